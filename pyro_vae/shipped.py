"""Where the files the project ships (MNIST under data/mnist, the trained runs under pretrained/) are found.

In a checkout they lie beside the package; the wheel carries them as package data under pyro_vae/_data/
(pyproject.toml's force-include), so an installed pyro_vae finds them from any folder, offline.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def shipped(checkout: str, packaged: str) -> Path:
    """The checkout's folder checkout (relative to the project root) where it exists, else the wheel's
    pyro_vae/_data/packaged."""
    path = PACKAGE.parent / checkout
    return path if path.is_dir() else PACKAGE / "_data" / packaged

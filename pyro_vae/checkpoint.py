"""Save and load a run: one checkpoint file carries the config, so it alone rebuilds everything.

`load` returns a `TrainedVAE` (trained.py), the run to inspect.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from .config import Config
from .model import build_vae
from .trained import TrainedVAE

FORMAT = "pyro_vae.checkpoint/1"
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"  # one JSON line per epoch, appended by the trainer
PRETRAINED = Path(__file__).resolve().parent.parent / "pretrained"  # the trained runs that ship with the project


class CheckpointError(Exception):
    """A run's checkpoint (or metrics file) is missing, unreadable, or does not fit the code that reads it."""


def save_checkpoint(path: Path, state: dict) -> None:
    """Write state atomically: a kill at any moment leaves the previous file readable."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _locate(path: str | Path) -> Path:
    """path itself, or, for "pretrained/NAME" not found from here, the shipped run of that name."""
    path = Path(path).expanduser()
    if not path.exists() and path.parts[:1] == ("pretrained",):  # "pretrained/conv32" from any directory
        path = PRETRAINED.joinpath(*path.parts[1:])
    return path


def run_directory(run: str | Path) -> Path:
    """The directory of a run given as a directory, as its checkpoint file or as "pretrained/NAME"."""
    run = _locate(run)
    return run if run.is_dir() else run.parent


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict at path (a run directory or a .pt file), loaded without running any code."""
    path = _locate(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holding objects we refuse to unpickle
        raise CheckpointError(f"{path} is not a readable pyro_vae checkpoint: {e}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a pyro_vae checkpoint (expected format {FORMAT})")
    return state


def load(path: str | Path, device: str | None = None) -> TrainedVAE:
    """Load a run directory or checkpoint file for inspection on `device` (default: the CPU)."""
    state = read_checkpoint(path)
    try:
        config = Config.from_dict(state["config"])
        problems = dataclasses.replace(config, device="cpu").errors()  # the device is chosen here, not there
        if problems:
            raise ValueError("; ".join(problems))
        vae = build_vae(config)
        vae.load_state_dict(state["model"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"{path} does not fit this version of pyro_vae: {e}") from e
    return TrainedVAE(vae.to(device or "cpu"), config, state)

"""Figures: image grids and training curves."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torchvision.utils import save_image


def image_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> None:
    """Save images (N, 1, 28, 28) in [0, 1] as one PNG grid, nrow images per row."""
    save_image(images.detach().float().cpu(), path, nrow=nrow, padding=2, pad_value=1.0)


def reconstruction_grid(originals: torch.Tensor, reconstructions: torch.Tensor, path: Path, nrow: int = 8) -> None:
    """Rows of originals, each followed by a row of their reconstructions."""
    rows = []
    for start in range(0, len(originals), nrow):
        rows += [originals[start:start + nrow], reconstructions[start:start + nrow]]
    image_grid(torch.cat(rows), path, nrow)


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_curve(run_dir: Path, path: Path | None = None) -> Path:
    """Train and test ELBO per epoch, from the run's metrics file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    path = Path(path or Path(run_dir) / "loss.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [r["epoch"] for r in rows]
    ax.plot(epochs, [r["train_elbo"] for r in rows], "o-", label="train ELBO")
    ax.plot(epochs, [r["test_elbo"] for r in rows], "s-", label="test ELBO")
    ax.set_xlabel("epoch")
    ax.set_ylabel("ELBO (nats per image)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

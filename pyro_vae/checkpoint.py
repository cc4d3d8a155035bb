"""Save and load a run: one checkpoint file carries the config, so it alone rebuilds everything."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from pyro import poutine

from .config import Config
from .model import VAE, build_vae
from .nets import IMAGE_SHAPE

FORMAT = "pyro_vae.checkpoint/1"
CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable, or does not fit the code that reads it."""


def save_checkpoint(path: Path, state: dict) -> None:
    """Write state atomically: a kill at any moment leaves the previous file readable."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_directory(run: str | Path) -> Path:
    """The directory of a run given as a directory or as its checkpoint file."""
    run = Path(run).expanduser()
    return run if run.is_dir() else run.parent


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict at path (a run directory or a .pt file), loaded without running any code."""
    path = Path(path).expanduser()
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


class TrainedVAE:
    """A trained VAE for inspection: the Pyro model and guide plus encode/decode/sample/reconstruct."""

    def __init__(self, vae: VAE, config: Config, state: dict | None = None):
        self.vae, self.config = vae.eval(), config
        self.epoch = (state or {}).get("epoch")
        self.device = next(vae.parameters()).device

    @property
    def model(self):
        return self.vae.model

    @property
    def guide(self):
        return self.vae.guide

    def _to(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else torch.as_tensor(t).to(self.device)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, y=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Loc and scale of the encoder's Gaussian q(z | x) (the IAF guide's base), each (B, latent_dim)."""
        x = self._to(x).reshape(-1, *IMAGE_SHAPE)
        return self.vae.encoder(x, self.vae._one_hot(self._labels(y, len(x))))

    @torch.no_grad()
    def decode(self, z: torch.Tensor, y=None) -> torch.Tensor:
        """Mean of p(x | z) (p(x | z, y) for the CVAE): images (..., 1, 28, 28)."""
        z = self._to(z)
        y = self._labels(y, z.shape[0] if z.ndim > 1 else None)
        return self.vae.likelihood(self.vae.decoder(z, self.vae._one_hot(y))).mean

    @property
    def labels_observed(self) -> bool:
        """Whether the model is told each image's label (the fully supervised CVAE)."""
        return self.config.conditional and not self.config.labels

    def _labels(self, y, n: int | None = None) -> torch.Tensor | None:
        """Labels as a (B,) long tensor on the device; an int means that digit for all; None where unused."""
        if y is None or not self.config.conditional:
            return None
        y = torch.as_tensor(y, device=self.device, dtype=torch.long)
        return y.expand(n) if y.ndim == 0 and n is not None else y

    @torch.no_grad()
    def sample(self, n: int, y=None) -> torch.Tensor:
        """n images from the generative model: z from the prior (given digit y, for the CVAE), then E[x | z]."""
        template = torch.zeros(n, *IMAGE_SHAPE, device=self.device)  # only its shape is used
        y = self._labels(y, n)
        model = poutine.uncondition(self.vae.model)  # x (and y) are drawn, not observed ...
        if y is not None:
            model = poutine.condition(model, data={"y": y})  # ... except the digit asked for
        trace = poutine.trace(model).get_trace(template)
        return trace.nodes["x"]["fn"].mean

    def sample_grid(self, per_row: int = 8) -> torch.Tensor:
        """Samples for the per-epoch picture: 8 x 8, or for the CVAE one row per digit 0-9."""
        if self.config.conditional:
            return self.sample(10 * per_row, torch.arange(10).repeat_interleave(per_row))
        return self.sample(per_row * per_row)

    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """The most probable digit under q(y | x), for the semi-supervised model: (B,)."""
        if self.vae.classifier is None:
            raise ValueError("this model has no classifier q(y | x); train with --conditional --labels N")
        return self.vae.classifier(self._to(x).reshape(-1, *IMAGE_SHAPE)).argmax(-1)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y=None) -> torch.Tensor:
        """Decode the posterior mean of each image: (B, 1, 28, 28); the CVAE uses labels y (or q(y | x))."""
        if self.config.conditional and y is None and self.vae.classifier is not None:
            y = self.classify(x)
        if self.vae.ladder:  # the ladder's q(z | z2, x) merges the encoder's Gaussian with p(z | z2): the guide's mean
            x = self._to(x).reshape(-1, *IMAGE_SHAPE)
            return self.decode(poutine.trace(self.vae.guide).get_trace(x).nodes["z"]["fn"].mean)
        loc, _ = self.encode(x, y)
        return self.decode(loc, y)


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

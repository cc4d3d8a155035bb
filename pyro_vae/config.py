"""The one Config dataclass, and the command line that fills it (one flag per field)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _opt(default, help: str, *, choices=None, minimum=None, maximum=None, nargs=None):
    """A dataclass field that also describes its CLI flag and its allowed range."""
    meta = {"help": help, "choices": choices, "min": minimum, "max": maximum, "nargs": nargs}
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    """Every hyperparameter of a run; saved in the run directory and in each checkpoint."""

    # optimisation
    epochs: int = _opt(15, "passes over the training set", minimum=1)
    batch_size: int = _opt(128, "images per SVI step", minimum=1)
    lr: float = _opt(1e-3, "Adam learning rate", minimum=0.0)
    num_particles: int = _opt(1, "samples of z per image in the ELBO estimate", minimum=1)
    max_steps: int = _opt(0, "stop after this many SVI steps in all (0: no cap; for smoke runs)", minimum=0)
    seed: int = _opt(0, "seed for every random number generator", minimum=0)
    # architecture
    latent_dim: int = _opt(32, "size of the latent z", minimum=1)
    arch: str = _opt("conv", "encoder/decoder networks", choices=("conv", "mlp"))
    conv_channels: tuple = _opt((32, 64), "channels of the two stride-2 conv layers", minimum=1, nargs=2)
    hidden_dim: int = _opt(400, "hidden units of the mlp networks", minimum=1)
    # data
    binarize: str = _opt("dynamic", "dynamic: fresh Bernoulli draw per use; threshold: pixel > 0.5; none: grey",
                         choices=("dynamic", "threshold", "none"))
    train_size: int = _opt(0, "use only the first N training images (0: all 60,000)", minimum=0)
    test_size: int = _opt(0, "use only the first N test images (0: all 10,000)", minimum=0)
    data_dir: str = _opt("~/.cache/pyro_vae", "where MNIST is unpacked (torchvision layout: DATA_DIR/MNIST/raw)")
    download: bool = _opt(False, "let torchvision download MNIST into --data-dir instead of using the shipped files")
    # where and how
    device: str = _opt(_default_device, "torch device (default: cuda when available, else cpu)")
    out: str = _opt("", "run directory (default: runs/<date>-<time>)")
    eval_batch_size: int = _opt(1000, "images per batch when evaluating", minimum=1)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(unknown)}")
        kwargs = {k: tuple(v) if known[k].type == "tuple" else v for k, v in d.items()}
        return cls(**kwargs)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def describe(self) -> str:
        return "\n".join(f"  {k:16s} {v}" for k, v in self.to_dict().items())

    def errors(self) -> list[str]:
        """Every problem with the values, each naming its flag; empty when the config is usable."""
        problems = []
        for f in dataclasses.fields(self):
            meta, value, flag = f.metadata, getattr(self, f.name), _flag(f.name)
            values = value if isinstance(value, tuple) else (value,)
            for v in values:
                if meta.get("choices") and v not in meta["choices"]:
                    problems.append(f"{flag} must be one of {', '.join(meta['choices'])}, not {v!r}")
                if meta.get("min") is not None and v < meta["min"]:
                    problems.append(f"{flag} must be at least {meta['min']}, not {v}")
                if meta.get("max") is not None and v > meta["max"]:
                    problems.append(f"{flag} must be at most {meta['max']}, not {v}")
        if self.lr == 0:
            problems.append("--lr must be positive, not 0")
        for name in ("train_size", "test_size"):
            limit = {"train_size": 60000, "test_size": 10000}[name]
            if getattr(self, name) > limit:
                problems.append(f"{_flag(name)} must be at most {limit}, not {getattr(self, name)}")
        train_n = self.train_size or 60000
        if self.batch_size > train_n:
            problems.append(f"--batch-size must be at most the number of training images ({train_n}), "
                            f"not {self.batch_size}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            problems.append(f"--device must be cpu or cuda[:N], not {self.device!r}")
        elif self.device.startswith("cuda") and not torch.cuda.is_available():
            problems.append(f"--device {self.device} was asked for, but this machine has no CUDA device; "
                            "use --device cpu")
        return problems


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pyro_vae.train",
        description="Train a variational autoencoder on MNIST with Pyro's SVI.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = Config()
    for f in dataclasses.fields(Config):
        meta, default = f.metadata, getattr(defaults, f.name)
        if f.type == "bool":
            parser.add_argument(_flag(f.name), action="store_true", help=meta["help"])
            continue
        kind = {"int": int, "float": float, "str": str, "tuple": int}[f.type]
        parser.add_argument(_flag(f.name), type=kind, default=default, help=meta["help"],
                            choices=meta.get("choices"), nargs=meta.get("nargs"),
                            metavar=f.name.upper() if meta.get("choices") is None else None)
    return parser


def parse_args(argv=None) -> Config:
    """Parse command-line flags into a checked Config; bad values exit with code 2 and a message."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    config = Config.from_dict(args)
    problems = config.errors()
    if problems:
        parser.error("; ".join(problems))
    return config

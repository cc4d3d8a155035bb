"""Save and load a run: one checkpoint file carries the config, so it alone rebuilds everything.

`load` returns a `TrainedVAE` (trained.py), the run to inspect.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch

from .config import Config
from .model import build_vae
from .shipped import shipped
from .trained import TrainedVAE

FORMAT = "pyro_vae.checkpoint/1"
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"  # one JSON line per epoch, appended by the trainer
NEARLY_FULL = 1 << 20  # bytes: a write that fails with less free than this failed for want of space
PRETRAINED = shipped("pretrained", "pretrained")  # the trained runs that ship with the project (or with the wheel)


class CheckpointError(Exception):
    """A run's checkpoint (or metrics file) is missing, unreadable, or does not fit the code that reads it."""


def write_atomically(path: Path, write) -> None:
    """Write a file whole or not at all: write(f) fills a temporary file beside path, which then replaces path; an
    interrupted or failed write leaves the previous file (or none) and no temporary file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write state atomically: a kill at any moment leaves the previous file readable, and a failed write (a full
    disk) leaves it too, removes the partial file and raises CheckpointError saying why."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        reason = _write_failure(e, path.parent)  # before the partial file goes: it may hold the last free bytes
        tmp.unlink(missing_ok=True)
        if reason is None:  # an interruption (Ctrl-C), not a failure to write
            raise
        raise CheckpointError(f"cannot write {path}: {reason}; the previous checkpoint there is kept") from e


def _write_failure(e: BaseException, folder: Path) -> str | None:
    """Why writing into folder failed, in words; None for an interruption, which is no failure of the disk.

    torch.save reports a full disk as "enforce fail at inline_container.cc" (the errno is lost on the way),
    so a disk with (almost) no free space left is taken to be the cause.
    """
    if not isinstance(e, (OSError, RuntimeError)):
        return None
    free = shutil.disk_usage(folder).free
    if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or free < NEARLY_FULL:
        return f"no space left on the device of the run directory {folder} ({free:,} bytes free)"
    return str(e)


def _locate(path: str | Path) -> Path:
    """path itself, or, for "pretrained/NAME" or a bare "NAME" not found from here, the shipped run of that name."""
    path = Path(path).expanduser()
    if not path.exists() and path.parts[:1] == ("pretrained",):  # "pretrained/conv32" from any directory
        path = PRETRAINED.joinpath(*path.parts[1:])
    elif not path.exists() and len(path.parts) == 1 and (PRETRAINED / path).is_dir():  # "conv32"
        path = PRETRAINED / path
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
        with warnings.catch_warnings():  # torch warns of a pickle protocol it did not write, before refusing it
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holding objects we refuse to unpickle
        if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e):
            # torch's message advises loading the file again with weights_only=False, which would run whatever
            # code it holds: not relayed
            raise CheckpointError(f"{path} is not a pyro_vae checkpoint and may be unsafe; it was not loaded") from None
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

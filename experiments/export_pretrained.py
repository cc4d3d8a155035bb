#!/usr/bin/env python
"""Copy a run into pretrained/NAME without the optimizer and RNG state: what `pyro_vae.load` needs.

    uv run python experiments/export_pretrained.py RUN NAME
"""
import sys
from pathlib import Path

from pyro_vae import Config
from pyro_vae.checkpoint import (CHECKPOINT_NAME, METRICS_NAME, PRETRAINED, read_checkpoint, run_directory,
                                 save_checkpoint)

KEEP = ("config", "epoch", "step", "model", "best_test_elbo")  # save_checkpoint adds the format


def export(run: str, name: str) -> Path:
    state, dest = read_checkpoint(run), PRETRAINED / name
    dest.mkdir(parents=True, exist_ok=True)
    config = Config.from_dict({**state["config"], "out": f"pretrained/{name}"})
    save_checkpoint(dest / CHECKPOINT_NAME, {**{k: state[k] for k in KEEP}, "config": config.to_dict()})
    config.save(dest / "config.json")
    (dest / METRICS_NAME).write_text((run_directory(run) / METRICS_NAME).read_text())
    print(dest, sum(p.numel() for p in state["model"].values()), "numbers")
    return dest


if __name__ == "__main__":
    export(*sys.argv[1:])

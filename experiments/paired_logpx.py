"""Two or more runs' log p(x) on the same test images, and each one's difference from the first with its paired
standard error: whether a lever's short row is ahead by more than the noise.

    uv run python experiments/paired_logpx.py BASE_RUN OTHER_RUN [...] --limit 500 --k 100

Each run's estimate is `pyro_vae.evaluate.importance_estimates` on the first LIMIT test images (as the first run's
config binarizes them: the same images for every run of the MNIST family) from the seed given. The difference
of two rows' means is the mean of the per-image differences, and its standard error is theirs over the images,
smaller than either row's own ± (which includes how images differ from each other).
"""

from __future__ import annotations

import argparse
import sys

import pyro
import torch

import pyro_vae
from pyro_vae.checkpoint import CheckpointError
from pyro_vae.datasets import load_data
from pyro_vae.evaluate import importance_estimates


def per_image_log_px(run, x: torch.Tensor, k: int, seed: int, batch: int = 50) -> torch.Tensor:
    """log p(x) of each image of x (K = k), shape (len(x),)."""
    pyro.set_rng_seed(seed)
    return torch.cat([importance_estimates(run.vae, x[i:i + batch], num_samples=k).log_px
                      for i in range(0, len(x), batch)])


def paired(runs: list, x: torch.Tensor, k: int, seed: int) -> list[dict]:
    """Per run: its mean log p(x), and for every run after the first its mean difference from the first and the
    standard error of that difference over the images."""
    estimates = [per_image_log_px(run, x, k, seed) for run in runs]
    rows = []
    for estimate in estimates:
        difference = estimate - estimates[0]
        rows.append({"log_px": estimate.mean().item(), "difference": difference.mean().item(),
                     "stderr": (difference.std() / len(difference) ** 0.5).item()})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories; the first is the baseline")
    parser.add_argument("--limit", type=int, default=500, help="the first N test images")
    parser.add_argument("--k", type=int, default=100, help="importance samples an image")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if len(args.runs) < 2 or args.limit < 2 or args.k < 1:
        parser.error("give at least two runs, --limit of at least 2 and --k of at least 1")
    try:
        runs = [pyro_vae.load(path) for path in args.runs]
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    x = load_data(runs[0].config).test_images[:args.limit]
    for i, (path, row) in enumerate(zip(args.runs, paired(runs, x, args.k, args.seed))):
        versus = f"   {row['difference']:+.3f} +- {row['stderr']:.3f} against the first" if i else ""
        print(f"{path}: log p(x) {row['log_px']:.3f} (K = {args.k}, first {len(x)}){versus}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

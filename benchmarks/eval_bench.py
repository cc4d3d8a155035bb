"""Evaluation speed: evaluate's old defaults (100 images x 100 draws per forward pass, torch's threads, contiguous
weights) against its automatic sizing and threads and, on the CPU, channels-last conv weights, on the same run, K
and images, run alternately; the median of each and their ratio.

    uv run python -m benchmarks.eval_bench pretrained/conv32 --k 1000 --limit 100 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from pyro_vae.checkpoint import CheckpointError, load
from pyro_vae.data import DataError
from pyro_vae import model
from pyro_vae.evaluate import evaluate_run

# evaluate's defaults before they were sized from memory: 100 x 100, as many threads as torch starts with, and
# the weights as they are stored (contiguous), not channels-last
OLD_SIZING = {"batch_size": 100, "chunk": 100, "threads": torch.get_num_threads(), "channels_last": False}
AUTOMATIC = {"batch_size": None, "chunk": None, "threads": None, "channels_last": True}


@contextmanager
def _weights_as_stored(channels_last: bool):
    """Where channels_last is False, evaluate_run runs the conv weights contiguous, as it did before."""
    if channels_last:
        yield
        return
    saved = model.MEMORY_FORMAT.get("cpu")
    model.MEMORY_FORMAT["cpu"] = torch.contiguous_format
    try:
        yield
    finally:
        model.MEMORY_FORMAT["cpu"] = saved


def time_evaluation(run, *, k: int, limit: int, batch_size: int | None, chunk: int | None, threads: int | None,
                    channels_last: bool = True, data_dir: str | None = None) -> dict:
    """One evaluate_run: wall, user and system seconds, the sizes and threads it used and its log p(x)."""
    before, started = os.times(), time.perf_counter()
    with _weights_as_stored(channels_last):
        results = evaluate_run(run, k=k, limit=limit, batch_size=batch_size, chunk=chunk, threads=threads,
                               data_dir=data_dir, progress=False)
    wall, after = time.perf_counter() - started, os.times()
    return {"wall_s": wall, "user_s": after.user - before.user, "system_s": after.system - before.system,
            "batch_size": results["batch_size"], "chunk": results["chunk"], "threads": results["threads"],
            "log_px": results["log_px"]["mean"]}


def compare(run, *, k: int, limit: int, repeats: int, data_dir: str | None = None) -> dict:
    """The old sizing and the automatic one alternately, `repeats` times each; medians and old / automatic."""
    time_evaluation(run, k=2, limit=2, data_dir=data_dir, **AUTOMATIC)  # warm-up: first-call costs to neither side
    runs = {"old": [], "automatic": []}
    for _ in range(repeats):
        for side, sizing in (("old", OLD_SIZING), ("automatic", AUTOMATIC)):
            runs[side].append(time_evaluation(run, k=k, limit=limit, data_dir=data_dir, **sizing))
    sides = {side: {"batch_size": timed[0]["batch_size"], "chunk": timed[0]["chunk"],
                    "threads": [t["threads"] for t in timed],
                    **{f"median_{key}": statistics.median(t[key] for t in timed)
                       for key in ("wall_s", "user_s", "system_s")}, "runs": timed}
             for side, timed in runs.items()}
    return {"k": k, "images": limit, "repeats": repeats, "device": str(run.device),
            "load_average": os.getloadavg()[0], "sides": sides,
            "ratio": sides["old"]["median_wall_s"] / sides["automatic"]["median_wall_s"]}


def format_comparison(result: dict) -> str:
    lines = [f"evaluate_run, K = {result['k']}, {result['images']} images, {result['device']}, median of "
             f"{result['repeats']} runs each, run alternately (load average at the end {result['load_average']:.1f})",
             f"  {'sizing':10s} {'images x draws':>15s} {'threads':>8s} {'wall s':>8s} {'user s':>8s} {'system s':>9s}"]
    for side, s in result["sides"].items():
        threads = ",".join(str(t) for t in s["threads"])
        lines.append(f"  {side:10s} {s['batch_size']:>6d} x {s['chunk']:<6d} {threads:>8s} {s['median_wall_s']:8.1f} "
                     f"{s['median_user_s']:8.1f} {s['median_system_s']:9.1f}")
    lines.append(f"  ratio old / automatic (wall): {result['ratio']:.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.eval_bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("run", nargs="?", default="pretrained/conv32", help="run directory or checkpoint file")
    parser.add_argument("--k", type=int, default=1000, help="draws from q(z|x) per image")
    parser.add_argument("--limit", type=int, default=100, help="the first N test images")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each sizing")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--data-dir", default=None, help="where MNIST is unpacked (default: the run's --data-dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    for flag, value in (("--k", args.k), ("--limit", args.limit), ("--repeats", args.repeats)):
        if value < 1:
            parser.error(f"{flag} must be at least 1, not {value}")
    if not (args.device == "cpu" or (args.device.startswith("cuda") and torch.cuda.is_available())):
        parser.error(f"--device {args.device} is not available here")
    try:
        result = compare(load(args.run, device=args.device), k=args.k, limit=args.limit, repeats=args.repeats,
                         data_dir=args.data_dir)
    except (CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_comparison(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a variant's training step costs against the default's: the trainer's own step, interleaved, median ratio.

    uv run python benchmarks/step_cost.py "--prior flow --guide iaf" "--layers 2 --upper-dims 16" --threads 1

Each VARIANT is a string of `python -m pyro_vae.train` flags, parsed and checked by the trainer's own
command line; the baseline is that command's default config. Every side is the VAE from `build_vae`
stepped by `SVIStep` (benchmarks/bench.py's `ProjectTrainer`) on real MNIST batches, drawn as the
trainer draws them. The sides run in turn (default, variant 1, variant 2, ..., then again) after a
warm-up, and each variant's figure is the median over the rounds of (its block time / the default's
block time in the same round), so a burst of load from another process hits both alike.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: the project root on the path, as `-m benchmarks.step_cost` has it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench import ProjectTrainer, batch_drawer, interleaved_times, quartiles  # noqa: E402
from pyro_vae.config import Config, default_device, parse_args  # noqa: E402
from pyro_vae.data import load_mnist  # noqa: E402


def step_costs(base: Config, variants: dict[str, Config], data, *, steps: int, repeats: int, warmup: int
               ) -> dict[str, dict]:
    """Per side: milliseconds per step (median block), parameters, and for each variant the median and quartiles
    of (variant block time / default block time) over the rounds, by wall and by process CPU time."""
    device = torch.device(base.device)
    sides = {"default": ProjectTrainer(base, data.num_train, device),
             **{name: ProjectTrainer(config, data.num_train, device) for name, config in variants.items()}}
    times = interleaved_times(sides, batch_drawer(data, base.batch_size), steps, repeats, warmup, device)
    results = {}
    for name, t in times.items():
        row = {"ms_per_step": 1000 * statistics.median(t["wall"]) / steps,
               "parameters": sum(p.numel() for p in sides[name].vae.parameters())}
        if name != "default":
            for clock in ("wall", "cpu"):
                ratios = [a / b for a, b in zip(t[clock], times["default"][clock])]
                row[f"ratio_{clock}"] = dict(zip(("q1", "median", "q3"), quartiles(ratios)))
        results[name] = row
    return results


def format_table(results: dict, batch_size: int, threads: int, device: str) -> str:
    lines = [f"training step against the default's: batch {batch_size}, {device}, {threads} thread(s); "
             "median over interleaved rounds (quartiles)",
             f"  {'variant':44s} {'ms/step':>8s} {'x default (wall)':>22s} {'x default (CPU time)':>22s}"]
    for name, row in results.items():
        cells = ["", ""] if name == "default" else [
            f"{r['median']:.3f} ({r['q1']:.2f}-{r['q3']:.2f})" for r in (row["ratio_wall"], row["ratio_cpu"])]
        lines.append(f"  {name or 'default':44s} {row['ms_per_step']:8.1f} {cells[0]:>22s} {cells[1]:>22s}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", metavar="VARIANT", help="training flags of a variant, quoted")
    parser.add_argument("--batch-size", type=int, default=Config().batch_size)
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--data-dir", default=Config().data_dir)
    parser.add_argument("--train-size", type=int, default=10000, help="training images to draw batches from")
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed block")
    parser.add_argument("--repeats", type=int, default=15, help="rounds of blocks (one block per side each)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed blocks per side first")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures here")
    args = parser.parse_args(argv)
    for flag in ("batch_size", "train_size", "steps", "repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, not {getattr(args, flag)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    shared = ["--batch-size", str(args.batch_size), "--device", args.device, "--train-size", str(args.train_size),
              "--data-dir", args.data_dir]
    base = parse_args(shared)  # exits 2 with the trainer's own message on a bad value
    variants = {flags: parse_args(shlex.split(flags) + shared) for flags in args.variants}
    data = load_mnist(args.data_dir, binarize=base.binarize, device=base.device, train_size=args.train_size,
                      test_size=1)
    results = step_costs(base, variants, data, steps=args.steps, repeats=args.repeats, warmup=args.warmup)
    print(format_table(results, args.batch_size, torch.get_num_threads(), args.device))
    if args.json:
        Path(args.json).write_text(json.dumps({"batch_size": args.batch_size, "device": args.device,
                                               "threads": torch.get_num_threads(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

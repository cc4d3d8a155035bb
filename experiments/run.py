"""Run an experiment: train, evaluate, and add a row to experiments/results.csv and the table in docs/results.md.

    uv run python experiments/run.py tf_tutorial            # the short version: train, evaluate, add the row
    uv run python experiments/run.py conv32 --full          # the full version
    uv run python experiments/run.py conv32 --full --run ~/pyro_vae_runs/conv32-full   # a run trained (and
                                      # resumed) by python -m pyro_vae.train: evaluate it (resumably), add the row
    uv run python experiments/run.py --list
    uv run python experiments/run.py --table                # rewrite docs/results.md's table from results.csv

Each experiment is a TOML file in experiments/configs/: Config fields under [config], and the
fields that differ between the short and the full version under [short] and [full].
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import subprocess
import sys
import time
import tomllib
from datetime import date
from pathlib import Path

import torch

from pyro_vae import Config, load
from pyro_vae.checkpoint import read_checkpoint
from pyro_vae.data import load_mnist
from pyro_vae.evaluate import evaluate_run, partial_path
from pyro_vae.plot import read_metrics
from pyro_vae.train import train

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
RESULTS = HERE / "results.csv"
RESULTS_PAGE = HERE.parent / "docs" / "results.md"
COLUMNS = ["experiment", "version", "variant", "epochs", "device", "train_minutes", "test_elbo", "log_px", "k",
           "images", "active_units", "extra", "date", "commit"]
TABLE_START, TABLE_END = "<!-- results:start -->", "<!-- results:end -->"
RUN_ONLY = {"out", "device", "data_dir", "epochs", "cuda_graph",  # where and how long a run ran, not what it is
            "image_shape", "num_classes"}  # and what the trainer read off its data (datasets.fill_config)


def experiment(name: str) -> dict:
    path = CONFIGS / f"{name}.toml"
    if not path.is_file():
        raise SystemExit(f"error: no experiment {name!r}; see --list")
    return tomllib.loads(path.read_text())


def experiment_config(name: str, full: bool, out_root: Path, device: str | None, epochs: int | None = None
                      ) -> Config:
    """The Config of one version of an experiment (epochs: a shorter or longer budget), checked like the CLI."""
    spec = experiment(name)
    version = "full" if full else "short"
    settings = {**spec.get("config", {}), **spec.get(version, {})}
    settings["out"] = str(out_root / f"{name}-{version}-{date.today():%Y%m%d}-{int(time.time()) % 100000}")
    if device:
        settings["device"] = device
    if epochs:
        settings["epochs"] = epochs
    config = Config.from_dict({**Config().to_dict(), **settings})
    problems = config.errors()
    if problems:
        raise SystemExit(f"error: experiment {name}: " + "; ".join(problems))
    return config


def _commit() -> str:
    """The checkout's commit (-dirty if pyro_vae/ has changes); empty where there is no git or no repository."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True).stdout.strip()
        except OSError:  # no git on this machine (a copy of the working tree on a lent GPU)
            return ""

    head = git("rev-parse", "--short", "HEAD")
    return head + ("-dirty" if head and git("status", "--porcelain", "pyro_vae") else "")


def _variant(config: Config) -> str:
    """The fields that differ from the defaults, as flags."""
    default = Config()
    changed = [f for f in dataclasses.fields(Config)
               if f.name not in RUN_ONLY and getattr(config, f.name) != getattr(default, f.name)]
    def value(v) -> str:
        return " ".join(map(str, v)) if isinstance(v, tuple) else str(v)  # as typed: --upper-dims 16 8

    return " ".join(f"--{f.name.replace('_', '-')} {value(getattr(config, f.name))}" for f in changed) or "defaults"


def extra_figures(run_dir: Path, trained, figures: dict) -> str:
    """Figures beyond the table's columns: the last epoch's single-sample test ELBO on the whole test set; for
    the CVAE, how often an independent classifier recognises the digit asked for in its samples;
    semi-supervised, the test accuracy of q(y | x). figures: what evaluate_run reported for the run."""
    last = read_metrics(run_dir)[-1]
    extra = [f"test ELBO on all {figures['num_test_images']} test images {last['test_elbo']:.2f}",
             f"KL {figures['kl']['mean']:.2f}"]
    if figures["labels_observed"]:
        extra.append("log p(x, y) given the test labels, not log p(x)")
    if trained.config.conditional:
        from digit_classifier import sample_recognition

        extra.append(f"samples recognised {sample_recognition(trained):.3f}")
    if "test_accuracy" in last:
        extra.append(f"classifier accuracy {last['test_accuracy']:.4f}")
        if trained.config.binarize != "none":
            extra.append(f"on the grey test images {grey_test_accuracy(trained):.4f}")
    return "; ".join(extra)


def grey_test_accuracy(trained) -> float:
    """q(y | x)'s accuracy on the grey (not binarized) test images: how Pyro's tutorial measures it."""
    config = trained.config
    grey = load_mnist(config.data_dir, binarize="none", test_size=config.test_size, split="test")
    return (trained.classify(grey.test_images).cpu() == grey.test_labels).float().mean().item()


def run(name: str, *, full: bool, k: int, limit: int, out_root: Path, device: str | None,
        epochs: int | None = None) -> dict:
    """Train and evaluate one experiment; append its row to the results file and docs/results.md."""
    config = experiment_config(name, full, out_root, device, epochs)
    commit = _commit()  # the code that trains, even if the checkout moves on before the row is written
    started = time.perf_counter()
    run_dir = train(config)
    minutes = (time.perf_counter() - started) / 60
    trained = load(run_dir, device=config.device)
    figures = evaluate_run(trained, k=k, limit=limit, device=config.device)
    (run_dir / "evaluation.json").write_text(json.dumps(figures, indent=2) + "\n")  # every figure, beside the row's
    return _add_row(results_row(name, full, run_dir, trained, figures, minutes, commit))


def record(name: str, run_dir: Path, *, full: bool, k: int, limit: int, device: str | None = None) -> dict:
    """Evaluate a run that `python -m pyro_vae.train` trained (and perhaps resumed) as an experiment, and add its row.

    For long runs: train them with the trainer's own command into a directory outside the checkout, resume them
    as often as needed, then record them here. The run's config must be the experiment's (its out, device, data
    directory and epochs aside: the row records the epochs). The evaluation resumes too: a partial file beside
    RUN/evaluation.json keeps the finished batches. train min is the sum of the epochs' training seconds.
    """
    state = read_checkpoint(run_dir)
    trained = load(run_dir, device=device or "cpu")
    expected = experiment_config(name, full, Path(run_dir).parent, device, trained.config.epochs)
    differ = [f.name for f in dataclasses.fields(Config) if f.name not in RUN_ONLY
              and getattr(expected, f.name) != getattr(trained.config, f.name)]
    if differ:
        raise SystemExit(f"error: {run_dir} is not a run of {name} ({'full' if full else 'short'}): its "
                         + ", ".join(f"--{f.replace('_', '-')} {getattr(trained.config, f)!r} (the experiment's: "
                                     f"{getattr(expected, f)!r})" for f in differ))
    rows = read_metrics(run_dir)
    if state["epoch"] < trained.config.epochs or "position" in state:
        raise SystemExit(f"error: {run_dir} has trained {state['epoch']} of its {trained.config.epochs} epochs; "
                         f"finish it first: python -m pyro_vae.train --resume {run_dir}")
    out = Path(run_dir) / "evaluation.json"
    figures = evaluate_run(trained, k=k, limit=limit, partial=partial_path(out))
    out.write_text(json.dumps(figures, indent=2) + "\n")
    partial_path(out).unlink(missing_ok=True)
    minutes = sum(r["seconds"] for r in rows) / 60
    row = results_row(name, full, Path(run_dir), trained, figures, minutes, _commit())
    sessions = state.get("sessions", [])
    devices = {(s["device"], s["processes"]) for s in sessions}
    if len(devices) == 1:  # the sessions' device, and their threads (a range where resumes changed them)
        (kind, processes), threads = devices.pop(), sorted({s["threads"] for s in sessions})
        device_name = _device_name(kind, threads[0]) if len(threads) == 1 or kind.startswith("cuda") \
            else f"CPU ({threads[0]}-{threads[-1]} threads)"
        row["device"] = device_name + (f" x {processes} processes" if processes > 1 else "")
    resumed = [s["step"] for s in sessions if s["step"] > 0]
    row["extra"] += (f"; trained by python -m pyro_vae.train, resumed at step{'s' if len(resumed) > 1 else ''} "
                     f"{', '.join(map(str, resumed))}" if resumed else "; trained by python -m pyro_vae.train")
    row["extra"] += f"; evaluated in {figures['seconds'] / 60:.1f} min ({figures['threads']} thread(s))"
    return _add_row(row)


def _add_row(row: dict) -> dict:
    append_row(row, RESULTS)
    write_table()
    print(f"experiment {row['experiment']}: " + ", ".join(f"{key} {row[key]}" for key in COLUMNS[3:11]))
    return row


def results_row(name: str, full: bool, run_dir: Path, trained, figures: dict, minutes: float, commit: str) -> dict:
    """The results.csv row of a trained run; figures: what evaluate_run reported for it."""
    config = trained.config
    return {
        "experiment": name, "version": "full" if full else "short", "variant": _variant(config),
        "epochs": config.epochs, "device": _device_name(config.device), "train_minutes": f"{minutes:.1f}",
        "test_elbo": f"{figures['elbo']['mean']:.2f}", "log_px": f"{figures['log_px']['mean']:.2f}",
        "k": figures["k"], "images": figures["num_images"], "active_units": figures["active_units"],
        "extra": extra_figures(run_dir, trained, figures), "date": f"{date.today():%Y-%m-%d}", "commit": commit,
    }


def append_row(row: dict, path: Path) -> None:
    """Add one row to a results CSV, writing the header first if the file is new."""
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def _device_name(device: str, threads: int | None = None) -> str:
    """The device as the table names it: the GPU's name, or the CPU and its torch threads (default: this process's)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    threads = threads or torch.get_num_threads()
    return f"CPU ({threads} thread{'s' if threads > 1 else ''})"


def markdown_table() -> str:
    rows = list(csv.DictReader(open(RESULTS))) if RESULTS.exists() else []
    head = ("| experiment | version | variant | epochs | device | train min | test ELBO | log p(x) (K) | images "
            "| active units | other | date | commit |")
    lines = [head, "|" + " --- |" * 13]
    for r in rows:
        lines.append(f"| {r['experiment']} | {r['version']} | `{r['variant']}` | {r['epochs']} | {r['device']} | "
                     f"{r['train_minutes']} | {r['test_elbo']} | {r['log_px']} ({r['k']}) | {r['images']} | "
                     f"{r['active_units']} | {r['extra']} | {r['date']} | {r['commit']} |")
    return "\n".join(lines)


def write_table() -> None:
    """Replace the table between the markers of docs/results.md with the rows of results.csv."""
    text = RESULTS_PAGE.read_text()
    if TABLE_START not in text:
        return
    before, rest = text.split(TABLE_START, 1)
    after = rest.split(TABLE_END, 1)[1]
    RESULTS_PAGE.write_text(f"{before}{TABLE_START}\n{markdown_table()}\n{TABLE_END}{after}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="experiments to run, one after the other")
    parser.add_argument("--full", action="store_true", help="the full (GPU) version instead of the short one")
    parser.add_argument("--k", type=int, default=1000, help="importance samples for log p(x)")
    parser.add_argument("--limit", type=int, default=0, help="evaluate on the first N test images (0: all)")
    parser.add_argument("--device", help="override the device of the config")
    parser.add_argument("--epochs", type=int, help="override the epochs of the version (the row records them)")
    parser.add_argument("--out-root", type=Path, default=Path("runs/experiments"))
    parser.add_argument("--run", type=Path, metavar="RUN",
                        help="do not train: evaluate RUN, trained for the one experiment named with the trainer's "
                             "command (and finished), and add its row")
    parser.add_argument("--list", action="store_true", help="list the experiments")
    parser.add_argument("--table", action="store_true", help="rewrite the table of docs/results.md from results.csv")
    args = parser.parse_args(argv)
    if args.list:
        for path in sorted(CONFIGS.glob("*.toml")):
            print(f"{path.stem:40s} {tomllib.loads(path.read_text())['description']}")
        return 0
    if args.table:
        write_table()
        return 0
    if not args.names:
        parser.error("name at least one experiment (see --list)")
    for name in args.names:
        experiment(name)  # fail on a typo before hours of training
    if args.run:
        if len(args.names) != 1:
            parser.error("--run records one experiment's run: name that one experiment")
        record(args.names[0], args.run, full=args.full, k=args.k, limit=args.limit, device=args.device)
        return 0
    for name in args.names:
        run(name, full=args.full, k=args.k, limit=args.limit, out_root=args.out_root, device=args.device,
            epochs=args.epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())

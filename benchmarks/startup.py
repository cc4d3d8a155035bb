"""Where a training run's time outside its steps goes: start-up, the first step, each epoch's end, the last picture.

    uv run python benchmarks/startup.py                          # the default run, 3 steps
    uv run python benchmarks/startup.py -- --train-size 512 ...   # flags after -- go to the trainer

Runs `python -m pyro_vae.train --max-steps 3 --epochs 1` (plus the flags given) in this process, through the
trainer's own `main`, and times the pieces it calls by wrapping them: importing the package (torch and Pyro),
loading the images, building the networks, `torch.optim.Adam()` (whose first call imports torch._dynamo), the
first step (Pyro's checks run there), the end of the epoch (the test ELBO on every test image, the pictures, the
checkpoint) and the loss curve. Prints one JSON line of seconds. Run it a few times on a quiet machine: each
figure is one reading.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

START = time.perf_counter()
import torch  # noqa: E402

if __package__ in (None, ""):  # run as a script: the project root on the path, as `-m benchmarks.startup` has it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyro_vae.step  # noqa: E402
import pyro_vae.train  # noqa: E402

IMPORTED = time.perf_counter() - START

PIECES = {  # (module or class, attribute) -> its name in the result
    (pyro_vae.train, "load_data"): "load images",
    (pyro_vae.train, "build_vae"): "build networks",
    (torch.optim.Adam, "__init__"): "torch.optim.Adam (imports torch._dynamo)",
    (pyro_vae.step.SVIStep, "step"): "first step",
    (pyro_vae.train, "_end_of_epoch"): "end of epoch",
    (pyro_vae.train.plot, "loss_curve"): "loss curve",
}


def measure(train_flags: list[str]) -> dict[str, float]:
    """Seconds of each piece's first call in one short training run, and of the whole process so far."""
    seconds = {"import pyro_vae": IMPORTED}
    originals = {key: getattr(*key) for key in PIECES}

    def timed(key):
        real = originals[key]

        def call(*args, **kwargs):
            began = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                seconds.setdefault(PIECES[key], time.perf_counter() - began)
        return call

    for key in PIECES:
        setattr(*key, timed(key))
    try:
        with tempfile.TemporaryDirectory() as folder:
            code = pyro_vae.train.main(["--max-steps", "3", "--epochs", "1", "--out", str(Path(folder) / "run"),
                                        *train_flags])
    finally:
        for key, real in originals.items():
            setattr(*key, real)
    if code:
        raise SystemExit(code)
    seconds["whole process"] = time.perf_counter() - START
    return {name: round(value, 3) for name, value in seconds.items()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    print(json.dumps(measure(argv[1:] if argv[:1] == ["--"] else argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

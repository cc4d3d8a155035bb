"""torchrun data parallelism: 2 gloo processes on the CPU follow the loss trajectory of 1 process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 0.02  # relative: the ranks draw their own z and so differ from one process by sampling noise


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(data_dir, tmp_path):
    flags = ["--epochs", "3", "--train-size", "4096", "--test-size", "512", "--batch-size", "64",
             "--latent-dim", "4", "--conv-channels", "8", "16", "--binarize", "threshold",
             "--data-dir", str(data_dir), "--device", "cpu", "--seed", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "pyro_vae.train", *flags, "--out", str(tmp_path / "two")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "pyro_vae.train", *flags, "--out", str(tmp_path / "one")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-3000:]

    assert two.stdout.count("pyro_vae: training in") == 1  # only rank 0 speaks and writes
    rows_two, rows_one = _metrics(tmp_path / "two"), _metrics(tmp_path / "one")
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one] == [64, 128, 192]
    for a, b in zip(rows_two, rows_one):
        assert a["train_elbo"] == pytest.approx(b["train_elbo"], rel=TOLERANCE)
        assert a["test_elbo"] == pytest.approx(b["test_elbo"], rel=TOLERANCE)
    assert rows_two[-1]["train_elbo"] > rows_two[0]["train_elbo"] + 30  # and it learns


def test_global_batch_must_split_evenly_among_processes(monkeypatch, capsys):
    from pyro_vae.config import parse_args

    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit) as info:
        parse_args(["--batch-size", "64"])
    assert info.value.code == 2 and "divide evenly among the 3" in capsys.readouterr().err

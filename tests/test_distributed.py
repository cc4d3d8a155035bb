"""torchrun data parallelism: 2 gloo processes on the CPU follow the loss trajectory of 1 process."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import processes
from pyro_vae.checkpoint import read_checkpoint

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
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    # in two sessions: --stop-after 2 stops both ranks after epoch 2 (exit 0), and --resume does the third
    two = processes.run(torchrun + ["-m", "pyro_vae.train", *flags, "--out", str(tmp_path / "two"),
                                    "--stop-after", "2", "--tensorboard"], cwd=ROOT, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "FutureWarning" not in two.stderr, two.stderr[-3000:]  # DDP is built with its current arguments
    assert "as --stop-after asked" in two.stdout and read_checkpoint(tmp_path / "two")["epoch"] == 2
    rest = processes.run(torchrun + ["-m", "pyro_vae.train", "--resume", str(tmp_path / "two")], cwd=ROOT,
                         timeout=600, env=env)
    assert rest.returncode == 0, rest.stderr[-3000:]
    one = processes.run([sys.executable, "-m", "pyro_vae.train", *flags, "--out", str(tmp_path / "one")],
                        cwd=ROOT, timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-3000:]

    assert two.stdout.count("pyro_vae: training in") == 1  # only rank 0 speaks and writes
    rows_two, rows_one = _metrics(tmp_path / "two"), _metrics(tmp_path / "one")
    # TensorBoard too: one event file per session (rank 0's), whose curve is metrics.jsonl's
    assert len(list((tmp_path / "two" / "tensorboard").iterdir())) == 2
    board = EventAccumulator(str(tmp_path / "two" / "tensorboard")).Reload()
    assert [(e.step, e.value) for e in board.Scalars("test/elbo")] == [(r["epoch"], float(np.float32(r["test_elbo"])))
                                                                       for r in rows_two]
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one] == [64, 128, 192]
    for a, b in zip(rows_two, rows_one):
        assert a["train_objective"] == pytest.approx(b["train_objective"], rel=TOLERANCE)
        assert a["test_elbo"] == pytest.approx(b["test_elbo"], rel=TOLERANCE)
    assert rows_two[-1]["train_objective"] > rows_two[0]["train_objective"] + 30  # and it learns


@pytest.mark.slow
def test_two_processes_stopped_mid_epoch_resume_to_the_same_parameters(data_dir, tmp_path):
    """Each rank comes back with its own random stream (its z and binarization noise), not rank 0's; a checkpoint
    of two processes is not resumed by one."""
    flags = ["--epochs", "2", "--train-size", "1024", "--test-size", "64", "--batch-size", "8", "--latent-dim", "2",
             "--conv-channels", "4", "8", "--data-dir", str(data_dir), "--device", "cpu", "--seed", "5"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cut, at = tmp_path / "cut", 128 + 20  # inside epoch 2 (128 steps an epoch)
    # rank 0 stops before step `at` and says so (tests/train_at_step.py); rank 1 waits for it in the all-reduce
    with open(tmp_path / "cut.err", "w") as err, processes.started(
            torchrun + [str(ROOT / "tests" / "train_at_step.py"), str(at), "signal", *flags, "--out", str(cut)],
            timeout=600, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True, env=env) as proc:
        for line in proc.stdout:
            if line.strip() == f"at step {at}":
                break
        proc.send_signal(signal.SIGTERM)  # torchrun passes it on to each rank, as a scheduler's would be
        proc.communicate(timeout=120)
    state = read_checkpoint(cut)
    assert state["epoch"] == 1 and state["position"] == 20, (tmp_path / "cut.err").read_text()
    assert len(state["rng"]) == 2  # one random state per rank

    one = processes.run([sys.executable, "-m", "pyro_vae.train", "--resume", str(cut)], cwd=ROOT, timeout=300,
                        env=env)
    assert one.returncode == 1 and one.stderr.count("\n") == 1, one.stderr
    assert "was saved by 2 training process(es); resume it with as many (now 1)" in one.stderr

    resumed = processes.run(torchrun + ["-m", "pyro_vae.train", "--resume", str(cut)], cwd=ROOT, timeout=600,
                            env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = processes.run(torchrun + ["-m", "pyro_vae.train", *flags, "--out", str(tmp_path / "whole")], cwd=ROOT,
                          timeout=600, env=env)
    assert whole.returncode == 0, whole.stderr[-3000:]
    expected, got = read_checkpoint(tmp_path / "whole")["model"], read_checkpoint(cut)["model"]
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_global_batch_must_split_evenly_among_processes(monkeypatch, capsys):
    from pyro_vae.config import parse_args

    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit) as info:
        parse_args(["--batch-size", "64"])
    assert info.value.code == 2 and "divide evenly among the 3" in capsys.readouterr().err

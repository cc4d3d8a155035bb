"""Runs survive interruption, bad input gets a clear error, nothing is lost."""

import argparse
import dataclasses
import errno
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import processes
import pyro_vae
from pyro_vae.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from pyro_vae.config import Config, parse_args
from pyro_vae.evaluate import main as evaluate_main
from pyro_vae.train import Diverged, Interrupted, RunDirError, SVIStep, main, resume, train

ROOT = Path(__file__).resolve().parent.parent


def _final_weights(run):
    return read_checkpoint(run)["model"]


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _signal_at_step(monkeypatch, step, signum=signal.SIGTERM, slow_from=None):
    """Make SVIStep.step deliver a real signal to this process at the given (1-based) step; steps from `slow_from`
    on take 2 s longer."""
    real_step, count = SVIStep.step, {"n": 0}

    def step_then_signal(self, *args, **kwargs):
        loss = real_step(self, *args, **kwargs)
        count["n"] += 1
        if slow_from and count["n"] >= slow_from:
            time.sleep(2.0)
        if count["n"] == step:
            signal.raise_signal(signum)
        return loss

    monkeypatch.setattr(SVIStep, "step", step_then_signal)


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_ends_with_the_same_parameters(small_config, tmp_path, monkeypatch):
    config = dataclasses.replace(small_config, epochs=3, out=str(tmp_path / "whole"))
    whole = train(config)

    interrupted = dataclasses.replace(config, out=str(tmp_path / "cut"))
    _signal_at_step(monkeypatch, 11, slow_from=9)  # epoch 2 of 3, 3 steps in (8 steps per epoch), 6 s in
    with pytest.raises(Interrupted) as info:
        train(interrupted)
    assert "--resume" in str(info.value)
    state = read_checkpoint(tmp_path / "cut")
    assert state["epoch"] == 1 and state["step"] == 11 and state["position"] == 3
    assert state["epoch_seconds"] >= 6.0  # the time epoch 2 has taken so far, which the resumed epoch counts too
    assert len(state["rng"]) == 1  # one random state per process
    monkeypatch.undo()
    older = tmp_path / "older"  # the same checkpoint as older versions wrote it: one random state, not a list
    shutil.copytree(tmp_path / "cut", older)
    save_checkpoint(older / "checkpoint.pt", {**{k: v for k, v in state.items() if k != "format"},
                                              "rng": state["rng"][0]})

    resumed = resume(tmp_path / "cut")
    _assert_same_weights(_final_weights(whole), _final_weights(resumed))
    assert [s["step"] for s in read_checkpoint(resumed)["sessions"]] == [0, 11]  # begun, then resumed at step 11
    assert [s["step"] for s in read_checkpoint(whole)["sessions"]] == [0]
    session = read_checkpoint(whole)["sessions"][0]
    assert (session["device"], session["threads"], session["processes"]) == ("cpu", torch.get_num_threads(), 1)
    _assert_same_weights(_final_weights(whole), _final_weights(resume(older)))
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["seconds"] >= 6.0 and rows[1]["images_per_s"] == pytest.approx(8 * 64 / rows[1]["seconds"])
    assert [r["test_elbo"] for r in rows] == [r["test_elbo"] for r in expected]
    assert [r["train_objective"] for r in rows] == pytest.approx([r["train_objective"] for r in expected])


def test_a_run_copied_without_its_pictures_folder_resumes(small_config, tmp_path, monkeypatch):
    """A checkpoint carried to another machine (experiments/in_progress/ holds no images/) trains on."""
    config = dataclasses.replace(small_config, epochs=2, out=str(tmp_path / "run"))
    _signal_at_step(monkeypatch, 3)
    with pytest.raises(Interrupted):
        train(config)
    monkeypatch.undo()
    shutil.rmtree(tmp_path / "run" / "images")
    resumed = resume(tmp_path / "run")
    assert read_checkpoint(resumed)["epoch"] == 2
    assert sorted(p.name for p in (resumed / "images").iterdir()) == [
        "recon_001.png", "recon_002.png", "samples_001.png", "samples_002.png"]


AT_STEP = [sys.executable, str(ROOT / "tests" / "train_at_step.py")]  # the CLI, stopping before a step and saying so
STEPS_PER_EPOCH = 128  # of TINY_RUN
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny runs; two threads on a busy machine spin and crawl
TINY_RUN = ["--epochs", "2", "--train-size", "1024", "--test-size", "64", "--batch-size", "8", "--latent-dim", "2",
            "--conv-channels", "4", "8", "--device", "cpu"]


@contextmanager
def _at_step(step: int, how: str, flags: list[str], **kwargs):
    """The training CLI in a subprocess, stopped before SVI step `step` (see tests/train_at_step.py): the block
    runs once it says it is there, and the process is ended when the block ends, within 300 s."""
    with processes.started(AT_STEP + [str(step), how] + flags, timeout=300, cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, **{"env": ONE_THREAD, **kwargs}) as proc:
        for line in proc.stdout:
            if line.strip() == f"at step {step}":
                break
        else:
            raise AssertionError(f"the run ended before step {step}: {proc.communicate()[1][-3000:]}")
        yield proc


@pytest.mark.slow
def test_cli_sigterm_in_a_subprocess_checkpoints_and_resumes_exactly(data_dir, tmp_path):
    flags = TINY_RUN + ["--data-dir", str(data_dir)]
    cli = [sys.executable, "-m", "pyro_vae.train"]
    run = tmp_path / "cut"
    with _at_step(STEPS_PER_EPOCH + 5, "signal", flags + ["--out", str(run)]) as proc:  # inside epoch 2
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert f"--resume {run}" in err and "Traceback" not in err
    state = read_checkpoint(run)
    assert state["epoch"] == 1 and state["position"] == 5 and state["step"] == STEPS_PER_EPOCH + 5

    resumed = processes.run(cli + ["--resume", str(run)], cwd=ROOT, timeout=300, env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr
    whole = processes.run(cli + flags + ["--out", str(tmp_path / "whole")], cwd=ROOT, timeout=300, env=ONE_THREAD)
    assert whole.returncode == 0, whole.stderr
    _assert_same_weights(_final_weights(tmp_path / "whole"), _final_weights(run))


@pytest.mark.slow
def test_ctrl_c_checkpoints_after_the_step_and_a_second_ctrl_c_stops_at_once(data_dir, tmp_path):
    flags = TINY_RUN + ["--data-dir", str(data_dir)]
    once = tmp_path / "once"
    with _at_step(STEPS_PER_EPOCH + 3, "signal", flags + ["--out", str(once)]) as proc:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert f"SIGINT: stopped and saved {once / 'checkpoint.pt'}" in err and "Traceback" not in err
    assert read_checkpoint(once)["position"] == 3

    twice = tmp_path / "twice"
    with _at_step(STEPS_PER_EPOCH + 3, "second-signal", flags + ["--out", str(twice)]) as proc:
        proc.send_signal(signal.SIGINT)
        assert proc.stdout.readline().strip() == "first signal"  # the first one is in: the step waits for the second
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "stopped at once by a second signal" in err and f"--resume {twice}" in err and "Traceback" not in err
    assert err.strip().count("\n") == 0  # one line
    state = read_checkpoint(twice)  # the end of epoch 1's, whole; nothing half-written, no lock left behind
    assert state["epoch"] == 1 and "position" not in state
    assert sorted(p.name for p in twice.iterdir() if p.name.startswith(".")) == []


@pytest.mark.slow
def test_running_out_of_memory_during_training_is_one_line_naming_the_batch_size(data_dir, tmp_path):
    flags = ["--epochs", "1", "--train-size", "2048", "--test-size", "64", "--batch-size", "1024",
             "--data-dir", str(data_dir), "--device", "cpu", "--out", str(tmp_path / "run")]
    with _at_step(2, "memory", flags) as proc:
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert err.startswith("error: out of memory") and "--batch-size (now 1024)" in err and "Traceback" not in err
    assert err.count("\n") == 1


def test_a_checkpoint_of_the_pyro_optimizer_era_loads_but_is_not_resumed(small_config):
    run = train(dataclasses.replace(small_config, max_steps=1))
    state = read_checkpoint(run)
    state["optimizer"] = {"encoder$$$head.weight": {"state": {}, "param_groups": []}}  # pyro.optim's get_state()
    save_checkpoint(run / "checkpoint.pt", {k: v for k, v in state.items() if k != "format"})
    assert pyro_vae.load(run).config.latent_dim == small_config.latent_dim
    with pytest.raises(CheckpointError, match="older pyro_vae"):
        resume(run)


def test_a_kill_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1, "weights": torch.ones(3)})

    def dies_halfway(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # as if the process were killed here

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"epoch": 2, "weights": torch.zeros(3)})
    monkeypatch.undo()
    state = read_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["weights"], torch.ones(3))


@pytest.mark.slow
def test_sigkill_during_checkpoint_writes_never_corrupts_the_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    writer = (
        "import sys, torch\n"
        "from pyro_vae.checkpoint import save_checkpoint\n"
        "big = torch.arange(4_000_000, dtype=torch.float32)\n"
        "for i in range(10**6):\n"
        f"    save_checkpoint({str(path)!r}, {{'epoch': i, 'weights': big + i}})\n"
        "    print(i, flush=True)\n"
    )
    with processes.started([sys.executable, "-c", writer], timeout=300, cwd=ROOT, stdout=subprocess.PIPE,
                           text=True) as proc:
        for line in proc.stdout:
            if int(line) >= 2:
                break
        time.sleep(0.05)
        proc.kill()
        proc.wait()
    state = read_checkpoint(path)
    assert state["epoch"] >= 2  # one whole, consistent checkpoint: the weights of the epoch it names
    assert torch.equal(state["weights"], torch.arange(4_000_000, dtype=torch.float32) + state["epoch"])


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(small_config, monkeypatch):
    real_step, count = SVIStep.step, {"n": 0}

    def goes_nan_in_epoch_2(self, *args, **kwargs):
        count["n"] += 1
        return real_step(self, *args, **kwargs) if count["n"] < 12 else torch.tensor(float("nan"))

    monkeypatch.setattr(SVIStep, "step", goes_nan_in_epoch_2)
    with pytest.raises(Diverged, match=r"step 12 \(epoch 2\).*nan.*--lr"):
        train(small_config)
    assert read_checkpoint(small_config.out)["epoch"] == 1


@pytest.mark.slow
def test_best_and_last_checkpoints_are_kept(small_config):
    run = train(dataclasses.replace(small_config, epochs=3))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best = read_checkpoint(run / "best.pt")
    assert best["best_test_elbo"] == max(r["test_elbo"] for r in rows)
    assert best["epoch"] == max(rows, key=lambda r: r["test_elbo"])["epoch"]
    assert read_checkpoint(run)["epoch"] == 3


def test_existing_run_is_not_overwritten_unless_asked(small_config):
    config = dataclasses.replace(small_config, epochs=1, max_steps=2)
    train(config)
    with pytest.raises(RunDirError, match="--overwrite"):
        train(dataclasses.replace(config, out=small_config.out))
    train(dataclasses.replace(config, out=small_config.out), overwrite=True)
    assert len((Path(small_config.out) / "metrics.jsonl").read_text().splitlines()) == 1


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


@pytest.mark.slow
@pytest.mark.parametrize("cut_short", [False, True])
def test_a_kill_between_the_metrics_line_and_the_checkpoint_leaves_each_epoch_once(small_config, monkeypatch,
                                                                                  cut_short):
    config = dataclasses.replace(small_config, epochs=3, train_size=128, test_size=64)
    def killed_at_epoch_2(path, state):
        if state["epoch"] == 2:
            raise _Killed
        save_checkpoint(path, state)

    monkeypatch.setattr("pyro_vae.train.save_checkpoint", killed_at_epoch_2)
    with pytest.raises(_Killed):
        train(config)
    metrics = Path(config.out) / "metrics.jsonl"
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [1, 2]
    if cut_short:  # the kill came while the line was being written
        metrics.write_text(metrics.read_text()[:-20])
    monkeypatch.undo()

    resume(config.out)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["step"] for r in rows] == [2, 4, 6]


def test_init_from_begins_at_the_other_runs_weights_with_a_fresh_optimizer(data_dir, tmp_path, capsys):
    flags = ["--epochs", "1", "--max-steps", "1", "--train-size", "512", "--test-size", "1000",
             "--data-dir", str(data_dir), "--device", "cpu"]
    assert main(["--init-from", "pretrained/conv32", *flags, "--out", str(tmp_path / "tuned")]) == 0
    assert main([*flags, "--out", str(tmp_path / "fresh")]) == 0
    tuned, fresh = (json.loads((tmp_path / run / "metrics.jsonl").read_text()) for run in ("tuned", "fresh"))
    # after this one step the shipped run is at -97.5 on all 10,000 (-100.3 on these first 1,000, which are
    # harder), a fresh network at -600: a margin of 10 nats either side tells them apart
    assert tuned["test_elbo"] > -110 and fresh["test_elbo"] < -400
    state = read_checkpoint(tmp_path / "tuned")
    assert state["config"]["init_from"] == "pretrained/conv32"
    assert state["step"] == 1 and {float(s["step"]) for s in state["optimizer"]["state"].values()} == {1.0}


def test_init_from_a_run_of_other_shapes_or_none_is_one_line_exit_1_and_writes_nothing(data_dir, tmp_path, capsys):
    flags = ["--epochs", "1", "--max-steps", "1", "--train-size", "512", "--test-size", "100",
             "--data-dir", str(data_dir), "--device", "cpu"]
    assert main(["--init-from", str(tmp_path / "nowhere"), *flags, "--out", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: --init-from: no checkpoint at {tmp_path / 'nowhere'}")
    assert not (tmp_path / "a").exists()
    assert main(["--init-from", "pretrained/conv32", "--latent-dim", "8", *flags, "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --init-from pretrained/conv32: its weights do not fit this "
                                               "model: encoder.head.weight is (64, 3136) there, (16, 3136) here")


def test_a_pixelcnn_kernel_wider_than_your_own_images_is_refused_once_they_are_read(tmp_path, capsys):
    images = tmp_path / "sixteen.npy"
    np.save(images, np.random.default_rng(0).integers(0, 256, (40, 16, 16), dtype=np.uint8))
    assert main(["--data", str(images), "--likelihood", "pixelcnn", "--pixelcnn-kernel", "17", "--binarize",
                 "threshold", "--batch-size", "8", "--device", "cpu", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --pixelcnn-kernel 17 is wider than the images (16 pixels a side): give an odd kernel "
                   "of at most 15"]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_resume_of_a_weights_only_run_says_to_use_init_from(capsys):
    assert main(["--resume", "pretrained/conv32"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --resume pretrained/conv32: it holds weights only, no optimizer state to continue; "
                   "begin a new run from its weights with --init-from pretrained/conv32"]
    assert not (ROOT / "pretrained" / "conv32" / ".lock").exists()


def test_a_file_where_the_tensorboard_folder_goes_is_found_before_training(small_config, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "tensorboard").write_text("not a folder")
    flags = ["--epochs", "1", "--train-size", "512", "--test-size", "100", "--data-dir", small_config.data_dir,
             "--device", "cpu", "--out", str(run)]
    assert main([*flags, "--tensorboard"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --tensorboard writes into {run / 'tensorboard'}, which is a file: move it away, or "
                   "train without --tensorboard"]
    assert (run / "tensorboard").read_text() == "not a folder" and not (run / "metrics.jsonl").exists()
    assert main(flags) == 0  # and the lock was released


def test_resume_takes_no_other_flags(capsys):
    with pytest.raises(SystemExit) as info:
        from pyro_vae.config import parse_command_line
        parse_command_line(["--resume", "runs/x", "--lr", "0.1"])
    assert info.value.code == 2 and "drop --lr" in capsys.readouterr().err


def test_resume_of_a_run_whose_saved_device_this_machine_lacks_is_exit_2_with_one_line(small_config, monkeypatch,
                                                                                      capsys):
    run = train(dataclasses.replace(small_config, epochs=2, max_steps=1))
    state = read_checkpoint(run)
    state["config"]["device"] = "cuda"  # as if trained on a GPU machine
    save_checkpoint(run / "checkpoint.pt", {k: v for k, v in state.items() if k != "format"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine: none, even where the tests have one
    capsys.readouterr()
    assert main(["--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume") and err.count("\n") == 1 and "Traceback" not in err
    assert "--device cuda was asked for" in err and "no CUDA device" in err


def test_checkpoint_of_another_architecture_is_refused(small_config, tmp_path):
    run = train(dataclasses.replace(small_config, max_steps=1, epochs=1))
    state = read_checkpoint(run)
    state["config"]["latent_dim"] += 3  # the weights no longer fit the config
    save_checkpoint(tmp_path / "other.pt", {k: v for k, v in state.items() if k != "format"})
    with pytest.raises(CheckpointError, match="does not fit"):
        pyro_vae.load(tmp_path / "other.pt")
    with open(run / "checkpoint.pt", "r+b") as f:  # truncated
        f.truncate(100)
    with pytest.raises(CheckpointError, match="not a readable"):
        pyro_vae.load(run)


class _Evil:
    """Unpickled, it runs a shell command that creates the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


UNSAFE = "is not a pyro_vae checkpoint and may be unsafe; it was not loaded"


@pytest.mark.parametrize("form", ["zip", "legacy", "pickle"])
def test_checkpoints_that_would_run_code_are_refused_in_one_line_that_gives_no_advice(form, tmp_path, capsys):
    """Refused by pyro_vae.load, evaluate and train --resume without running it, in one line that does not relay
    torch's advice to load it again with weights_only=False (which would run it)."""
    marker, run = tmp_path / "pwned", tmp_path / "run"
    run.mkdir()
    payload = {"format": "pyro_vae.checkpoint/1", "config": _Evil(marker)}
    path = run / "checkpoint.pt"
    if form == "pickle":  # a bare pickle, not torch's format
        path.write_bytes(pickle.dumps(payload, protocol=4))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=form == "zip")
    with pytest.raises(CheckpointError) as info:
        pyro_vae.load(path)
    assert str(info.value) == f"{path} {UNSAFE}"
    assert evaluate_main([str(run), "--limit", "10", "--out", str(tmp_path / "e.json")]) == 1
    assert capsys.readouterr().err == f"error: {path} {UNSAFE}\n"
    assert main(["--resume", str(run)]) == 1
    assert capsys.readouterr().err == f"error: {path} {UNSAFE}\n"
    assert not marker.exists()  # nothing in the file ran
    pickle.loads(pickle.dumps(_Evil(marker)))  # while unpickled by anything less careful, it runs
    assert marker.exists()


FIELDS = [f for f in dataclasses.fields(Config) if f.name not in ("data_dir", "out", "device")]
junk = st.one_of(st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=True).map(str),
                 st.text(min_size=0, max_size=12))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), value=junk)
def test_any_flag_value_gives_a_config_or_a_clear_usage_error(field, value, capsys):
    flag = "--" + field.name.replace("_", "-")
    argv = [flag] if field.type == "bool" else [flag, value] + ([value] if field.metadata.get("nargs") else [])
    try:
        config = parse_args(argv)
    except SystemExit as e:
        assert e.code == 2
        err = capsys.readouterr().err
        assert "error:" in err and "Traceback" not in err
    else:
        assert config.errors() == []


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.one_of(
    st.binary(max_size=300),
    st.dictionaries(st.sampled_from(["format", "config", "model", "epoch"]),
                    st.one_of(st.integers(), st.text(max_size=5), st.just("pyro_vae.checkpoint/1"),
                              st.dictionaries(st.text(max_size=8), st.integers(), max_size=3)), max_size=4),
))
def test_load_of_anything_is_a_model_or_a_checkpoint_error(payload, tmp_path_factory):
    path = tmp_path_factory.mktemp("junk") / "c.pt"
    if isinstance(payload, bytes):
        path.write_bytes(payload)
    else:
        torch.save(payload, path)
    with pytest.raises(CheckpointError):
        pyro_vae.load(path)


@pytest.mark.parametrize("flags, message", [
    (["--out", "/proc/forbidden/run"], "error: cannot create run directory /proc/forbidden/run: "),
    (["--data-dir", "/dev/null"], "error: cannot use /dev/null/MNIST/raw for MNIST: "),
    (["--latent-dim", "99999999"], "error: out of memory while building the model (it tried to allocate "),
])
def test_environment_problems_exit_1_with_one_line(flags, message, data_dir, tmp_path, capsys):
    """Flags that are valid but that this machine cannot honour: exit 1, one line naming the cause."""
    argv = ["--epochs", "1", "--max-steps", "1", "--train-size", "64", "--test-size", "64", "--batch-size", "64",
            "--data-dir", str(data_dir), "--out", str(tmp_path / "run"), "--device", "cpu", *flags]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.slow
def test_a_second_training_into_the_same_out_is_refused_while_the_first_runs(data_dir, tmp_path):
    run = tmp_path / "run"
    flags = TINY_RUN + ["--epochs", "1", "--data-dir", str(data_dir), "--out", str(run)]
    with _at_step(3, "stdin", flags, stdin=subprocess.PIPE) as first:  # holds the run directory, waiting
        second = processes.run([sys.executable, "-m", "pyro_vae.train", *flags], cwd=ROOT, timeout=120,
                               env=ONE_THREAD)
        assert second.returncode == 1, second.stderr
        assert second.stderr == (f"error: run directory {run} is in use by another training (process {first.pid}); "
                                 "wait for it to end, or choose another --out\n")
        resumed = processes.run([sys.executable, "-m", "pyro_vae.train", "--resume", str(run)], cwd=ROOT,
                                timeout=120, env=ONE_THREAD)
        assert resumed.returncode == 1 and "is in use by another training" in resumed.stderr
        first.stdin.write("go\n")
        first.stdin.flush()
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not (run / ".lock").exists()  # released at the end


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_line(small_config, capsys):
    dead = processes.run([sys.executable, "-c", "import os; print(os.getpid())"], timeout=60)
    out = Path(small_config.out)
    out.mkdir(parents=True)
    (out / ".lock").write_text(dead.stdout.strip())  # its flock went with it
    argv = ["--epochs", "1", "--max-steps", "1", "--train-size", "64", "--test-size", "64", "--batch-size", "64",
            "--latent-dim", "2", "--conv-channels", "4", "8", "--data-dir", small_config.data_dir,
            "--out", str(out), "--device", "cpu"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"taking over the lock of {out}, left by process {dead.stdout.strip()}" in err
    assert not (out / ".lock").exists() and (out / "checkpoint.pt").is_file()


def _argv_tiny(config, out) -> list[str]:
    return ["--epochs", "2", "--train-size", "128", "--test-size", "64", "--batch-size", "64", "--latent-dim", "2",
            "--conv-channels", "4", "8", "--data-dir", config.data_dir, "--out", str(out), "--device", "cpu"]


def test_stop_after_pauses_each_session_checkpointed_and_the_resumed_run_ends_as_an_uninterrupted_one(
        small_config, tmp_path, capsys):
    """--stop-after N: exit 0 after N epochs of this session with the checkpoint of the last, on a start and on a
    resume; the three sessions end with the weights of one uninterrupted run."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    argv = _argv_tiny(small_config, cut)
    argv[1] = "3"  # --epochs 3
    assert main(argv + ["--stop-after", "1"]) == 0
    said = capsys.readouterr().out
    assert "stopped after 1 epoch(s) of this session, as --stop-after asked" in said and f"--resume {cut}" in said
    assert read_checkpoint(cut)["epoch"] == 1 and len((cut / "metrics.jsonl").read_text().splitlines()) == 1
    assert main(["--resume", str(cut), "--stop-after", "1"]) == 0
    assert read_checkpoint(cut)["epoch"] == 2
    assert main(["--resume", str(cut), "--stop-after", "5"]) == 0  # more than are left: runs to the end
    assert read_checkpoint(cut)["epoch"] == 3 and len(read_checkpoint(cut)["sessions"]) == 3
    assert main(_argv_tiny(small_config, whole)[:1] + ["3"] + _argv_tiny(small_config, whole)[2:]) == 0
    _assert_same_weights(_final_weights(whole), _final_weights(cut))
    with pytest.raises(SystemExit) as info:
        main(["--resume", str(cut), "--stop-after", "-1"])
    assert info.value.code == 2


def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_previous_checkpoint(small_config, monkeypatch,
                                                                                    capsys):
    """The second epoch's checkpoint finds the disk full, as a file system reports it at fsync (or at write)."""
    import pyro_vae.checkpoint as checkpoint

    real_fsync, calls = os.fsync, []

    def fsync_on_a_full_disk(fd):
        calls.append(fd)
        if len(calls) == 3:  # epoch 1: checkpoint.pt, best.pt; epoch 2: checkpoint.pt
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync_on_a_full_disk)
    out = Path(small_config.out)
    assert main(_argv_tiny(small_config, out)) == 1
    err = capsys.readouterr().err
    expected = (re.escape(f"error: cannot write {out / 'checkpoint.pt'}: no space left on the device of the run "
                          f"directory {out} (") + r"[\d,]+ bytes free\); the previous checkpoint there is kept\n")
    assert re.fullmatch(expected, err), err
    assert read_checkpoint(out)["epoch"] == 1  # intact
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temp file, no lock


@pytest.mark.slow
def test_a_real_full_disk_is_one_line_and_keeps_the_previous_checkpoint(data_dir, tmp_path):
    """A 2 MB tmpfs as the run directory, filled while the run waits in epoch 2 (needs root to mount)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if processes.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], timeout=60).returncode:
        pytest.skip("cannot mount a tmpfs here (not root); the fsync test above covers the same path")
    try:
        run = disk / "run"
        flags = _argv_tiny(argparse.Namespace(data_dir=str(data_dir)), run)
        with _at_step(3, "stdin", flags, stdin=subprocess.PIPE) as proc:  # epoch 1 (2 steps) is saved
            size = (run / "checkpoint.pt").stat().st_size
            free = shutil.disk_usage(disk).free
            (disk / "filler").write_bytes(b"\0" * (free - size // 2))  # room for pictures, not for a checkpoint
            proc.stdin.write("go\n")
            proc.stdin.flush()
            _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, err
        assert err.startswith(f"error: cannot write {run / 'checkpoint.pt'}: no space left on the device of the "
                              f"run directory {run}") and err.count("\n") == 1
        assert read_checkpoint(run)["epoch"] == 1
        assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []
    finally:
        processes.run(["umount", str(disk)], timeout=60)

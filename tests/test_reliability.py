"""Runs survive interruption, bad input gets a clear error, nothing is lost."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyro_vae
from pyro_vae.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from pyro_vae.config import Config, parse_args
from pyro_vae.train import Diverged, Interrupted, RunDirError, SVIStep, main, resume, train

ROOT = Path(__file__).resolve().parent.parent


def _final_weights(run):
    return read_checkpoint(run)["model"]


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _signal_at_step(monkeypatch, step, signum=signal.SIGTERM):
    """Make SVIStep.step deliver a real signal to this process at the given (1-based) step."""
    real_step, count = SVIStep.step, {"n": 0}

    def step_then_signal(self, *args, **kwargs):
        loss = real_step(self, *args, **kwargs)
        count["n"] += 1
        if count["n"] == step:
            signal.raise_signal(signum)
        return loss

    monkeypatch.setattr(SVIStep, "step", step_then_signal)


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_ends_with_the_same_parameters(small_config, tmp_path, monkeypatch):
    config = dataclasses.replace(small_config, epochs=3, out=str(tmp_path / "whole"))
    whole = train(config)

    interrupted = dataclasses.replace(config, out=str(tmp_path / "cut"))
    _signal_at_step(monkeypatch, 11)  # epoch 2 of 3, 3 steps in (8 steps per epoch)
    with pytest.raises(Interrupted) as info:
        train(interrupted)
    assert "--resume" in str(info.value)
    state = read_checkpoint(tmp_path / "cut")
    assert state["epoch"] == 1 and state["step"] == 11 and state["position"] == 3
    assert len(state["rng"]) == 1  # one random state per process
    monkeypatch.undo()
    older = tmp_path / "older"  # the same checkpoint as older versions wrote it: one random state, not a list
    shutil.copytree(tmp_path / "cut", older)
    save_checkpoint(older / "checkpoint.pt", {**{k: v for k, v in state.items() if k != "format"},
                                              "rng": state["rng"][0]})

    resumed = resume(tmp_path / "cut")
    _assert_same_weights(_final_weights(whole), _final_weights(resumed))
    _assert_same_weights(_final_weights(whole), _final_weights(resume(older)))
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [r["test_elbo"] for r in rows] == [r["test_elbo"] for r in expected]
    assert [r["train_objective"] for r in rows] == pytest.approx([r["train_objective"] for r in expected])


@pytest.mark.slow
def test_cli_sigterm_in_a_subprocess_checkpoints_and_resumes_exactly(data_dir, tmp_path):
    flags = ["--epochs", "2", "--train-size", "8192", "--test-size", "64", "--batch-size", "8", "--latent-dim", "2",
             "--conv-channels", "4", "8", "--data-dir", str(data_dir), "--device", "cpu"]
    cli = [sys.executable, "-m", "pyro_vae.train"]
    run = tmp_path / "cut"
    proc = subprocess.Popen(cli + flags + ["--out", str(run)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait for the first epoch to end, then stop the process inside the second
        if line.startswith("epoch   1/2"):
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert f"--resume {run}" in err and "Traceback" not in err
    state = read_checkpoint(run)
    assert state["epoch"] == 1 and 0 < state["position"] < 1024, "the signal should land inside epoch 2"

    resumed = subprocess.run(cli + ["--resume", str(run)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    whole = subprocess.run(cli + flags + ["--out", str(tmp_path / "whole")], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    _assert_same_weights(_final_weights(tmp_path / "whole"), _final_weights(run))


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
    proc = subprocess.Popen([sys.executable, "-c", writer], cwd=ROOT, stdout=subprocess.PIPE, text=True)
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
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoints_that_would_run_code_are_refused(tmp_path):
    torch.save({"format": "pyro_vae.checkpoint/1", "config": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not a readable"):
        pyro_vae.load(tmp_path / "evil.pt")


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

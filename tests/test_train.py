"""Training end to end: the loop lowers the loss, the CLI writes every artefact, runs load back exactly."""

import contextlib
import dataclasses
import json
import math
import sys
from pathlib import Path

import pyro
import pytest
import torch
from pyro.infer import SVI

import processes
import pyro_vae
from pyro_vae.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from pyro_vae.config import Config
from pyro_vae.model import build_vae
from pyro_vae import step as step_module, train as train_module
from pyro_vae.train import SVIStep, main, make_elbo, train

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args, cwd=ROOT):
    return processes.run([sys.executable, "-m", "pyro_vae.train", *args], cwd=cwd, timeout=300)


@pytest.mark.slow
def test_short_training_run_lowers_the_loss(small_config):
    config = dataclasses.replace(small_config, epochs=3)
    run = train(config)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["train_objective"] > rows[0]["train_objective"] + 20
    assert rows[-1]["test_elbo"] > rows[0]["test_elbo"]


def test_the_training_step_moves_the_parameters_exactly_as_pyro_svi_does():
    """One torch Adam over all parameters steps each one as pyro.optim's one Adam per parameter does."""
    config = Config(conv_channels=(4, 8), latent_dim=4, device="cpu")
    batches = [torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(s)).bernoulli() for s in range(3)]
    losses, weights = [], []
    for make_step in (lambda vae: SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": config.lr}), make_elbo(config)),
                      lambda vae: SVIStep(vae, config)):
        pyro.clear_param_store()
        torch.manual_seed(0)
        vae = build_vae(config, num_data=1000)
        svi = make_step(vae)
        losses.append([float(svi.step(x)) for x in batches])
        weights.append(vae.state_dict())
    # SVI sums the sites' log-probabilities as Python floats, SVIStep keeps the float32 tensor on the device
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name


def test_the_training_step_declares_the_networks_to_pyro_on_its_first_step_only(monkeypatch):
    """pyro.module in model and guide is how Pyro's own optimizers find the parameters; SVIStep holds them itself,
    so after the first step (which fills Pyro's param store) it runs the program without those statements, and
    leaves the VAE declaring them again for anyone else's SVI."""
    declared, real_module = [], pyro.module
    monkeypatch.setattr(pyro, "module", lambda name, *args, **kwargs: declared.append(name) or real_module(
        name, *args, **kwargs))
    config = Config(conv_channels=(4, 8), latent_dim=4, device="cpu")
    vae = build_vae(config, num_data=1000)
    svi = SVIStep(vae, config)
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0)).bernoulli()
    svi.step(x)
    assert sorted(declared) == ["bottom_up", "decoder", "encoder", "likelihood", "posterior", "prior", "top_down"]
    declared.clear()
    for _ in range(3):
        svi.step(x)
    assert declared == [] and vae.declare_modules
    store = pyro.get_param_store()
    assert len(store) == len(list(vae.parameters()))
    assert all(store[f"encoder$$${n}"] is p for n, p in vae.encoder.named_parameters())  # the very tensors Adam steps
    SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), make_elbo(config)).step(x)
    assert len(declared) == 7


def test_pyro_checks_the_first_training_step_only():
    """Validation catches a mistake on the first step; later steps skip Pyro's checks, for speed."""
    config = Config(conv_channels=(4, 8), latent_dim=4, device="cpu")
    grey = torch.full((8, 1, 28, 28), 0.5)  # outside the support of the Bernoulli likelihood
    svi = SVIStep(build_vae(config, num_data=1000), config)
    with pytest.raises(ValueError, match="support"):
        svi.step(grey)
    svi.step(grey.bernoulli())
    assert math.isfinite(svi.step(grey).item())
    assert pyro.infer.util.is_validation_enabled()  # as the test set it, outside the step


# What reads a value back from the device (on a GPU: a wait for it to catch up), or makes a tensor on the
# device from Python numbers (on a GPU: a copy from the host that waits, and one a CUDA graph cannot hold)
HOST_READS = ("item", "__bool__", "tolist", "__float__", "__int__", "cpu", "numpy")
SYNC_FREE = {
    "trace": {},
    "meanfield": {"elbo": "meanfield"},
    "trace, two layers": {"layers": 2},
    "trace, ladder guide and vamp prior": {"layers": 2, "guide": "ladder", "prior": "vamp"},
    "iwae": {"elbo": "iwae", "num_particles": 3},
    "enum (semi-supervised), both kinds of batch": {"conditional": True, "labels": 100},
    "cvae": {"conditional": True},
    "kl warm-up": {"kl_warmup_epochs": 1.0},
    "prior laplace": {"prior": "laplace"},
    "prior mog": {"prior": "mog"},
    "prior flow": {"prior": "flow"},
    "guide iaf": {"guide": "iaf"},
    "likelihood normal": {"likelihood": "normal", "binarize": "none"},
}


def _host_reads_per_step(svi: SVIStep, batches: list, monkeypatch) -> dict:
    """Calls of each host-reading Tensor method, and of torch.tensor(..., device=...), inside svi.step over the
    batches, after two warm-up rounds (the first step runs Pyro's checks); Adam's CPU step counts left out."""
    for _ in range(2):
        for x, y in batches:
            svi.step(x, y)
    adam_steps = {id(s["step"]) for s in svi.optimizer.state.values()}
    counts = {}

    def counting(name, real):
        def method(self, *args, **kwargs):
            if id(self) not in adam_steps:
                counts[name] = counts.get(name, 0) + 1
            return real(self, *args, **kwargs)
        return method

    def made_on_device(real):
        def make(*args, **kwargs):
            if kwargs.get("device") is not None:
                counts["torch.tensor(..., device=...)"] = counts.get("torch.tensor(..., device=...)", 0) + 1
            return real(*args, **kwargs)
        return make

    with monkeypatch.context() as patch:
        for name in HOST_READS:
            patch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
        for name in ("tensor", "as_tensor"):
            patch.setattr(torch, name, made_on_device(getattr(torch, name)))
        for x, y in batches:
            svi.step(x, y)
    return {name: n / len(batches) for name, n in counts.items()}


@pytest.mark.parametrize("name", SYNC_FREE)
def test_the_training_step_reads_nothing_back_from_the_device_after_the_first_steps(name, monkeypatch):
    """Pyro 1.9's Trace_ELBO read 4 numbers per step here (.item() on each site), and 2 more for its NaN check;
    make_elbo's estimators read none, so on a GPU the step never waits and can be captured as a CUDA graph."""
    config = Config(conv_channels=(4, 8), latent_dim=4, device="cpu", **SYNC_FREE[name])
    vae = build_vae(config, num_data=1000)
    vae.kl_weight = 0.4 if config.kl_warmup_epochs else 1.0
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    x = x if config.binarize == "none" else x.bernoulli()
    y = torch.arange(8) % 10
    batches = [(x, None), (x, y)] if config.labels else [(x, y if config.conditional else None)]
    assert _host_reads_per_step(SVIStep(vae, config), batches, monkeypatch) == {}


def test_the_count_of_host_reads_sees_pyros_own_estimator(monkeypatch):
    """The counter above, on Pyro's Trace_ELBO: the reads it must see (so that zero above means none)."""
    config = Config(conv_channels=(4, 8), latent_dim=4, device="cpu")
    svi = SVIStep(build_vae(config, num_data=1000), config)
    svi.elbo = svi.objective.elbo = pyro.infer.Trace_ELBO(vectorize_particles=True, max_plate_nesting=1)
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0)).bernoulli()
    assert _host_reads_per_step(svi, [(x, None)], monkeypatch) == {"item": 4, "__bool__": 2}


@pytest.mark.parametrize("fails_in", ["the last warm-up step", "the capture"])
def test_a_step_that_cannot_be_captured_trains_on_eagerly_after_one_line(fails_in, capsys, monkeypatch):
    """On the CPU the step is never captured; where a capture is tried and fails (here: no CUDA), in the last
    warm-up step (run with every wait for the GPU an error) or in the capture itself, one line says so and
    training goes on eagerly, exactly as if no capture had been tried."""
    if fails_in == "the capture":
        monkeypatch.setattr(step_module, "_waits_raise", contextlib.nullcontext)
    config = Config(conv_channels=(4, 8), latent_dim=4, device="cpu")
    batches = [torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(s)).bernoulli() for s in range(3)]
    runs = []
    for try_capture in (False, True):
        pyro.clear_param_store()
        torch.manual_seed(0)
        vae = build_vae(config, num_data=1000)
        svi = SVIStep(vae, config)
        assert not svi.capture  # config.cuda_graph is on, but this is the CPU
        svi.capture = try_capture  # as on CUDA
        losses = [svi.step(x).item() for _ in range(train_module.GRAPH_WARMUP_STEPS + 2) for x in batches]
        runs.append((losses, vae.state_dict(), svi))
    (eager_losses, eager_weights, _), (losses, weights, svi) = runs
    err = capsys.readouterr().err
    assert err.count("cannot be captured as a CUDA graph") == 1 and "every step runs eagerly" in err
    assert not svi.capture and not svi._graphs and vae.kl_weight == 1.0
    assert losses == eager_losses
    for name, value in eager_weights.items():
        assert torch.equal(weights[name], value), name


def test_adam_state_saved_by_a_captured_step_resumes_in_an_eager_one():
    """A step on CUDA (fused Adam, captured) keeps Adam's step counts on the GPU and says fused and capturable in
    its saved groups; a CPU step loading that state steps with torch's default Adam, counts on the CPU (and the
    reverse on CUDA)."""
    config = Config(conv_channels=(4, 8), latent_dim=4, device="cpu")
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0)).bernoulli()
    svi = SVIStep(build_vae(config, num_data=1000), config)
    svi.step(x)
    state = svi.optimizer.state_dict()
    for group in state["param_groups"]:
        group["capturable"], group["fused"] = True, True  # as SVIStep on CUDA saves it
    resumed = SVIStep(build_vae(config, num_data=1000), config)
    resumed.load_state(state, Path("checkpoint.pt"))
    assert all(not group["capturable"] and not group["fused"] for group in resumed.optimizer.param_groups)
    assert all(s["step"].device.type == "cpu" for s in resumed.optimizer.state.values())
    assert math.isfinite(resumed.step(x).item())


def test_the_loop_reads_the_losses_from_the_device_every_few_steps_and_at_the_end_of_each_epoch(small_config,
                                                                                               monkeypatch):
    """Reading a loss makes the host wait for the GPU, so the loop reads them in blocks, not after every step."""
    reads, real_read = [], train_module._read_losses

    def counted(pending, step, *args):
        reads.append((len(pending), step))
        return real_read(pending, step, *args)

    monkeypatch.setattr(train_module, "_read_losses", counted)
    monkeypatch.setattr(train_module, "LOSS_READ_EVERY", 3)
    run = train(small_config)  # 2 epochs of 8 steps
    assert reads == [(3, 3), (3, 6), (2, 8), (3, 11), (3, 14), (2, 16)]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [8, 16] and all(math.isfinite(r["train_objective"]) for r in rows)


def test_checkpoint_holds_the_trained_parameters_and_loads_back_exactly(small_config, tmp_path):
    small_config = dataclasses.replace(small_config, epochs=1)
    run = train(small_config)
    trained = pyro_vae.load(run)
    store = pyro.get_param_store()  # still holds the parameters as training left them
    loaded = dict(trained.vae.named_parameters())
    assert len(store) == len(loaded) > 0
    for name, value in store.items():
        module, param = name.split("$$$")
        assert torch.equal(loaded[f"{module}.{param}"], value), name

    state = read_checkpoint(run)
    assert state["epoch"] == 1 and state["step"] == 512 // 64
    assert set(state) >= {"config", "model", "param_store", "optimizer", "rng"}
    assert trained.config == dataclasses.replace(small_config, out=str(run))

    # round trip: save what was loaded, load it again, get identical outputs
    save_checkpoint(tmp_path / "copy.pt", {k: v for k, v in state.items() if k != "format"})
    again = pyro_vae.load(tmp_path / "copy.pt")
    x = torch.rand(6, 1, 28, 28).bernoulli()
    for a, b in zip(trained.encode(x), again.encode(x)):
        assert torch.equal(a, b)
    assert torch.equal(trained.reconstruct(x), again.reconstruct(x))
    z = torch.randn(3, small_config.latent_dim)
    assert torch.equal(trained.decode(z), again.decode(z))
    torch.manual_seed(5)
    first = trained.sample(4)
    torch.manual_seed(5)
    assert torch.equal(first, again.sample(4)) and first.shape == (4, 1, 28, 28)
    assert ((first >= 0) & (first <= 1)).all()


def test_load_refuses_what_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        pyro_vae.load(tmp_path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")  # to torch's unpickler, as unknown as a malicious file
    with pytest.raises(CheckpointError, match="not a pyro_vae checkpoint and may be unsafe"):
        pyro_vae.load(tmp_path / "junk.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a pyro_vae checkpoint"):
        pyro_vae.load(tmp_path / "other.pt")


@pytest.mark.slow
def test_cli_smoke_run_writes_every_artefact(data_dir, tmp_path):
    out = tmp_path / "run"
    result = _cli("--max-steps", "5", "--train-size", "512", "--test-size", "128", "--batch-size", "32",
                  "--latent-dim", "2", "--out", str(out), "--data-dir", str(data_dir), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "latent_dim" in result.stdout and "test ELBO" in result.stdout  # config printed, epoch line
    assert json.loads((out / "config.json").read_text())["latent_dim"] == 2
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(row) >= {"epoch", "step", "train_objective", "test_elbo", "seconds", "images_per_s"}
    assert row["step"] == 5
    for name in ("checkpoint.pt", "loss.png", "images/samples_001.png", "images/recon_001.png"):
        assert (out / name).stat().st_size > 0, name
    assert pyro_vae.load(out).config.latent_dim == 2

    again = _cli("--max-steps", "1", "--out", str(out), "--data-dir", str(data_dir))
    assert again.returncode != 0 and "already holds a run" in again.stderr


@pytest.mark.parametrize("flag, value, message", [
    ("--latent-dim", "0", "--latent-dim must be at least 1"),
    ("--binarize", "sometimes", "invalid choice"),
    ("--batch-size", "70000", "--batch-size must be at most"),
    ("--lr", "0", "--lr must be positive"),
    ("--lr", "nan", "--lr must be a finite number, not nan"),
    ("--lr", "inf", "--lr must be a finite number, not inf"),
    ("--beta", "nan", "--beta must be a finite number"),
    ("--kl-warmup-epochs", "nan", "--kl-warmup-epochs must be a finite number"),
    ("--kl-warmup-epochs", "inf", "--kl-warmup-epochs must be a finite number"),
    ("--classifier-weight", "nan", "--classifier-weight must be a finite number"),
])
def test_bad_flags_are_refused_before_loading_data(flag, value, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([flag, value, "--data-dir", str(tmp_path / "nothing-here")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "nothing-here").exists()


@pytest.mark.slow
def test_cli_exits_2_without_traceback_on_a_bad_flag(tmp_path):
    result = _cli("--epochs", "-3", "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "--epochs must be at least 1" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_under_beta_4_the_epoch_figure_is_the_weighted_objective_and_says_so(data_dir, tmp_path, monkeypatch,
                                                                                capsys):
    """--beta 4 trains on E[log p(x | z)] - 4 KL: the figure is the mean of that, named as the objective."""
    real_step, losses = SVIStep.step, []

    def recording_step(self, *args, **kwargs):
        loss = real_step(self, *args, **kwargs)
        losses.append(float(loss))  # -(objective) of the batch, scaled to all 512 images
        return loss

    monkeypatch.setattr(SVIStep, "step", recording_step)
    run = tmp_path / "beta4"
    assert main(["--beta", "4", "--epochs", "1", "--batch-size", "64", "--train-size", "512", "--test-size", "64",
                 "--latent-dim", "4", "--conv-channels", "8", "16", "--data-dir", str(data_dir), "--device", "cpu",
                 "--out", str(run)]) == 0
    row = json.loads((run / "metrics.jsonl").read_text())
    assert "train_elbo" not in row  # the weighted objective is not the ELBO
    assert len(losses) == 8 and row["train_objective"] == pytest.approx(-sum(losses) / 8 / 512, rel=1e-6)
    assert f"train objective {row['train_objective']:9.2f}" in capsys.readouterr().out


def test_the_loop_warms_the_kl_weight_up_step_by_step_from_its_first_step(data_dir, tmp_path, monkeypatch):
    """--kl-warmup-epochs 2 --beta 2, 2 steps an epoch: the weight the loop sets on the model before each step is
    beta x (epochs done after that step) / 2, beta at the end of epoch 2; metrics.jsonl records each epoch's last."""
    real_step, weights = SVIStep.step, []

    def recording_step(self, *args, **kwargs):
        weights.append(self.vae.kl_weight)  # what the model's poutine.scale reads in this step
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(SVIStep, "step", recording_step)
    run = tmp_path / "warm"
    assert main(["--kl-warmup-epochs", "2", "--beta", "2", "--epochs", "2", "--batch-size", "64", "--train-size",
                 "128", "--test-size", "64", "--latent-dim", "2", "--conv-channels", "4", "8", "--data-dir",
                 str(data_dir), "--device", "cpu", "--out", str(run)]) == 0
    assert weights == [0.5, 1.0, 1.5, 2.0]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["kl_weight"] for r in rows] == [1.0, 2.0]


def test_the_loop_takes_the_kl_term_out_of_every_step_under_a_free_bits_floor_no_batch_reaches(
        data_dir, tmp_path, monkeypatch):
    """--free-bits 1000 nats (no batch of an untrained 2-d latent comes near): every step's weight is 0, so its
    objective is log p(x | z) alone, and metrics.jsonl says that all of the epoch's steps were floored."""
    real_step, weights = SVIStep.step, []

    def recording_step(self, *args, **kwargs):
        weights.append(self.vae.kl_weight)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(SVIStep, "step", recording_step)
    run = tmp_path / "free"
    assert main(["--free-bits", "1000", "--kl-warmup-epochs", "2", "--epochs", "1", "--batch-size", "64",
                 "--train-size", "192", "--test-size", "64", "--latent-dim", "2", "--conv-channels", "4", "8",
                 "--data-dir", str(data_dir), "--device", "cpu", "--out", str(run)]) == 0
    assert weights == [0.0, 0.0, 0.0]
    row = json.loads((run / "metrics.jsonl").read_text())
    assert row["kl_floored"] == 1.0 and row["kl_weight"] == 0.0
    assert json.loads((run / "config.json").read_text())["free_bits"] == 1000

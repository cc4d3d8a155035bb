"""The CUDA path: programs, training, checkpoints, resume and evaluation on the GPU (`pytest -m cuda`).

Skipped where torch sees no CUDA device; `python -m experiments.campaign` runs them first on a lent GPU.
"""

import dataclasses
import json
import math
import signal

import pytest
import torch
from pyro import poutine

import pyro_vae
from pyro_vae.checkpoint import read_checkpoint
from pyro_vae.config import Config
from pyro_vae.data import load_mnist
from pyro_vae.evaluate import evaluate_run
from pyro_vae.model import build_vae
from pyro_vae.train import Interrupted, SVIStep, main, resume, train

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")

# every piece the registries offer, each on a tiny network; Config kwargs
VARIANTS = {
    "conv": {},
    "mlp": {"arch": "mlp", "hidden_dim": 32},
    "prior laplace": {"prior": "laplace"},
    "prior studentt": {"prior": "studentt"},
    "prior mog": {"prior": "mog"},
    "prior vamp": {"prior": "vamp"},
    "prior flow": {"prior": "flow"},
    "guide iaf": {"guide": "iaf"},
    "guide delta": {"guide": "delta"},
    "likelihood continuous-bernoulli": {"likelihood": "continuous-bernoulli", "binarize": "none"},
    "likelihood normal": {"likelihood": "normal", "binarize": "none"},
    "elbo meanfield": {"elbo": "meanfield"},
    "elbo iwae": {"elbo": "iwae", "num_particles": 3},
    "cvae": {"conditional": True},
    "semi-supervised": {"conditional": True, "labels": 100},
}


def _config(**changes) -> Config:
    return Config(latent_dim=4, conv_channels=(8, 16), batch_size=16, device="cuda", **changes)


def _batch(config: Config, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 28, 28, generator=generator)  # grey, in (0, 1)
    if config.binarize != "none":
        x = x.bernoulli(generator=generator)
    return x.to(CUDA), torch.randint(10, (n,), generator=generator).to(CUDA)


def _cuda_run(small_config, **changes) -> Config:
    return dataclasses.replace(small_config, device="cuda", **changes)


@pytest.mark.parametrize("changes", VARIANTS.values(), ids=VARIANTS.keys())
def test_every_variant_traces_on_the_device(changes):
    """Model and guide run on CUDA under validation: every sample site's value and log-prob live there."""
    config = _config(**changes)
    vae = build_vae(config, num_data=1000).to(CUDA)
    x, y = _batch(config)
    y = y if config.conditional else None  # labelled: the semi-supervised guide has nothing to enumerate
    guide_trace = poutine.trace(vae.guide).get_trace(x, y)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x, y)
    for trace in (guide_trace, model_trace):
        trace.compute_log_prob()  # checks every value against its distribution's support and shape
        for name, site in trace.nodes.items():
            if site["type"] == "sample" and name != "data":
                assert site["value"].device.type == "cuda", name
                assert site["log_prob"].device.type == "cuda" and torch.isfinite(site["log_prob"]).all(), name


@pytest.mark.parametrize("changes", VARIANTS.values(), ids=VARIANTS.keys())
def test_the_training_step_runs_on_the_device(changes):
    """The trainer's SVIStep on CUDA: a finite loss tensor there, every gradient there, the weights moved."""
    config = _config(**changes)
    vae = build_vae(config, num_data=1000).to(CUDA)
    before = {name: p.detach().clone() for name, p in vae.named_parameters()}
    svi = SVIStep(vae, config)
    x, y = _batch(config)
    batches = [(x, y if config.conditional else None)]
    if config.labels:
        batches.append((x, None))  # an unlabelled batch: TraceEnum_ELBO sums over the ten digits on the GPU
    for xb, yb in batches * 2:  # the second round runs with Pyro's checks off, as training does
        loss = svi.step(xb, yb)
        assert isinstance(loss, torch.Tensor) and loss.device.type == "cuda" and not loss.requires_grad
        assert math.isfinite(loss.item())
    moved = [name for name, p in vae.named_parameters() if not torch.equal(p, before[name])]
    assert moved and all(p.device.type == "cuda" for p in vae.parameters())


def test_a_short_cuda_run_trains_and_its_checkpoint_loads_on_the_cpu_and_back(small_config, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # TF32 convs would differ from the CPU by 1e-3
    run = train(_cuda_run(small_config))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(math.isfinite(r["test_elbo"]) for r in rows)
    assert rows[-1]["train_objective"] > rows[0]["train_objective"]
    state = read_checkpoint(run)  # mapped to the CPU whatever device wrote it
    assert all(t.device.type == "cpu" for t in state["model"].values())

    on_cpu, on_cuda = pyro_vae.load(run, device="cpu"), pyro_vae.load(run, device="cuda")
    for name, value in on_cpu.vae.state_dict().items():
        assert value.device.type == "cpu" and torch.equal(value, state["model"][name]), name
        assert torch.equal(on_cuda.vae.state_dict()[name].cpu(), value), name
    z = torch.randn(8, small_config.latent_dim)
    torch.testing.assert_close(on_cuda.decode(z).cpu(), on_cpu.decode(z), rtol=1e-4, atol=1e-5)
    images = load_mnist(small_config.data_dir, train_size=1, test_size=16).test_images
    loc_cpu, _ = on_cpu.encode(images)
    loc_cuda, _ = on_cuda.encode(images)
    torch.testing.assert_close(loc_cuda.cpu(), loc_cpu, rtol=1e-4, atol=1e-4)


def test_a_run_interrupted_on_cuda_resumes_to_the_same_end(small_config, tmp_path, monkeypatch):
    """SIGTERM mid-epoch on CUDA checkpoints (CUDA random state and plan included); resume finishes the run."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)  # the comparison below needs repeatable convs
    config = _cuda_run(small_config, epochs=3)
    straight = train(dataclasses.replace(config, out=str(tmp_path / "straight")))

    real_step, count = SVIStep.step, {"n": 0}

    def step_then_signal(self, *args, **kwargs):
        loss = real_step(self, *args, **kwargs)
        count["n"] += 1
        if count["n"] == 11:  # epoch 2 of 3, 3 steps in (8 steps per epoch)
            signal.raise_signal(signal.SIGTERM)
        return loss

    monkeypatch.setattr(SVIStep, "step", step_then_signal)
    interrupted = dataclasses.replace(config, out=str(tmp_path / "interrupted"))
    with pytest.raises(Interrupted):
        train(interrupted)
    state = read_checkpoint(interrupted.out)
    assert state["epoch"] == 1 and state["position"] == 3 and "cuda" in state["rng"]
    monkeypatch.setattr(SVIStep, "step", real_step)
    resume(interrupted.out)

    a, b = read_checkpoint(straight), read_checkpoint(interrupted.out)
    assert a["epoch"] == b["epoch"] == 3 and a["step"] == b["step"] == 24
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_evaluation_on_cuda_agrees_with_the_cpu_within_monte_carlo_error(small_config):
    """The same checkpoint evaluated on both devices: different draws of z, the same images, so the means
    differ only by Monte Carlo noise, which each summary's standard error (image spread plus noise) bounds."""
    run = train(_cuda_run(small_config, epochs=1))
    figures = {device: evaluate_run(run, k=50, limit=64, device=device, progress=False)
               for device in ("cpu", "cuda")}
    assert figures["cuda"]["device"].startswith("cuda") and figures["cpu"]["device"] == "cpu"
    for name in ("log_px", "elbo"):
        cpu, cuda = figures["cpu"][name], figures["cuda"][name]
        bound = 4 * math.hypot(cpu["stderr"], cuda["stderr"])
        assert abs(cpu["mean"] - cuda["mean"]) < bound, (name, cpu, cuda)
    assert figures["cuda"]["log_px"]["mean"] >= figures["cuda"]["elbo"]["mean"]
    assert figures["cpu"]["latent_dim"] == figures["cuda"]["latent_dim"]


def test_the_cvae_trains_on_cuda_and_samples_the_digit_asked_for(small_config):
    run = train(_cuda_run(small_config, conditional=True))
    trained = pyro_vae.load(run, device="cuda")
    images = trained.sample(20, y=torch.arange(10).repeat(2))
    assert images.shape == (20, 1, 28, 28) and images.device.type == "cuda"
    assert torch.isfinite(images).all() and ((images >= 0) & (images <= 1)).all()


def test_the_semi_supervised_model_trains_on_cuda_and_classifies(small_config, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # so near-ties of q(y | x) break as on the CPU
    run = train(_cuda_run(small_config, conditional=True, labels=100))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 and math.isfinite(r["test_elbo"]) for r in rows)
    trained = pyro_vae.load(run, device="cuda")
    images = load_mnist(small_config.data_dir, train_size=1, test_size=32).test_images
    predicted = trained.classify(images)
    assert predicted.shape == (32,) and predicted.device.type == "cuda"
    assert torch.equal(predicted.cpu(), pyro_vae.load(run, device="cpu").classify(images))


def test_the_cli_trains_on_cuda_by_default(data_dir, tmp_path):
    """`python -m pyro_vae.train` with no --device picks the GPU and records it; the run loads on the CPU."""
    out = tmp_path / "run"
    assert main(["--max-steps", "5", "--train-size", "512", "--test-size", "128", "--batch-size", "32",
                 "--latent-dim", "2", "--out", str(out), "--data-dir", str(data_dir)]) == 0
    assert json.loads((out / "config.json").read_text())["device"] == "cuda"
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 5
    assert pyro_vae.load(out).config.latent_dim == 2

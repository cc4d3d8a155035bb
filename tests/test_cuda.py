"""The CUDA path: the step that never waits, the captured step, training, checkpoints, resume and evaluation
on the GPU (`pytest -m cuda`), most important first: a short GPU window may cut the run.

Skipped where torch sees no CUDA device; experiments/campaign.py runs them first on a lent GPU.
"""

import dataclasses
import json
import math
import signal
from pathlib import Path

import pyro
import pytest
import torch
from pyro import poutine

import pyro_vae
from pyro_vae import step as step_module
from pyro_vae.checkpoint import read_checkpoint
from pyro_vae.config import Config
from pyro_vae.data import load_mnist
from pyro_vae.evaluate import evaluate_run, importance_estimates
from pyro_vae.model import build_vae
from pyro_vae.train import GRAPH_WARMUP_STEPS, Interrupted, SVIStep, free_bits_weight, main, resume, train

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


# the estimators the trainer uses, each on a kind of batch it meets; Config kwargs and whether y is given
ESTIMATORS = {
    "trace": ({}, False),
    "trace, KL warm-up": ({"kl_warmup_epochs": 1.0}, False),
    "meanfield": ({"elbo": "meanfield"}, False),
    "iwae": ({"elbo": "iwae", "num_particles": 3}, False),
    "enum, unlabelled batch": ({"conditional": True, "labels": 100}, False),
    "enum, labelled batch": ({"conditional": True, "labels": 100}, True),
}


@pytest.mark.parametrize("name", ESTIMATORS)
def test_the_eager_step_never_waits_for_the_gpu_after_the_first_steps(name):
    """torch's sync debug mode turns every synchronising call (a read of a value, a copy from the host) into
    an error: the trainer's eager step makes none once Pyro's checks of the first step are over."""
    changes, labelled = ESTIMATORS[name]
    config = _config(cuda_graph=False, **changes)
    vae = build_vae(config, num_data=1000).to(CUDA)
    vae.kl_weight = 0.4 if config.kl_warmup_epochs else 1.0
    x, y = _batch(config)
    y = y if labelled else None
    svi = SVIStep(vae, config)
    for _ in range(2):
        svi.step(x, y)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [svi.step(x, y) for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(math.isfinite(loss.item()) for loss in losses)


def _steps(graph: bool, config: Config, batches: list, lr: float | None = None) -> tuple[list[float], SVIStep]:
    """The trainer's step over the batches from the same initial weights and seed, captured or eager; the KL
    weight changes every step, as under warm-up, so a captured step must read it afresh."""
    config = dataclasses.replace(config, cuda_graph=graph, lr=config.lr if lr is None else lr)
    pyro.clear_param_store()
    torch.manual_seed(0)
    vae = build_vae(config, num_data=1000).to(CUDA)
    pyro.set_rng_seed(1)
    svi = SVIStep(vae, config)
    losses = []
    for i, x in enumerate(batches):
        vae.kl_weight = free_bits_weight(vae, x, None, min(1.0, 0.1 * (i + 1)), config)  # as the loop decides it
        losses.append(svi.step(x))
    return [loss.item() for loss in losses], svi


def test_the_captured_step_takes_the_eager_steps_under_one_seed():
    """Replays draw from CUDA's graph-safe Philox stream at the offsets the eager steps would use, and read the
    batch and KL weight from their static buffers: the same losses, step for step (the last digits differ:
    the captured step's Adam keeps its step count on the GPU)."""
    config = _config()
    batches = [_batch(config)[0].roll(i, 0) for i in range(GRAPH_WARMUP_STEPS + 6)]
    eager, eager_svi = _steps(False, config, batches)
    captured, svi = _steps(True, config, batches)
    assert not eager_svi._graphs and len(svi._graphs) == 1, "the step was not captured"
    assert captured == pytest.approx(eager, rel=1e-4)


@pytest.mark.parametrize("floor", [1e-6, 1e6], ids=["never floored", "always floored"])
def test_the_captured_step_under_free_bits_takes_the_eager_steps(floor):
    """--free-bits: each step's KL estimate (kl_per_image) draws z eagerly between replays, and a floored step's
    weight is 0, which the eager model applies as a poutine.mask and the graph as its weight tensor's 0: the same
    losses step for step either way."""
    config = _config(free_bits=floor)
    batches = [_batch(config)[0].roll(i, 0) for i in range(GRAPH_WARMUP_STEPS + 6)]
    eager, eager_svi = _steps(False, config, batches)
    captured, svi = _steps(True, config, batches)
    assert not eager_svi._graphs and len(svi._graphs) == 1, "the step was not captured"
    assert captured == pytest.approx(eager, rel=1e-4)
    assert captured != pytest.approx(_steps(True, _config(), batches)[0], rel=1e-4)  # free bits were on: the
    # estimate draws z between the steps, and the floor, where it binds, takes their KL term out


def test_bf16_inside_the_captured_step_takes_the_eager_bf16_steps():
    """--precision bf16 on CUDA (issue 40, item 4): the captured step runs the networks under the eager step's
    autocast, so the same losses step for step, within one bf16 rounding (2^-8) of their size, and not fp32's."""
    batches = [_batch(_config())[0].roll(i, 0) for i in range(GRAPH_WARMUP_STEPS + 6)]
    eager, eager_svi = _steps(False, _config(precision="bf16"), batches)
    captured, svi = _steps(True, _config(precision="bf16"), batches)
    assert not eager_svi._graphs and len(svi._graphs) == 1, "the step was not captured"
    assert captured == pytest.approx(eager, rel=2 ** -8)
    assert captured != pytest.approx(_steps(True, _config(), batches)[0], rel=1e-6)  # it did compute in bf16


def test_captured_and_eager_steps_draw_the_same_loss_distribution():
    """lr 0: a fixed model, so each step's loss is one fresh draw of the estimate. Captured replays must not
    repeat their draws: the same mean within Monte Carlo error and the same spread."""
    config = _config()
    x = _batch(config)[0]
    draws = 300
    (eager, _), (captured, svi) = (_steps(graph, config, [x] * draws, lr=0.0) for graph in (False, True))
    assert svi._graphs
    e, c = torch.tensor(eager, dtype=torch.float64), torch.tensor(captured, dtype=torch.float64)
    stderr = math.hypot(e.std().item(), c.std().item()) / math.sqrt(draws)
    assert abs(e.mean().item() - c.mean().item()) < 5 * stderr, (e.mean(), c.mean(), stderr)
    # the sample standard deviations of 300 draws each: their ratio is within 1 +- 0.3 (about 5 standard errors)
    assert 0.7 < c.std().item() / e.std().item() < 1.4
    assert len(set(captured[GRAPH_WARMUP_STEPS:])) > draws // 2  # fresh draws, not one replayed


def test_a_captured_run_interrupted_on_cuda_resumes_to_the_same_end(small_config, tmp_path, monkeypatch):
    """SIGTERM mid-epoch with the step captured: the checkpoint (capturable Adam, CUDA random state, plan)
    resumes, captured again, to the parameters of the uninterrupted run; its Adam state also loads eagerly."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)  # the comparison below needs repeatable convs
    captures = []
    real_capture = step_module._CapturedStep.__init__

    def counted(self, *args, **kwargs):
        real_capture(self, *args, **kwargs)
        captures.append(self)

    monkeypatch.setattr(step_module._CapturedStep, "__init__", counted)
    config = _cuda_run(small_config, epochs=3)
    straight = train(dataclasses.replace(config, out=str(tmp_path / "straight")))
    assert len(captures) == 1

    real_step, count = SVIStep.step, {"n": 0}

    def step_then_signal(self, *args, **kwargs):
        loss = real_step(self, *args, **kwargs)
        count["n"] += 1
        if count["n"] == 11:  # epoch 2 of 3, 3 steps in (8 steps per epoch), long after the capture
            signal.raise_signal(signal.SIGTERM)
        return loss

    monkeypatch.setattr(SVIStep, "step", step_then_signal)
    interrupted = dataclasses.replace(config, out=str(tmp_path / "interrupted"))
    with pytest.raises(Interrupted):
        train(interrupted)
    state = read_checkpoint(interrupted.out)
    assert state["epoch"] == 1 and state["position"] == 3
    assert len(state["rng"]) == 1 and "cuda" in state["rng"][0]  # one process: one random state, with CUDA's
    assert all(group["capturable"] and group["fused"] for group in state["optimizer"]["param_groups"])
    monkeypatch.setattr(SVIStep, "step", real_step)
    resume(interrupted.out)
    assert len(captures) == 3  # the straight run, the interrupted one, the resumed one

    a, b = read_checkpoint(straight), read_checkpoint(interrupted.out)
    assert a["epoch"] == b["epoch"] == 3 and a["step"] == b["step"] == 24
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=1e-4, atol=1e-5, msg=name)

    on_cpu = dataclasses.replace(config, device="cpu")
    eager = SVIStep(build_vae(on_cpu, num_data=512), on_cpu)
    eager.load_state(b["optimizer"], Path(interrupted.out))
    assert math.isfinite(eager.step(_batch(on_cpu)[0].cpu()).item())


def test_evaluation_on_cuda_agrees_with_the_cpu_image_by_image(small_config, monkeypatch):
    """The same checkpoint evaluated on both devices draws different z for the same images: paired per-image
    differences of log p(x) and the ELBO average to 0 within their own standard error (the spread between
    images, much larger, cancels in each pair)."""
    # TF32 convolutions round differently from the CPU by about 1e-3: a bias the paired test could see
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    run = train(_cuda_run(small_config, epochs=1))
    figures = evaluate_run(run, k=50, limit=64, device="cuda", progress=False)  # the user's path, on the GPU
    assert figures["device"].startswith("cuda") and figures["num_images"] == 64 and figures["k"] == 50
    images = load_mnist(small_config.data_dir, train_size=1, test_size=64).test_images
    estimates = {device: importance_estimates(pyro_vae.load(run, device=device).vae, images.to(device),
                                              num_samples=50)
                 for device in ("cpu", "cuda")}
    for name in ("log_px", "elbo"):
        difference = (getattr(estimates["cpu"], name).double()
                      - getattr(estimates["cuda"], name).double().cpu())  # (64,): one pair per image
        stderr = difference.std().item() / math.sqrt(len(difference))
        assert abs(difference.mean().item()) < 5 * stderr, (name, difference.mean().item(), stderr)
    cuda_mean = getattr(estimates["cuda"], "log_px").double().mean().item()
    assert abs(cuda_mean - figures["log_px"]["mean"]) < 5 * figures["log_px"]["stderr"]


def test_the_benchmarks_captured_sides_take_the_steps_of_their_eager_sides():
    """bench's project-graph and yardstick-graph sides: captured after their warm-up, the same losses as eager."""
    from benchmarks.bench import ProjectTrainer, Yardstick

    config = dataclasses.replace(_config(), cuda_graph=False)
    batches = [_batch(config)[0].roll(i, 0) for i in range(Yardstick.WARMUP_STEPS + 4)]
    makers = {"project": lambda graph: ProjectTrainer(dataclasses.replace(config, cuda_graph=graph), 1000, CUDA),
              "yardstick": lambda graph: Yardstick(config, 1000, CUDA, capture=graph)}
    for name, make in makers.items():
        losses = {}
        for graph in (False, True):
            pyro.clear_param_store()
            torch.manual_seed(0)
            side = make(graph)
            pyro.set_rng_seed(1)
            with side.scope():
                losses[graph] = [float(side.step(x)) for x in batches]
        captured = side.svi._graphs if name == "project" else side.graph
        assert captured, name
        assert losses[True] == pytest.approx(losses[False], rel=1e-4), name


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
    for xb, yb in batches * (GRAPH_WARMUP_STEPS + 2):  # Pyro's checks on the first round; then captured
        loss = svi.step(xb, yb)
        assert isinstance(loss, torch.Tensor) and loss.device.type == "cuda" and not loss.requires_grad
        assert math.isfinite(loss.item())
    moved = [name for name, p in vae.named_parameters() if not torch.equal(p, before[name])]
    assert moved and all(p.device.type == "cuda" for p in vae.parameters())
    # torch's StudentT makes a constant on the device in each step (its Chi2): that step stays eager
    assert len(svi._graphs) == len(batches) or config.prior == "studentt"


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
    saved = json.loads((out / "config.json").read_text())
    assert saved["device"] == "cuda" and saved["cuda_graph"]
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 5
    assert pyro_vae.load(out).config.latent_dim == 2


@pytest.mark.parametrize("run, k", [("pretrained/conv32_full", 4), ("pretrained/hierarchical", 1)])
def test_a_file_encoded_on_the_cpu_decodes_bit_for_bit_on_the_gpu(run, k, data_dir):
    """The fixed-point coding networks (pyro_vae/compress/networks.py) compute the same integers on a GPU."""
    pytest.importorskip("constriction")  # the device carries it as a wheel (docs/gpu.md)
    from pyro_vae import compress

    images = load_mnist(data_dir, split="test", test_size=40).test_images.reshape(40, 28, 28).to(torch.uint8).numpy()
    data = compress.encode(run, images, k=k, progress=False)
    assert compress.read_header(data).exact
    restored = compress.decode(None, data, progress=False, device="cuda")
    assert (restored == images).all()

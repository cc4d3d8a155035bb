"""bf16 mixed precision (--precision): the networks in bf16, everything Pyro sums in fp32; auto's choice; runs."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch
from pyro import poutine

import pyro_vae
from pyro_vae import precision, step as step_module
from pyro_vae.checkpoint import read_checkpoint
from pyro_vae.config import Config
from pyro_vae.data import load_mnist
from pyro_vae.evaluate import elbo_and_kl_per_image
from pyro_vae.model import build_vae
from pyro_vae.precision import autocast, resolve
from pyro_vae.train import Paused, SVIStep, resume, train
from conftest import SEED

TINY = dict(latent_dim=4, conv_channels=(4, 8), device="cpu")


def _batch(seed: int, n: int = 16) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed)).bernoulli()


@pytest.mark.parametrize("variant", [{}, {"arch": "mlp"}, {"guide": "iaf"}, {"prior": "vamp"},
                                     {"likelihood": "pixelcnn", "pixelcnn_channels": 4, "pixelcnn_layers": 1},
                                     {"layers": 2, "layer_hidden_dim": 8}, {"prior": "flow", "layers": 1}])
def test_under_bf16_the_networks_compute_in_bf16_and_every_log_prob_is_fp32(variant):
    """The bf16 autocast reaches the networks (a linear or conv layer's output is bf16), but every site's
    distribution parameters and log-prob, and so the ELBO Pyro sums, are fp32: a sum of 784 Bernoulli terms in bf16
    would be off by whole nats (below)."""
    vae = build_vae(Config(**TINY, **variant), num_data=100)
    layer_dtypes = []
    for m in vae.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            m.register_forward_hook(lambda m, a, out: layer_dtypes.append(out.dtype))
    x = _batch(SEED)
    with autocast("bf16", x.device):
        guide = poutine.trace(vae.guide).get_trace(x)
        model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(x)
        loss = pyro.infer.Trace_ELBO().differentiable_loss(vae.model, vae.guide, x)
    assert torch.bfloat16 in layer_dtypes
    for trace in (guide, model):
        trace.compute_log_prob()
        for name, site in trace.nodes.items():
            if site["type"] == "sample":
                assert site["log_prob"].dtype == torch.float32, name
                assert site["value"].dtype in (torch.float32, torch.int64), name
    assert loss.dtype == torch.float32


def test_a_sum_of_784_bernoulli_log_probs_in_bf16_is_off_by_whole_nats():
    """Why the boundary exists: the likelihood term of one image, summed in bf16, is nats away from fp32's."""
    g = torch.Generator().manual_seed(SEED)
    logits, x = torch.randn(784, generator=g) * 3, torch.rand(784, generator=g).bernoulli()
    terms = -torch.nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="none")
    exact = terms.double().sum().item()
    total = torch.zeros((), dtype=torch.bfloat16)
    for term in terms.bfloat16():  # summed in bf16: each partial sum rounded to bf16's 8 significant bits
        total = total + term
    assert abs(total.item() - exact) > 1.0
    assert abs(terms.sum().item() - exact) < 1e-3  # in fp32, as the ELBO sums it


def _gradients(config: Config, x: torch.Tensor, seed: int, monkeypatch) -> list[torch.Tensor]:
    """The gradients that the trainer's own step hands Adam on its first step, z drawn from `seed`."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    svi = SVIStep(build_vae(config, num_data=1000), config)
    seen = []
    real_step = svi.optimizer.step
    monkeypatch.setattr(svi.optimizer, "step", lambda: (seen.append([p.grad.clone() for p in svi.params]),
                                                        real_step())[1])
    torch.manual_seed(seed)
    svi.step(x)
    return seen[0]


# Roundings to bf16 on the way to a parameter's gradient, at most: each of the conv VAE's 7 layers rounds its input
# and weight forward (2) and its output's gradient and weight or input in each of its 2 backward products (4)
ROUNDINGS = 7 * 6


def test_the_bf16_steps_gradients_are_fp32s_within_bf16s_rounding(monkeypatch):
    """The bf16 step's gradient of each parameter against fp32's, on the same batch and the same draws of z: off by
    at most one bf16 rounding step (2^-8, relative) per rounding on its way (ROUNDINGS, added as if all in one
    direction), of the gradient's size, for each of three draws. A step that ignored --precision would differ by
    exactly 0."""
    g = torch.Generator().manual_seed(SEED)
    x = torch.rand(32, 1, 28, 28, generator=g).bernoulli(generator=g)
    fp32, bf16 = (Config(**TINY, precision=p) for p in ("fp32", "bf16"))
    for draw in range(3):
        exact = _gradients(fp32, x, SEED * 10 + draw, monkeypatch)
        rounded = _gradients(bf16, x, SEED * 10 + draw, monkeypatch)
        errors = [((r - e).norm() / e.norm()).item() for e, r in zip(exact, rounded)]
        assert all(error < ROUNDINGS * 2 ** -8 for error in errors), errors
        assert all(error > 0 for error in errors)  # bf16 did run


def test_auto_is_bf16_only_where_torch_and_the_cpu_say_bf16_is_native(monkeypatch):
    """auto: bf16 on a CPU with avx512_bf16 (or amx_bf16) whose torch kernels run at AVX512 and whose oneDNN may
    use bf16; fp32 when any of them is missing (forced here, whatever this CPU is)."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert resolve("auto", cpu)[0] == "bf16"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert resolve("auto", cpu)[0] == "bf16"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert resolve("auto", cpu) == ("fp32", "oneDNN is limited to AVX2 (ONEDNN_MAX_CPU_ISA), which has no bf16")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert resolve("auto", cpu)[0] == "fp32"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"avx2", "avx512f"})  # AVX-512 without its bf16 part
    assert resolve("auto", cpu)[0] == "fp32"
    assert resolve("bf16", cpu)[0] == "bf16" and resolve("fp32", cpu)[0] == "fp32"  # asked for: as asked


@pytest.mark.slow
def test_auto_is_fp32_with_torch_and_onednn_held_to_avx2():
    """In a fresh process under ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 (on any CPU) auto is fp32, and
    torch reports what the probe reads: kernels at AVX2."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "1"}
    script = ("import torch; from pyro_vae.precision import resolve; "
              "print(torch.backends.cpu.get_cpu_capability(), *resolve('auto', torch.device('cpu')))")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    capability, chosen, *_ = out.stdout.split()
    assert (capability, chosen) == ("AVX2", "fp32")


@pytest.mark.slow
def test_a_bf16_run_saves_fp32_weights_and_loads_and_evaluates_in_fp32(small_config):
    """A run with --precision bf16: its config and checkpoint say bf16, its weights are fp32, and pyro_vae.load
    evaluates it in fp32 to the test ELBO the run itself printed (the trainer's evaluation is fp32 too)."""
    config = dataclasses.replace(small_config, precision="bf16", epochs=1, max_steps=4)
    out = train(config)
    state = read_checkpoint(out)
    assert state["config"]["precision"] == "bf16"
    assert json.loads((out / "config.json").read_text())["precision"] == "bf16"
    assert all(t.dtype == torch.float32 for t in state["model"].values() if t.is_floating_point())
    run = pyro_vae.load(out)
    data = load_mnist(config.data_dir, binarize=config.binarize, test_size=config.test_size,
                      train_size=config.train_size)
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)  # the trainer's evaluation stream
        elbo, _ = elbo_and_kl_per_image(run.vae, data.test_images, batch_size=config.eval_batch_size)
    assert elbo.dtype == torch.float32
    logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["test_elbo"]
    assert math.isclose(elbo.mean().item(), logged, rel_tol=1e-5)


@pytest.mark.slow
def test_auto_is_decided_once_saved_with_the_run_and_kept_on_resume(small_config, monkeypatch):
    """train resolves auto once (here forced to bf16) and saves bf16 in config.json and the checkpoint; resumed
    where auto would choose fp32, the run still steps in bf16."""
    used = []
    real_autocast = step_module.autocast
    monkeypatch.setattr(step_module, "autocast", lambda p, *a, **k: (used.append(p), real_autocast(p, *a, **k))[1])
    monkeypatch.setattr(precision, "bf16_is_fast", lambda device: (True, "forced by the test"))
    config = dataclasses.replace(small_config, precision="auto", epochs=2, train_size=256)
    with pytest.raises(Paused):
        train(config, stop_after=1)
    out = config.out
    assert json.loads((Path(out) / "config.json").read_text())["precision"] == "bf16"
    assert read_checkpoint(out)["config"]["precision"] == "bf16" and set(used) == {"bf16"}
    used.clear()
    monkeypatch.setattr(precision, "bf16_is_fast", lambda device: (False, "forced by the test"))
    resume(out)
    assert read_checkpoint(out)["config"]["precision"] == "bf16" and used and set(used) == {"bf16"}

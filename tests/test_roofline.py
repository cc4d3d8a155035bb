"""Issue 30: the roofline's FLOP count against a hand-derived one, the channels-last path against the contiguous one
through the trainer's own step, and checkpoints that continue in the other layout."""

import dataclasses
import json

import pyro
import pytest
import torch
from torch import nn

import pyro_vae
from benchmarks import roofline
from pyro_vae.checkpoint import read_checkpoint
from pyro_vae.config import Config
from pyro_vae.model import MEMORY_FORMAT, build_vae
from pyro_vae.train import Paused, SVIStep, resume, train

CONTIGUOUS = torch.contiguous_format


def conv_vae_forward_flops(batch: int, channels: tuple[int, int], latent: int) -> int:
    """The conv VAE's forward FLOPs by hand, 2 per multiply-add (as torch's counter): encoder and decoder on a batch."""
    c1, c2 = channels
    macs = (196 * 9 * 1 * c1  # Conv2d(1, c1, 3, stride 2): 14 x 14 outputs, 9 taps of 1 channel each
            + 49 * 9 * c1 * c2  # Conv2d(c1, c2, 3, stride 2): 7 x 7 outputs
            + 49 * c2 * 2 * latent  # the head: Linear(c2 * 7 * 7, 2 * latent) -> loc and scale
            + latent * c1 * 49  # Linear(latent, c1 * 7 * 7)
            + 49 * 9 * c1 * c2  # ConvTranspose2d(c1, c2, stride 2): each of 7 x 7 inputs to 9 taps x c2 outputs
            + 196 * 9 * c2 * c1  # ConvTranspose2d(c2, c1, stride 2): from 14 x 14 inputs
            + 784 * 9 * c1 * 1)  # ConvTranspose2d(c1, 1, stride 1): from 28 x 28 inputs
    return 2 * batch * macs


def test_the_flop_count_of_the_models_forward_pass_is_the_hand_derived_one():
    config = Config(conv_channels=(4, 8), latent_dim=3, device="cpu")
    svi = SVIStep(build_vae(config, num_data=1000), config)
    x = torch.rand(5, 1, 28, 28).bernoulli()
    flops, calls = roofline.count(lambda: svi.objective(x, None))  # the ELBO's forward pass, as the step runs it
    assert flops == conv_vae_forward_flops(5, (4, 8), 3) == 2 * 5 * 122_892
    assert sum(roofline.op_flops(op) * n for op, n in calls.items()) == flops  # every counted op was recorded
    assert sorted(op.func.overloadpacket.__name__ for op in calls.elements()) == ["addmm"] * 2 + ["convolution"] * 5


def test_the_roofline_runs_a_tiny_model_and_writes_its_figures(tmp_path, data_dir, capsys):
    out = tmp_path / "roofline.json"
    assert roofline.main(["--threads", "1", "--rounds", "1", "--k", "4", "--json", str(out), "--",
                          "--conv-channels", "2", "4", "--latent-dim", "2", "--batch-size", "4",
                          "--train-size", "64", "--test-size", "8", "--data-dir", str(data_dir)]) == 0
    results = json.loads(out.read_text())
    step, batch = results["workloads"].values()
    assert step["flops"] == step["flops_of_recorded_ops"] > 3 * conv_vae_forward_flops(4, (2, 4), 2) * 0.9
    assert batch["flops"] == batch["flops_of_recorded_ops"] > 0
    for workload in (step, batch):
        row = workload["threads"]["1"]
        assert row["fraction"] == pytest.approx(workload["attainable_s"] / row["seconds"])
    conv = [row for row in results["ops"] if row["op"].startswith("convolution")]
    assert conv and all({"contiguous/1", "channels_last/1"} <= set(row["gflops"]) for row in conv)
    gemm = results["gemm"]  # the hardware's peak beside torch's per-op best
    assert gemm["gflops"]["1"] > 0 and gemm["gflops_bf16"]["1"] > 0
    report = capsys.readouterr().out
    assert "of attainable" in report
    fraction = step["threads"]["1"]["gflops"] / gemm["gflops"]["1"]
    assert f"1 thread(s) {fraction:.0%} of the fp32 peak" in report
    with pytest.raises(SystemExit) as exit_info:  # the model's flags are the trainer's, checked by its parser
        roofline.main(["--", "--prior", "nonsense"])
    assert exit_info.value.code == 2


def _step_with_gradients(config: Config, x: torch.Tensor, layout, monkeypatch) -> tuple[torch.Tensor, list, bool]:
    """One step of the trainer's SVIStep with the convolutions in layout: its loss, the gradients Adam was given,
    and whether the decoder's widest activation was channels-last."""
    monkeypatch.setitem(MEMORY_FORMAT, "cpu", layout)
    torch.manual_seed(0)
    vae = build_vae(config, num_data=1000)
    svi = SVIStep(vae, config)
    grads, seen = [], []
    svi.optimizer.register_step_pre_hook(lambda *_: grads.extend(p.grad.clone() for p in svi.params))
    widest = [m for m in vae.decoder.modules() if isinstance(m, nn.ConvTranspose2d)][1]
    widest.register_forward_hook(lambda m, args, out: seen.append(out.is_contiguous(memory_format=torch.channels_last)
                                                                  and not out.is_contiguous()))
    torch.manual_seed(1)
    with pyro.get_param_store().scope():
        loss = svi.step(x)
    return loss, grads, seen[0]


def test_the_channels_last_path_gives_the_loss_and_gradients_of_the_contiguous_one(monkeypatch):
    config = Config(conv_channels=(8, 16), latent_dim=4, device="cpu")
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(2)).bernoulli()
    fast_loss, fast, channels_last = _step_with_gradients(config, x, torch.channels_last, monkeypatch)
    plain_loss, plain, contiguous = _step_with_gradients(config, x, CONTIGUOUS, monkeypatch)
    assert channels_last and not contiguous  # each path ran in its own layout
    assert fast_loss.item() == pytest.approx(plain_loss.item(), rel=1e-5)
    assert len(fast) == len(plain) == len(list(build_vae(config).parameters()))
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("first, then", [(torch.channels_last, CONTIGUOUS), (CONTIGUOUS, torch.channels_last)])
def test_a_checkpoint_written_in_one_layout_continues_in_the_other(first, then, small_config, tmp_path, monkeypatch):
    """Stopped after the first epoch and resumed in the other layout, a run ends where it ends uninterrupted, up to
    what the layouts' rounding does to it. The two layouts' kernels sum in other orders, and Adam turns a rounding
    difference in a gradient near zero into a different step, so that yardstick is measured here on this CPU: the
    same run trained straight through in each layout. A resume that lost the optimizer's moments, the data order or
    the RNG moves weights by about lr = 1e-3 a step, hundreds of times that."""
    config = dataclasses.replace(small_config, epochs=2)
    straight = {}
    for layout, name in ((first, "straight"), (then, "other")):
        monkeypatch.setitem(MEMORY_FORMAT, "cpu", layout)
        train(dataclasses.replace(config, out=str(tmp_path / name)))
        straight[name] = pyro_vae.load(tmp_path / name).vae.state_dict()
    monkeypatch.setitem(MEMORY_FORMAT, "cpu", first)
    with pytest.raises(Paused):
        train(config, stop_after=1)
    saved = read_checkpoint(config.out)
    assert saved["epoch"] == 1 and all(t.is_contiguous() for t in saved["model"].values())

    monkeypatch.setitem(MEMORY_FORMAT, "cpu", then)
    resume(config.out)
    store = pyro.get_param_store()  # Pyro's store holds the very tensors the resumed steps trained
    resumed = pyro_vae.load(config.out).vae
    assert all(torch.equal(store[f"decoder$$${name}"], p) for name, p in resumed.decoder.named_parameters())
    assert read_checkpoint(config.out)["epoch"] == 2

    def distance(a: dict, b: dict) -> float:
        return max((a[name] - b[name]).abs().max().item() for name in a)

    layouts_apart = distance(straight["other"], straight["straight"])  # two epochs of the layouts' rounding
    tolerance = 10 * layouts_apart + 8 * 2 ** -24  # the resumed run saw one epoch of it; fp32's eps on weights ~ 1
    assert tolerance < 1e-4  # the yardstick is rounding, far below one Adam step
    assert distance(resumed.state_dict(), straight["straight"]) <= tolerance

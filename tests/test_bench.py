"""The benchmark: its yardstick computes the trainer's objective, and a tiny run gives a sane result.

No timing assertions: speed depends on the machine and its load; only the structure is checked.
"""

import dataclasses
import json
import math

import pytest
import torch

from benchmarks.bench import ProjectTrainer, Yardstick, main, yardstick_loss
from pyro_vae.config import Config
from pyro_vae.model import build_vae
from pyro_vae.train import SVIStep, make_elbo

NUM_DATA = 1000
TINY = {"mlp": Config(arch="mlp", hidden_dim=32, latent_dim=4, device="cpu"),
        "conv": Config(arch="conv", conv_channels=(4, 8), latent_dim=4, device="cpu")}


def _batch(batch_size: int = 8, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch_size, 1, 28, 28, generator=generator).bernoulli(generator=generator)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_yardstick_loss_and_gradients_equal_trace_elbo_at_the_same_draw(arch):
    """Under the same seed both sides draw the same eps, so value and gradients must agree to rounding."""
    vae = build_vae(TINY[arch], num_data=NUM_DATA)
    elbo, x = make_elbo(TINY[arch]), _batch()
    params = list(vae.parameters())
    for seed in (0, 1):
        torch.manual_seed(seed)
        pyro_loss = elbo.differentiable_loss(vae.model, vae.guide, x)
        pyro_grads = torch.autograd.grad(pyro_loss, params)
        torch.manual_seed(seed)
        hand_loss = yardstick_loss(vae.encoder, vae.decoder, x, NUM_DATA)
        hand_grads = torch.autograd.grad(hand_loss, params)
        assert hand_loss.item() == pytest.approx(pyro_loss.item(), rel=1e-5)
        for a, b in zip(hand_grads, pyro_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)

    # the agreement is not trivial: another draw of z gives another value
    torch.manual_seed(3)
    other = yardstick_loss(vae.encoder, vae.decoder, x, NUM_DATA).item()
    assert other != pytest.approx(pyro_loss.item(), rel=1e-5)


def _one_step_each(config: Config, x: torch.Tensor) -> tuple[ProjectTrainer, Yardstick, float, float]:
    """Both sides built from the same initial weights, then one step each on x under the same draw: the sides
    and their losses."""
    torch.manual_seed(0)
    project = ProjectTrainer(config, NUM_DATA, torch.device("cpu"))
    torch.manual_seed(0)
    yardstick = Yardstick(config, NUM_DATA, torch.device("cpu"))
    torch.manual_seed(5)
    with project.scope():
        project_loss = project.step(x)
    torch.manual_seed(5)
    return project, yardstick, project_loss, yardstick.step(x).item()


def test_one_training_step_moves_both_sides_to_the_same_parameters():
    """Same initial weights, same batch, same draw: the SVI step and the hand-written step agree."""
    config = TINY["mlp"]
    project, yardstick, project_loss, yardstick_loss_value = _one_step_each(config, _batch())
    assert project_loss == pytest.approx(yardstick_loss_value, rel=1e-5)
    moved = dict(project.vae.encoder.named_parameters()) | {
        f"d.{k}": v for k, v in project.vae.decoder.named_parameters()}
    reference = dict(yardstick.encoder.named_parameters()) | {
        f"d.{k}": v for k, v in yardstick.decoder.named_parameters()}
    torch.manual_seed(0)
    initial = build_vae(config).encoder.state_dict()
    assert not torch.equal(initial["head.weight"], moved["head.weight"])  # the project side did step
    for name, value in moved.items():
        torch.testing.assert_close(value, reference[name], rtol=1e-5, atol=1e-5, msg=name)


def test_the_bf16_yardstick_is_the_bf16_trainers_arithmetic():
    """--bf16's pair: both sides under the trainer's autocast take the same step, and it is not the fp32 one."""
    losses = {}
    for precision in ("bf16", "fp32"):
        config = dataclasses.replace(TINY["conv"], precision=precision)
        project, yardstick, losses[precision], yardstick_loss_value = _one_step_each(config, _batch())
        assert losses[precision] == pytest.approx(yardstick_loss_value, rel=1e-5)
        # Adam's first step moves each weight by lr * sign(gradient): the same on both sides, except where a
        # gradient is within the rounding of bf16's backward pass of zero and the two sides' signs differ (2 lr)
        moved = [(a - b).abs() for a, b in zip(project.vae.decoder.parameters(), yardstick.decoder.parameters())]
        differ = sum(int((d > 1e-5).sum()) for d in moved)
        assert max(d.max().item() for d in moved) <= 2 * config.lr + 1e-6
        assert differ <= (0.01 * sum(d.numel() for d in moved) if precision == "bf16" else 0)
    # bf16 keeps 8 bits of each network output (relative rounding up to 2^-9); over the 6,272 pixel terms much of
    # it averages out, but the -ELBO still moves (6e-5 of it here) by more than twice the 1e-5 the sides agree to
    assert abs(losses["bf16"] - losses["fp32"]) > 2e-5 * losses["fp32"]


def test_the_benchmark_with_bf16_reports_its_three_ratios(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--device", "cpu", "--synthetic", "--train-size", "64", "--test-size", "16", "--batch-size", "8",
                 "--arch", "mlp", "--hidden-dim", "16", "--latent-dim", "4", "--steps", "2", "--repeats", "3",
                 "--warmup", "1", "--eval-repeats", "1", "--ll-images", "4", "--ll-k", "4", "--ll-chunk", "4",
                 "--bf16", "--json", str(out)]) == 0
    (t,) = json.loads(out.read_text())["training"]
    assert {"project", "yardstick", "project-bf16", "yardstick-bf16"} <= set(t["sides"])
    assert set(t["bf16"]) == {"project-bf16/project", "project-bf16/yardstick-bf16", "yardstick-bf16/yardstick"}
    assert all(math.isfinite(r) and r > 0 for r in t["bf16"].values())
    assert "bf16 at batch 8: project-bf16/yardstick-bf16" in capsys.readouterr().out


def test_the_project_side_is_the_trainers_step(monkeypatch):
    """No bench-only path: each project step is one call of the SVIStep.step the training loop calls."""
    calls = []
    real_step = SVIStep.step

    def counted(self, x, y=None):
        calls.append(y)
        return real_step(self, x, y)

    monkeypatch.setattr(SVIStep, "step", counted)
    project = ProjectTrainer(TINY["mlp"], NUM_DATA, torch.device("cpu"))
    with project.scope():
        losses = [project.step(_batch(seed=s)) for s in range(3)]
    assert calls == [None] * 3 and all(math.isfinite(loss) and loss > 0 for loss in losses)


def test_tiny_benchmark_reports_a_sane_result(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["--device", "cpu", "--synthetic", "--train-size", "256", "--test-size", "64",
                 "--batch-size", "8", "16", "--arch", "mlp", "--hidden-dim", "16", "--latent-dim", "4",
                 "--steps", "2", "--repeats", "3", "--warmup", "1", "--eval-repeats", "1",
                 "--ll-images", "4", "--ll-k", "8", "--ll-chunk", "4", "--stock-svi",
                 "--json", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    assert [t["batch_size"] for t in results["training"]] == [8, 16]
    for t in results["training"]:
        assert set(t["sides"]) == {"project", "yardstick", "stock-svi"}
        for side in t["sides"].values():
            assert side["images_per_s"] > 0 and len(side["block_s"]) == 3
        assert math.isfinite(t["ratio"]) and t["ratio"] > 0
        assert t["ratio"] == t["sides"]["project"]["ratio_to_yardstick"]
        assert t["peak_rss_bytes"] > 0
    e = results["evaluation"]
    assert e["test_images"] == 64 and e["elbo_per_image"]["images_per_s"] > 0 and e["ratio"] > 0
    assert e["log_likelihood"]["k"] == 8 and e["log_likelihood"]["images_per_s"] > 0
    table = capsys.readouterr().out
    assert "yardstick" in table and "images/s" in table


@pytest.mark.parametrize("flags", [["--batch-size", "0"], ["--steps", "0"], ["--device", "tpu"]])
def test_bad_flags_exit_with_code_2(flags):
    with pytest.raises(SystemExit) as exit_info:
        main(["--synthetic", *flags])
    assert exit_info.value.code == 2


def test_step_cost_compares_each_variant_with_the_default_step(tmp_path, data_dir, capsys):
    from benchmarks import step_cost

    out = tmp_path / "cost.json"
    assert step_cost.main(["--prior flow --guide iaf", "--latent-dim 4", "--batch-size", "8", "--train-size", "64",
                           "--steps", "1", "--repeats", "2", "--warmup", "0", "--device", "cpu",
                           "--data-dir", str(data_dir), "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert list(results) == ["default", "--prior flow --guide iaf", "--latent-dim 4"]
    sizes = {name: row["parameters"] for name, row in results.items()}  # each side is the model its flags make
    assert sizes["--latent-dim 4"] < sizes["default"] < sizes["--prior flow --guide iaf"]
    for name in list(results)[1:]:
        for clock in ("wall", "cpu"):
            assert 0 < results[name][f"ratio_{clock}"]["q1"] <= results[name][f"ratio_{clock}"]["median"] \
                <= results[name][f"ratio_{clock}"]["q3"]
    assert "--prior flow --guide iaf" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:  # a variant's flags are the trainer's, checked by its parser
        step_cost.main(["--prior nonsense", "--device", "cpu"])
    assert exit_info.value.code == 2


def test_startup_times_each_piece_of_a_short_training_run(data_dir, capsys):
    """benchmarks/startup.py runs the trainer's own main and times every piece it wraps, each once; the wrappers
    are taken off again."""
    from benchmarks import startup
    from pyro_vae import train as train_module

    end_of_epoch = train_module._end_of_epoch
    assert startup.main(["--", "--train-size", "64", "--test-size", "32", "--batch-size", "16", "--latent-dim", "2",
                         "--conv-channels", "4", "8", "--data-dir", str(data_dir), "--device", "cpu"]) == 0
    seconds = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(seconds) == {"import pyro_vae", *startup.PIECES.values(), "whole process"}
    assert all(value >= 0 for value in seconds.values()) and seconds["end of epoch"] > 0
    assert seconds["whole process"] >= seconds["end of epoch"] + seconds["first step"]
    assert train_module._end_of_epoch is end_of_epoch

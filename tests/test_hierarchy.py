"""The hierarchical VAE (--layers L): traces, training, the exact value of a linear-Gaussian chain, one layer unchanged."""

import dataclasses
import math
from pathlib import Path

import pyro
import pytest
import torch
from pyro import poutine

import pyro_vae
from pyro_vae import Config, build_vae
from pyro_vae.config import parse_args
from pyro_vae.data import load_mnist
from pyro_vae.checkpoint import TrainedVAE
from pyro_vae import evaluate
from pyro_vae.evaluate import evaluate_run, format_table
from pyro_vae import plot
from pyro_vae.model import latent_sites
from pyro_vae.nets import MIN_SCALE
from pyro_vae.train import SVIStep, main
from test_evaluate import OneActiveEncoder


def _config(layers=2, guide="normal", **kwargs):
    settings = dict(arch="mlp", latent_dim=4, hidden_dim=16, upper_dims=(3,), layer_hidden_dim=8, batch_size=16,
                    device="cpu")
    config = Config(**{**settings, **kwargs}, layers=layers, guide=guide)
    assert config.errors() == []
    return config


def _traces(vae, x):
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    for trace in (guide_trace, model_trace):
        trace.compute_log_prob()  # validates every site's value against its distribution
    return model_trace, guide_trace


@pytest.mark.parametrize("layers", [2, 3])
@pytest.mark.parametrize("guide, prior", [("normal", "normal"), ("iaf", "normal"), ("ladder", "normal"),
                                          ("normal", "flow"), ("ladder", "vamp"), ("normal", "mog")])
def test_model_and_guide_traces_validate_with_the_same_sites(layers, guide, prior):
    vae = build_vae(_config(layers, guide, prior=prior, upper_dims=(3, 2)[:layers - 1]), num_data=100)
    x = torch.rand(5, 1, 28, 28).bernoulli()
    model_trace, guide_trace = _traces(vae, x)
    latents = latent_sites(layers)
    assert latents == ("z", "z2", "z3")[:layers]
    sample_sites = lambda t: [n for n, s in t.nodes.items() if s["type"] == "sample" and n != "data"]
    assert sample_sites(model_trace) == [*reversed(latents), "x"]  # top down: z_L first, x last
    assert sorted(sample_sites(guide_trace)) == sorted(latents)
    for site, width in zip(latents, (4, 3, 2)):
        for trace in (model_trace, guide_trace):
            node = trace.nodes[site]
            assert node["value"].shape == (5, width) and node["fn"].event_shape == (width,)
            assert node["log_prob"].shape == (5,)
            assert [f.name for f in node["cond_indep_stack"]] == ["data"]


@pytest.mark.parametrize("guide", ["normal", "ladder"])
def test_kl_weight_scales_every_layer_in_model_and_guide(guide):
    vae = build_vae(_config(3, guide), num_data=100)
    vae.kl_weight = 0.25
    model_trace, guide_trace = _traces(vae, torch.rand(4, 1, 28, 28).bernoulli())
    data_scale = 100 / 4
    for site in latent_sites(3):
        assert model_trace.nodes[site]["scale"] == guide_trace.nodes[site]["scale"] == pytest.approx(0.25 * data_scale)
    assert model_trace.nodes["x"]["scale"] == pytest.approx(data_scale)


def test_ladder_guide_merges_the_bottom_up_pass_with_the_model_by_precision():
    vae = build_vae(_config(2, "ladder"))
    x = torch.rand(3, 1, 28, 28).bernoulli()
    _, guide_trace = _traces(vae, x)
    loc_hat, scale_hat = vae.encoder(x)  # the pass's Gaussian for z_1
    loc_p, scale_p = vae.top_down[0](guide_trace.nodes["z2"]["value"])  # the model's p(z_1 | z_2)
    q = guide_trace.nodes["z"]["fn"].base_dist
    variance = 1 / (scale_hat ** -2 + scale_p ** -2)
    assert torch.allclose(q.scale ** 2, variance)
    assert torch.allclose(q.loc, variance * (loc_hat / scale_hat ** 2 + loc_p / scale_p ** 2), atol=1e-6)
    assert (q.scale < torch.minimum(scale_hat, scale_p)).all()  # two sources of evidence: narrower than either


@pytest.mark.parametrize("guide, elbo, particles", [("normal", "trace", 1), ("ladder", "trace", 1),
                                                    ("normal", "iwae", 4), ("ladder", "iwae", 4)])
def test_thirty_training_steps_lower_the_loss(data_dir, guide, elbo, particles):
    config = _config(2, guide, elbo=elbo, num_particles=particles, lr=3e-3)
    data = load_mnist(data_dir, binarize="dynamic", train_size=512, test_size=1)
    vae = build_vae(config, num_data=data.num_train)  # N = 512, B = 16: the plate scales by 32
    step = SVIStep(vae, config)
    plan = data.plan_epoch(config.batch_size)  # 32 batches, as the training loop draws them
    losses = [step.step(*data.batch(*plan[i])) for i in range(30)]
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5


# Recorded from main at the branch point (8e4323c) by the steps of test_one_layer_is_todays_model_bit_for_bit: the
# sum of each parameter after pyro.set_rng_seed(0), and the loss of three steps on one batch.
MAIN_PARAMETER_SUMS = {
    "encoder.features.1.weight": 1.4462339129, "encoder.features.1.bias": -0.0419719397,
    "encoder.head.weight": 1.5403380096, "encoder.head.bias": -0.6051366329,
    "decoder.body.0.weight": -1.1064477023, "decoder.body.0.bias": 0.7061512023,
    "decoder.body.2.weight": 11.0187948048, "decoder.body.2.bias": 5.3995322287,
}
MAIN_LOSSES = [567090.5659179688, 562240.71875, 561802.2158203125]


def test_one_layer_is_todays_model_bit_for_bit():
    config = Config(arch="mlp", latent_dim=3, conv_channels=(4, 8), hidden_dim=16, device="cpu", batch_size=8)
    assert config.layers == 1 and parse_args([]).layers == 1
    pyro.set_rng_seed(0)
    vae = build_vae(config, num_data=1000)
    state = vae.state_dict()
    assert list(state) == list(MAIN_PARAMETER_SUMS)  # the same parameter names, in the same order
    for name, total in MAIN_PARAMETER_SUMS.items():
        assert state[name].double().sum().item() == pytest.approx(total, abs=1e-8), name
    pyro.set_rng_seed(1)
    x = torch.rand(8, 1, 28, 28).bernoulli()
    step = SVIStep(vae, config)
    assert [step.step(x) for _ in range(3)] == pytest.approx(MAIN_LOSSES, rel=1e-6)
    assert vae.sites == ("z",)


@pytest.mark.parametrize("argv, message", [
    (["--guide", "ladder"], "--guide ladder needs --layers 2 or more"),
    (["--upper-dims", "8"], "--upper-dims needs --layers 2 or more"),
    (["--layer-hidden-dim", "8"], "--layer-hidden-dim needs --layers 2 or more"),
    (["--layers", "3", "--upper-dims", "8", "4", "2"], "--upper-dims takes one width for all"),
    (["--layers", "2", "--guide", "delta"], "--guide delta"),
    (["--layers", "2", "--conditional"], "--conditional"),
    (["--layers", "2", "--elbo", "meanfield"], "--elbo meanfield"),
    (["--layers", "2", "--prior", "vamp"], "use --guide ladder"),
    (["--layers", "2", "--upper-dims", "1", "--prior", "flow"], "--prior flow is the top layer's prior"),
])
def test_unsupported_combinations_exit_2_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv + ["--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err


def test_widths_one_per_layer_or_one_for_all():
    assert Config(layers=3, latent_dim=8).layer_dims() == (8, 8, 8)
    assert Config(layers=3, latent_dim=8, upper_dims=(4,)).layer_dims() == (8, 4, 4)
    assert Config(layers=3, latent_dim=8, upper_dims=(4, 2)).layer_dims() == (8, 4, 2)
    assert parse_args(["--layers", "3", "--upper-dims", "4", "2", "--device", "cpu"]).upper_dims == (4, 2)
    assert parse_args(["--layers", "2", "--device", "cpu"]).layer_dims() == (32, 32)  # the defaults are usable


@pytest.mark.parametrize("guide", ["normal", "ladder"])
def test_evaluate_reports_kl_and_active_units_per_layer(data_dir, guide):
    """z has one active unit (the encoder's first), z2 none (the nets between the layers ignore their input, and
    p(z | z2) is N(0, 1)): the counts are exact. Each layer's q and p then do not depend on the draws of the other,
    so each layer's KL term has a closed form; the terms come from the same draws as the whole KL and add up to it."""
    config = dataclasses.replace(_config(2, guide), data_dir=str(data_dir), test_size=64)
    vae = build_vae(config)
    vae.encoder = OneActiveEncoder(config.latent_dim)
    for net in vae.bottom_up:
        _silence(net, "input")
    last = vae.top_down[0].body[-1]
    with torch.no_grad():  # p(z | z2) = N(0, 1): the ladder's merge halves the encoder's loc, whatever the seed
        last.weight.zero_()
        last.bias[:last.out_features // 2] = 0.0
        last.bias[last.out_features // 2:] = math.log(math.expm1(1 - MIN_SCALE))  # softplus^-1
    run = TrainedVAE(vae, config, {"epoch": 1})
    k = 50  # few draws: the guide's mean of a layer, not the mean of its draws, keeps the inactive units at 0
    results = evaluate_run(run, k=k, limit=32, batch_size=16, chunk=25, progress=False)
    layers = results["layers"]
    assert [row["site"] for row in layers] == ["z", "z2"] and [row["width"] for row in layers] == [4, 3]
    assert [row["active_units"] for row in layers] == [1, 0]
    # the same draws: the layers' terms add up to the whole KL, and that is reconstruction - ELBO
    assert sum(row["kl"]["mean"] for row in layers) == pytest.approx(results["kl"]["mean"], abs=1e-4)
    assert results["kl"]["mean"] == pytest.approx(results["reconstruction"]["mean"] - results["elbo"]["mean"],
                                                  abs=1e-4)

    x = load_mnist(data_dir, binarize="dynamic", test_size=64).test_images[:32]
    model_trace, guide_trace = evaluate._traces(vae, x, None, 500)  # the spread of one draw's terms
    for row in layers:
        q, p = guide_trace.nodes[row["site"]], model_trace.nodes[row["site"]]
        closed_form = torch.distributions.kl_divergence(q["fn"], p["fn"])[0].mean().item()
        one_draw = q["fn"].log_prob(q["value"]) - p["fn"].log_prob(q["value"])  # (500, 32)
        se = (one_draw.var(0).sum() / k).sqrt().item() / 32
        assert row["kl"]["mean"] == pytest.approx(closed_form, abs=5 * se), row["site"]
    table = format_table(results)
    assert "per stochastic layer" in table and f"{layers[1]['kl']['mean']:.2f}" in table
    one_layer = evaluate_run(TrainedVAE(build_vae(dataclasses.replace(config, layers=1, upper_dims=(),
                                                                       layer_hidden_dim=256, guide="normal")),
                                        config), k=5, limit=8, batch_size=8, progress=False)
    assert "layers" not in one_layer and "per stochastic layer" not in format_table(one_layer)


def _silence(net, what):
    """Make a GaussianLayer ignore its input (what="input") or give a near-zero scale (what="scale")."""
    last = net.body[-1]
    with torch.no_grad():
        if what == "input":
            net.body[0].weight.zero_()
        else:
            last.bias[last.out_features // 2:] = -30.0
            last.weight[last.out_features // 2:] = 0.0


def test_hierarchy_samples_hold_the_top_layer_along_rows_or_the_noise_below():
    config = _config(3)
    vae = build_vae(config)
    run = TrainedVAE(vae, config)
    for net in vae.top_down:
        _silence(net, "scale")  # z_l is then a function of z_l+1: a row that holds z_L holds the image
    rows = plot.hierarchy_samples(run, "top", n=4)
    assert rows.shape == (4, 4, 1, 28, 28)
    assert torch.allclose(rows[:, :1].expand_as(rows), rows, atol=1e-4)
    assert (rows[0, 0] - rows[1, 0]).abs().max() > 1e-3  # rows differ

    vae = build_vae(config)
    run = TrainedVAE(vae, config)
    for net in vae.top_down:
        _silence(net, "input")  # z_l no longer depends on z_l+1: a row that holds the noise below holds the image
    rows = plot.hierarchy_samples(run, "lower", n=4)
    assert torch.allclose(rows[:, :1].expand_as(rows), rows, atol=1e-5)
    assert (rows[0, 0] - rows[1, 0]).abs().max() > 1e-3  # rows differ
    figure = plot.layer_controls(run, n=3)
    held_top, held_lower = figure.axes
    assert held_top.get_title() == "each row one z3; z, z2 redrawn"
    assert held_lower.get_title() == "each row one noise of z, z2; z3 redrawn"
    grids = [torch.as_tensor(ax.images[0].get_array().data) for ax in (held_top, held_lower)]
    assert grids[0].shape == grids[1].shape == (3 * 30 + 2, 3 * 30 + 2)  # 3 x 3 images, 2-pixel lines around
    tiles = [grid[2:, 2:].unfold(0, 28, 30).unfold(1, 28, 30) for grid in grids]  # (3 rows, 3 columns, 28, 28)
    assert torch.allclose(tiles[1][:, :1].expand_as(tiles[1]), tiles[1], atol=1e-5)  # the noise below held: one image
    assert (tiles[1][0, 0] - tiles[1][1, 0]).abs().max() > 1e-3  # rows differ
    assert (tiles[0][0, 0] - tiles[0][0, 1]).abs().max() > 1e-3  # z3 held, the layers below redrawn: columns differ


@pytest.mark.slow  # the CLI end to end
@pytest.mark.parametrize("guide", ["normal", "ladder"])
def test_cli_trains_a_two_layer_run_that_loads_back(small_config, guide):
    args = ["--layers", "2", "--guide", guide, "--epochs", "1", "--max-steps", "3", "--batch-size", "64",
            "--train-size", "256", "--test-size", "64", "--latent-dim", "4", "--conv-channels", "4", "8",
            "--data-dir", small_config.data_dir, "--out", small_config.out, "--device", "cpu"]
    assert main(args) == 0
    trained = pyro_vae.load(small_config.out)
    assert trained.config.layers == 2 and trained.vae.sites == ("z", "z2")
    assert trained.sample(4).shape == (4, 1, 28, 28)
    x = torch.rand(3, 1, 28, 28).bernoulli()
    if guide == "ladder":  # reconstructions decode the merged posterior's mean given a draw of z2, not the encoder's
        assert not torch.allclose(trained.reconstruct(x), trained.decode(trained.encode(x)[0]))
    rebuilt = build_vae(dataclasses.replace(trained.config))
    assert set(rebuilt.state_dict()) == set(trained.vae.state_dict())
    assert any(name.startswith("top_down.") for name in rebuilt.state_dict())
    if guide == "ladder":  # the plot CLI draws a hierarchical run's layer picture too
        assert plot.main([small_config.out, "--limit", "64"]) == 0
        assert (Path(small_config.out) / "plots" / "layers.png").is_file()

"""The autoregressive likelihood (--likelihood pixelcnn): exact per-pixel conditionals, masks, sampling, the CLI."""

import json
import sys

import pytest
import torch

import processes

from pyro_vae import Config, build_vae
from pyro_vae.likelihoods import AutoregressiveBernoulli, PixelCNNBernoulli
from pyro_vae.nets import PixelCNN

PIXELS = 28 * 28


def _likelihood(channels=3, layers=2, kernel=3, seed=0, gated=False) -> PixelCNNBernoulli:
    """A small likelihood in float64 with weights large enough that every pixel's logit depends on its context."""
    torch.manual_seed(seed)
    likelihood = PixelCNNBernoulli(channels, layers, kernel, gated).double()
    for p in likelihood.parameters():
        torch.nn.init.normal_(p, std=0.4)
    return likelihood


def _images(n, seed=1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.bernoulli(torch.full((n, 1, 28, 28), 0.3, dtype=torch.float64))


@pytest.mark.parametrize("gated", [False, True])
def test_log_prob_is_the_sum_of_each_pixels_conditional_computed_one_pixel_at_a_time(gated):
    likelihood, x = _likelihood(gated=gated), _images(2)
    features = torch.randn(2, 3, 28, 28, dtype=torch.float64)
    generator = torch.Generator().manual_seed(2)
    reference = torch.zeros(2, dtype=torch.float64)
    for i in range(PIXELS):
        # pixel i's logit from an image that keeps x before i and has noise from i on: it must not matter
        seen = x.flatten(1).clone()
        seen[:, i:] = torch.randint(0, 2, seen[:, i:].shape, generator=generator, dtype=torch.float64)
        logit = likelihood.net(seen.reshape(x.shape), features).flatten(1)[:, i]
        reference += torch.distributions.Bernoulli(logits=logit).log_prob(x.flatten(1)[:, i])
    torch.testing.assert_close(likelihood(features).log_prob(x), reference, rtol=0, atol=1e-9)


@pytest.mark.parametrize("layers, kernel, gated", [(0, 3, False), (2, 3, False), (1, 5, False), (2, 3, True)])
def test_each_logit_depends_on_the_pixels_before_it_within_the_receptive_field_only(layers, kernel, gated):
    net = _likelihood(layers=layers, kernel=kernel, gated=gated).net
    features = torch.randn(1, 3, 28, 28, dtype=torch.float64)
    x = _images(1)
    jacobian = torch.autograd.functional.jacobian(lambda image: net(image, features).flatten(),
                                                  x).reshape(PIXELS, PIXELS)  # d logit_i / d x_j
    rows, cols = torch.meshgrid(torch.arange(28), torch.arange(28), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    r = net.receptive_radius
    before = torch.arange(PIXELS)[None, :] < torch.arange(PIXELS)[:, None]  # j before i in raster order
    near = ((rows[:, None] - rows[None, :]) <= r) & ((cols[:, None] - cols[None, :]).abs() <= r)
    assert torch.all(jacobian[~(before & near)] == 0)  # nothing at or after i, nothing beyond the radius
    # and it does see its context, the pixel to its left and the one above, wherever a ReLU lets it through
    inner = [i for i in range(PIXELS) if rows[i] > 0 and cols[i] > 0]
    for neighbour in (1, 28):
        assert (jacobian[inner, [i - neighbour for i in inner]] != 0).float().mean() > 0.5


@pytest.mark.parametrize("layers, kernel, gated", [(0, 3, False), (3, 3, False), (2, 5, False), (3, 3, True)])
def test_the_logit_of_one_pixel_is_the_whole_images_at_every_pixel(layers, kernel, gated):
    """logit_at (the pixel loop's: each layer only where the layers after it read it) gives the whole pass's logit,
    at the borders and corners too, with plain and gated layers."""
    net = _likelihood(layers=layers, kernel=kernel, gated=gated).net
    x, features = _images(2), torch.randn(2, 3, 28, 28, dtype=torch.float64)
    whole, condition = net(x, features)[:, 0], net.condition(features)
    one_at_a_time = torch.stack([torch.stack([net.logit_at(x, condition, i, j) for j in range(28)], -1)
                                 for i in range(28)], -2)
    torch.testing.assert_close(one_at_a_time, whole, rtol=0, atol=1e-12)


def test_sample_draws_each_pixel_from_its_conditional_given_the_pixels_drawn_before_it():
    likelihood = _likelihood(channels=2, layers=1)
    features = torch.randn(3, 2, 28, 28, dtype=torch.float64)
    torch.manual_seed(5)
    drawn = likelihood(features).sample()
    # the reference: one uniform per pixel from the same generator, each pixel's logit from the whole image so far
    torch.manual_seed(5)
    uniforms = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    reference = torch.zeros_like(uniforms)
    for i in range(28):
        for j in range(28):
            p = torch.sigmoid(likelihood.net(reference, features)[:, 0, i, j])
            reference[:, 0, i, j] = (uniforms[:, 0, i, j] < p).double()
    assert torch.equal(drawn, reference)
    assert 0.05 < drawn.mean() < 0.95  # not a degenerate image


def test_log_prob_broadcasts_images_over_particles_and_sample_takes_a_sample_shape():
    likelihood, x = _likelihood(channels=2, layers=1), _images(4)
    features = torch.randn(3, 4, 2, 28, 28, dtype=torch.float64)  # (particles, images, C, 28, 28)
    d = likelihood(features)
    assert d.batch_shape == (3, 4) and d.event_shape == (1, 28, 28)
    each = torch.stack([torch.stack([likelihood(features[s, b]).log_prob(x[b]) for b in range(4)]) for s in range(3)])
    torch.testing.assert_close(d.log_prob(x), each)
    assert likelihood(features[0, :2]).sample((5,)).shape == (5, 2, 1, 28, 28)
    assert isinstance(d.expand((2, 3, 4)), AutoregressiveBernoulli) and d.expand((2, 3, 4)).log_prob(x).shape == (2, 3, 4)


def test_the_model_keeps_its_line_and_the_decoder_gives_the_feature_map():
    config = Config(likelihood="pixelcnn", pixelcnn_channels=5, pixelcnn_layers=1, latent_dim=4, conv_channels=(8, 16))
    vae = build_vae(config)
    features = vae.decoder(torch.randn(6, 4))
    assert features.shape == (6, 5, 28, 28)
    assert isinstance(vae.likelihood(features), AutoregressiveBernoulli)
    assert isinstance(vae.likelihood.net, PixelCNN) and vae.likelihood.net.receptive_radius == 2
    assert not vae.likelihood.net.gated
    gated = build_vae(Config(likelihood="pixelcnn", pixelcnn_channels=5, pixelcnn_layers=2, pixelcnn_gated=True,
                             latent_dim=4, conv_channels=(8, 16))).likelihood.net
    assert gated.gated and [layer.out_channels for layer in gated.layers] == [10, 10]
    assert gated.condition.out_channels == 5 + 2 * 10  # the feature map's term: one map in, (a, b) per gated layer
    assert "--pixelcnn-gated is a setting of --likelihood pixelcnn" in " ".join(
        Config(pixelcnn_gated=True).errors())


def _checked(args, timeout: float):
    done = processes.run(args, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.slow
def test_train_evaluate_and_plot_a_pixelcnn_run_through_the_clis(data_dir, tmp_path):
    run = tmp_path / "run"
    common = [sys.executable, "-m"]
    _checked(common + ["pyro_vae.train", "--likelihood", "pixelcnn", "--pixelcnn-channels", "4",
                             "--pixelcnn-layers", "1", "--latent-dim", "4", "--conv-channels", "8", "16",
                             "--epochs", "2", "--batch-size", "64", "--train-size", "256", "--test-size", "64",
                             "--data-dir", str(data_dir), "--device", "cpu", "--out", str(run)],
                   timeout=300)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2] and (run / "images" / "samples_002.png").is_file()
    evaluated = _checked(common + ["pyro_vae.evaluate", str(run), "--k", "5", "--limit", "16"],
                               timeout=300)
    figures = json.loads((run / "evaluation.json").read_text())
    assert figures["num_images"] == 16 and figures["k"] == 5 and figures["likelihood"] == "pixelcnn"
    assert f"{figures['log_px']['mean']:.2f}" in evaluated.stdout
    # the ELBO's two parts come from the same draws: E_q log p(x | z) of the autoregressive pass, and the KL
    elbo, reconstruction, kl = (figures[name]["mean"] for name in ("elbo", "reconstruction", "kl"))
    assert abs(elbo - (reconstruction - kl)) < 1e-3 and reconstruction < 0 < kl
    plotted = _checked(common + ["pyro_vae.plot", str(run), "--out", str(tmp_path / "plots")],
                             timeout=300)
    assert "draws_given_z.png" in plotted.stdout and (tmp_path / "plots" / "draws_given_z.png").is_file()

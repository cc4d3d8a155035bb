"""Unit tests of the probabilistic program: traces, shapes, and the minibatch scaling of the ELBO."""

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from torch import nn

from pyro_vae import Config, build_vae
from pyro_vae.evaluate import log_weights


def _vae(arch="conv", latent_dim=3, num_data=None):
    config = Config(arch=arch, latent_dim=latent_dim, conv_channels=(4, 8), hidden_dim=16, device="cpu")
    return build_vae(config, num_data=num_data)


def _images(n):
    return torch.rand(n, 1, 28, 28).bernoulli()


@pytest.mark.parametrize("arch", ["conv", "mlp"])
def test_model_and_guide_traces_have_the_right_sites_and_shapes(arch):
    vae, x = _vae(arch), _images(5)
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    for trace in (guide_trace, model_trace):
        trace.compute_log_prob()  # validates every site's value against its distribution

    z_q, z_p, x_p = guide_trace.nodes["z"], model_trace.nodes["z"], model_trace.nodes["x"]
    assert {n for n, s in model_trace.nodes.items() if s["type"] == "sample"} == {"data", "z", "x"}
    assert z_q["value"].shape == (5, 3) and z_q["fn"].event_shape == (3,) and z_q["fn"].batch_shape == (5,)
    assert z_p["fn"].event_shape == (3,)
    assert x_p["is_observed"] and x_p["fn"].event_shape == (1, 28, 28) and x_p["fn"].batch_shape == (5,)
    assert x_p["log_prob"].shape == (5,)
    assert [f.name for f in x_p["cond_indep_stack"]] == ["data"]


def test_the_model_and_guide_make_no_tensor_from_python_values(monkeypatch):
    """Host time in every training step: the data plate is told its device, so Pyro's plate does not build a
    throwaway tensor to find it (torch.tensor(()) in each model and guide call); nothing else makes one."""
    vae, x = _vae(num_data=1000), _images(5)
    made = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *args, **kwargs: made.append(args) or real(*args, **kwargs))
    with vae.modules_declared(), pyro.validation_enabled(False):  # as the trainer runs them after its first step
        guide_trace = poutine.trace(vae.guide).get_trace(x)
        poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
        log_weights(vae, x, num_samples=3)  # evaluation's traces, their log-probs (the plate's site left out)
    assert made == []


def test_elbo_validates_and_model_guide_match():
    vae, x = _vae(), _images(4)
    loss = Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1).loss(vae.model, vae.guide, x)
    assert torch.isfinite(torch.tensor(loss))


@pytest.mark.parametrize("mistake, message", [("missing", "Found vars in model but not guide"),
                                              ("extra", "Found non-auxiliary vars in guide but not model")])
def test_a_guide_that_does_not_match_the_model_fails_the_check_above(mistake, message):
    """The check above can fail: a guide without the model's z, or with a site the model lacks, is an error here."""
    vae, x = _vae(), _images(4)

    def guide(x, y=None):
        if mistake == "missing":  # q(z | x) forgotten: the model's z would be drawn from the prior
            return
        vae.guide(x, y)
        with pyro.plate("extra_plate", x.shape[0]):
            pyro.sample("w", pyro.distributions.Normal(0.0, 1.0))

    with pytest.raises(UserWarning, match=message):
        Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1).loss(vae.model, guide, x)


@pytest.mark.parametrize("num_data", [None, 1000])
def test_minibatch_elbo_is_scaled_to_the_whole_data_set(num_data):
    """Trace_ELBO on B images out of N equals N / B times the sum of the per-image ELBO terms."""
    batch = 10
    vae, x = _vae(num_data=num_data), _images(batch)
    pyro.set_rng_seed(1)
    loss = Trace_ELBO().loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(1)  # the same draw of z
    per_image = log_weights(vae, x)[0]  # (B,) unscaled log p(x, z) - log q(z | x)
    scale = (num_data or batch) / batch
    assert per_image.shape == (batch,)
    assert loss == pytest.approx(-scale * per_image.sum().item(), rel=1e-5)


def test_log_weights_vectorize_over_samples():
    vae, x = _vae(), _images(6)
    weights = log_weights(vae, x, num_samples=7)
    assert weights.shape == (7, 6)
    assert not torch.allclose(weights[0], weights[1])  # independent draws of z


def test_networks_take_extra_leading_dimensions():
    vae = _vae()
    z = torch.randn(2, 5, 3)  # (particles, batch, latent)
    assert vae.decoder(z).shape == (2, 5, 1, 28, 28)
    loc, scale = vae.encoder(_images(5))
    assert loc.shape == scale.shape == (5, 3) and (scale > 0).all()


def test_glorot_init_gives_keras_initial_weights():
    layers = lambda vae: [m for m in [*vae.encoder.modules(), *vae.decoder.modules()]
                          if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d))]
    torch.manual_seed(0)
    keras = build_vae(Config(latent_dim=2, init="glorot", device="cpu"))
    torch.manual_seed(0)
    default = build_vae(Config(latent_dim=2, device="cpu"))
    for layer in layers(keras):
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(layer.weight)
        bound = (6 / (fan_in + fan_out)) ** 0.5
        assert (layer.bias == 0).all() and layer.weight.abs().max() <= bound
        assert layer.weight.abs().max() > 0.9 * bound  # uniform on the whole interval, not a smaller one
    assert any((layer.bias != 0).any() for layer in layers(default))  # torch's defaults are left alone

"""Every variant is a piece of the model or guide: each validates, trains, and is selectable by name."""

import dataclasses
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from pyro_vae import Config, build_vae
from pyro_vae.trained import TrainedVAE
from pyro_vae.config import parse_args
from pyro_vae.data import load_mnist
from pyro_vae.evaluate import elbo_and_kl_per_image, kl_per_image, log_weights
from pyro_vae.priors import LabelConditional
from pyro_vae.train import SVIStep, free_bits_weight, kl_weight, make_elbo

VARIANTS = {
    "prior normal": {},
    "prior laplace": {"prior": "laplace"},
    "prior studentt": {"prior": "studentt"},
    "prior mog": {"prior": "mog", "prior_components": 3},
    "prior vamp": {"prior": "vamp", "prior_components": 3},
    "prior flow": {"prior": "flow"},
    "likelihood continuous-bernoulli": {"likelihood": "continuous-bernoulli", "binarize": "none"},
    "likelihood normal": {"likelihood": "normal", "binarize": "none"},
    "likelihood pixelcnn": {"likelihood": "pixelcnn", "pixelcnn_channels": 4, "pixelcnn_layers": 1},
    "guide iaf": {"guide": "iaf"},
    "guide delta": {"guide": "delta"},
    "elbo meanfield": {"elbo": "meanfield"},
    "elbo iwae": {"elbo": "iwae", "num_particles": 4},
    "beta with warm-up": {"beta": 2.0, "kl_warmup_epochs": 1.0},
    "conditional": {"conditional": True},
    "semi-supervised": {"conditional": True, "labels": 100},
    "semi-supervised M2 (standard prior, y at input, mlp nets, conv classifier)": {
        "conditional": True, "labels": 100, "class_prior": "standard", "label_at": "input",
        "arch": "mlp", "hidden_dim": 64, "classifier_arch": "conv"},
}


def _config(data_dir, **changes):
    base = Config(latent_dim=4, conv_channels=(8, 16), batch_size=32, train_size=960, test_size=64,
                  data_dir=str(data_dir), device="cpu")
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def datasets(data_dir):
    return {mode: load_mnist(data_dir, binarize=mode, train_size=960, test_size=64) for mode in ("dynamic", "none")}


def _data(datasets, config):
    data = datasets["none" if config.binarize == "none" else "dynamic"]
    data.labelled = None
    if config.labels:
        data.keep_labels(config.labels)
    return data


# semi-supervised (an enumerated y, 10 times the work a step) is in the slow tier; its M2 form keeps the path in the fast one
@pytest.mark.parametrize("variant", [pytest.param(v, marks=pytest.mark.slow) if v == "semi-supervised" else v
                                     for v in VARIANTS])
def test_variant_validates_and_30_steps_lower_its_loss(variant, datasets, data_dir):
    config = _config(data_dir, **VARIANTS[variant])
    assert not config.errors()
    data = _data(datasets, config)
    vae = build_vae(config, num_data=data.num_train)
    x, y = data.test_images[:8], data.test_labels[:8]
    guide_trace = poutine.trace(vae.guide).get_trace(x, None if config.labels else y)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x, None)
    guide_trace.compute_log_prob()  # validates each site under pyro.enable_validation(True)
    model_trace.compute_log_prob()
    assert model_trace.nodes["z"]["fn"].event_shape == (4,) and model_trace.nodes["x"]["fn"].event_shape == (1, 28, 28)

    # the trainer's own step, on a plate of N = 960 images in batches of 32 (each log-prob scaled by 30)
    assert vae.num_data == 960 != config.batch_size
    svi = SVIStep(vae, dataclasses.replace(config, lr=3e-3))
    losses, steps = [], 0
    while steps < 30:
        for xb, yb in data.epoch(config.batch_size):
            vae.kl_weight = kl_weight(config, (steps + 1) / 30)
            losses.append(float(svi.step(xb, yb)) / data.num_train)
            steps += 1
            if steps == 30:
                break
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert torch.isfinite(torch.tensor(losses)).all()
    assert last < first - 5, f"{variant}: loss went from {first:.1f} to {last:.1f}"


def test_cvae_learns_class_means_that_move_apart(datasets, data_dir):
    config = _config(data_dir, conditional=True)
    data = _data(datasets, config)
    vae = build_vae(config, num_data=data.num_train)
    assert isinstance(vae.prior, LabelConditional)
    assert torch.pdist(vae.prior.class_means.detach()).max() == 0  # all classes start at Normal(0, I)
    svi = SVIStep(vae, dataclasses.replace(config, lr=1e-2))
    for _ in range(2):
        for xb, yb in data.epoch(config.batch_size):
            svi.step(xb, yb)
    distances = torch.pdist(vae.prior.class_means.detach())  # between the 45 pairs of digits
    assert distances.min() > 0.02 and distances.mean() > 0.1, distances

    trained = TrainedVAE(vae, config)
    assert trained.sample(5, y=7).shape == (5, 1, 28, 28)
    assert trained.sample_grid().shape == (80, 1, 28, 28)  # one row of 8 per digit
    # the CVAE's samples depend on the digit asked for
    torch.manual_seed(0)
    sevens = trained.sample(4, y=7)
    torch.manual_seed(0)
    assert not torch.equal(sevens, trained.sample(4, y=1))


@pytest.mark.parametrize("weight", [0.25, 0.0])
def test_kl_weight_scales_exactly_the_latent_terms(data_dir, weight):
    """With weight b the loss is -(log p(x|z) + b (log p(z) - log q(z|x))): no loss code, a poutine.scale (for
    b = 0, under free bits, a poutine.mask)."""
    vae = build_vae(_config(data_dir))
    x = torch.rand(6, 1, 28, 28).bernoulli()
    vae.kl_weight = weight
    pyro.set_rng_seed(3)
    loss = Trace_ELBO().loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(3)
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    reconstruction = model_trace.nodes["x"]["unscaled_log_prob"].sum()
    latent = model_trace.nodes["z"]["unscaled_log_prob"].sum() - guide_trace.nodes["z"]["unscaled_log_prob"].sum()
    assert loss == pytest.approx(-(reconstruction + weight * latent).item(), rel=1e-5)
    # the reported figure is always the unweighted ELBO
    pyro.set_rng_seed(3)
    assert log_weights(vae, x)[0].sum().item() == pytest.approx((reconstruction + latent).item(), rel=1e-5)


def test_kl_warmup_schedule():
    config = Config(beta=4.0, kl_warmup_epochs=2.0)
    assert [kl_weight(config, e) for e in (0.5, 1.0, 2.0, 5.0)] == [1.0, 2.0, 4.0, 4.0]
    assert kl_weight(Config(beta=0.5), 0.1) == 0.5


def test_free_bits_drop_the_kl_term_exactly_where_the_minibatch_kl_is_under_the_floor(data_dir):
    """The step's KL weight is 0 where the batch's mean KL term (single-sample, unscaled, nats per image) is under
    --free-bits and the warm-up's weight where it is over; the floor is set just either side of that estimate, made
    from the same draw of z."""
    vae = build_vae(_config(data_dir, latent_dim=8))
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0)).bernoulli()
    vae.kl_weight = 0.3  # the estimate must not read the weight: it is unscaled
    pyro.set_rng_seed(5)
    kl = elbo_and_kl_per_image(vae, x)[1].mean().item()
    assert kl > 0.1  # an untrained encoder's q is far from the prior: the floors below are both positive
    for floor, expected in ((kl * 0.999, 0.7), (kl * 1.001, 0.0)):
        pyro.set_rng_seed(5)
        assert free_bits_weight(vae, x, None, 0.7, _config(data_dir, free_bits=floor)) == expected
    assert free_bits_weight(vae, x, None, 0.7, _config(data_dir)) == 0.7  # off: no estimate, the weight as it was


@pytest.mark.parametrize("changes", [
    *VARIANTS.values(),
    {"layers": 3, "upper_dims": (3, 2)},
    {"layers": 2, "upper_dims": (2,), "guide": "ladder"},
    {"prior": "flow", "guide": "iaf", "likelihood": "pixelcnn", "pixelcnn_channels": 4, "pixelcnn_layers": 1,
     "pixelcnn_gated": True},
], ids=[*VARIANTS, "three layers", "ladder guide", "the frontier row's families"])
def test_the_kl_that_free_bits_decide_on_is_the_evaluated_kl_without_the_decoder(data_dir, datasets, changes):
    """kl_per_image, which each free-bits step decides on, is elbo_and_kl_per_image's KL term at the same draw of
    z (the same seed), for every family, labelled batches included; and it leaves the model before the decoder."""
    config = _config(data_dir, **changes)
    vae = build_vae(config)
    data = _data(datasets, config)
    x = torch.bernoulli(data.train_images[:16], generator=torch.Generator().manual_seed(0))
    y = data.train_labels[:16] if config.conditional else None
    calls = []
    vae.decoder.register_forward_hook(lambda module, args, output: calls.append(1))
    for labels in [y, None] if config.labels else [y]:  # semi-supervised: a labelled and an unlabelled batch
        calls.clear()
        pyro.set_rng_seed(11)
        expected = elbo_and_kl_per_image(vae, x, labels)[1]
        assert calls, "the full evaluation runs the decoder"
        calls.clear()
        pyro.set_rng_seed(11)
        kl = kl_per_image(vae, x, labels)
        assert not calls
        assert kl.shape == (16,)
        torch.testing.assert_close(kl, expected, rtol=1e-5, atol=1e-5)


def test_free_bits_refuse_the_importance_weighted_bound():
    with pytest.raises(SystemExit) as info:
        parse_args(["--free-bits", "4", "--elbo", "iwae", "--num-particles", "2"])
    assert info.value.code == 2


@pytest.mark.parametrize("num_data", [3, 3000])
def test_iwae_loss_is_n_over_b_times_the_importance_weighted_bound(num_data, data_dir):
    config = _config(data_dir, elbo="iwae", num_particles=5)
    vae = build_vae(config, num_data=num_data)
    x = torch.rand(3, 1, 28, 28).bernoulli()
    pyro.set_rng_seed(4)
    loss = make_elbo(config).loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(4)
    weights = log_weights(vae, x, num_samples=config.num_particles)  # (K, B), unscaled
    bound = (weights.logsumexp(0) - torch.log(torch.tensor(5.0))).sum()  # per-image bounds, summed
    assert loss == pytest.approx(-(num_data / 3) * bound.item(), rel=1e-4)


def test_semi_supervised_epoch_mixes_labelled_and_unlabelled_batches(datasets, data_dir):
    config = _config(data_dir, conditional=True, labels=100)
    data = _data(datasets, config)
    assert len(data.labelled) == 100 and data.train_labels[data.labelled].bincount().tolist() == [10] * 10
    batches = list(data.epoch(config.batch_size))
    labelled = [y for _, y in batches if y is not None]
    assert len(batches) == data.steps_per_epoch(config.batch_size)
    assert len(labelled) == 100 // 32 and sum(y is None for _, y in batches) == (960 - 100) // 32


@pytest.mark.parametrize("flags, message", [
    (["--binarize", "none"], "--likelihood bernoulli models binary pixels"),
    (["--likelihood", "normal"], "--likelihood normal models grey-valued pixels"),
    (["--elbo", "meanfield", "--guide", "iaf"], "--elbo meanfield uses the analytic KL"),
    (["--elbo", "iwae"], "--elbo iwae needs --num-particles 2 or more"),
    (["--conditional", "--prior", "vamp"], "--conditional has its own prior"),
    (["--labels", "100"], "--labels needs --conditional"),
    (["--class-prior", "standard"], "--class-prior needs --conditional"),
    (["--label-at", "input"], "--label-at needs --conditional"),
    (["--conditional", "--classifier-arch", "conv"], "--classifier-arch is the network of q(y | x)"),
    (["--conditional", "--labels", "100", "--elbo", "iwae", "--num-particles", "3"], "TraceEnum_ELBO"),
    (["--prior", "flow", "--latent-dim", "1"], "--prior flow needs --latent-dim 2 or more"),
    (["--guide", "iaf", "--latent-dim", "1"], "--guide iaf needs --latent-dim 2 or more"),
    (["--likelihood", "pixelcnn", "--binarize", "none"], "--likelihood pixelcnn models binary pixels"),
    (["--pixelcnn-layers", "2"], "--pixelcnn-layers is a setting of --likelihood pixelcnn, not of --likelihood "
                                 "bernoulli"),
    (["--likelihood", "pixelcnn", "--pixelcnn-kernel", "4"], "--pixelcnn-kernel must be odd"),
])
def test_nonsense_combinations_are_refused_with_a_reason(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def _model_sites(vae, x, y=None):
    guide = poutine.trace(poutine.enum(vae.guide, first_available_dim=-2)).get_trace(x, y)
    model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(x, y)
    return {name for name, site in model.nodes.items() if site["type"] == "sample"}


def test_semi_supervised_classifier_term_only_on_labelled_images(data_dir):
    # Kingma's extra log q(y | x) term fits the classifier to given labels; on unlabelled images, where y
    # is enumerated, it would reward q(y | x) for agreeing with itself and collapse it onto one class.
    vae = build_vae(_config(data_dir, conditional=True, labels=100), num_data=960)
    x = torch.rand(5, 1, 28, 28).bernoulli()
    assert "y_aux" in _model_sites(vae, x, torch.arange(5))
    assert "y_aux" not in _model_sites(vae, x)


def test_standard_class_prior_is_normal_0_i_for_every_digit(datasets, data_dir):
    config = _config(data_dir, conditional=True, class_prior="standard")
    data = _data(datasets, config)
    vae = build_vae(config, num_data=data.num_train)
    assert "class_means" not in dict(vae.prior.named_parameters())  # nothing for the optimizer to move
    svi = SVIStep(vae, dataclasses.replace(config, lr=1e-2))
    for xb, yb in data.epoch(config.batch_size):
        svi.step(xb, yb)
    z = torch.randn(10, 4)
    for digit in (0, 7):
        p = vae.prior(torch.full((10,), digit))
        assert torch.allclose(p.log_prob(z), dist.Normal(0.0, 1.0).log_prob(z).sum(-1))


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_label_at_input_joins_the_first_layer(arch, data_dir):
    config = _config(data_dir, conditional=True, labels=100, label_at="input", arch=arch, hidden_dim=16)
    encoder = build_vae(config, num_data=960).encoder
    x = torch.rand(3, 1, 28, 28).bernoulli()
    y = torch.tensor([4, 0, 9])
    one_hot = torch.nn.functional.one_hot(y, 10).float()
    loc, scale = encoder(x, one_hot)
    assert encoder.head.in_features == (16 if arch == "mlp" else 16 * 7 * 7)  # y is not appended at the head
    # under enumeration (labels (10, 1, 10) against images (3,)): the same as each label given on its own
    every = torch.nn.functional.one_hot(torch.arange(10), 10).float().reshape(10, 1, 10)
    loc_all, scale_all = encoder(x, every)
    assert loc_all.shape == (10, 3, 4)
    assert torch.allclose(loc_all[y, torch.arange(3)], loc, atol=1e-5)
    assert torch.allclose(scale_all[y, torch.arange(3)], scale, atol=1e-5)
    # the label changes the features, not only the head
    assert not torch.allclose(encoder._features(x, one_hot), encoder._features(x, one_hot.roll(1, -1)))
    if arch == "mlp":  # exactly the first layer applied to [x, y], as in Kingma et al.'s M2
        first = encoder.features[1]
        weight = torch.cat([first.weight, encoder.cond_input.weight], dim=1)
        hidden = torch.nn.functional.softplus(torch.cat([x.flatten(1), one_hot], 1) @ weight.T + first.bias)
        assert torch.allclose(encoder.head(hidden).chunk(2, -1)[0], loc, atol=1e-5)


def test_classifier_arch_picks_the_network_of_q_y_given_x(data_dir):
    same = build_vae(_config(data_dir, conditional=True, labels=100, arch="mlp", hidden_dim=16), num_data=960)
    conv = build_vae(_config(data_dir, conditional=True, labels=100, arch="mlp", hidden_dim=16,
                             classifier_arch="conv"), num_data=960)
    assert isinstance(same.classifier.features[1], torch.nn.Linear)  # the encoder's family by default
    assert isinstance(conv.classifier.features[0], torch.nn.Conv2d)
    assert isinstance(conv.encoder.features[1], torch.nn.Linear)  # the VAE's own networks stay MLPs
    assert conv.classifier(torch.rand(2, 5, 1, 28, 28)).shape == (2, 5, 10)


def test_the_mixture_priors_weights_means_and_scales_all_enter_log_p_z(data_dir):
    """--prior mog with unequal weights: log p(z) at the model's z site is log sum_k w_k N(z; mu_k, diag sigma_k^2),
    written out here with w = softmax(logits)."""
    vae = build_vae(_config(data_dir, prior="mog", prior_components=3, arch="mlp", hidden_dim=16))
    prior = vae.prior
    with torch.no_grad():  # away from the initial equal weights and unit scales
        prior.logits.copy_(torch.tensor([2.0, -1.0, 0.5]))
        prior.log_scales.copy_(0.3 * torch.randn_like(prior.log_scales))
    x = torch.rand(6, 1, 28, 28).bernoulli()
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    model_trace.compute_log_prob()
    z = model_trace.nodes["z"]["value"]  # (6, 4)
    mu, sigma = prior.locs.detach(), prior.log_scales.detach().exp()  # (3, 4) each
    log_normal = (-0.5 * ((z[:, None] - mu) / sigma) ** 2 - sigma.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
    log_w = prior.logits.detach() - prior.logits.detach().exp().sum().log()  # (3,)
    expected = torch.logsumexp(log_w + log_normal, dim=-1)  # (6,)
    torch.testing.assert_close(model_trace.nodes["z"]["unscaled_log_prob"].detach(), expected)

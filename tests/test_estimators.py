"""Every estimator the trainer uses, at a real plate scale (N / B = 250): the trainer's step estimates its definition.

Each definition is computed here from the model's and guide's traces with unscaled log-probs
(`site["fn"].log_prob(site["value"])`), and only then multiplied by N / B; the trainer's loss is
averaged over many draws and must agree within Monte Carlo error.
"""

import contextlib
import dataclasses
import math
import os
import sys

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO
from torch.distributions import kl_divergence

import processes
from pyro_vae import Config, build_vae
from pyro_vae.data import load_mnist
from pyro_vae.estimators import IWAE, make_elbo
from pyro_vae.train import SVIStep

NUM_DATA, BATCH = 1000, 4  # N / B = 250: the regime where scaling before the logsumexp goes wrong
DRAWS = 200
SIGMAS = 5.0  # agreement within 5 standard errors of the difference of two Monte Carlo means

ESTIMATORS = {
    "trace": {},
    "trace, beta 2": {"beta": 2.0},
    "trace, 3 particles": {"num_particles": 3},
    "meanfield": {"elbo": "meanfield"},
    "iwae": {"elbo": "iwae", "num_particles": 5},
    "iwae, beta 0.5": {"elbo": "iwae", "num_particles": 5, "beta": 0.5},
    "enum, unlabelled batch": {"conditional": True, "labels": 100},
    "enum, labelled batch": {"conditional": True, "labels": 100},
}


@pytest.fixture(scope="module")
def images(data_dir):
    data = load_mnist(data_dir, train_size=1, test_size=BATCH)
    return data.test_images, data.test_labels


def _config(**changes) -> Config:
    return dataclasses.replace(Config(latent_dim=4, conv_channels=(8, 16), device="cpu"), **changes)


def _site_log_prob(site, weights: dict) -> torch.Tensor:
    """Unscaled log-prob of a site, times the weight the model gives it (the KL weight on z, alpha on y_aux)."""
    return weights.get(site["name"], 1.0) * site["fn"].log_prob(site["value"])


def _traces(vae, x, y, particles: int | None = 1, condition: dict | None = None):
    model, guide = vae.model, vae.guide
    if condition:  # a site of both, fixed in both (here the digit y, as one term of the enumeration)
        model, guide = poutine.condition(model, data=condition), poutine.condition(guide, data=condition)
    with pyro.plate("particles", particles, dim=-2) if particles else contextlib.nullcontext():
        guide_trace = poutine.trace(guide).get_trace(x, y)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, y)
    return model_trace, guide_trace


def _log_weights(vae, x, y, particles: int | None = 1, condition: dict | None = None) -> torch.Tensor:
    """log p(x, z) - log q(z | x) per particle and image, (K, B), the KL weight on the z terms."""
    weights = {"z": vae.kl_weight, "y_aux": vae.classifier_weight}
    model_trace, guide_trace = _traces(vae, x, y, particles, condition)
    sites = lambda trace: [s for s in trace.nodes.values() if s["type"] == "sample" and s["name"] != "data"]
    return (sum(_site_log_prob(s, weights) for s in sites(model_trace))
            - sum(_site_log_prob(s, weights) for s in sites(guide_trace)))


def _definition(vae, config: Config, x, y) -> float:
    """One Monte Carlo draw of the estimator's definition: minus N / B times the sum of per-image objectives."""
    factor = NUM_DATA / len(x)
    with torch.no_grad():
        if config.elbo == "iwae":
            k = config.num_particles
            per_image = _log_weights(vae, x, y, k).logsumexp(0) - math.log(k)
        elif config.elbo == "meanfield":
            model_trace, guide_trace = _traces(vae, x, y)
            q, p = guide_trace.nodes["z"]["fn"], model_trace.nodes["z"]["fn"]
            log_lik = model_trace.nodes["x"]["fn"].log_prob(x)
            per_image = log_lik - vae.kl_weight * kl_divergence(q, p)
        elif config.labels and y is None:
            # E_{q(y | x)} of the ELBO given y, summed exactly over the ten digits (as TraceEnum_ELBO does)
            digits = torch.arange(10).unsqueeze(1).expand(10, len(x))  # (10, B): every digit for every image
            given = _log_weights(vae, x, None, particles=None, condition={"y": digits})  # (10, B), with log p(y) - log q(y | x)
            per_image = (vae.classifier(x).softmax(-1).T * given).sum(0)
        else:
            per_image = _log_weights(vae, x, y)
    return -factor * per_image.sum().item()


def _mean_and_stderr(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), t.std().item() / math.sqrt(len(t))


def _assert_same_mean(trainer: list[float], definition: list[float], what: str) -> None:
    """The two Monte Carlo means agree within SIGMAS standard errors of their difference."""
    (mean_t, se_t), (mean_d, se_d) = _mean_and_stderr(trainer), _mean_and_stderr(definition)
    assert abs(mean_t - mean_d) < SIGMAS * math.hypot(se_t, se_d), (
        f"{what}: trainer {mean_t:.1f} +- {se_t:.1f}, definition {mean_d:.1f} +- {se_d:.1f}")


@pytest.mark.slow  # 2 x 200 draws per estimator: about a minute in all on an idle 2-core machine
@pytest.mark.parametrize("name", ESTIMATORS)
def test_trainers_step_estimates_the_definition_at_plate_scale_250(name, images):
    config = _config(**ESTIMATORS[name])
    assert not config.errors()
    x, labels = images
    y = labels if name == "enum, labelled batch" else None
    vae = build_vae(config, num_data=NUM_DATA)
    vae.kl_weight = config.beta
    # lr 0: the trainer's own step (estimator, backward, Adam, cleared gradients) on a model that stays put
    step = SVIStep(vae, dataclasses.replace(config, lr=0.0))
    trainer = [float(step.step(x, y)) for _ in range(DRAWS)]
    definition = [_definition(vae, config, x, y) for _ in range(DRAWS)]
    _assert_same_mean(trainer, definition, name)


# Config changes, Pyro's own estimator of that config, and whether the batch is labelled
AS_PYRO = {
    "trace": ({}, Trace_ELBO, False),
    "trace, 3 particles": ({"num_particles": 3}, Trace_ELBO, False),
    "trace, 2 layers": ({"layers": 2}, Trace_ELBO, False),
    "trace, KL weight a tensor": ({"kl_warmup_epochs": 1.0}, Trace_ELBO, False),
    "trace, iaf guide": ({"guide": "iaf"}, Trace_ELBO, False),
    "meanfield": ({"elbo": "meanfield"}, TraceMeanField_ELBO, False),
    "meanfield, KL weight a tensor": ({"elbo": "meanfield", "kl_warmup_epochs": 1.0}, TraceMeanField_ELBO, False),
    "enum, unlabelled batch": ({"conditional": True, "labels": 100}, TraceEnum_ELBO, False),
    "enum, labelled batch": ({"conditional": True, "labels": 100}, TraceEnum_ELBO, True),
    "enum, KL weight a tensor": ({"conditional": True, "labels": 100, "kl_warmup_epochs": 1.0}, TraceEnum_ELBO, False),
}


@pytest.mark.parametrize("name", AS_PYRO)
def test_each_estimator_gives_pyros_loss_and_gradients_on_the_same_draws(name, images):
    """make_elbo's estimators read nothing back from the device, yet compute what Pyro's own do: the same loss and
    gradients, in float64 (in float32 they differ by rounding: the sums run in another order)."""
    changes, pyro_class, labelled = AS_PYRO[name]
    config = _config(**changes)
    x, labels = images
    x, y = x.double(), labels if labelled else None
    with _float64():
        _assert_same_loss_and_gradients(config, pyro_class, x, y)


@contextlib.contextmanager
def _float64():
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(torch.float32)


def _assert_same_loss_and_gradients(config, pyro_class, x, y):
    vae = build_vae(config, num_data=NUM_DATA)
    # the captured CUDA step gives the model its KL warm-up weight as a tensor
    vae.kl_weight = torch.tensor(0.3, dtype=torch.float64) if config.kl_warmup_epochs else 1.0
    ours = make_elbo(config)
    theirs = pyro_class(num_particles=ours.num_particles, vectorize_particles=True, max_plate_nesting=1)
    assert type(ours) is not pyro_class and isinstance(ours, pyro_class)
    results = []
    for elbo in (theirs, ours):
        pyro.set_rng_seed(11)  # the same draws of z for both
        loss = elbo.differentiable_loss(vae.model, vae.guide, x, y)
        named = [(n, p) for n, p in vae.named_parameters()]
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        results.append((loss.detach(), {n: g for (n, _), g in zip(named, grads)}))
    (pyro_loss, pyro_grads), (loss, grads) = results
    assert loss.item() == pytest.approx(pyro_loss.item(), rel=1e-12)
    assert grads.keys() == pyro_grads.keys()
    for n, want in pyro_grads.items():
        if want is None:
            assert grads[n] is None, n
        else:
            torch.testing.assert_close(grads[n], want, rtol=1e-10, atol=1e-10 * want.abs().max().item(), msg=n)


def test_iwae_gradient_is_n_over_b_times_the_per_image_bounds_gradient(images):
    """Same draws: the IWAE loss and gradient are N / B times those of the summed unscaled per-image bounds."""
    config = _config(elbo="iwae", num_particles=5)
    x, _ = images
    vae = build_vae(config, num_data=NUM_DATA)
    pyro.set_rng_seed(7)
    loss = IWAE(num_particles=5).loss_and_grads(vae.model, vae.guide, x)
    trainer = {n: p.grad.clone() for n, p in vae.named_parameters() if p.grad is not None}
    vae.zero_grad(set_to_none=True)
    pyro.set_rng_seed(7)  # the same draws of z
    bound = _log_weights(vae, x, None, particles=5).logsumexp(0) - math.log(5)
    definition = -(NUM_DATA / BATCH) * bound.sum()
    definition.backward()
    assert loss == pytest.approx(definition.item(), rel=1e-5)
    assert trainer.keys() == {n for n, p in vae.named_parameters() if p.grad is not None}
    for n, g in trainer.items():
        expected = dict(vae.named_parameters())[n].grad
        torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item(), msg=n)


def test_iwae_refuses_a_guide_it_cannot_differentiate():
    def model():
        with pyro.plate("data", 10, subsample_size=2):
            pyro.sample("c", pyro.distributions.Bernoulli(0.5))

    def guide():
        with pyro.plate("data", 10, subsample_size=2):
            pyro.sample("c", pyro.distributions.Bernoulli(0.3))

    with pytest.raises(NotImplementedError, match="reparameterized"):
        IWAE(num_particles=2).loss(model, guide)


def test_iwae_under_torchrun_each_rank_scales_its_shard_and_the_mean_is_the_whole_batch(images):
    """Each rank's plate subsamples B / W images, so its factor is N / (B / W); the ranks' mean loss (what
    the trainer reports under torchrun) is then -(N / B) times the sum of all B per-image bounds."""
    x, _ = images
    vae = build_vae(_config(elbo="iwae", num_particles=3), num_data=NUM_DATA)
    shards = x.chunk(2)  # what train._loop gives ranks 0 and 1
    rank_losses, bounds = [], []
    for seed, shard in enumerate(shards):
        pyro.set_rng_seed(seed)
        rank_losses.append(IWAE(num_particles=3).loss(vae.model, vae.guide, shard))
        pyro.set_rng_seed(seed)  # the same draws, for the definition
        with torch.no_grad():
            bounds.append(_log_weights(vae, shard, None, particles=3).logsumexp(0) - math.log(3))
    definition = -(NUM_DATA / len(x)) * torch.cat(bounds, -1).sum().item()
    assert sum(rank_losses) / 2 == pytest.approx(definition, rel=1e-5)


# One rank of a torchrun job, as train._loop runs it: its shard of the global batch, its own noise, the
# trainer's step with the gradients (and loss) averaged over the ranks. lr 0 keeps the model put.
_RANK_PROGRAM = """
import sys, types, torch, pyro
from pyro_vae import build_vae, distributed
from pyro_vae.train import SVIStep
given = torch.load(sys.argv[1], weights_only=False)  # written by the test itself
ranks = distributed.setup("cpu")
vae = build_vae(given["config"], num_data=given["num_data"])
vae.load_state_dict(given["state"])
pyro.set_rng_seed(ranks.rank)
shard = given["x"].chunk(ranks.world)[ranks.rank]
step = SVIStep(vae, given["config"], ranks, stop=types.SimpleNamespace(signum=None))
losses = [float(step.step(shard)) for _ in range(given["draws"])]
if ranks.is_main:
    torch.save(losses, sys.argv[2])
distributed.teardown(ranks)
"""


@pytest.mark.slow  # two gloo processes: about 20 s on an idle 2-core machine
def test_iwae_trainers_step_under_torchrun_estimates_the_whole_batchs_bound(images, tmp_path):
    """2 ranks of 2 images each: the mean over draws of the loss the trainer reports (the ranks' mean) is
    -(N / B) times the sum of the K-sample bounds of all B = 4 images."""
    config = _config(elbo="iwae", num_particles=5, lr=0.0)
    x, _ = images
    vae = build_vae(config, num_data=NUM_DATA)
    torch.save({"config": config, "num_data": NUM_DATA, "state": vae.state_dict(), "x": x, "draws": DRAWS},
               tmp_path / "given.pt")
    (tmp_path / "rank.py").write_text(_RANK_PROGRAM)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ran = processes.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                         str(tmp_path / "rank.py"), str(tmp_path / "given.pt"), str(tmp_path / "losses.pt")],
                        timeout=600, env=env)
    assert ran.returncode == 0, ran.stderr[-3000:]
    trainer = torch.load(tmp_path / "losses.pt")
    definition = [_definition(vae, config, x, None) for _ in range(DRAWS)]
    _assert_same_mean(trainer, definition, "iwae under torchrun")


@pytest.mark.parametrize("particles", [1, 3])
def test_a_guide_with_a_score_function_site_gets_pyros_trace_elbo_too(particles):
    """The VAE's guides are all reparameterized, where the ELBO is its own surrogate; a guide with a discrete
    (score-function) site as well takes Pyro's surrogate path: the same loss and gradients as Pyro's Trace_ELBO."""
    x = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)

    def model():
        with pyro.plate("data", 30, subsample=torch.arange(3)):
            b = pyro.sample("b", pyro.distributions.Bernoulli(torch.tensor(0.4, dtype=torch.float64)))
            z = pyro.sample("z", pyro.distributions.Normal(b, torch.tensor(1.0, dtype=torch.float64)))
            pyro.sample("x", pyro.distributions.Normal(z, torch.tensor(0.5, dtype=torch.float64)), obs=x)

    params = {"p": torch.tensor(0.3, dtype=torch.float64, requires_grad=True),
              "loc": torch.tensor(0.2, dtype=torch.float64, requires_grad=True)}

    def guide():
        with pyro.plate("data", 30, subsample=torch.arange(3)):
            pyro.sample("b", pyro.distributions.Bernoulli(params["p"]))
            pyro.sample("z", pyro.distributions.Normal(params["loc"] + x / 2, torch.tensor(0.8, dtype=torch.float64)))

    ours = make_elbo(_config(num_particles=particles))
    results = []
    for elbo in (Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1), ours):
        pyro.set_rng_seed(3)
        loss = elbo.differentiable_loss(model, guide)
        results.append((loss.item(), torch.autograd.grad(loss, list(params.values()))))
    (want, want_grads), (got, grads) = results
    assert got == pytest.approx(want, rel=1e-12)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert all(g.abs() > 0 for g in grads)  # the score-function term reaches p

"""Evaluation: the importance-sampled log p(x) against an exact value, the grid posterior, evaluate_run and its CLI."""

import dataclasses
import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyro_vae import Config, TrainedVAE, build_vae
from pyro_vae.checkpoint import save_checkpoint
from pyro_vae.evaluate import (evaluate_run, format_table, grid_posteriors, importance_estimates, kl_to_standard_normal,
                               log_weights, main, posterior_on_grid)


class PPCA:
    """Probabilistic PCA, z ~ N(0, I_k), x | z ~ N(W z + b, sigma^2 I_D), whose log p(x) is known exactly.

    The guide is amortized and Gaussian but deliberately not the exact posterior: diagonal where the
    posterior is correlated, too wide by `widen`, and shifted by `shift`. With `exact_guide` it is the
    exact posterior (a full-covariance Gaussian), so every importance weight equals p(x).
    """

    def __init__(self, D=6, k=2, sigma=0.5, widen=1.3, shift=0.1, exact_guide=False):
        gen = torch.Generator().manual_seed(0)
        self.W, self.b, self.sigma, self.k = torch.randn(D, k, generator=gen), torch.randn(D, generator=gen), sigma, k
        self.post_cov = torch.linalg.inv(torch.eye(k) + self.W.T @ self.W / sigma ** 2)
        self.gain = self.post_cov @ self.W.T / sigma ** 2  # posterior mean = gain (x - b)
        self.widen, self.shift, self.exact_guide = widen, shift, exact_guide

    def marginal(self) -> dist.Distribution:
        return dist.MultivariateNormal(self.b, self.W @ self.W.T + self.sigma ** 2 * torch.eye(len(self.b)))

    def posterior(self, x) -> dist.Distribution:
        return dist.MultivariateNormal((x - self.b) @ self.gain.T, self.post_cov)

    def q(self, x) -> dist.Distribution:
        if self.exact_guide:
            return self.posterior(x)
        loc = (x - self.b) @ self.gain.T + self.shift
        return dist.Normal(loc, self.widen * self.post_cov.diagonal().sqrt()).to_event(1)

    def model(self, x, y=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros(self.k), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.sigma).to_event(1), obs=x)

    def guide(self, x, y=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", self.q(x))


def test_importance_estimate_converges_to_the_exact_log_marginal_and_the_elbo_stays_below():
    ppca = PPCA()
    x = ppca.marginal().sample((200,))  # (B, D)
    exact = ppca.marginal().log_prob(x)  # (B,)
    errors = []
    for k in (1, 10, 100, 1000):
        estimates = importance_estimates(ppca, x, num_samples=k, chunk=128)
        assert estimates.log_px.shape == (200,)
        errors.append((exact - estimates.log_px).abs().mean().item())
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[0] > 1.0 and errors[3] < 0.05  # the guide is poor at K = 1, close at K = 1000

    # the ELBO is below log p(x) for every image, by KL(q(z|x) || p(z|x)), known exactly here
    elbo = estimates.elbo
    gap = torch.distributions.kl_divergence(dist.MultivariateNormal(ppca.q(x).mean, torch.diag_embed(ppca.q(x).variance)),
                             ppca.posterior(x))
    assert (elbo < exact).all()
    assert (exact - elbo).mean().item() == pytest.approx(gap.mean().item(), abs=0.05)
    assert log_weights(ppca, x, num_samples=1000).mean(0).mean().item() == pytest.approx(elbo.mean().item(),
                                                                                         abs=0.05)


def test_reconstruction_term_and_kl_match_their_closed_forms():
    ppca = PPCA()
    x = ppca.marginal().sample((100,))
    estimates = importance_estimates(ppca, x, num_samples=2000, chunk=500)
    q = ppca.q(x)
    # E_q[log N(x; W z + b, sigma^2 I)] = log N(x; W m + b, sigma^2 I) - tr(W S W^T) / (2 sigma^2)
    expected = (dist.Normal(q.mean @ ppca.W.T + ppca.b, ppca.sigma).log_prob(x).sum(-1)
                - (ppca.W ** 2 @ q.variance.T).sum(0) / (2 * ppca.sigma ** 2))
    assert estimates.reconstruction.mean().item() == pytest.approx(expected.mean().item(), abs=0.05)
    kl = kl_to_standard_normal(q.mean, q.stddev).sum(-1)  # the prior is N(0, I)
    assert (estimates.reconstruction - estimates.elbo).mean().item() == pytest.approx(kl.mean().item(), abs=0.05)


@pytest.mark.parametrize("k, chunk", [(1, 1), (10, 3), (10, 10), (7, 100)])
@pytest.mark.parametrize("story", ["PPCA", "LinearGaussianChain"])
def test_exact_guide_gives_the_exact_value_for_any_k_and_chunking(story, k, chunk):
    known = globals()[story](exact_guide=True)  # one latent layer, or two (z2 -> z -> x, as --layers 2 names them)
    x = known.marginal().sample((5,))
    estimates = importance_estimates(known, x, num_samples=k, chunk=chunk)
    exact = known.marginal().log_prob(x)
    assert torch.allclose(estimates.log_px, exact, atol=1e-4)
    assert torch.allclose(estimates.elbo, exact, atol=1e-4)


def test_posterior_on_grid_recovers_the_exact_posterior_and_marginal():
    ppca = PPCA(D=4, k=2)
    x = ppca.marginal().sample((3,))
    axes = [torch.linspace(-4, 4, 161, dtype=torch.float64)] * 2
    log_density, log_px = posterior_on_grid(ppca, x, [a.float() for a in axes])
    assert log_density.shape == (3, 161, 161)
    assert torch.allclose(log_px, ppca.marginal().log_prob(x), atol=1e-3)
    # the normalized grid density has the exact posterior mean and integrates to one
    cell = (axes[0][1] - axes[0][0]).item() ** 2
    density = log_density.double().exp() * cell
    assert torch.allclose(density.sum((1, 2)), torch.ones(3, dtype=torch.float64), atol=1e-6)
    z1, z2 = torch.meshgrid(*axes, indexing="ij")
    mean = torch.stack([(density * z1).sum((1, 2)), (density * z2).sum((1, 2))], -1)
    assert torch.allclose(mean.float(), ppca.posterior(x).mean, atol=1e-3)


def test_grid_posteriors_find_both_densities_and_measure_the_gap():
    ppca = PPCA(D=4, k=2, shift=0.3)
    x = ppca.marginal().sample((3,))
    q = ppca.q(x)
    gap = torch.distributions.kl_divergence(dist.MultivariateNormal(q.mean, torch.diag_embed(q.variance)),
                                            ppca.posterior(x))
    grids = grid_posteriors(ppca, x, coarse=41, fine=81, extent=4.0)
    for grid, log_px, kl in zip(grids, ppca.marginal().log_prob(x), gap):
        assert grid.log_p.shape == grid.log_q.shape == (81, 81)
        assert grid.log_px == pytest.approx(log_px.item(), abs=1e-3)
        assert grid.kl == pytest.approx(kl.item(), abs=1e-2)
        width = [(a[-1] - a[0]).item() for a in grid.axes]
        assert all(w < 4.0 for w in width)  # zoomed in from the coarse [-4, 4]^2


class OneActiveEncoder(nn.Module):
    """q(z | x) = N(loc, I) with loc_0 = 20 * (mean pixel - 0.13) and every other loc_d = 0: one active unit."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim

    def forward(self, x, c=None):
        loc = torch.zeros(*x.shape[:-3], self.latent_dim)
        loc[..., 0] = 20 * (x.mean((-3, -2, -1)) - 0.13)
        return loc, torch.ones_like(loc)


@pytest.fixture
def one_active_run(data_dir, tmp_path):
    """An untrained VAE whose encoder is replaced: its posterior means and KL per dimension are known."""
    config = Config(latent_dim=3, arch="mlp", hidden_dim=16, test_size=100, data_dir=str(data_dir), device="cpu",
                    out=str(tmp_path / "run"))
    vae = build_vae(config)
    vae.encoder = OneActiveEncoder(config.latent_dim)
    return TrainedVAE(vae, config, {"epoch": 3})


def test_evaluate_run_reports_active_units_and_kl_per_dimension(one_active_run):
    results = evaluate_run(one_active_run, k=100, limit=24, batch_size=8, chunk=30, seed=1, progress=False)
    assert results["num_images"] == 24 and results["num_test_images"] == 100 and results["k"] == 100
    assert results["active_units"] == 1
    assert results["posterior_mean_variance"][0] > 0.01 and results["posterior_mean_variance"][1:] == [0, 0]

    from pyro_vae.data import load_mnist
    x = load_mnist(one_active_run.config.data_dir, binarize="dynamic", test_size=100).test_images[:24]
    loc0 = 20 * (x.mean((1, 2, 3)) - 0.13)
    kl = results["kl_per_dim_to_standard_normal"]
    assert kl[0] == pytest.approx((0.5 * loc0 ** 2).mean().item(), rel=1e-4) and kl[1:] == [0, 0]
    # the prior is N(0, I), so the total KL (reconstruction - ELBO) is the sum of the analytic ones
    assert results["kl"]["mean"] == pytest.approx(sum(kl), abs=0.1)
    assert results["log_px"]["mean"] > results["elbo"]["mean"]
    assert results["epoch"] == 3 and results["seed"] == 1

    again = evaluate_run(one_active_run, k=100, limit=24, batch_size=24, chunk=100, seed=1, progress=False)
    assert again["elbo"]["mean"] != results["elbo"]["mean"]  # different batching, different draws ...
    assert again["log_px"]["mean"] == pytest.approx(results["log_px"]["mean"], abs=0.2)  # ... same figure
    same = evaluate_run(one_active_run, k=100, limit=24, batch_size=8, chunk=30, seed=1, progress=False)
    assert same["log_px"] == results["log_px"]  # a fixed seed: reproducible


def test_cli_writes_json_and_table(one_active_run, tmp_path, capsys):
    save_checkpoint(tmp_path / "checkpoint.pt", {"config": one_active_run.config.to_dict(), "epoch": 1,
                                                 "model": build_vae(one_active_run.config).state_dict()})
    assert main([str(tmp_path), "--k", "20", "--limit", "30", "--chunk", "7", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "30 of 100 test images" in out and "K = 20" in out and "active units" in out
    results = json.loads((tmp_path / "evaluation.json").read_text())
    assert results["num_images"] == 30 and results["k"] == 20 and results["device"] == "cpu"
    assert results["seconds"] > 0 and len(results["kl_per_dim_to_standard_normal"]) == 3
    assert f"{results['log_px']['mean']:.2f}" in out
    assert "log p(x), importance-sampled" in out and results["labels_observed"] is False
    # a label-conditioned model told the test labels estimates the joint, and the table says so
    assert "log p(x, y), importance-sampled" in format_table({**results, "labels_observed": True})


def test_cli_bad_run_is_a_one_line_error(tmp_path, capsys):
    assert main([str(tmp_path / "no-such-run"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no checkpoint at") and err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--k", "0"])
    assert exit_info.value.code == 2 and "--k must be at least 1" in capsys.readouterr().err


def test_grid_posterior_and_importance_sampling_agree_on_a_2d_vae():
    """Two independent estimates of log p(x) for a real (untrained) VAE: quadrature on a grid and K = 4000 IS."""
    vae = build_vae(Config(latent_dim=2, arch="mlp", hidden_dim=32, device="cpu"))
    x = torch.rand(4, 1, 28, 28).bernoulli()
    axes = [torch.linspace(-6, 6, 121)] * 2
    log_density, by_grid = posterior_on_grid(vae, x, axes)
    by_sampling = importance_estimates(vae, x, num_samples=4000, chunk=1000).log_px
    assert torch.allclose(by_grid, by_sampling, atol=0.05)
    assert log_density.shape == (4, 121, 121)


class LinearGaussianChain:
    """z2 ~ N(0, I), z | z2 ~ N(A z2 + a, s^2 I), x | z ~ N(W z + b, sigma^2 I): log p(x) in closed form.

    Site names as in the VAE ("z" next to x, "z2" above). The guide is bottom-up, q(z | x) q(z2 | z), like
    --guide normal: deliberately off (widened and shifted), or with `exact_guide` the exact posterior
    p(z | x) p(z2 | z) (z2 is independent of x given z), which makes every importance weight p(x).
    """

    def __init__(self, D=5, k1=3, k2=2, s=0.7, sigma=0.5, widen=1.3, shift=0.1, exact_guide=False):
        gen = torch.Generator().manual_seed(0)
        self.A, self.a = torch.randn(k1, k2, generator=gen), torch.randn(k1, generator=gen)
        self.W, self.b = torch.randn(D, k1, generator=gen), torch.randn(D, generator=gen)
        self.s, self.sigma, self.k2 = s, sigma, k2
        self.z_cov = self.A @ self.A.T + s ** 2 * torch.eye(k1)  # of the marginal p(z)
        self.z_post_cov = torch.linalg.inv(torch.linalg.inv(self.z_cov) + self.W.T @ self.W / sigma ** 2)
        self.z2_post_cov = torch.linalg.inv(torch.eye(k2) + self.A.T @ self.A / s ** 2)
        self.widen, self.shift, self.exact_guide = widen, shift, exact_guide

    def marginal(self) -> dist.Distribution:
        D = len(self.b)
        return dist.MultivariateNormal(self.W @ self.a + self.b,
                                       self.W @ self.z_cov @ self.W.T + self.sigma ** 2 * torch.eye(D))

    def q_z(self, x) -> dist.Distribution:
        loc = (torch.linalg.solve(self.z_cov, self.a) + (x - self.b) @ self.W / self.sigma ** 2) @ self.z_post_cov
        if self.exact_guide:
            return dist.MultivariateNormal(loc, self.z_post_cov)
        return dist.MultivariateNormal(loc + self.shift, self.widen ** 2 * self.z_post_cov)

    def q_z2(self, z) -> dist.Distribution:
        loc = (z - self.a) @ self.A / self.s ** 2 @ self.z2_post_cov
        if self.exact_guide:
            return dist.MultivariateNormal(loc, self.z2_post_cov)
        return dist.MultivariateNormal(loc - self.shift, self.widen ** 2 * self.z2_post_cov)

    def model(self, x, y=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            z2 = pyro.sample("z2", dist.Normal(torch.zeros(self.k2), 1.0).to_event(1))
            z = pyro.sample("z", dist.Normal(z2 @ self.A.T + self.a, self.s).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.sigma).to_event(1), obs=x)

    def guide(self, x, y=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", self.q_z(x))
            pyro.sample("z2", self.q_z2(z))


def test_importance_estimate_of_a_linear_gaussian_chain_converges_to_the_exact_log_marginal():
    chain = LinearGaussianChain()
    x = chain.marginal().sample((200,))
    exact = chain.marginal().log_prob(x)
    errors = []
    for k in (1, 10, 100, 1000):
        estimates = importance_estimates(chain, x, num_samples=k, chunk=128)
        errors.append((exact - estimates.log_px).abs().mean().item())
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[0] > 0.5 and errors[3] < 0.05
    assert (estimates.elbo < exact).all()


def test_kl_of_a_label_observed_cvae_is_the_z_sites_kl_without_log_p_y(small_config):
    """The CVAE told y: ELBO = E_q[log p(x | z, y)] - KL(q(z | x, y) || p(z | y)) + log p(y), with log p(y) = -log 10."""
    from pyro_vae import TrainedVAE, build_vae
    from pyro_vae.data import load_mnist
    from pyro_vae.data import NUM_CLASSES

    config = dataclasses.replace(small_config, conditional=True)
    run = TrainedVAE(build_vae(config), config)  # untrained: the identity below holds for any parameters
    assert run.labels_observed
    with torch.no_grad():  # a mean per digit far from 0, so that p(z | y) depends on y
        run.vae.prior.class_means.copy_(torch.randn(NUM_CLASSES, small_config.latent_dim))
    k = 100
    results = evaluate_run(run, k=k, limit=64, batch_size=32, chunk=k, seed=2, progress=False)

    data = load_mnist(small_config.data_dir, binarize=small_config.binarize, test_size=small_config.test_size)
    x, y = data.test_images[:64], data.test_labels[:64]
    q = run.vae.posterior(*run.vae.encoder(x, run.vae._one_hot(y)))  # q(z | x, y), batch (64,)
    closed_form = torch.distributions.kl_divergence(q, run.vae.prior(y)).mean().item()
    z = q.sample((1000,))  # the spread of one draw's log q - log p, for a Monte Carlo tolerance of 4 standard errors
    tolerance = 4 * (q.log_prob(z) - run.vae.prior(y).log_prob(z)).std().item() / math.sqrt(64 * k)
    assert results["kl"]["mean"] == pytest.approx(closed_form, abs=tolerance)
    assert results["log_py"]["mean"] == pytest.approx(-math.log(NUM_CLASSES), abs=1e-4)
    total = results["reconstruction"]["mean"] - results["kl"]["mean"] + results["log_py"]["mean"]
    assert total == pytest.approx(results["elbo"]["mean"], abs=1e-3)
    table = format_table(results)
    assert "KL(q(z|x,y) || p(z|y))" in table and "log p(y) of the observed label" in table
    assert "test ELBO of log p(x, y)" in table

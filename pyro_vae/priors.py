"""Priors p(z) (or p(z | y)): each is an nn.Module whose forward(y) returns a distribution over z.

Every prior has event shape (latent_dim,) and no batch shape of its own beyond what y brings,
so the model's `data` plate broadcasts it over images. Learned priors hold their parameters here.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.distributions import transforms as T
from torch import nn


class StandardNormal(nn.Module):
    """p(z) = Normal(0, I)."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.register_buffer("zero", torch.zeros(()), persistent=False)  # carries the device and dtype

    def forward(self, y=None) -> dist.Distribution:
        return dist.Normal(self.zero, 1.0).expand([self.latent_dim]).to_event(1)


class Laplace(StandardNormal):
    """p(z) = Laplace(0, 1) per dimension: heavier tails than the normal."""

    def forward(self, y=None) -> dist.Distribution:
        return dist.Laplace(self.zero, 1.0).expand([self.latent_dim]).to_event(1)


class StudentT(StandardNormal):
    """p(z) = StudentT(df=3, 0, 1) per dimension: much heavier tails."""

    df = 3.0

    def forward(self, y=None) -> dist.Distribution:
        return dist.StudentT(self.df, self.zero, 1.0).expand([self.latent_dim]).to_event(1)


class MixtureOfGaussians(nn.Module):
    """p(z) = sum_k w_k Normal(mu_k, diag sigma_k^2), with weights, means and scales learned."""

    def __init__(self, latent_dim: int, components: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(components))
        self.locs = nn.Parameter(torch.randn(components, latent_dim))
        self.log_scales = nn.Parameter(torch.zeros(components, latent_dim))

    def forward(self, y=None) -> dist.Distribution:
        components = dist.Normal(self.locs, self.log_scales.exp()).to_event(1)  # batch (K,), event (D,)
        return dist.MixtureSameFamily(dist.Categorical(logits=self.logits), components)


class VampPrior(nn.Module):
    """The VampPrior (Tomczak & Welling 2018): p(z) = 1/K sum_k q(z | u_k) at K learned pseudo-inputs u_k."""

    def __init__(self, encoder: nn.Module, components: int):
        super().__init__()
        self.pseudo_inputs = nn.Parameter(0.5 * torch.randn(components, 1, 28, 28))  # pre-sigmoid pixels
        self.__dict__["encoder"] = encoder  # shared with the guide, not a submodule: registered once, there

    def forward(self, y=None) -> dist.Distribution:
        loc, scale = self.encoder(torch.sigmoid(self.pseudo_inputs))  # (K, D) each
        weights = dist.Categorical(logits=torch.zeros_like(loc[:, 0]))
        return dist.MixtureSameFamily(weights, dist.Normal(loc, scale).to_event(1))


class Flow(nn.Module):
    """p(z): a standard normal pushed through learned affine coupling layers (RealNVP)."""

    def __init__(self, latent_dim: int, steps: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.couplings = nn.ModuleList(T.affine_coupling(latent_dim, hidden_dims=[4 * latent_dim])
                                       for _ in range(steps))
        self.register_buffer("reverse", torch.arange(latent_dim - 1, -1, -1), persistent=False)
        self.register_buffer("zero", torch.zeros(()), persistent=False)

    def forward(self, y=None) -> dist.Distribution:
        base = dist.Normal(self.zero, 1.0).expand([self.latent_dim]).to_event(1)
        steps = [t for coupling in self.couplings for t in (coupling, T.Permute(self.reverse))]
        return dist.TransformedDistribution(base, steps)


class LabelConditional(nn.Module):
    """p(z | y) = Normal(mu_y, I), one learned mean per digit class (the CVAE's prior).

    With `learned=False` every mean stays at zero: p(z | y) = Normal(0, I), z independent of y, as
    in Kingma et al.'s M2, so the digit is carried by y alone and z holds only the style.
    """

    def __init__(self, latent_dim: int, num_classes: int = 10, learned: bool = True):
        super().__init__()
        means = torch.zeros(num_classes, latent_dim)  # starts as Normal(0, I) for all
        if learned:
            self.class_means = nn.Parameter(means)
        else:
            self.register_buffer("class_means", means)

    def forward(self, y: torch.Tensor) -> dist.Distribution:
        return dist.Normal(self.class_means[y], 1.0).to_event(1)  # y (...) -> batch (...), event (D,)


def make_prior(config, encoder: nn.Module) -> nn.Module:
    """The prior that config names; the VampPrior shares the guide's encoder."""
    if config.conditional:
        return LabelConditional(config.latent_dim, learned=config.class_prior == "learned")
    return {
        "normal": lambda: StandardNormal(config.latent_dim),
        "laplace": lambda: Laplace(config.latent_dim),
        "studentt": lambda: StudentT(config.latent_dim),
        "mog": lambda: MixtureOfGaussians(config.latent_dim, config.prior_components),
        "vamp": lambda: VampPrior(encoder, config.prior_components),
        "flow": lambda: Flow(config.latent_dim, config.flow_steps),
    }[config.prior]()

"""Priors p(z) (or p(z | y)): each is an nn.Module whose forward(y) returns a distribution over z.

Every prior has event shape (latent_dim,) and no batch shape of its own beyond what y brings,
so the model's `data` plate broadcasts it over images. Learned priors hold their parameters here.
A new prior is one class here and one line in PRIORS: `--prior NAME` then chooses it.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.distributions import transforms as T
from torch import nn

from .data import IMAGE_SHAPE, NUM_CLASSES


class Prior(nn.Module):
    """What every prior declares, and how it is built from the Config; config.py asks these, never a name."""

    min_latent_dim = 1  # the smallest --latent-dim it is defined for
    analytic_kl = False  # KL(q || p) in closed form against an analytic_kl guide (--elbo meanfield)
    label_conditional = None  # the prior p(z | y) that --conditional puts in its place; None: no such form

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        # the constants of the distributions, on the model's device: a Python number there would be copied from
        # the host on every step (a wait for the GPU, and a copy a CUDA graph cannot hold)
        self.register_buffer("zero", torch.zeros(()), persistent=False)
        self.register_buffer("one", torch.ones(()), persistent=False)

    @classmethod
    def from_config(cls, config, encoder: nn.Module) -> Prior:
        """This prior as config describes it; encoder is the guide's, for priors built on it (VampPrior)."""
        return cls(config.latent_dim)


class LabelConditional(Prior):
    """p(z | y) = Normal(mu_y, I), one learned mean per digit class (the CVAE's prior).

    With `learned=False` every mean stays at zero: p(z | y) = Normal(0, I), z independent of y, as
    in Kingma et al.'s M2, so the digit is carried by y alone and z holds only the style.
    """

    analytic_kl = True

    def __init__(self, latent_dim: int, num_classes: int = NUM_CLASSES, learned: bool = True):
        super().__init__(latent_dim)
        means = torch.zeros(num_classes, latent_dim)  # starts as Normal(0, I) for all
        if learned:
            self.class_means = nn.Parameter(means)
        else:
            self.register_buffer("class_means", means)

    @classmethod
    def from_config(cls, config, encoder: nn.Module) -> LabelConditional:
        return cls(config.latent_dim, config.classes(), learned=config.class_prior == "learned")

    def forward(self, y: torch.Tensor) -> dist.Distribution:
        return dist.Normal(self.class_means[y], self.one).to_event(1)  # y (...) -> batch (...), event (D,)


class StandardNormal(Prior):
    """p(z) = Normal(0, I)."""

    analytic_kl = True
    label_conditional = LabelConditional

    def forward(self, y=None) -> dist.Distribution:
        return dist.Normal(self.zero, self.one).expand([self.latent_dim]).to_event(1)


class Laplace(Prior):
    """p(z) = Laplace(0, 1) per dimension: heavier tails than the normal."""

    def forward(self, y=None) -> dist.Distribution:
        return dist.Laplace(self.zero, self.one).expand([self.latent_dim]).to_event(1)


class StudentT(Prior):
    """p(z) = StudentT(df, 0, 1) per dimension (df = --studentt-df, 3 by default): much heavier tails."""

    def __init__(self, latent_dim: int, df: float):
        super().__init__(latent_dim)
        self.register_buffer("df", torch.tensor(float(df)), persistent=False)

    @classmethod
    def from_config(cls, config, encoder: nn.Module) -> StudentT:
        return cls(config.latent_dim, config.studentt_df)

    def forward(self, y=None) -> dist.Distribution:
        return dist.StudentT(self.df, self.zero, self.one).expand([self.latent_dim]).to_event(1)


class MixtureOfGaussians(Prior):
    """p(z) = sum_k w_k Normal(mu_k, diag sigma_k^2), with weights, means and scales learned."""

    def __init__(self, latent_dim: int, components: int):
        super().__init__(latent_dim)
        self.logits = nn.Parameter(torch.zeros(components))
        self.locs = nn.Parameter(torch.randn(components, latent_dim))
        self.log_scales = nn.Parameter(torch.zeros(components, latent_dim))

    @classmethod
    def from_config(cls, config, encoder: nn.Module) -> MixtureOfGaussians:
        return cls(config.latent_dim, config.prior_components)

    def forward(self, y=None) -> dist.Distribution:
        components = dist.Normal(self.locs, self.log_scales.exp()).to_event(1)  # batch (K,), event (D,)
        return dist.MixtureSameFamily(dist.Categorical(logits=self.logits), components)


class VampPrior(Prior):
    """The VampPrior (Tomczak & Welling 2018): p(z) = 1/K sum_k q(z | u_k) at K learned pseudo-inputs u_k."""

    def __init__(self, latent_dim: int, encoder: nn.Module, components: int, image_shape: tuple = IMAGE_SHAPE):
        super().__init__(latent_dim)
        self.pseudo_inputs = nn.Parameter(0.5 * torch.randn(components, *image_shape))  # pre-sigmoid pixels
        self.__dict__["encoder"] = encoder  # shared with the guide, not a submodule: registered once, there

    @classmethod
    def from_config(cls, config, encoder: nn.Module) -> VampPrior:
        return cls(config.latent_dim, encoder, config.prior_components, config.shape())

    def forward(self, y=None) -> dist.Distribution:
        loc, scale = self.encoder(torch.sigmoid(self.pseudo_inputs))  # (K, D) each
        weights = dist.Categorical(logits=torch.zeros_like(loc[:, 0]))
        return dist.MixtureSameFamily(weights, dist.Normal(loc, scale).to_event(1))


class Flow(Prior):
    """p(z): a standard normal pushed through learned affine coupling layers (RealNVP)."""

    min_latent_dim = 2  # a coupling layer splits z in two parts

    def __init__(self, latent_dim: int, steps: int, hidden_dim: int):
        super().__init__(latent_dim)
        self.couplings = nn.ModuleList(T.affine_coupling(latent_dim, hidden_dims=[hidden_dim])
                                       for _ in range(steps))
        self.register_buffer("reverse", torch.arange(latent_dim - 1, -1, -1), persistent=False)

    @classmethod
    def from_config(cls, config, encoder: nn.Module) -> Flow:
        return cls(config.latent_dim, config.flow_steps, config.flow_hidden_factor * config.latent_dim)

    def forward(self, y=None) -> dist.Distribution:
        base = dist.Normal(self.zero, self.one).expand([self.latent_dim]).to_event(1)
        steps = [t for coupling in self.couplings for t in (coupling, T.Permute(self.reverse))]
        return dist.TransformedDistribution(base, steps)


# --prior NAME chooses PRIORS[NAME]; with --conditional, its label_conditional form
PRIORS = {"normal": StandardNormal, "laplace": Laplace, "studentt": StudentT, "mog": MixtureOfGaussians,
          "vamp": VampPrior, "flow": Flow}


def make_prior(config, encoder: nn.Module) -> Prior:
    """The prior that config names (its label-conditioned form with --conditional); the VampPrior shares the encoder."""
    prior = PRIORS[config.prior]
    if config.conditional:
        prior = prior.label_conditional
    return prior.from_config(config, encoder)

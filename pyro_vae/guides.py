"""Posterior families q(z | x): each is an nn.Module that turns the encoder's output into a distribution.

The encoder gives a diagonal Gaussian's loc and scale (..., latent_dim); a guide piece may use them
as they are, push them through a flow, or collapse them to a point. A new family is one class here
and one line in GUIDES: `--guide NAME` then chooses it.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.distributions import transforms as T
from torch import nn


class Guide(nn.Module):
    """What every posterior family declares, and how it is built from the Config; config.py asks these."""

    min_latent_dim = 1  # the smallest --latent-dim it is defined for
    analytic_kl = False  # KL(q || p) in closed form against an analytic_kl prior (--elbo meanfield)
    top_down = False  # with --layers 2 or more: bottom-up q(z | x) q(z2 | z) ..., or top-down as the ladder

    @classmethod
    def from_config(cls, config, encoder: nn.Module) -> Guide:
        """This family as config describes it; encoder is the network whose (loc, scale) it is given."""
        return cls()


class DiagonalNormal(Guide):
    """q(z | x) = Normal(loc(x), diag scale(x)^2)."""

    analytic_kl = True

    def forward(self, loc: torch.Tensor, scale: torch.Tensor) -> dist.Distribution:
        return dist.Normal(loc, scale).to_event(1)


class InverseAutoregressiveFlow(Guide):
    """The diagonal Gaussian followed by IAF steps (Kingma et al. 2016), each conditioned on the encoder output."""

    min_latent_dim = 2  # over a single dimension there is no order to be autoregressive in

    def __init__(self, latent_dim: int, steps: int, hidden_dim: int):
        super().__init__()
        context_dim = 2 * latent_dim  # (loc, log scale) of the base Gaussian: a summary of x
        self.steps = nn.ModuleList(
            T.conditional_affine_autoregressive(latent_dim, context_dim, hidden_dims=[hidden_dim])
            for _ in range(steps))

    @classmethod
    def from_config(cls, config, encoder: nn.Module) -> InverseAutoregressiveFlow:
        return cls(config.latent_dim, config.flow_steps, config.flow_hidden_factor * config.latent_dim)

    def forward(self, loc: torch.Tensor, scale: torch.Tensor) -> dist.Distribution:
        context = torch.cat([loc, scale.log()], dim=-1)
        base = dist.Normal(loc, scale).to_event(1)
        return dist.TransformedDistribution(base, [step.condition(context) for step in self.steps])


class PointEstimate(Guide):
    """q(z | x) = Delta(loc(x)): MAP on z under the prior, which makes the VAE a plain autoencoder."""

    def forward(self, loc: torch.Tensor, scale: torch.Tensor) -> dist.Distribution:
        return dist.Delta(loc).to_event(1)


class Ladder(DiagonalNormal):
    """The ladder guide (Sønderby et al. 2016), for --layers 2 or more: each layer's Gaussian from a deterministic
    bottom-up pass, merged top-down by precision with the model's p(z_l | z_l+1) (model.VAE._ladder_guide)."""

    analytic_kl = False  # the merged q(z | x, z2) has no closed-form KL against p(z) alone
    top_down = True  # the guide goes top-down through the model's conditionals


def precision_weighted(loc_a: torch.Tensor, scale_a: torch.Tensor, loc_b: torch.Tensor, scale_b: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ladder guide's merge of two Gaussians' evidence: precisions add, locs average weighted by precision."""
    precision_a, precision_b = scale_a ** -2, scale_b ** -2
    variance = 1 / (precision_a + precision_b)
    return (loc_a * precision_a + loc_b * precision_b) * variance, variance.sqrt()


# --guide NAME chooses GUIDES[NAME]
GUIDES = {"normal": DiagonalNormal, "iaf": InverseAutoregressiveFlow, "delta": PointEstimate, "ladder": Ladder}


def make_posterior(config, encoder: nn.Module) -> Guide:
    """The posterior family that config names, applied to encoder's output."""
    return GUIDES[config.guide].from_config(config, encoder)

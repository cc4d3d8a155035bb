"""Posterior families q(z | x): each is an nn.Module that turns the encoder's output into a distribution.

The encoder gives a diagonal Gaussian's loc and scale (..., latent_dim); a guide piece may use them
as they are, push them through a flow, or collapse them to a point.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.distributions import transforms as T
from torch import nn


class DiagonalNormal(nn.Module):
    """q(z | x) = Normal(loc(x), diag scale(x)^2)."""

    def forward(self, loc: torch.Tensor, scale: torch.Tensor) -> dist.Distribution:
        return dist.Normal(loc, scale).to_event(1)


class InverseAutoregressiveFlow(nn.Module):
    """The diagonal Gaussian followed by IAF steps (Kingma et al. 2016), each conditioned on the encoder output."""

    def __init__(self, latent_dim: int, steps: int):
        super().__init__()
        context_dim = 2 * latent_dim  # (loc, log scale) of the base Gaussian: a summary of x
        self.steps = nn.ModuleList(
            T.conditional_affine_autoregressive(latent_dim, context_dim, hidden_dims=[4 * latent_dim])
            for _ in range(steps))

    def forward(self, loc: torch.Tensor, scale: torch.Tensor) -> dist.Distribution:
        context = torch.cat([loc, scale.log()], dim=-1)
        base = dist.Normal(loc, scale).to_event(1)
        return dist.TransformedDistribution(base, [step.condition(context) for step in self.steps])


class PointEstimate(nn.Module):
    """q(z | x) = Delta(loc(x)): MAP on z under the prior, which makes the VAE a plain autoencoder."""

    def forward(self, loc: torch.Tensor, scale: torch.Tensor) -> dist.Distribution:
        return dist.Delta(loc).to_event(1)


def precision_weighted(loc_a: torch.Tensor, scale_a: torch.Tensor, loc_b: torch.Tensor, scale_b: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ladder guide's merge of two Gaussians' evidence: precisions add, locs average weighted by precision."""
    precision_a, precision_b = scale_a ** -2, scale_b ** -2
    variance = 1 / (precision_a + precision_b)
    return (loc_a * precision_a + loc_b * precision_b) * variance, variance.sqrt()


def make_posterior(config) -> nn.Module:
    return {
        "normal": DiagonalNormal,
        "ladder": DiagonalNormal,  # each layer's merged Gaussian (model.VAE._ladder_guide)
        "iaf": lambda: InverseAutoregressiveFlow(config.latent_dim, config.flow_steps),
        "delta": PointEstimate,
    }[config.guide]()

"""Priors p(z): each is an nn.Module whose forward() returns a distribution with event shape (latent_dim,)."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn


class StandardNormal(nn.Module):
    """p(z) = Normal(0, I)."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.register_buffer("zero", torch.zeros(()), persistent=False)  # carries the device and dtype

    def forward(self, y=None) -> dist.Distribution:
        return dist.Normal(self.zero, 1.0).expand([self.latent_dim]).to_event(1)


PRIORS = {"normal": StandardNormal}


def make_prior(config) -> nn.Module:
    return PRIORS["normal"](config.latent_dim)

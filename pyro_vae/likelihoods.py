"""Likelihoods p(x | z): each is an nn.Module that turns decoder output into a distribution over images.

Each returns one event per image (event shape (1, 28, 28)) and says which data it fits, so a
mismatch such as Bernoulli on grey values is refused before training.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F


class Bernoulli(nn.Module):
    """Independent Bernoulli pixels; the decoder output is their logits."""

    fits = ("dynamic", "threshold")  # binary data only

    def forward(self, logits: torch.Tensor) -> dist.Distribution:
        return dist.Bernoulli(logits=logits).to_event(3)


class ContinuousBernoulli(nn.Module):
    """The continuous Bernoulli (Loaiza-Ganem & Cunningham 2019): a proper density on grey values in [0, 1]."""

    fits = ("none",)

    def forward(self, logits: torch.Tensor) -> dist.Distribution:
        return dist.ContinuousBernoulli(logits=logits).to_event(3)


class Normal(nn.Module):
    """Normal pixels around the decoder output with one learned scale: the "MSE loss" as a likelihood."""

    fits = ("none",)

    def __init__(self):
        super().__init__()
        self.raw_scale = nn.Parameter(torch.tensor(0.0))

    def forward(self, loc: torch.Tensor) -> dist.Distribution:
        scale = F.softplus(self.raw_scale) + 1e-3  # floor: constant background pixels would drive it to 0
        return dist.Normal(loc, scale).to_event(3)


LIKELIHOODS = {"bernoulli": Bernoulli, "continuous-bernoulli": ContinuousBernoulli, "normal": Normal}


def make_likelihood(config) -> nn.Module:
    return LIKELIHOODS[config.likelihood]()

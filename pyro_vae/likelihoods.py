"""Likelihoods p(x | z): each is an nn.Module that turns decoder output into a distribution over images.

Each returns one event per image (event shape (1, 28, 28)) and says which data it fits, so a
mismatch such as Bernoulli on grey values is refused before training. A new likelihood is one
class here and one line in LIKELIHOODS: `--likelihood NAME` then chooses it.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

MIN_PIXEL_SCALE = 1e-3  # floor of the normal likelihood's scale: constant background pixels would drive it to 0


class Likelihood(nn.Module):
    """What every likelihood declares, and how it is built from the Config; config.py asks these."""

    fits = ()  # the --binarize settings whose data it models (empty: any)

    @classmethod
    def from_config(cls, config) -> Likelihood:
        """This likelihood as config describes it."""
        return cls()


class Bernoulli(Likelihood):
    """Independent Bernoulli pixels; the decoder output is their logits."""

    fits = ("dynamic", "threshold")  # binary data only

    def forward(self, logits: torch.Tensor) -> dist.Distribution:
        return dist.Bernoulli(logits=logits).to_event(3)


class ContinuousBernoulli(Likelihood):
    """The continuous Bernoulli (Loaiza-Ganem & Cunningham 2019): a proper density on grey values in [0, 1]."""

    fits = ("none",)

    def forward(self, logits: torch.Tensor) -> dist.Distribution:
        return dist.ContinuousBernoulli(logits=logits).to_event(3)


class Normal(Likelihood):
    """Normal pixels around the decoder output with one learned scale: the "MSE loss" as a likelihood."""

    fits = ("none",)

    def __init__(self):
        super().__init__()
        self.raw_scale = nn.Parameter(torch.tensor(0.0))

    def forward(self, loc: torch.Tensor) -> dist.Distribution:
        scale = F.softplus(self.raw_scale) + MIN_PIXEL_SCALE
        return dist.Normal(loc, scale).to_event(3)


# --likelihood NAME chooses LIKELIHOODS[NAME]
LIKELIHOODS = {"bernoulli": Bernoulli, "continuous-bernoulli": ContinuousBernoulli, "normal": Normal}


def make_likelihood(config) -> Likelihood:
    """The likelihood that config names."""
    return LIKELIHOODS[config.likelihood].from_config(config)

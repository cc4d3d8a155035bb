"""Likelihoods p(x | z): each is an nn.Module that turns decoder output into a distribution over images."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn


class Bernoulli(nn.Module):
    """Independent Bernoulli pixels; the decoder output is their logits. One event per image."""

    def forward(self, logits: torch.Tensor) -> dist.Distribution:
        return dist.Bernoulli(logits=logits).to_event(3)  # event (1, 28, 28)


LIKELIHOODS = {"bernoulli": Bernoulli}


def make_likelihood(config) -> nn.Module:
    return LIKELIHOODS["bernoulli"]()

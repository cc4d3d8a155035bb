"""Evaluation: per-image ELBO and importance weights computed from model and guide traces."""

from __future__ import annotations

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample


def _log_prob(trace) -> torch.Tensor:
    """Sum of the log-probs of a trace's sample sites, one value per (sample, image).

    Unscaled: neither the minibatch factor N / B nor a KL weight enters a reported figure.
    """
    trace.compute_log_prob()
    return sum(site["unscaled_log_prob"] for site in trace.nodes.values()
               if site["type"] == "sample" and not site_is_subsample(site))


@torch.no_grad()
def log_weights(vae, x: torch.Tensor, y: torch.Tensor | None = None, num_samples: int = 1) -> torch.Tensor:
    """log p(x, z) - log q(z | x) for num_samples draws z ~ q(z | x), vectorized: shape (num_samples, B)."""
    with pyro.plate("samples", num_samples, dim=-2):
        guide_trace = poutine.trace(vae.guide).get_trace(x, y)
        model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x, y)
    return (_log_prob(model_trace) - _log_prob(guide_trace)).reshape(num_samples, -1)


@torch.no_grad()
def elbo_per_image(vae, images: torch.Tensor, labels: torch.Tensor | None = None,
                   batch_size: int = 1000) -> torch.Tensor:
    """Single-sample ELBO of each image in nats, shape (N,); the figure the training log reports."""
    values = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        y = None if labels is None else labels[start:start + batch_size]
        values.append(log_weights(vae, x, y)[0])
    return torch.cat(values)

"""The objectives the trainer can use, each a Pyro ELBO over any model and guide; `make_elbo` picks one by name.

Pyro's own estimators serve where the objective is linear in each image's log-probs (Trace_ELBO,
TraceMeanField_ELBO, TraceEnum_ELBO): there the data plate's minibatch factor N / B may scale each
log-prob. The importance-weighted bound is not linear, so it gets its own estimator here.
"""

from __future__ import annotations

import math
import warnings

import torch
from pyro.infer import ELBO, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.util import torch_item


class IWAE(ELBO):
    """Burda et al.'s K-sample importance-weighted bound of the whole training set, with subsampling done right.

    For each image b: log (1/K) sum_k w_kb, w_kb = p(x_b, z_kb) / q(z_kb | x_b) with z_kb ~ q(z | x_b);
    the loss is -(N / B) times the sum over the minibatch, so its expectation is minus the bound of all
    N images. The data plate's factor N / B multiplies each image's bound *after* the logsumexp over the
    K particles. (Pyro's RenyiELBO(alpha=0) sums log-probs that already carry N / B and only then takes
    the logsumexp: at N / B = 469 that is max_k log w_k, which is not a bound on log p(x).) Any other
    scale, such as the KL weight's poutine.scale, stays inside the log-weights: with weight b they are
    log p(x | z) + b (log p(z) - log q(z | x)).

    Every sample site must lie in the data plate (the bound is per image) and every guide site must be
    reparameterized (the gradient goes through z, as in Burda et al.).
    """

    def __init__(self, num_particles: int = 2, max_plate_nesting: int = 1):
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting,
                         vectorize_particles=True)

    def _get_trace(self, model, guide, args, kwargs):
        return get_importance_trace("flat", self.max_plate_nesting, model, guide, args, kwargs)

    def _log_weights(self, model, guide, args, kwargs) -> tuple[torch.Tensor, float]:
        """The per-image log-weights (K, B), without the minibatch factor, and that factor N / B."""
        model_trace, guide_trace = next(self._get_traces(model, guide, args, kwargs))
        log_w, factors = 0.0, set()
        for sign, trace in ((1.0, model_trace), (-1.0, guide_trace)):
            for name, site in trace.nodes.items():
                if site["type"] != "sample":
                    continue
                if sign < 0 and not site["fn"].has_rsample:
                    raise NotImplementedError(f"IWAE needs a reparameterized guide; site {name!r} is not")
                subsampled = [f for f in site["cond_indep_stack"] if f.full_size is not None]
                if not subsampled:
                    raise ValueError(f"IWAE bounds each image's log p(x): site {name!r} is outside the data plate")
                factor = math.prod(f.full_size / f.size for f in subsampled)  # N / B
                factors.add(factor)
                log_w = log_w + sign * site["log_prob"] / factor  # (K, B), or (B,) for an observed label
        if len(factors) != 1:
            raise ValueError(f"IWAE needs one minibatch factor N / B for all sites, not {sorted(factors)}")
        return log_w, factors.pop()

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """-(N / B) sum_b log (1/K) sum_k w_kb, differentiable through the reparameterized draws."""
        log_w, factor = self._log_weights(model, guide, args, kwargs)
        bound = log_w.logsumexp(0) - math.log(self.num_particles)  # (B,): each image's K-sample bound
        return -factor * bound.sum()

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return torch_item(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return torch_item(loss)


def make_elbo(config) -> ELBO:
    """The estimator config names; semi-supervised, Trace_ELBO becomes TraceEnum_ELBO to sum over unknown labels."""
    if config.elbo == "iwae":
        return IWAE(num_particles=config.num_particles)
    kwargs = dict(num_particles=config.num_particles, vectorize_particles=True, max_plate_nesting=1)
    if config.labels:
        # labelled batches observe y, so nothing is enumerated there; that is expected, not a mistake
        warnings.filterwarnings("ignore", message="TraceEnum_ELBO found no sample sites configured for enumeration")
        return TraceEnum_ELBO(**kwargs)
    return {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO}[config.elbo](**kwargs)

"""The objectives the trainer can use, each a Pyro ELBO over any model and guide; `make_elbo` picks one by name.

Pyro's own estimators serve where the objective is linear in each image's log-probs (Trace_ELBO,
TraceMeanField_ELBO, TraceEnum_ELBO): there the data plate's minibatch factor N / B may scale each
log-prob. The importance-weighted bound is not linear, so it gets its own estimator here.

Pyro 1.9's estimators read numbers back from the device inside every step: `torch_item` on each
site's log-prob, `warn_if_nan` on the loss and its gradient, and a mask test in TraceEnum's Dice. On
a GPU each read waits for the device, and a CUDA graph cannot hold one. The `SyncFree` subclasses
below are those estimators with each read replaced by the same arithmetic on tensors: the same
loss and gradients on the same draws (tests/test_estimators.py), and nothing read until the caller
reads the loss. Pyro's NaN warning goes with them: the training loop checks every loss it reads.
"""

from __future__ import annotations

import functools
import math
import operator
import warnings

import torch
from opt_einsum import shared_intermediates
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer import ELBO, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.trace_elbo import _compute_log_r
from pyro.infer.traceenum_elbo import _compute_model_factors
from pyro.infer.util import Dice, _fulldot, check_fully_reparametrized, is_validation_enabled, torch_item
from pyro.ops import packed
from pyro.ops.contract import contract_tensor_tree
from pyro.ops.einsum.adjoint import require_backward
from pyro.ops.rings import MarginalRing, SampleRing
from torch.distributions import kl_divergence


class _SyncFreeLoss:
    """Pyro's Trace_ELBO.differentiable_loss, with the ELBO's value kept as a tensor instead of a float.

    `_differentiable_loss_particle` returns (the loss, the surrogate loss), as Pyro's does; the result has
    the value of the first and the gradient of the second. Where they are one tensor (every guide site
    reparameterized) it is returned as it is: the same value and gradient in fewer operations, each of
    which costs a kernel launch on a GPU.
    """

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        total = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            loss, surrogate = self._differentiable_loss_particle(model_trace, guide_trace)
            # Pyro: loss + (surrogate - torch_item(surrogate)), averaged over the particles
            particle = surrogate if loss is surrogate else loss + (surrogate - surrogate.detach())
            total = particle if self.num_particles == 1 else total + particle / self.num_particles
        return total

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward()
        return torch_item(loss)


def _sample_sites(trace) -> list[dict]:
    return [site for site in trace.nodes.values() if site["type"] == "sample"]


def _total(terms: list[torch.Tensor]):
    """terms[0] + terms[1] + ..., without a leading 0 + (one addition fewer); 0 for no terms."""
    return functools.reduce(operator.add, terms) if terms else 0


class SyncFreeTrace_ELBO(_SyncFreeLoss, Trace_ELBO):
    """Pyro's Trace_ELBO without its reads from the device (each site's `torch_item`, `warn_if_nan`)."""

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        guide_sites = _sample_sites(guide_trace)
        if all(site["fn"].has_rsample and is_identically_zero(site["score_parts"].score_function)
               for site in guide_sites):
            # Every guide site reparameterized: each one's entropy term in Pyro's surrogate is its (scaled)
            # log-prob, so the surrogate is the ELBO itself, log p(x, z) - log q(z | x), one tensor for both.
            elbo = _total([site["log_prob_sum"] for site in _sample_sites(model_trace)])
            loss = -(elbo - _total([site["log_prob_sum"] for site in guide_sites]))
            return loss, loss
        # Pyro 1.9's Trace_ELBO._differentiable_loss_particle, with torch_item(x) -> x.detach()
        elbo_particle = 0
        surrogate_elbo_particle = 0
        log_r = None
        for site in _sample_sites(model_trace):
            elbo_particle = elbo_particle + site["log_prob_sum"].detach()
            surrogate_elbo_particle = surrogate_elbo_particle + site["log_prob_sum"]
        for site in guide_sites:
            log_prob, score_function_term, entropy_term = site["score_parts"]
            elbo_particle = elbo_particle - site["log_prob_sum"].detach()
            if not is_identically_zero(entropy_term):
                surrogate_elbo_particle = surrogate_elbo_particle - entropy_term.sum()
            if not is_identically_zero(score_function_term):
                if log_r is None:
                    log_r = _compute_log_r(model_trace, guide_trace)
                site = log_r.sum_to(site["cond_indep_stack"])
                surrogate_elbo_particle = surrogate_elbo_particle + (site * score_function_term).sum()
        return -elbo_particle, -surrogate_elbo_particle


class SyncFreeTraceMeanField_ELBO(_SyncFreeLoss, TraceMeanField_ELBO):
    """Pyro's TraceMeanField_ELBO (the analytic KL where there is one) without its reads from the device."""

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        # Pyro 1.9's TraceMeanField_ELBO._differentiable_loss_particle, with torch_item(x) -> x.detach()
        elbo_particle = 0
        for name, model_site in model_trace.nodes.items():
            if model_site["type"] != "sample":
                continue
            if model_site["is_observed"]:
                elbo_particle = elbo_particle + model_site["log_prob_sum"]
                continue
            guide_site = guide_trace.nodes[name]
            if is_validation_enabled():
                check_fully_reparametrized(guide_site)
            try:
                kl_qp = kl_divergence(guide_site["fn"], model_site["fn"])
                kl_qp = scale_and_mask(kl_qp, scale=guide_site["scale"], mask=guide_site["mask"])
                if torch.is_tensor(kl_qp):
                    assert kl_qp.shape == guide_site["fn"].batch_shape
                    kl_qp_sum = kl_qp.sum()
                else:
                    kl_qp_sum = kl_qp * torch.Size(guide_site["fn"].batch_shape).numel()
                elbo_particle = elbo_particle - kl_qp_sum
            except NotImplementedError:
                entropy_term = guide_site["score_parts"].entropy_term
                elbo_particle = elbo_particle + model_site["log_prob_sum"] - entropy_term.sum()
        for name, guide_site in guide_trace.nodes.items():  # auxiliary sites of the guide
            if guide_site["type"] == "sample" and name not in model_trace.nodes:
                assert guide_site["infer"].get("is_auxiliary")
                if is_validation_enabled():
                    check_fully_reparametrized(guide_site)
                elbo_particle = elbo_particle - guide_site["score_parts"].entropy_term.sum()
        loss = -elbo_particle  # its own surrogate
        return loss, loss


class _SyncFreeDice(Dice):
    """Pyro's Dice, whose expectation drops the terms of probability 0 with `torch.where` rather than
    `masked_select` behind a test of the mask (a read from the device and a shape that depends on data)."""

    def compute_expectation(self, costs):
        # Pyro 1.9's Dice.compute_expectation; only the last block (prob * cost where prob > 0) differs
        with shared_intermediates() as cache:
            ring = MarginalRing(cache=cache)
            expected_cost = 0.0
            for ordinal, cost_terms in costs.items():
                log_factors = self._get_log_factors(ordinal)
                scale = math.exp(sum(x for x in log_factors if not isinstance(x, torch.Tensor)))
                log_factors = [x for x in log_factors if isinstance(x, torch.Tensor)]
                queries = {frozenset(cost._pyro_dims): None for cost in cost_terms}
                for log_factor in log_factors:
                    key = frozenset(log_factor._pyro_dims)
                    if queries.get(key, False) is None:
                        queries[key] = log_factor
                for cost in cost_terms:
                    key = frozenset(cost._pyro_dims)
                    if queries[key] is None:
                        query = torch.zeros_like(cost)
                        query._pyro_dims = cost._pyro_dims
                        log_factors.append(query)
                        queries[key] = query
                sum_dims = set().union(*(x._pyro_dims for x in log_factors)) - ordinal
                for query in queries.values():
                    require_backward(query)
                root = ring.sumproduct(log_factors, sum_dims)
                root._pyro_backward()
                probs = {key: query._pyro_backward_result.exp() for key, query in queries.items()}
                for cost in cost_terms:
                    key = frozenset(cost._pyro_dims)
                    prob = probs[key]
                    prob._pyro_dims = queries[key]._pyro_dims
                    cost, prob = packed.broadcast_all(cost, prob)
                    kept = prob > 0  # zero both factors where prob is 0, so that 0 * -inf adds nothing (and no nan)
                    expected_cost = expected_cost + scale * _fulldot(prob.where(kept, 0.0), cost.where(kept, 0.0))
        return expected_cost


def _sync_free_dice_elbo(model_trace, guide_trace):
    """Pyro 1.9's traceenum_elbo._compute_dice_elbo with _SyncFreeDice in place of Dice."""
    marginal_costs, log_factors, ordering, sum_dims, scale = _compute_model_factors(model_trace, guide_trace)
    if log_factors:
        dim_to_size = {}
        for terms in log_factors.values():
            for term in terms:
                dim_to_size.update(zip(term._pyro_dims, term.shape))
        with shared_intermediates() as cache:
            ring = SampleRing(cache=cache, dim_to_size=dim_to_size)
            log_factors = contract_tensor_tree(log_factors, sum_dims, ring=ring)
            model_trace._sharing_cache = cache
        for t, log_factors_t in log_factors.items():
            marginal_costs_t = marginal_costs.setdefault(t, [])
            for term in log_factors_t:
                marginal_costs_t.append(packed.scale_and_mask(term, scale=scale))
    costs = marginal_costs
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample":
            costs.setdefault(ordering[name], []).append(packed.neg(site["packed"]["log_prob"]))
    return _SyncFreeDice(guide_trace, ordering).compute_expectation(costs)


class SyncFreeTraceEnum_ELBO(TraceEnum_ELBO):
    """Pyro's TraceEnum_ELBO (sums over enumerated discrete sites) without its reads from the device."""

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        # Pyro 1.9's TraceEnum_ELBO.differentiable_loss, without warn_if_nan
        elbo = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            elbo_particle = _sync_free_dice_elbo(model_trace, guide_trace)
            if not is_identically_zero(elbo_particle):
                elbo = elbo + elbo_particle
        elbo = elbo / self.num_particles
        if not torch.is_tensor(elbo) or not elbo.requires_grad:
            raise ValueError(f"ELBO is cannot be differentiated: {elbo}")
        return -elbo

    loss_and_grads = _SyncFreeLoss.loss_and_grads


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
    """The estimator config names (Pyro's, without reads from the device); semi-supervised, Trace_ELBO becomes
    TraceEnum_ELBO to sum over unknown labels."""
    if config.elbo == "iwae":
        return IWAE(num_particles=config.num_particles)
    kwargs = dict(num_particles=config.num_particles, vectorize_particles=True, max_plate_nesting=1)
    if config.labels:
        # labelled batches observe y, so nothing is enumerated there; that is expected, not a mistake
        warnings.filterwarnings("ignore", message="TraceEnum_ELBO found no sample sites configured for enumeration")
        return SyncFreeTraceEnum_ELBO(**kwargs)
    return {"trace": SyncFreeTrace_ELBO, "meanfield": SyncFreeTraceMeanField_ELBO}[config.elbo](**kwargs)

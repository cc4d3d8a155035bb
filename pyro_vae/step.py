"""The training step: SVIStep (the Pyro ELBO's loss and gradients, then Adam) and its CUDA-graph capture."""

from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import pyro
import torch
from pyro.infer.elbo import ELBOModule

from . import distributed
from .checkpoint import CheckpointError
from .config import Config
from .estimators import make_elbo
from .model import VAE
from .precision import autocast, resolve


class Objective(ELBOModule):
    """Pyro's ELBOModule for the VAE: its forward is the estimator's differentiable loss of (x, y), and its
    parameters are the VAE's, so torch's DistributedDataParallel can wrap it."""

    def __init__(self, vae: VAE, elbo):
        super().__init__(vae.model, vae.guide, elbo)
        self.vae = vae


GRAPH_WARMUP_STEPS = 3  # eager steps of a batch shape before its step is captured; the first runs Pyro's checks
MAX_GRAPHS = 2  # captured steps kept: one per kind of batch (semi-supervised: unlabelled, labelled)


class SVIStep:
    """SVI's training step: the Pyro ELBO's loss and gradients, then one torch Adam over all the VAE's parameters.

    Like `pyro.infer.SVI.step` (the estimator's loss and gradients, optimizer, clear the gradients), with one
    `torch.optim.Adam` over `vae.parameters()` in place of pyro.optim's one optimizer per parameter, the
    gradients set to None rather than to fresh zeros, and Pyro's checks of arguments, supports and
    shapes on the first step only (the tests run every variant's program with them on). The loss is the
    estimator's `differentiable_loss` (make_elbo's estimators never read a value back from the device),
    backpropagated here and returned as a tensor on the device: the loop, not the step, decides when to
    wait for it. Every module the model and guide use is part of `vae`, so every parameter is here.

    On CUDA (with config.cuda_graph, in one process) the step of each batch shape is captured as a CUDA
    graph after GRAPH_WARMUP_STEPS eager steps and replayed from then on (`_CapturedStep`); a step that
    cannot be captured stays eager, with one line saying why. Under torchrun the loss is the forward pass
    of `Objective` under DistributedDataParallel, which averages the gradients over the ranks during the
    backward pass; one small all-reduce then shares the mean loss and the stop flag (`stop_requested`).
    """

    def __init__(self, vae: VAE, config: Config, ranks: distributed.Ranks = distributed.Ranks(), stop=None):
        self.vae, self.image_shape = vae, config.shape()
        self.model, self.guide = vae.model, vae.guide
        self.elbo = make_elbo(config)
        self.params = list(vae.parameters())
        device = self.params[0].device
        self.capture = config.cuda_graph and device.type == "cuda" and not ranks.active
        # bf16: the networks run under autocast, in the step's forward pass only (the backward follows the forward's
        # dtypes); train() has resolved auto already, and a step made outside it resolves it here
        self.precision = resolve(config.precision, device)[0]
        # On CUDA torch's fused Adam: one kernel for all parameters, where the default (foreach) launches a
        # dozen and spends more host time on them than the step's arithmetic; on the CPU torch's default.
        # capturable: Adam's step counts on the device, which a captured step can update (fused keeps them
        # there anyway)
        self.fused = device.type == "cuda"
        self.optimizer = torch.optim.Adam(self.params, lr=config.lr, capturable=self.capture,
                                          fused=True if self.fused else None)
        self.objective = Objective(vae, self.elbo)
        if ranks.active:
            self.objective = distributed.data_parallel(self.objective, ranks, self._some_parameter_unused(device))
        self.ranks, self.stop = ranks, stop
        self.validated = False
        self._agreed_stop = False
        self._graphs: dict[tuple, _CapturedStep] = {}
        self._eager_steps: dict[tuple, int] = {}
        self._stream = torch.cuda.Stream(device) if self.capture else None

    def step(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """One update on a minibatch; returns its loss (the -ELBO estimate, scaled to the whole training set),
        a detached scalar tensor on the device."""
        key = (tuple(x.shape), None if y is None else tuple(y.shape))
        graph = self._graphs.get(key)
        if graph is None and self.capture and len(self._graphs) < MAX_GRAPHS \
                and self._eager_steps.get(key, 0) >= GRAPH_WARMUP_STEPS:
            graph = self._capture(key, x, y)
        if graph is not None:
            return graph.replay(x, y, self.vae.kl_weight)
        self._eager_steps[key] = self._eager_steps.get(key, 0) + 1
        if self.capture and self._eager_steps[key] == GRAPH_WARMUP_STEPS:
            # the last eager step before the capture, with every wait for the host an error: a capture could
            # not hold one, and a capture that fails midway may leave torch's allocator and generator in it
            try:
                with _waits_raise():
                    return self._eager_step(x, y)
            except Exception as e:  # noqa: BLE001 (the step is taken again below, eagerly; a real error recurs)
                self._give_up_capture(e)
        return self._eager_step(x, y)

    def _some_parameter_unused(self, device: torch.device) -> bool:
        """Whether a batch of some kind (labelled, unlabelled) leaves a parameter out of the loss: the
        semi-supervised model with --classifier-weight 0 uses q(y | x) on unlabelled batches only. Found on
        two blank images, on a side random stream."""
        vae = self.vae
        x = torch.zeros(2, *self.image_shape, device=device)
        kinds = [torch.zeros(2, dtype=torch.long, device=device)] if vae.conditional else []
        if not vae.conditional or vae.classifier is not None:
            kinds.append(None)  # the unlabelled batch
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                pyro.validation_enabled(False):
            return any(any(g is None for g in torch.autograd.grad(self.objective(x, y), self.params,
                                                                  allow_unused=True))
                       for y in kinds)

    def stop_requested(self) -> bool:
        """Whether the loop stops after this step: under torchrun the flag the ranks agreed on in the step's
        all-reduce (every rank acts on the same value); in one process the signal flag itself."""
        if self.ranks.active:
            return self._agreed_stop
        return self.stop is not None and self.stop.signum is not None

    def _eager_step(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        # warm-up steps run on the stream the capture will use (as torch's CUDA graph recipe asks)
        with self._after_first_step(), self._on_capture_stream():
            if self._graphs:  # a captured step left its static gradients on the parameters
                self.optimizer.zero_grad(set_to_none=True)
            with autocast(self.precision, x.device):
                loss = self.objective(x, y)
            loss.backward()  # under DDP this also averages the gradients over the ranks
            loss = loss.detach()
            if self.ranks.active:
                asked = self.stop is not None and self.stop.signum is not None
                loss, self._agreed_stop = distributed.agree(loss, asked, self.ranks)
            with self._uncaptured_adam():
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self._stream is not None:
            loss.record_stream(torch.cuda.current_stream())  # made on the capture stream, read on this one
        self.validated = True
        return loss

    @contextmanager
    def _after_first_step(self):
        """From the second step on: no Pyro checks, and no pyro.module statements (the first step declared the
        networks to Pyro's param store; the optimizer here holds vae.parameters() itself)."""
        if not self.validated:
            yield
            return
        with pyro.validation_enabled(False), self.vae.modules_declared():
            yield

    @contextmanager
    def _uncaptured_adam(self):
        """torch warns that a capturable Adam steps outside a capture: the warm-up steps do, on purpose."""
        if not self.optimizer.defaults["capturable"]:
            yield
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")
            yield

    @contextmanager
    def _on_capture_stream(self):
        if self._stream is None:
            yield
            return
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            yield
        torch.cuda.current_stream().wait_stream(self._stream)

    def _capture(self, key: tuple, x: torch.Tensor, y: torch.Tensor | None) -> _CapturedStep | None:
        try:
            graph = _CapturedStep(self, x, y)
        except Exception as e:  # noqa: BLE001 (whatever stops the capture, the eager step still trains)
            self._give_up_capture(e)
            return None
        self._graphs[key] = graph
        return graph

    def _give_up_capture(self, e: Exception) -> None:
        """From now on every step is eager; one line says why."""
        self.capture = False
        self.optimizer.zero_grad(set_to_none=True)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"pyro_vae: this training step cannot be captured as a CUDA graph ({type(e).__name__}: {reason}); "
              "every step runs eagerly", file=sys.stderr, flush=True)

    def load_state(self, state: dict, path: Path) -> None:
        """Adam's moments from a checkpoint (written with or without a captured step)."""
        if set(state) != {"state", "param_groups"}:
            raise CheckpointError(f"{path} holds the optimizer state of an older pyro_vae (one Pyro optimizer per "
                                  "parameter): it loads with pyro_vae.load but cannot be resumed")
        self.optimizer.load_state_dict(state)
        # the saved groups say how the run that wrote them stepped (fused, captured or not); this optimizer's own
        # settings say how this one steps
        how = {key: self.optimizer.defaults[key] for key in ("capturable", "fused", "foreach")}
        on_device = self.capture or self.fused
        for group in self.optimizer.param_groups:
            group.update(how)
            for p in group["params"]:
                s = self.optimizer.state.get(p, {})
                if "step" in s:  # on the device for a captured or fused step, on the CPU otherwise (torch's convention)
                    s["step"] = s["step"].to(torch.float32).to(p.device if on_device else "cpu")


@contextmanager
def _waits_raise():
    """torch's sync debug mode "error": a call that would make the host wait for the GPU raises instead."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


class _CapturedStep:
    """One training step (model and guide traces, loss, backward, Adam) captured as a CUDA graph.

    The batch and the KL weight are read from static tensors, refilled before each replay; the draws
    of z stay fresh, since CUDA's Philox generator is graph-safe (each replay advances its offset).
    Every batch of the loop has one shape (the plan drops the short last batch), so one graph serves
    a run; a batch of another shape takes the eager step.
    """

    def __init__(self, svi: SVIStep, x: torch.Tensor, y: torch.Tensor | None):
        self.x, self.y = x.clone(), None if y is None else y.clone()
        self.kl_weight = torch.full((), float(svi.vae.kl_weight), device=x.device)
        self.graph = torch.cuda.CUDAGraph()
        svi.optimizer.zero_grad(set_to_none=True)  # backward allocates the gradients inside the graph's memory
        weight, svi.vae.kl_weight = svi.vae.kl_weight, self.kl_weight  # the model reads the tensor, not a float
        try:
            with pyro.validation_enabled(False), torch.cuda.graph(self.graph, stream=svi._stream):
                with autocast(svi.precision, x.device, cache_enabled=False):  # bf16 inside the captured region
                    loss = svi.objective(self.x, self.y)
                loss.backward()
                svi.optimizer.step()
        finally:
            svi.vae.kl_weight = weight
        self.loss = loss.detach()
        svi.optimizer.zero_grad(set_to_none=True)  # the graph keeps its own gradient memory

    def replay(self, x: torch.Tensor, y: torch.Tensor | None, kl_weight: float) -> torch.Tensor:
        """One training step on (x, y): copy them in, replay, return a copy of the loss (the next replay
        overwrites it)."""
        self.x.copy_(x)
        if self.y is not None:
            self.y.copy_(y)
        self.kl_weight.fill_(float(kl_weight))
        self.graph.replay()
        return self.loss.clone()

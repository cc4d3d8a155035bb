"""Data-parallel training on PyTorch's own engine: `torchrun --nproc_per_node N -m pyro_vae.train ...`.

Each rank runs the same model and guide on its shard of every global batch; gradients are averaged
across ranks before Pyro's optimizer steps, so all ranks keep identical parameters. The `data` plate
still scales by N / B, so each rank's loss, and their mean, estimates the whole-data ELBO.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist
from pyro import poutine
from pyro.infer import SVI
from pyro.infer.util import zero_grads


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def setup(device_type: str) -> Ranks:
    """Join the process group torchrun describes (NCCL on GPU, gloo on CPU); a plain run is one rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def teardown(ranks: Ranks) -> None:
    if ranks.active and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_parameters(module: torch.nn.Module, ranks: Ranks) -> None:
    """Give every rank rank 0's parameters and buffers, as DistributedDataParallel does at start."""
    if ranks.active:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


class DistributedSVI(SVI):
    """SVI whose step averages gradients (and the loss) over ranks before the optimizer update.

    The same three stages as `SVI.step` (loss_and_grads, optimizer, zero_grads) with one all-reduce
    between the first two. A stop request on any rank is shared in the same all-reduce, so every rank
    stops after the same step.
    """

    def __init__(self, *args, ranks: Ranks, stop, **kwargs):
        super().__init__(*args, **kwargs)
        self.ranks, self.stop = ranks, stop

    def step(self, *args, **kwargs) -> float:
        with poutine.trace(param_only=True) as capture:
            loss = self.loss_and_grads(self.model, self.guide, *args, **kwargs)
        # sorted by name: every rank packs the gradients in the same order
        params = [site["value"].unconstrained() for _, site in sorted(capture.trace.nodes.items())]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        extra = torch.tensor([loss, float(self.stop.signum is not None)], device=params[0].device)
        flat = torch.cat([g.reshape(-1) for g in grads] + [extra.to(grads[0].dtype)])
        dist.all_reduce(flat)
        flat /= self.ranks.world
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        self.optim(params)
        zero_grads(params)
        loss, stopping = flat[-2:].tolist()
        if stopping > 0 and self.stop.signum is None:
            self.stop.signum = signal.SIGTERM  # another rank was asked to stop
        return loss

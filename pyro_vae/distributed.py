"""Data-parallel training on PyTorch's own engine: `torchrun --nproc_per_node N -m pyro_vae.train ...`.

Each rank runs the same model and guide on its shard of every global batch; gradients are averaged
across ranks before the optimizer steps, so all ranks keep identical parameters. The `data` plate
still scales by N / B, so each rank's loss, and their mean, estimates the whole-data ELBO.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def launched_rank() -> int:
    """This process's rank as torchrun sets it (0 in a plain run), known before the process group exists."""
    return int(os.environ.get("RANK", "0"))


def setup(device_type: str) -> Ranks:
    """Join the process group torchrun describes (NCCL on GPU, gloo on CPU); a plain run is one rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)  # NCCL's object collectives (all_gather below) use the current device
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank)


def teardown(ranks: Ranks) -> None:
    if ranks.active and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_parameters(module: torch.nn.Module, ranks: Ranks) -> None:
    """Give every rank rank 0's parameters and buffers, as DistributedDataParallel does at start."""
    if ranks.active:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def all_gather(obj, ranks: Ranks) -> list:
    """obj from every rank, in rank order; every rank must call this at the same point."""
    if not ranks.active:
        return [obj]
    gathered = [None] * ranks.world
    dist.all_gather_object(gathered, obj)
    return gathered


def average_gradients(params: list[torch.Tensor], loss: torch.Tensor, ranks: Ranks, stop) -> torch.Tensor:
    """Average the gradients of params, and the loss, over the ranks in one all-reduce; return the mean loss.

    Only parameters that have a gradient take part: every rank runs the same program on the same kind
    of batch, so that is the same list, in the same order, on every rank. A stop request on any rank is
    shared in the same all-reduce, so every rank stops after the same step (reading that flag is the one
    wait for the device per step under torchrun; the loss stays a tensor on the device).
    """
    params = [p for p in params if p.grad is not None]
    grad = params[0].grad
    requested = torch.full((1,), float(stop.signum is not None), dtype=grad.dtype, device=grad.device)
    flat = torch.cat([p.grad.reshape(-1) for p in params] + [loss.reshape(1).to(grad), requested])
    dist.all_reduce(flat)
    flat /= ranks.world
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    if flat[-1].item() > 0 and stop.signum is None:
        stop.signum = signal.SIGTERM  # another rank was asked to stop
    return flat[-2].clone()  # not a view: that would keep the whole gradient buffer alive

"""Data-parallel training on PyTorch's own engine: `torchrun --nproc_per_node N -m pyro_vae.train ...`.

Each rank runs the same model and guide on its shard of every global batch. The ELBO is the forward
pass of a module (Pyro's `ELBOModule` pattern) wrapped in torch's DistributedDataParallel, which
averages the gradients across ranks while the backward pass runs, so all ranks keep identical
parameters. The `data` plate scales each rank's shard by N / (B / ranks), so the averaged gradient
is that of the global batch, and the ranks' mean loss estimates the whole-data ELBO. One path for
gloo (CPU) and NCCL (GPU).
"""

from __future__ import annotations

import os
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


def teardown(ranks: Ranks, failed: bool = False) -> None:
    """Leave the process group. After a barrier, unless this rank failed (its peers may never reach one): a rank
    that closes its connections while a peer still has a message in flight to it makes gloo's reader on the
    peer throw, and the peer abort (SIGABRT) at the end of a run that went well."""
    if ranks.active and dist.is_initialized():
        if not failed:
            dist.barrier()
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


def data_parallel(module: torch.nn.Module, ranks: Ranks, find_unused: bool = False) -> torch.nn.Module:
    """module under DistributedDataParallel: its gradients averaged over the ranks during backward.

    find_unused: some batch leaves a parameter out of the loss; DDP then looks for such parameters after
    every forward pass (they keep no gradient, and Adam skips them, as in one process).
    """
    from torch.nn.parallel import DistributedDataParallel

    device = next(module.parameters()).device
    # forward_sync_buffers=False (torch 2.13's name for the old broadcast_buffers=False): no buffer broadcast
    # before each forward; the buffers (masks, constants) are the same on every rank and synced once at init
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   forward_sync_buffers=False, find_unused_parameters=find_unused)


def agree(loss: torch.Tensor, stop_requested: bool, ranks: Ranks) -> tuple[torch.Tensor, bool]:
    """The ranks' mean loss, and whether any rank was asked to stop, in one small all-reduce.

    Every rank acts on the agreed flag, never on its own: a signal that lands on one rank after this
    all-reduce is shared in the next step's, so all ranks stop after the same step. Reading the flag
    is the one wait for the device per step under torchrun; the loss stays a tensor on the device.
    """
    both = torch.stack([loss.detach().reshape(()), torch.full((), float(stop_requested), device=loss.device,
                                                               dtype=loss.dtype)])
    dist.all_reduce(both)
    both /= ranks.world
    return both[0].clone(), bool(both[1] > 0)  # clone: not a view that keeps `both` alive

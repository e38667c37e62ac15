"""The one place that decides the device and the distributed world.

Under `torchrun` (RANK/WORLD_SIZE/LOCAL_RANK set) a process group is started: NCCL on CUDA, gloo on
CPU. Without it, a single process runs on CUDA when available, else CPU. `PGOLF_DEVICE=cpu`
forces the CPU (tests, laptops with a GPU they don't want used).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def _want_cuda() -> bool:
    return os.environ.get("PGOLF_DEVICE", "").lower() != "cpu" and torch.cuda.is_available()


def uses_cuda() -> bool:
    """Whether this process runs on CUDA: settings that only apply there ("cuda") ask this."""
    return _want_cuda()


def init_world() -> World:
    """Detect torchrun, start the process group if needed, and pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = _want_cuda()
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return World(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def current_world() -> World:
    """The world of an already-initialised process (no side effects)."""
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        rank, world_size = 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if _want_cuda() else torch.device("cpu")
    return World(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def all_reduce_max(value: float, world: World) -> float:
    """Agree on one number across ranks (the budget clock's stop decision)."""
    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=world.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def broadcast_object(value, world: World):
    """Rank 0's `value` (a picklable object) on every rank."""
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()

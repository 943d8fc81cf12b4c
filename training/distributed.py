"""Which process this is: rank, world size and device, as torchrun/accelerate set them up.

`DistInfo` is passed to everything that behaves differently with several processes (sharding,
checkpoints, logging on rank 0); `all_sum` is the one reduction the loop needs for its figures.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_distributed() -> DistInfo:
    """Join the process group torchrun/accelerate set up (NCCL on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistInfo(rank, world, local_rank, device)


def all_sum(value: torch.Tensor, info: DistInfo) -> float:
    """The sum of `value` over every process (the value itself with one process)."""
    if info.world > 1:
        value = value.clone()
        dist.all_reduce(value)
    return float(value)


def full(x: Any) -> Any:
    """A DTensor gathered to a plain tensor (FSDP2 grad norms); anything else unchanged."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x

"""Distributed data parallel helpers: process group from ``torchrun``'s environment, reductions.

``torchrun --nproc_per_node N -m deeplab.cli train ...`` (or ``deeplab train`` under any launcher
that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) runs one
process per device: gloo on CPUs, NCCL on GPUs. Without those variables everything here is a
no-op for a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "all_reduce_sum", "barrier", "cleanup", "init_distributed"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str, *, timeout: timedelta | None = None) -> DistInfo:
    """Join the process group described by the environment (``torchrun``), if any.

    Args:
        device_type: ``"cpu"`` (gloo backend) or ``"cuda"`` (NCCL; sets the current device to
            ``LOCAL_RANK``).
        timeout: how long a collective waits for the other processes (None: PyTorch's default,
            30 minutes for gloo); ``deeplab segment`` waits at the end for the process with the
            longest share.

    Returns:
        This process's :class:`DistInfo` (rank 0 of 1 without ``WORLD_SIZE``).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, **({} if timeout is None else {"timeout": timeout}))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all processes in place (identity without a process group); returns ``t``."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    """Wait for every process (no-op for one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

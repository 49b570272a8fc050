"""Data parallelism with PyTorch's own stack: torchrun sets the environment, DDP wraps the model
from outside (the model file knows nothing of it)."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from stacklm.device import resolve_device


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes (gloo on CPU, NCCL on GPU), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_name, info.local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


def wrap_data_parallel(model: nn.Module, info: Dist, device: torch.device, ignore: list[str] = ()) -> nn.Module:
    """DDP over every parameter except those named in `ignore` (each rank's own expert shares)."""
    if info.world == 1:
        return model
    if ignore:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(ignore))
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def shutdown(info: Dist) -> None:
    if info.world > 1 and dist.is_initialized():
        # Free what still holds the process group (DDP's reducer sits in reference cycles) while
        # the interpreter is whole: gloo objects freed during interpreter teardown have aborted a
        # finished run, rarely, with "terminate called without an active exception"
        gc.collect()
        dist.destroy_process_group()

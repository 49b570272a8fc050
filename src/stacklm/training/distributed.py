"""Data parallelism with PyTorch's own stack: torchrun sets the environment, DDP or FSDP2 wraps the
model from outside (the model file knows nothing of it)."""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
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


def wrap_data_parallel(model: nn.Module, info: Dist, device: torch.device, kind: str = "ddp",
                       ignore: list[str] = ()) -> nn.Module:
    """`kind="ddp"`: DDP over every parameter except those named in `ignore` (each rank's own expert
    shares). `kind="fsdp"`: FSDP2, which shards `model` in place (build the optimizer afterwards):
    each block of the model's stacks is a unit whose weights are gathered just before it runs and
    freed after; the embeddings, final norm and head (tied or not) are the root's unit."""
    if info.world == 1:
        return model
    if kind == "fsdp":
        for stack in model.stacks().values():
            for block in stack:
                fully_shard(block)
        fully_shard(model)
        return model
    if ignore:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(ignore))
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


@contextlib.contextmanager
def gradient_sync(parallel: nn.Module, sync: bool) -> Iterator[None]:
    """Backward passes inside reduce the gradients across ranks (`sync`), or only accumulate them
    on this rank (the micro-batches before a step's last)."""
    if isinstance(parallel, FSDPModule):
        parallel.set_requires_gradient_sync(sync)
    with parallel.no_sync() if isinstance(parallel, DistributedDataParallel) and not sync else contextlib.nullcontext():
        yield


def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_`; under FSDP the total norm of the sharded gradients comes
    back whole (a plain tensor, the same on every rank)."""
    total = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return total.full_tensor() if isinstance(total, DTensor) else total


def is_fully_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """An FSDP model's unsharded state dict and its optimizer's (keyed by parameter name), in host
    memory on rank 0 and empty elsewhere. A collective: every rank calls it. Tied parameters share
    one tensor again (the gather returns a copy per name), so a file stores them once."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    # safetensors saves only tensors that cover their storage; a gather of uneven shards (a
    # dimension the world size does not divide) returns a view into a padded buffer
    weights = {k: v.clone() if v.untyped_storage().nbytes() > v.nbytes else v for k, v in weights.items()}
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        kept = first.setdefault(id(p), name)
        if kept != name and name in weights:
            weights[name] = weights[kept]
    return weights, get_optimizer_state_dict(model, optimizer, options=options)


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Shard an optimizer state that `full_state` saved into this FSDP model's optimizer (any
    number of ranks: the state is whole and keyed by parameter name)."""
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def shutdown(info: Dist) -> None:
    if info.world > 1 and dist.is_initialized():
        # Free what still holds the process group (DDP's reducer sits in reference cycles) while
        # the interpreter is whole: gloo objects freed during interpreter teardown have aborted a
        # finished run, rarely, with "terminate called without an active exception"
        gc.collect()
        dist.destroy_process_group()

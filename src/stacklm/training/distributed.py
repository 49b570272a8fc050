"""Data parallelism with PyTorch's own stack: torchrun sets the environment, DDP or FSDP2 wraps the
model from outside (the model file knows nothing of it).

FSDP and its state-dict tools are imported where they are used: loading them takes half a second,
which `stacklm generate` and `eval`, also importers of this module, need not pay."""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from stacklm.device import resolve_device
from stacklm.errors import UserError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    # Collectives of Python objects (the optimizer state gathered for a checkpoint) run here: on an
    # NCCL world they would otherwise be staged in GPU memory, every rank's state on the receiver's
    # GPU at once. None: the default group, already host memory (gloo)
    host_group: dist.ProcessGroup | None = None

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
    if world > 1 and device_name.startswith("cuda:"):
        raise UserError(f"train.device={device_name} with {world} processes would put every rank on the "
                        f"same GPU; use cuda or auto (each rank takes cuda:LOCAL_RANK)")
    device = resolve_device(device_name, info.local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if world > 1 and dist.get_backend() != "gloo":
        info.host_group = dist.new_group(backend="gloo")
    return info, device


def wrap_data_parallel(model: nn.Module, info: Dist, device: torch.device, kind: str = "ddp",
                       ignore: Iterable[str] = ()) -> nn.Module:
    """`kind="ddp"`: DDP over every parameter except those named in `ignore` (each rank's own expert
    shares). `kind="fsdp"`: FSDP2, which shards `model` in place (build the optimizer afterwards):
    each block of the model's stacks is a unit whose weights are gathered just before it runs and
    freed after; the rest (embeddings, positions, final norms, head) is the root's unit, gathered
    for the whole forward and backward. The parameters named in `ignore` stay whole and local under
    both, their gradients not reduced."""
    if info.world == 1:
        return model
    if kind == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        ignore = set(ignore)
        broadcast_weights(model, skip=ignore)  # each rank shards its own copy: make them rank 0's, as DDP does
        mesh = init_device_mesh(device.type, (info.world,))  # the run's device, not the default accelerator
        ignored = {p for name, p in model.named_parameters() if name in ignore}
        options = {"ignored_params": ignored} if ignored else {}  # an option since torch 2.7
        for stack in model.stacks().values():
            for block in stack:
                fully_shard(block, mesh=mesh, **options)
        fully_shard(model, mesh=mesh, **options)
        return model
    if ignore:  # DDP broadcasts the rest from rank 0 as it wraps them
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(ignore))
    # The model's buffers are constant tables (RoPE, ALiBi slopes, LSH rotations), the same on every
    # rank: no need to broadcast them before every forward
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False)


def broadcast_weights(model: nn.Module, skip: Iterable[str] = ()) -> None:
    """Rank 0's parameters and buffers on every rank (before each keeps a shard of them), but for
    those named in `skip` (each rank's own)."""
    skip = set(skip)
    for name, tensor in model.state_dict().items():
        if name not in skip:
            dist.broadcast(tensor, src=0)


def gradient_sync(parallel: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """The context of a micro-batch's backward pass. DDP all-reduces the gradients only on a step's
    last micro-batch and accumulates whole ones before it; FSDP reduce-scatters on every
    micro-batch, so that each rank only ever holds its shard of the gradients."""
    if isinstance(parallel, DistributedDataParallel) and not last:
        return parallel.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_`; under FSDP the total norm of the sharded gradients comes
    back whole (a plain tensor, the same on every rank)."""
    from torch.distributed.tensor import DTensor

    total = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return total.full_tensor() if isinstance(total, DTensor) else total


def is_fully_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """An FSDP model's unsharded state dict and its optimizer's (keyed by parameter name), in host
    memory on rank 0 and empty elsewhere. A collective: every rank calls it. Tied parameters share
    one tensor again (the gather returns a copy per name), so a file stores them once."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return full_model_state(model), get_optimizer_state_dict(model, optimizer, options=options)


def full_model_state(model: nn.Module) -> dict:
    """`full_state`'s model half: the unsharded state dict on rank 0 ({} elsewhere). Parameters
    FSDP ignores (sharded experts) come as rank 0 holds them. A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # safetensors saves only tensors that cover their storage; a gather of uneven shards (a
    # dimension the world size does not divide) returns a view into a padded buffer
    weights = {k: v.clone() if v.untyped_storage().nbytes() > v.nbytes else v for k, v in weights.items()}
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        kept = first.setdefault(id(p), name)
        if kept != name and name in weights:
            weights[name] = weights[kept]
    return weights


def local_state(state):
    """A nested dict / list of tensors (an optimizer's state dict) with each DTensor replaced by this
    rank's shard of it, in host memory: what a rank saves of its own state."""
    from torch.distributed.tensor import DTensor

    if isinstance(state, DTensor):
        return state.to_local().cpu()
    if isinstance(state, torch.Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {key: local_state(value) for key, value in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(local_state(value) for value in state)
    return state


def load_local_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a state `local_state` saved on this rank: the shards of sharded (DTensor) parameters
    become DTensors again, laid out as their parameters."""
    from torch.distributed.tensor import DTensor

    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor):
                continue
            entries = optimizer.state.get(p, {})
            for key, value in entries.items():  # moments like the parameter; scalars (Adam's step) stay
                if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.dim() > 0:
                    entries[key] = DTensor.from_local(value.to(p.device), p.device_mesh, p.placements,
                                                      run_check=False, shape=p.shape, stride=p.stride())


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict | None) -> None:
    """Shard an optimizer state that `full_state` saved into this FSDP model's optimizer, on any
    number of ranks (the state is whole and keyed by parameter name). Only rank 0 reads `state`
    (the others pass None): each tensor is broadcast from it in turn, and every rank keeps its
    shard, so no rank holds more than one whole tensor of it at a time."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state or {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters, in the order `optimizer.state_dict()` numbers them."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def rekey_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, by_name: bool) -> dict:
    """An `optimizer.state_dict()` (parameters numbered) keyed by parameter name instead, the form
    `full_state` saves under FSDP (`by_name`); or back (not `by_name`)."""
    names = parameter_names(model, optimizer)
    key = dict(enumerate(names)) if by_name else {name: i for i, name in enumerate(names)}
    return {"state": {key[k]: value for k, value in state["state"].items()},
            "param_groups": [{**group, "params": [key[k] for k in group["params"]]}
                             for group in state["param_groups"]]}


def shutdown(info: Dist) -> None:
    if info.world > 1 and dist.is_initialized():
        # Free what still holds the process group (DDP's reducer sits in reference cycles) while
        # the interpreter is whole: gloo objects freed during interpreter teardown have aborted a
        # finished run, rarely, with "terminate called without an active exception"
        gc.collect()
        dist.destroy_process_group()

"""Expert parallelism, applied to a built model from outside (as torchtitan does): each rank keeps
n_experts / size of every MoE layer's experts, where `size` ranks (an expert group) share them out,
and the tokens routed to an expert travel to its rank and back with all_to_all. The router, the
attention and everything else stay data-parallel. With groups smaller than the world (more ranks
than a layer has experts, say), ranks at the same place in different groups hold the same experts
(replicas) and sum those experts' gradients.

The collectives are PyTorch's functional ones (`torch.distributed._functional_collectives`), whose
all_to_all carries gradients: the backward pass sends each token's gradient back the way it came.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from stacklm.errors import UserError
from stacklm.model.moe import MoE


class ExpertParallel(nn.Module):
    """This rank's share of a layer's experts, called like the whole set: tokens sorted by global
    expert with counts (E,) in, their outputs in the same order out."""

    def __init__(self, experts: nn.Module, group: dist.ProcessGroup | None = None,
                 replicas: dist.ProcessGroup | None = None):
        super().__init__()
        self.group = group or dist.group.WORLD
        self.replicas = replicas  # the ranks holding the same experts as this one, if more than it
        self.world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        self.n_experts = experts.n_experts
        if self.n_experts % self.world:
            raise UserError(f"model.ffn.n_experts ({self.n_experts}) must be a multiple of the ranks that share "
                            f"the experts ({self.world}: train.expert_parallel_size, by default the number "
                            f"of processes)")
        self.n_local = self.n_experts // self.world
        self.first = rank * self.n_local
        self.local = experts.select(range(self.first, self.first + self.n_local))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # x: (M, D) sorted by expert, counts: (E,) -> (M, D)
        # received[r, e]: tokens rank r sends to local expert e
        received = funcol.all_to_all_single(counts, None, None, self.group).view(self.world, self.n_local)
        send = counts.view(self.world, self.n_local).sum(1).tolist()
        recv = received.sum(1).tolist()
        tokens = funcol.all_to_all_single_autograd(x, recv, send, self.group)  # by (source rank, expert)
        # Group the received tokens by local expert for the experts' contiguous slices, then undo it
        expert = torch.arange(self.n_local, device=x.device).repeat(self.world)
        order = expert.repeat_interleave(received.flatten(), output_size=sum(recv)).argsort(stable=True)
        y = self.local(tokens.index_select(0, order), received.sum(0))
        y = torch.empty_like(y).index_copy(0, order, y)
        return funcol.all_to_all_single_autograd(y, send, recv, self.group)

    def full_state_dict(self, dst: int = 0) -> dict[str, torch.Tensor]:
        """The state dict of the unsharded experts on rank `dst` (in host memory), gathered from
        every rank; {} on the others. A collective: every rank calls it."""
        mine = self.local.state_dict()
        receiver = dist.get_rank(self.group) == dst
        shares: list[dict[str, torch.Tensor]] = [{} for _ in range(self.world)]
        for key, value in mine.items():
            gathered = [torch.empty_like(value) for _ in range(self.world)] if receiver else None
            dist.gather(value.contiguous(), gathered, dst=dist.get_global_rank(self.group, dst), group=self.group)
            if receiver:
                for share, tensor in zip(shares, gathered, strict=True):
                    share[key] = tensor.cpu()
        if not receiver:
            return {}
        return type(self.local).merge_state(shares)


def apply_expert_parallel(model: nn.Module, group: dist.ProcessGroup | None = None,
                          replicas: dist.ProcessGroup | None = None) -> nn.Module:
    """Shard every MoE layer's experts of `model` across `group` (default: all ranks), in place;
    `replicas`: the ranks in other groups holding the same slice (`expert_groups`), if any.

    Every rank must hold the same weights beforehand (same seed, or the same checkpoint); each then
    keeps its slice. An expert's gradient is the sum over the tokens of the group's ranks that
    reached it (`finish_sharded_grads` adds the replicas').
    """
    for module in model.modules():
        if isinstance(module, MoE) and not isinstance(module.experts, ExpertParallel):
            module.experts = ExpertParallel(module.experts, group, replicas)
    return model


def expert_groups(device_type: str, size: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup | None]:
    """This rank's expert group and replica group when the world splits into expert groups of
    `size` consecutive ranks: a (world / size, size) device mesh, "expert" along its rows (ranks
    0 .. size - 1, then size .., ...) and "replica" along its columns (ranks i, i + size, ...).
    The replica group is None when one group spans the world."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if size < 1 or world % size:
        raise UserError(f"train.expert_parallel_size ({size}) must divide the number of processes ({world})")
    if size == world:  # no mesh, no new communicator: the world is the group
        return dist.group.WORLD, None
    mesh = init_device_mesh(device_type, (world // size, size), mesh_dim_names=("replica", "expert"))
    return mesh.get_group("expert"), mesh.get_group("replica")


def sharded_modules(model: nn.Module) -> dict[str, ExpertParallel]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ExpertParallel)}


def sharded_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters each rank holds its own share of (for DDP to leave alone)."""
    return [f"{prefix}.{name}" for prefix, m in sharded_modules(model).items() for name, _ in m.named_parameters()]


def unsharded_name(name: str) -> str:
    """The name a sharded parameter's counterpart has in the unsharded model, up to the expert
    index (local expert i of a list of experts maps to expert i): for per-role lookups (muP)."""
    return name.replace(".experts.local.", ".experts.")


def full_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """`model.state_dict()` as the unsharded model's on the main rank, every expert gathered
    there from its expert group (its local entries elsewhere). A collective over the main rank's
    expert group: every rank calls it. Tensors shared by names (tied embeddings) stay shared.
    `state`: the rest of the model's state to start from (under FSDP, its gathered state dict)
    instead of `model.state_dict()`."""
    state = model.state_dict() if state is None else state
    for prefix, module in sharded_modules(model).items():
        if 0 not in dist.get_process_group_ranks(module.group):  # the main rank's group gathers; the others wait
            continue
        for key in [k for k in state if k.startswith(f"{prefix}.")]:
            del state[key]
        state.update({f"{prefix}.{key}": value for key, value in module.full_state_dict().items()})
    return state


def optimizer_state_sources(model: nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> list[int]:
    """For each parameter of `optimizer` (in its state dict's numbering), the rank whose saved
    entry holds its optimizer state: a checkpoint keeps each distinct state once. An expert's
    state is the same on its replicas, so the first expert group saves it; a replicated
    parameter's (beside DDP) is the same on every rank, so rank 0 saves it; each rank saves the
    states of its own FSDP shards (DTensor parameters)."""
    from torch.distributed.tensor import DTensor

    sources = {}
    for module in sharded_modules(model).values():
        first = rank if module.replicas is None else dist.get_global_rank(module.replicas, 0)
        sources.update({id(p): first for p in module.parameters()})
    return [sources.get(id(p), rank if isinstance(p, DTensor) else 0)
            for group in optimizer.param_groups for p in group["params"]]


def saved_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> dict:
    """The part of this rank's optimizer state that its checkpoint entry keeps
    (`optimizer_state_sources`), in host memory, FSDP's shards as local tensors."""
    from stacklm.training.distributed import local_state

    state = optimizer.state_dict()
    sources = optimizer_state_sources(model, optimizer, rank)
    state["state"] = {i: entry for i, entry in state["state"].items() if sources[i] == rank}
    return local_state(state)


def rank_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: list[dict], rank: int) -> dict:
    """This rank's optimizer state, copied out of the checkpoint's per-rank entries
    (`saved_optimizer_state`; a memory-mapped file is read only where this rank's state lies).
    Entries saved whole, before states were kept once, read the same way."""
    sources = optimizer_state_sources(model, optimizer, rank)
    state = {"state": {}, "param_groups": copy.deepcopy(saved[rank]["param_groups"])}
    for i, source in enumerate(sources):
        if (entry := saved[source]["state"].get(i)) is not None:
            state["state"][i] = copy.deepcopy(entry)
    return state


def finish_sharded_grads(model: nn.Module, world: int) -> None:
    """The sharded experts' gradients as DDP leaves the rest's: summed over the replicas (the other
    expert groups' ranks holding the same experts), so each is the sum over every rank's tokens,
    then divided by the world size, as DDP averages."""
    for module in sharded_modules(model).values():
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if module.replicas is not None and grads:  # one all-reduce of them all, flattened
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat, group=module.replicas)
            for grad, summed in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
                grad.copy_(summed.view_as(grad))
        for grad in grads:
            grad.div_(world)


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` over the whole unsharded model: the replicated gradients'
    norm (equal on every rank after DDP's all-reduce; gathered from FSDP's shards) combined with
    the expert shares' of every rank in the expert group (after `finish_sharded_grads`, the
    replicas' are the same). Returns the total norm, the same on every rank."""
    from torch.distributed.tensor import DTensor

    modules = list(sharded_modules(model).values())
    group = modules[0].group if modules else None
    sharded = {id(p) for m in modules for p in m.parameters()}
    params = [p for p in model.parameters() if p.grad is not None]
    device = next(model.parameters()).device

    def squared(grads: list[torch.Tensor]) -> torch.Tensor:
        if not grads:
            return torch.zeros((), device=device)
        norm = torch.nn.utils.get_total_norm(grads)  # under FSDP, of DTensor shards: whole below
        return (norm.full_tensor() if isinstance(norm, DTensor) else norm).float() ** 2

    shares = [p for p in params if id(p) in sharded]
    replicated = [p for p in params if id(p) not in sharded]
    experts = squared([p.grad for p in shares])
    dist.all_reduce(experts, group=group)
    total = (squared([p.grad for p in replicated]) + experts).sqrt()
    if math.isfinite(max_norm):  # in two calls: FSDP's DTensor gradients and the experts' plain ones
        torch.nn.utils.clip_grads_with_norm_(replicated, max_norm, total)
        torch.nn.utils.clip_grads_with_norm_(shares, max_norm, total)
    return total

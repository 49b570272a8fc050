"""Expert parallelism, applied to a built model from outside (as torchtitan does): each rank keeps
n_experts / world of every MoE layer's experts, and the tokens routed to an expert travel to its
rank and back with all_to_all. The router, the attention and everything else stay replicated.

The collectives are PyTorch's functional ones (`torch.distributed._functional_collectives`), whose
all_to_all carries gradients: the backward pass sends each token's gradient back the way it came.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from stacklm.errors import UserError
from stacklm.model.moe import MoE


class ExpertParallel(nn.Module):
    """This rank's share of a layer's experts, called like the whole set: tokens sorted by global
    expert with counts (E,) in, their outputs in the same order out."""

    def __init__(self, experts: nn.Module, group: dist.ProcessGroup | None = None):
        super().__init__()
        self.group = group or dist.group.WORLD
        self.world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        self.n_experts = experts.n_experts
        if self.n_experts % self.world:
            raise UserError(f"model.ffn.n_experts ({self.n_experts}) must be a multiple of the "
                            f"expert-parallel world size ({self.world})")
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
        order = expert.repeat_interleave(received.flatten()).argsort(stable=True)
        y = self.local(tokens.index_select(0, order), received.sum(0))
        y = torch.empty_like(y).index_copy(0, order, y)
        return funcol.all_to_all_single_autograd(y, send, recv, self.group)


def apply_expert_parallel(model: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Shard every MoE layer's experts of `model` across `group` (default: all ranks), in place.

    Every rank must hold the same weights beforehand (same seed, or the same checkpoint); each then
    keeps its slice. An expert's gradient is the sum over the tokens of all ranks that reached it.
    """
    for module in model.modules():
        if isinstance(module, MoE) and not isinstance(module.experts, ExpertParallel):
            module.experts = ExpertParallel(module.experts, group)
    return model

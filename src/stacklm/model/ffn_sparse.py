"""The Scaling Transformer's sparse feed-forward layer (Jaszczur et al. 2021, "Sparse is Enough in
Scaling Transformers", section 3.1), `model.ffn.kind: sparse`.

The d_ff units are split into d_ff / N blocks of N; a low-rank controller picks one unit per block
for each token, and only those units are computed:

    logits = (x C1) C2 + c              C1: (D, d_lowrank), C2: (d_lowrank, d_ff), read as (d_ff/N, N)
    y = (relu(x W1 + b1) * mask) W2 + b2

Training: mask = one-hot of argmax(log_softmax(logits) + temperature * Gumbel noise), with the
gradient of softmax(logits) passed straight through; with probability 1 - quant_prob the soft
mask softmax(logits) is used instead (one draw per layer call). Evaluation: the argmax one-hot.

Decoding reads only the chosen units: for one token a gather of d_ff / N rows of W1 and of W2
(both stored unit-major, (d_ff, D), so a unit's weights are one contiguous row); for a batch the
union of the rows chosen by any token, once, and a small matmul masked to each token's own units.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from stacklm.errors import UserError
from stacklm.registry import FFN, ComponentConfig, option


@dataclasses.dataclass
class SparseFFNConfig(ComponentConfig):
    kind: str = "sparse"
    block_size: int = option(32, ge=2, help="N, units per block, one of them active per token "
                             "(Trax's layer default 32; the paper's models 64)")
    d_lowrank: int | None = option(None, ge=1, help="rank of the controller; default d_model / N, as "
                                   "in the paper (Trax's code uses d_ff / N)")
    temperature: float = option(0.1, ge=0.0, help="scale of the Gumbel noise on the controller in training")
    quant_prob: float = option(0.3, ge=0.0, le=1.0, help="probability that a training step uses the hard "
                               "one-hot mask (straight-through) rather than the soft softmax mask")
    bias: bool = option(False, help="biases b1, b2 on the two FFN matmuls (the controller always has one)")

    def check(self, cfg) -> None:
        if cfg.ffn_dim % self.block_size:
            raise UserError(f"model.ffn.block_size ({self.block_size}) must divide the FFN width "
                            f"model.d_ff ({cfg.ffn_dim})")

    def lowrank(self, cfg) -> int:
        return self.d_lowrank or max(1, cfg.d_model // self.block_size)


# Decoding a batch gathers the union of the chosen units; once it covers this share of all units,
# the masked dense matmul reads no more weights and is simpler.
GATHER_MAX_SHARE = 0.5


@FFN.register("sparse", SparseFFNConfig)
class SparseFFN(nn.Module):
    def __init__(self, options: SparseFFNConfig, cfg):
        super().__init__()
        self.d_ff, self.block_size = cfg.ffn_dim, options.block_size
        self.n_blocks = self.d_ff // self.block_size
        self.temperature, self.quant_prob = options.temperature, options.quant_prob
        rank = options.lowrank(cfg)
        self.controller_down = nn.Linear(cfg.d_model, rank, bias=False)  # C1
        self.controller_up = nn.Linear(rank, self.d_ff)  # C2 and its bias
        self.in_proj = nn.Parameter(torch.empty(self.d_ff, cfg.d_model))  # W1, a row per unit
        self.out_proj = nn.Parameter(torch.empty(self.d_ff, cfg.d_model))  # W2, a row per unit
        self.in_bias = nn.Parameter(torch.zeros(self.d_ff)) if options.bias else None
        self.out_bias = nn.Parameter(torch.zeros(cfg.d_model)) if options.bias else None
        self.register_buffer("block_start", torch.arange(0, self.d_ff, self.block_size), persistent=False)

    def init_weights(self, std: float, residual_std: float) -> None:
        nn.init.normal_(self.in_proj, 0.0, std)
        nn.init.normal_(self.out_proj, 0.0, residual_std)

    def controller(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., D) -> logits (..., d_ff / N, N) in float32
        logits = self.controller_up(self.controller_down(x)).float()
        return logits.view(*x.shape[:-1], self.n_blocks, self.block_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, D)
        logits = self.controller(x)
        if self.training:
            return self.masked(x, self.training_mask(logits))
        units = logits.argmax(dim=-1) + self.block_start  # (B, T, d_ff / N)
        rows = x.numel() // x.size(-1)
        if rows == 1:
            return self.gathered_one(x, units)
        if rows * self.n_blocks <= GATHER_MAX_SHARE * self.d_ff:
            return self.gathered(x, units)
        return self.masked(x, F.one_hot(logits.argmax(dim=-1), self.block_size))

    def training_mask(self, logits: torch.Tensor) -> torch.Tensor:
        # logits: (..., d_ff / N, N) -> mask of the same shape
        soft = logits.softmax(dim=-1)
        gumbel = -torch.empty_like(logits).exponential_().log()
        choice = (logits.log_softmax(dim=-1) + self.temperature * gumbel).argmax(dim=-1)
        hard = F.one_hot(choice, self.block_size).to(soft.dtype) + soft - soft.detach()
        use_hard = torch.rand((), device=logits.device) < self.quant_prob  # a tensor: no host sync
        return torch.where(use_hard, hard, soft)

    def masked(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Every unit computed, then masked: the training path (and large evaluation batches)."""
        # x: (..., D), mask: (..., d_ff / N, N)
        h = F.relu(F.linear(x, self.in_proj, self.in_bias))  # (..., d_ff)
        h = h * mask.flatten(-2).to(h.dtype)
        return self.add_out_bias(h @ self.out_proj)

    def gathered_one(self, x: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """One token: gather its d_ff / N rows of W1 and W2."""
        # x: (1, 1, D) or (1, D), units: (..., d_ff / N)
        idx = units.reshape(-1)
        bias = self.in_bias[idx] if self.in_bias is not None else None
        h = F.relu(F.linear(x, self.in_proj[idx], bias))  # (..., d_ff / N)
        return self.add_out_bias(h @ self.out_proj[idx])

    def gathered(self, x: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """Several tokens: gather the union U of their units once, mask each token to its own."""
        # x: (..., D), units: (..., d_ff / N)
        flat = units.reshape(-1, self.n_blocks)  # (R, d_ff / N)
        chosen = torch.zeros(self.d_ff, dtype=torch.bool, device=x.device)
        chosen[flat.reshape(-1)] = True
        union = chosen.nonzero().squeeze(1)  # (|U|,), sorted
        if union.numel() > GATHER_MAX_SHARE * self.d_ff:
            return self.masked(x, F.one_hot(units - self.block_start, self.block_size))
        slot = chosen.cumsum(0) - 1  # unit -> its column among the union
        own = torch.zeros(flat.size(0), union.numel(), dtype=x.dtype, device=x.device)
        own.scatter_(1, slot[flat], 1.0)  # (R, |U|): 1 where the token chose the unit
        bias = self.in_bias[union] if self.in_bias is not None else None
        h = F.relu(F.linear(x.reshape(-1, x.size(-1)), self.in_proj[union], bias)) * own
        y = h @ self.out_proj[union]
        return self.add_out_bias(y.view(*x.shape[:-1], -1))

    def add_out_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.out_bias is None else y + self.out_bias

"""The Scaling Transformer's sparse feed-forward layer (Jaszczur et al. 2021, "Sparse is Enough in
Scaling Transformers", section 3.1), `model.ffn.kind: sparse`.

The d_ff units are split into d_ff / N blocks of N; a low-rank controller picks one unit per block
for each token, and only those units are computed:

    logits = (x C1) C2 + c              C1: (D, d_lowrank), C2: (d_lowrank, d_ff), read as (d_ff/N, N)
    y = (relu(x W1 + b1) * mask) W2 + b2

Training: mask = one-hot of argmax(log_softmax(logits) + temperature * Gumbel noise), with the
gradient of softmax(logits) passed straight through; with probability 1 - quant_prob the soft
mask softmax(logits) is used instead (one draw per layer call). Evaluation: the argmax one-hot.
(Trax's SparseFF, google/trax trax/layers/research/sparsity.py, does the same.)

One difference from Trax: the output is multiplied by a constant, N by default, with W2's init
divided by it. Only 1/N of the units act on a token, so under Adam (a fixed step per weight) the
layer's output moved N times less per step than a dense layer's, and small models trained for a
few hundred steps lagged far behind their dense twins (see docs/sparsity.md). The multiplier
changes the training dynamics, not the function class; `output_multiplier: 1.0` restores Trax's.

Decoding reads only the chosen units: for one token d_ff / N rows of W1 and of W2 (both stored
unit-major, (d_ff, D), so a unit's weights are one contiguous row); for a batch, W1's rows for the
union of the units any token chose, read once, and each token's own rows of W2. On the CPU a
one-token inference step is one fused kernel - controller, choice and both gathers - written in
C++ (csrc/sparse_ffn.cpp, built by cpu_kernels.py), with these PyTorch ops as its fallback.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from stacklm.errors import UserError
from stacklm.model import cpu_kernels
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
    output_multiplier: float | None = option(None, gt=0.0, help="constant the layer's output is multiplied "
                                             "by; default N (see below); 1.0 is Trax's parametrization")

    def check(self, cfg) -> None:
        if cfg.ffn_dim % self.block_size:
            raise UserError(f"model.ffn.block_size ({self.block_size}) must divide the FFN width "
                            f"model.d_ff ({cfg.ffn_dim})")

    def lowrank(self, cfg) -> int:
        return self.d_lowrank or max(1, cfg.d_model // self.block_size)

    def multiplier(self) -> float:
        return self.output_multiplier if self.output_multiplier is not None else float(self.block_size)


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
        self.output_multiplier = options.multiplier()
        rank = options.lowrank(cfg)
        self.controller_down = nn.Linear(cfg.d_model, rank, bias=False)  # C1
        self.controller_up = nn.Linear(rank, self.d_ff)  # C2 and its bias
        self.fan_in_dims = {"in_proj": (1,), "out_proj": (0,)}  # for muP: h = x W1^T, y = h W2
        self.in_proj = nn.Parameter(torch.empty(self.d_ff, cfg.d_model))  # W1, a row per unit
        self.out_proj = nn.Parameter(torch.empty(self.d_ff, cfg.d_model))  # W2, a row per unit
        self.in_bias = nn.Parameter(torch.zeros(self.d_ff)) if options.bias else None
        self.out_bias = nn.Parameter(torch.zeros(cfg.d_model)) if options.bias else None
        self.register_buffer("block_start", torch.arange(0, self.d_ff, self.block_size), persistent=False)

    def init_weights(self, std: float, residual_std: float) -> None:
        nn.init.normal_(self.in_proj, 0.0, std)
        # One unit in N is active: sqrt(N) keeps the output's variance at init that of a dense
        # layer (Trax's `kernel_scaling`), and W2 is divided by the output multiplier it meets.
        nn.init.normal_(self.out_proj, 0.0, residual_std * self.block_size**0.5 / self.output_multiplier)

    def controller(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., D) -> logits (..., d_ff / N, N) in float32
        logits = self.controller_up(self.controller_down(x)).float()
        return logits.view(*x.shape[:-1], self.n_blocks, self.block_size)

    def forward(self, x: torch.Tensor, decoding: bool = False, valid: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, T, D)
        rows = x.numel() // x.size(-1)
        if rows == 1 and cpu_kernels.applies(x, self.in_proj, self.training):
            y = torch.ops.stacklm.sparse_ffn_decode(
                x.reshape(-1), self.controller_down.weight, self.controller_up.weight, self.controller_up.bias,
                self.in_proj, self.in_bias, self.out_proj, self.block_size)
            return self.finish(y.view_as(x))
        logits = self.controller(x)
        if self.training:
            return self.masked(x, self.training_mask(logits))
        choice = logits.argmax(dim=-1)  # (B, T, d_ff / N), the unit within each block
        if rows == 1:
            return self.gathered_one(x, choice + self.block_start)
        if rows * self.n_blocks <= GATHER_MAX_SHARE * self.d_ff:
            return self.gathered(x, choice + self.block_start)
        return self.masked(x, F.one_hot(choice, self.block_size))

    def training_mask(self, logits: torch.Tensor) -> torch.Tensor:
        # logits: (..., d_ff / N, N) -> mask of the same shape
        soft = logits.softmax(dim=-1)
        # One draw per call, from the CPU generator (seeded by torch.manual_seed, and no device sync)
        if torch.rand(()) >= self.quant_prob:
            return soft
        # argmax(log_softmax(logits) + T * Gumbel) = argmax(logits - T * log(-log(u))), u ~ U(0, 1)
        u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
        choice = torch.add(logits, u.log_().neg_().log_(), alpha=-self.temperature).argmax(dim=-1)
        hard = torch.zeros_like(soft).scatter_(-1, choice.unsqueeze(-1), 1.0)
        return StraightThrough.apply(hard, soft)

    def masked(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Every unit computed, then masked: the training path (and large evaluation batches)."""
        # x: (..., D), mask: (..., d_ff / N, N)
        h = F.relu(F.linear(x, self.in_proj, self.in_bias))  # (..., d_ff)
        h = h * mask.flatten(-2).to(h.dtype)
        return self.finish(h @ self.out_proj)

    def gathered_one(self, x: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """One token: the dot products with its d_ff / N rows of W1, then the sum of its rows of
        W2 weighted by them."""
        # x: (1, 1, D) or (1, D), units: (..., d_ff / N)
        idx = units.reshape(1, -1)
        bias = self.in_bias.index_select(0, idx[0]) if self.in_bias is not None else None
        h = F.relu(F.linear(x.reshape(1, -1), self.in_proj.index_select(0, idx[0]), bias))  # (1, d_ff / N)
        return self.second_layer(h, idx).view_as(x)

    def gathered(self, x: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """Several tokens: W1's rows for the union U of their units are read once, each token keeps
        the dot products of its own units; then each token sums its own rows of W2."""
        # x: (..., D), units: (..., d_ff / N)
        idx = units.reshape(-1, self.n_blocks)  # (R, d_ff / N)
        chosen = torch.zeros(self.d_ff, dtype=torch.bool, device=x.device)
        chosen[idx.reshape(-1)] = True
        union = chosen.nonzero().squeeze(1)  # (|U|,), sorted
        if union.numel() > GATHER_MAX_SHARE * self.d_ff:
            return self.masked(x, F.one_hot(units - self.block_start, self.block_size))
        column = chosen.cumsum(0) - 1  # unit -> its column among the union
        bias = self.in_bias.index_select(0, union) if self.in_bias is not None else None
        h = F.linear(x.reshape(-1, x.size(-1)), self.in_proj.index_select(0, union), bias)  # (R, |U|)
        h = F.relu(h.gather(1, column[idx]))  # (R, d_ff / N)
        return self.second_layer(h, idx).view_as(x)

    def second_layer(self, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        # h, idx: (R, d_ff / N) -> sum_k h[r, k] W2[idx[r, k]] + b2: (R, D)
        # embedding_bag is PyTorch's fused gather-and-weighted-sum of rows (for recommender
        # tables); a gather then a matmul wrote the rows out and read them back at half the speed.
        y = F.embedding_bag(idx, self.out_proj, per_sample_weights=h.to(self.out_proj.dtype), mode="sum")
        return self.finish(y.to(h.dtype))

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        y = y * self.output_multiplier
        return y if self.out_bias is None else y + self.out_bias


class StraightThrough(torch.autograd.Function):
    """Forward the hard mask, pass its gradient to the soft one (hard + soft - soft.detach(),
    without the two full-size temporaries)."""

    @staticmethod
    def forward(ctx, hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        return hard

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, grad

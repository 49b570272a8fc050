"""Sparse q/k/v projections of the Scaling Transformer (Jaszczur et al. 2021, "Sparse is Enough in
Scaling Transformers", section 3.2), chosen by `model.attention.qkv`.

A multiplicative layer splits the output into S modules of M = d_out / S units and computes

    y[s, m] = sum_i x_i D[s, i] E[i, m]

with D (S, d_in) and E (d_in, M): S d_in + d_in d_out / S parameters, about 1/S of a dense
layer's, yet it can still express any permutation of its input. Two ways to use it:

- `multiplicative`: q, k, v and the output projection are each a multiplicative layer.
- `multiplicative_conv` (the paper's sparse QKV): one multiplicative layer shared by q, k and v,
  then per branch a 2-d convolution over (position, module) with M channels: causal over the
  current and previous `length_kernel - 1` positions, and over 3 neighbouring modules for q and
  k, 1 for v. With S = n_heads a module is a head. There is no output projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stacklm.model import cpu_kernels
from stacklm.registry import QKV


class MultiplicativeDense(nn.Module):
    """The multiplicative layer: (..., d_in) -> (..., S * M), module s in units s*M ... s*M + M - 1."""

    no_weight_decay = ("multiplier",)  # D scales the input per module, like a norm's gain
    fan_in_dims = {"multiplier": (), "weight": (1,)}  # for muP: D is a gain

    def __init__(self, d_in: int, d_out: int, sparsity: int, bias: bool, residual: bool = False):
        super().__init__()
        self.residual = residual
        self.multiplier = nn.Parameter(torch.empty(sparsity, d_in))  # D
        self.weight = nn.Parameter(torch.empty(d_out // sparsity, d_in))  # E, stored (M, d_in)
        self.bias = nn.Parameter(torch.zeros(d_out)) if bias else None

    def init_weights(self, std: float, residual_std: float) -> None:
        # D ~ N(0, 1) gives y the scale of a dense layer whose weights have E's std
        # (Trax draws D ~ N(0, 0.5^2) with a Glorot E: the same idea at another scale).
        nn.init.normal_(self.multiplier, 0.0, 1.0)
        nn.init.normal_(self.weight, 0.0, residual_std if self.residual else std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def active_matmul_params(self) -> float:
        """Multiply-adds per token: S modules of M units each read all d_in scaled inputs, as many
        as a dense layer's (the saving is in the weights read, S d_in + M d_in, not in arithmetic)."""
        return self.multiplier.size(0) * self.weight.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., d_in) -> (..., S * M)
        d_in = x.size(-1)
        rows = x.numel() // d_in
        if rows <= self.weight.size(0):
            # few rows (decoding): scale each row per module and share E; reads only D and E, and
            # the (rows, S, d_in) scaled copies of x are no larger than the dense weight would be
            y = F.linear(x.unsqueeze(-2) * self.multiplier, self.weight).flatten(-2)
            return y if self.bias is None else y + self.bias
        # many rows (training): build the equivalent dense (S * M, d_in) weight once
        dense = (self.multiplier[:, None, :] * self.weight[None]).flatten(0, 1)
        return F.linear(x, dense, self.bias)


@QKV.register("multiplicative")
class MultiplicativeQKV(nn.Module):
    """q, k, v and the output projection are four multiplicative layers."""

    per_position = True  # each position's q, k, v from its own x alone (rows may be packed)

    def __init__(self, options, cfg):
        super().__init__()
        d, s = cfg.d_model, options.qkv_sparsity or cfg.n_heads
        self.q_proj, self.k_proj, self.v_proj = (MultiplicativeDense(d, d, s, options.bias) for _ in range(3))
        self.out_proj = MultiplicativeDense(d, d, s, options.bias, residual=True)

    def new_state(self, batch: int, dtype: torch.dtype, device) -> None:
        return None

    def zero_query(self) -> None:
        """muP's zero-initialised query."""
        with torch.no_grad():
            self.q_proj.weight.zero_()

    def forward(self, x: torch.Tensor, state=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: (B, T, D) -> q, k, v: (B, T, D)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def out(self, y: torch.Tensor) -> torch.Tensor:
        return self.out_proj(y)


class ConvState:
    """The convolutions' look-back while decoding: the shared layer's last length_kernel - 1
    outputs, (B, length_kernel - 1, D); zeros before the first token, as in training. A sequence
    decoded by the fused CPU kernel also keeps the weights as the kernel takes them, repacked at
    its first one-token step: like the KV cache, a state belongs to the weights it was made with."""

    def __init__(self, frames: torch.Tensor):
        self.frames = frames
        self.packed: tuple[torch.Tensor, ...] | None = None


@QKV.register("multiplicative_conv")
class MultiplicativeConvQKV(nn.Module):
    """A shared multiplicative layer, then a causal (position x module) convolution per q, k, v."""

    per_position = False  # the convolution reads the positions before each

    def __init__(self, options, cfg):
        super().__init__()
        d, s = cfg.d_model, options.qkv_sparsity or cfg.n_heads
        self.sparsity, self.d_module, self.length_kernel = s, d // s, options.length_kernel
        m, lk = self.d_module, options.length_kernel
        self.shared = MultiplicativeDense(d, d, s, options.bias)
        # Convolution kernels over (position, module) with the M units of a module as channels,
        # laid out as Conv2d's (out channels, in channels, positions, modules); q and k in one.
        self.fan_in_dims = {"qk_conv": (1, 2, 3), "v_conv": (1, 2, 3)}  # for muP
        self.qk_conv = nn.Parameter(torch.empty(2 * m, m, lk, 3))
        self.qk_conv_bias = nn.Parameter(torch.zeros(2 * m))
        self.v_conv = nn.Parameter(torch.empty(m, m, lk, 1))
        self.v_conv_bias = nn.Parameter(torch.zeros(m))

    def active_matmul_params(self) -> float:
        """Multiply-adds per token of the convolutions (the shared layer counts its own): each of
        the S modules applies the whole kernels once."""
        return self.sparsity * (self.qk_conv.numel() + self.v_conv.numel())

    def zero_query(self) -> None:
        """muP's zero-initialised query: q's output channels of the shared q/k convolution (q's
        bias starts at zero too)."""
        with torch.no_grad():
            self.qk_conv[: self.qk_conv.size(0) // 2].zero_()

    def new_state(self, batch: int, dtype: torch.dtype, device) -> ConvState:
        return ConvState(torch.zeros(batch, self.length_kernel - 1, self.sparsity * self.d_module,
                                     dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, state: ConvState | None = None):
        # x: (B, T, D) -> q, k, v: (B, T, D)
        b, t, d = x.shape
        if (b == t == 1 and state is not None and state.frames.dtype == x.dtype
                and cpu_kernels.applies(x, self.qk_conv, self.training)):
            return self.decode_fused(x, state)
        y = self.shared(x)
        before = state.frames if state is not None else y.new_zeros(b, self.length_kernel - 1, d)
        frames = torch.cat([before.to(y.dtype), y], dim=1)  # (B, length_kernel - 1 + T, D)
        if state is not None:
            state.frames = frames[:, t:]
        grid = frames.view(b, -1, self.sparsity, self.d_module)  # (B, positions, S, M)
        q, k = local_conv(grid, self.qk_conv, self.qk_conv_bias).chunk(2, dim=-1)  # (B, T, S, M) each
        v = local_conv(grid, self.v_conv, self.v_conv_bias)
        return q.reshape(b, t, d), k.reshape(b, t, d), v.reshape(b, t, d)

    def decode_fused(self, x: torch.Tensor, state: ConvState):
        """One token, one sequence: the same computation as one fused CPU kernel
        (csrc/multiplicative_conv.cpp), on the weights repacked at the sequence's first step."""
        d = x.size(-1)
        if state.packed is None:
            state.packed = self.packed_weights()
        mult_t, weight, qk_conv, v_conv = state.packed
        y, qk, v = torch.ops.stacklm.multiplicative_conv_decode(
            x.reshape(-1), mult_t, weight, self.shared.bias, state.frames.reshape(-1, d), qk_conv,
            self.qk_conv_bias, v_conv, self.v_conv_bias)
        state.frames = torch.cat([state.frames, y.view(1, 1, d)], dim=1)[:, 1:]
        q, k = qk.view(1, 1, self.sparsity, 2, self.d_module).unbind(3)
        return q.reshape(1, 1, d), k.reshape(1, 1, d), v.view(1, 1, d)

    def packed_weights(self) -> tuple[torch.Tensor, ...]:
        """D, E and the convolutions' kernels as the fused CPU kernel takes them, repacked (a copy:
        csrc/multiplicative_conv.h, `pack`)."""
        return torch.ops.stacklm.multiplicative_conv_pack(
            self.shared.multiplier.detach(), self.shared.weight.detach(), self.qk_conv.detach(), self.v_conv.detach())

    def out(self, y: torch.Tensor) -> torch.Tensor:
        return y  # the paper's sparse QKV has no output projection


def local_conv(grid: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A valid convolution over positions, zero-padded over modules: (B, P, S, M) -> (B, P - Lk + 1, S, O)
    for a weight (O, M, Lk, k)."""
    lk, k = weight.shape[2:]
    if grid.size(1) > lk:
        # many positions (training, prefill): oneDNN's conv2d; forward + backward of the small
        # preset's q/k convolution took 41 ms against 100 ms for the windows below (27 vs 83 in bf16)
        out = F.conv2d(grid.permute(0, 3, 1, 2), weight, bias, padding=(0, (k - 1) // 2))
        return out.permute(0, 2, 3, 1)
    # one new position (decoding): the windows and a matmul, a few small reductions that compile
    # into the decode step, where a conv2d call costs more than its arithmetic
    padded = F.pad(grid, (0, 0, (k - 1) // 2, (k - 1) // 2))  # (B, P, S + k - 1, M)
    windows = padded.unfold(1, lk, 1).unfold(2, k, 1)  # (B, P - Lk + 1, S, M, Lk, k)
    return F.linear(windows.flatten(-3), weight.flatten(1), bias)

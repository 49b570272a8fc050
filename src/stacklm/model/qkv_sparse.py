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

from stacklm.registry import QKV


class MultiplicativeDense(nn.Module):
    """The multiplicative layer: (..., d_in) -> (..., S * M), module s in units s*M ... s*M + M - 1."""

    def __init__(self, d_in: int, d_out: int, sparsity: int, bias: bool, residual: bool = False):
        super().__init__()
        self.sparsity, self.residual = sparsity, residual
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., d_in) -> (..., S * M)
        d_in = x.size(-1)
        rows = x.numel() // d_in
        if rows * self.sparsity <= self.weight.numel():
            # few rows (decoding): scale each row per module and share E; reads only D and E
            y = F.linear(x.unsqueeze(-2) * self.multiplier, self.weight).flatten(-2)
            return y if self.bias is None else y + self.bias
        # many rows (training): build the equivalent dense (S * M, d_in) weight once
        dense = (self.multiplier[:, None, :] * self.weight[None]).flatten(0, 1)
        return F.linear(x, dense, self.bias)


@QKV.register("multiplicative")
class MultiplicativeQKV(nn.Module):
    """q, k, v and the output projection are four multiplicative layers."""

    def __init__(self, options, cfg):
        super().__init__()
        d, s = cfg.d_model, options.qkv_sparsity or cfg.n_heads
        self.q_proj, self.k_proj, self.v_proj = (MultiplicativeDense(d, d, s, options.bias) for _ in range(3))
        self.out_proj = MultiplicativeDense(d, d, s, options.bias, residual=True)

    def new_state(self, batch: int, dtype: torch.dtype, device) -> None:
        return None

    def forward(self, x: torch.Tensor, state=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: (B, T, D) -> q, k, v: (B, T, D)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def out(self, y: torch.Tensor) -> torch.Tensor:
        return self.out_proj(y)


class ConvState:
    """The convolutions' look-back while decoding: the shared layer's last length_kernel - 1
    outputs, (B, length_kernel - 1, D); zeros before the first token, as in training."""

    def __init__(self, frames: torch.Tensor):
        self.frames = frames


@QKV.register("multiplicative_conv")
class MultiplicativeConvQKV(nn.Module):
    """A shared multiplicative layer, then a causal (position x module) convolution per q, k, v."""

    def __init__(self, options, cfg):
        super().__init__()
        d, s = cfg.d_model, options.qkv_sparsity or cfg.n_heads
        self.sparsity, self.d_module, self.length_kernel = s, d // s, options.length_kernel
        m, lk = self.d_module, options.length_kernel
        self.shared = MultiplicativeDense(d, d, s, options.bias)
        # Conv2d over a (position, module) grid with the M units of a module as channels; the
        # module axis is zero-padded by the layer, the position axis by the look-back frames.
        self.qk_conv = nn.Conv2d(m, 2 * m, (lk, 3), padding=(0, 1))  # q and k in one convolution
        self.v_conv = nn.Conv2d(m, m, (lk, 1))

    def new_state(self, batch: int, dtype: torch.dtype, device) -> ConvState:
        return ConvState(torch.zeros(batch, self.length_kernel - 1, self.sparsity * self.d_module,
                                     dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, state: ConvState | None = None):
        # x: (B, T, D) -> q, k, v: (B, T, D)
        b, t, d = x.shape
        y = self.shared(x)
        before = state.frames if state is not None else y.new_zeros(b, self.length_kernel - 1, d)
        frames = torch.cat([before.to(y.dtype), y], dim=1)  # (B, length_kernel - 1 + T, D)
        if state is not None:
            state.frames = frames[:, t:]
        # (B, M, positions, S): channels innermost in memory, the layout oneDNN's convolution wants
        grid = frames.view(b, -1, self.sparsity, self.d_module).permute(0, 3, 1, 2)
        q, k = self.qk_conv(grid).chunk(2, dim=1)  # (B, M, T, S) each
        v = self.v_conv(grid)
        return tuple(z.permute(0, 2, 3, 1).reshape(b, t, d) for z in (q, k, v))

    def out(self, y: torch.Tensor) -> torch.Tensor:
        return y  # the paper's sparse QKV has no output projection

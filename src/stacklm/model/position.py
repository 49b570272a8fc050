"""Position encodings, chosen by `model.position.kind`. Built as POSITION.build(options, model_config).

A position module may act in three places; each hook defaults to doing nothing:
- `embed(x, start)`: add to the token embeddings (absolute positions),
- `rotate(q, k, start)`: transform queries and keys (rotary positions),
- `bias(t_q, t_k, start)`: an additive attention-score bias (relative positions).
`start` is the absolute position of the first token of x (non-zero while decoding with a cache).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from stacklm.registry import POSITION, ComponentConfig, option


@dataclasses.dataclass
class NoPositionConfig(ComponentConfig):
    kind: str = "none"


@dataclasses.dataclass
class RoPEConfig(ComponentConfig):
    kind: str = "rope"
    theta: float = option(10000.0, gt=0.0, help="base of the rotary frequencies")

    def check(self, cfg) -> None:
        from stacklm.errors import UserError

        if cfg.head_dim % 2:
            raise UserError(f"model.position.kind=rope needs an even head dim; "
                            f"d_model/n_heads = {cfg.head_dim}")


@POSITION.register("none", NoPositionConfig)
class Position(nn.Module):
    """No position information (NoPE): causal attention alone orders the tokens."""

    def __init__(self, options: ComponentConfig, cfg):
        super().__init__()

    def embed(self, x: torch.Tensor, start: int) -> torch.Tensor:
        return x

    def rotate(self, q: torch.Tensor, k: torch.Tensor, start: int):
        return q, k

    def bias(self, t_q: int, t_k: int, start: int) -> torch.Tensor | None:
        return None


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) for the two halves of the last dim of x."""
    # x: (..., T, hd); cos, sin: (T, hd/2)
    x1, x2 = x.chunk(2, dim=-1)
    if torch.compiler.is_compiling():  # Inductor fuses this into one kernel (and cannot trace out=)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    # Eager PyTorch would make a full-size temporary per operation; write into one buffer instead.
    out = torch.empty_like(x)
    o1, o2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin)
    return out


class Rotate(torch.autograd.Function):
    """`rotate` with autograd: a rotation's gradient is the rotation by the opposite angle."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return rotate(grad, cos, -sin), None, None


@POSITION.register("rope", RoPEConfig)
class RotaryPosition(Position):
    """RoPE (Su et al. 2021): rotate each (i, i + d/2) pair of q and k by angle pos * theta^(-2i/d).

    The pairs are the two halves of the head, the layout Llama checkpoints use, so weights move
    to and from Hugging Face without permutation.
    """

    def __init__(self, options: RoPEConfig, cfg):
        super().__init__(options, cfg)
        hd = cfg.head_dim
        inv_freq = options.theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64), inv_freq)  # (max_seq_len, hd/2)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def rotate(self, q: torch.Tensor, k: torch.Tensor, start: int):
        # q: (B, H, T, hd), k: (B, Hkv, T, hd)
        t = q.size(-2)
        cos = self.cos[start : start + t].to(q.dtype)
        sin = self.sin[start : start + t].to(q.dtype)
        return Rotate.apply(q, cos, sin), Rotate.apply(k, cos, sin)

"""Feed-forward layers, chosen by `model.ffn.kind`. Built as FFN.build(options, model_config) and
called as ffn(x, decoding, valid): `decoding` is True when generating with the KV cache (an MoE
layer then never drops a token), `valid` (B, T) marks real tokens against padding (None: all real;
a position-wise layer ignores it, an MoE layer routes only real tokens).

A module's residual output projection is named `out_proj`: the model scales its init by
1/sqrt(2 * n_layers), as GPT-2 does.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from stacklm.registry import FFN, ComponentConfig, option


@dataclasses.dataclass
class SwiGLUConfig(ComponentConfig):
    kind: str = "swiglu"
    bias: bool = option(False)


@dataclasses.dataclass
class GeluConfig(ComponentConfig):
    kind: str = "gelu"
    bias: bool = option(False)


@FFN.register("swiglu", SwiGLUConfig)
class SwiGLU(nn.Module):
    """FFN(x) = W2 (silu(x W_gate) * x W_up)  (Shazeer 2020). Gate and up share one matmul."""

    def __init__(self, options: SwiGLUConfig, cfg):
        super().__init__()
        self.d_ff = cfg.ffn_dim
        self.gate_up_proj = nn.Linear(cfg.d_model, 2 * self.d_ff, bias=options.bias)
        self.out_proj = nn.Linear(self.d_ff, cfg.d_model, bias=options.bias)

    def forward(self, x: torch.Tensor, decoding: bool = False, valid: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, T, D)
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.out_proj(F.silu(gate) * up)


@FFN.register("gelu", GeluConfig)
class GeluMLP(nn.Module):
    """The GPT-2 MLP: W2 gelu(W1 x)."""

    def __init__(self, options: GeluConfig, cfg):
        super().__init__()
        self.in_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=options.bias)
        self.out_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=options.bias)

    def forward(self, x: torch.Tensor, decoding: bool = False, valid: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, T, D)
        return self.out_proj(F.gelu(self.in_proj(x), approximate="tanh"))

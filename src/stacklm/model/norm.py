"""Normalisation layers, chosen by `model.norm.kind`. Built as NORM.build(options, dim)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from stacklm.registry import NORM, ComponentConfig, option


@dataclasses.dataclass
class RMSNormConfig(ComponentConfig):
    kind: str = "rmsnorm"
    eps: float = option(1e-5, gt=0.0)


@dataclasses.dataclass
class LayerNormConfig(ComponentConfig):
    kind: str = "layernorm"
    eps: float = option(1e-5, gt=0.0)
    bias: bool = option(True)


@NORM.register("rmsnorm", RMSNormConfig)
class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * g  (Zhang & Sennrich 2019)."""

    def __init__(self, options: RMSNormConfig, dim: int):
        super().__init__()
        self.eps = options.eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


@NORM.register("layernorm", LayerNormConfig)
class LayerNorm(nn.LayerNorm):
    def __init__(self, options: LayerNormConfig, dim: int):
        super().__init__(dim, eps=options.eps, bias=options.bias)

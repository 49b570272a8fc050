"""Next-token prediction on packed windows."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from stacklm.registry import OBJECTIVE, ComponentConfig


@dataclasses.dataclass
class CausalConfig(ComponentConfig):
    kind: str = "causal"


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    # logits: (B, T, V), targets: (B, T); the loss is taken in float32 whatever the autocast dtype
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)


@OBJECTIVE.register("causal", CausalConfig)
class CausalLM:
    def __init__(self, options: CausalConfig, tokenizer=None):
        self.options = options

    def loss(self, model, batch: torch.Tensor) -> torch.Tensor:
        # batch: (B, T + 1) token ids
        return next_token_loss(model(batch[:, :-1]), batch[:, 1:])

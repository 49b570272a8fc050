"""Next-token prediction on packed windows."""

from __future__ import annotations

import dataclasses

import torch

from stacklm.registry import OBJECTIVE, ComponentConfig


@dataclasses.dataclass
class CausalConfig(ComponentConfig):
    kind: str = "causal"


@OBJECTIVE.register("causal", CausalConfig)
class CausalLM:
    def __init__(self, options: CausalConfig, tokenizer=None):
        self.options = options

    def loss(self, model, batch: torch.Tensor) -> torch.Tensor:
        # batch: (B, T + 1) token ids
        return model(batch[:, :-1], targets=batch[:, 1:])

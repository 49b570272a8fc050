"""Next-token prediction on packed windows."""

from __future__ import annotations

import dataclasses

import torch

from stacklm.errors import UserError
from stacklm.model.loss import IGNORE_INDEX
from stacklm.registry import OBJECTIVE, ComponentConfig


@dataclasses.dataclass
class CausalConfig(ComponentConfig):
    kind: str = "causal"

    def check(self, cfg) -> None:
        if cfg.arch == "encoder_decoder":
            raise UserError("train.objective.kind=causal leaves an encoder-decoder's encoder unused; "
                            "valid: prefix_lm (the encoder reads a prefix, the decoder continues it), "
                            "span_corruption or ul2")


class Objective:
    """What every objective provides; `batch` is its own."""

    prefix_lm = False  # whether a decoder-only model reads its inputs both ways (a prefix LM)

    def batch(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def mode_head(self) -> list[int]:
        """The tokens that put a model trained with this objective in its language-model mode,
        read before plain text: by an encoder-decoder's encoder, before the text by a decoder-only
        model. Nothing for causal LM; UL2 with mode tokens: [S2S]."""
        return []

    def encoder_input(self, ids: list[int]) -> list[int]:
        """What an encoder-decoder's encoder reads for a text's `ids` (a system prompt)."""
        return self.mode_head() + list(ids)

    def loss(self, model, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean loss over the batch's target tokens, and how many there are (data-parallel
        ranks weight their means by it). batch: (B, T + 1) token ids."""
        inputs = self.batch(batch)
        return model(**inputs), inputs["targets"].ne(IGNORE_INDEX).sum()


@OBJECTIVE.register("causal", CausalConfig)
class CausalLM(Objective):
    def __init__(self, options: CausalConfig, tokenizer, model_config):
        self.options = options

    def batch(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, T + 1) windows -> the model's inputs: idx (B, T) and targets (B, T)."""
        return {"idx": batch[:, :-1], "targets": batch[:, 1:]}

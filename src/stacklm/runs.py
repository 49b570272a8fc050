"""Run directories: `config.yaml`, `tokenizer.json`, `checkpoints/step_*/model.safetensors`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from stacklm.config import Config
from stacklm.data.tokenizer import Tokenizer
from stacklm.errors import UserError
from stacklm.model.transformer import Transformer, build_model
from stacklm.training.checkpoint import Checkpointer, load_weights
from stacklm.training.trainer import CONFIG_FILE, TOKENIZER_FILE


@dataclass
class Run:
    model: Transformer
    tokenizer: Tokenizer
    config: Config
    checkpoint: Path

    def prompt_ids(self, prompt: str, system: str | None = None) -> tuple[list[int], list[int] | None]:
        """A prompt laid out as this run's objective trained the model: (the ids to continue, the
        encoder's ids or None). A decoder-only model reads the objective's mode head first (a UL2
        run's [S2S], as its S and C examples start); an encoder-decoder's encoder reads `system`
        after it and its decoder starts from <eos>. `system` on a decoder-only run is refused."""
        from stacklm.registry import OBJECTIVE

        tok, m = self.tokenizer, self.config.model
        objective = OBJECTIVE.build(self.config.train.objective, tok, m)
        encoder = None
        if m.arch == "encoder_decoder":
            encoder = objective.encoder_input(tok.encode(system or "")) or None
            if encoder is not None and len(encoder) > m.max_seq_len:
                raise UserError(f"the system prompt is {len(encoder)} tokens; this model reads at most "
                                f"{m.max_seq_len}")
            ids = [tok.eos_id, *tok.encode(prompt)]  # the decoder starts from <eos>, as in training
        elif system is not None:
            raise UserError("--system is read by an encoder; this run is decoder-only (model.arch=decoder): "
                            "put the text in --prompt")
        else:
            ids = objective.mode_head() + tok.encode(prompt) or [tok.eos_id]  # <eos> also starts a document
        if len(ids) >= m.max_seq_len:
            raise UserError(f"the prompt is {len(ids)} tokens; this model reads at most {m.max_seq_len}")
        return ids, encoder


def load_run(run_dir: str | Path, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, overrides: list[str] | None = None) -> Run:
    """The latest checkpoint of a run, its tokenizer and config; the model is in eval mode.

    `overrides` (`key=value`, as on the command line) change the saved config before the model is
    built, e.g. `model.max_seq_len=4096` to evaluate past the training length.
    """
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).exists():
        raise UserError(f"{run_dir} is not a stacklm run directory (no {CONFIG_FILE})")
    config = Config.load(run_dir / CONFIG_FILE, overrides)
    checkpoint = Checkpointer(run_dir / "checkpoints").latest()
    if checkpoint is None:
        raise UserError(f"{run_dir} has no checkpoint yet")
    model = build_model(config)
    try:
        load_weights(model, checkpoint)
    except RuntimeError as e:  # load_state_dict: missing, unexpected or reshaped weights
        changed = f" with {' '.join(overrides)}" if overrides else ""
        detail = str(e).strip().splitlines()[-1].strip()
        raise UserError(f"{checkpoint} does not fit the model its config builds{changed}: {detail}") from None
    model.to(device=device, dtype=dtype).eval()
    return Run(model, Tokenizer.load(run_dir / TOKENIZER_FILE), config, checkpoint)


def load(run_dir: str | Path, device: str | torch.device = "cpu") -> Transformer:
    """The trained model of a run directory, in eval mode: model(ids (B, T)) -> logits (B, T, V)."""
    return load_run(run_dir, device).model

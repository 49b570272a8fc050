"""Held-out loss, perplexity and bits-per-byte of a model on a token store."""

from __future__ import annotations

import math

import numpy as np
import torch

from stacklm.data.store import TokenStore
from stacklm.errors import UserError
from stacklm.model.loss import IGNORE_INDEX
from stacklm.training.distributed import Dist


@torch.no_grad()
def evaluate(model, store: TokenStore, seq_len: int, batch_size: int, max_batches: int | None,
             device: torch.device, dtype: torch.dtype = torch.float32, dist: Dist | None = None,
             objective=None, max_windows: int | None = None, head: list[int] | None = None) -> dict:
    """Mean next-token loss over consecutive non-overlapping windows from the start of `store`.

    bits-per-byte converts the loss with the split's measured UTF-8 bytes per token, so models
    with different tokenizers compare. With a denoising `objective` (`stacklm.objectives.ul2`) or
    another layout (`Continuation`), the loss is that layout's, over its target tokens. Otherwise
    it is the next-token loss over each window (`NextToken`) after the run's `head`, the
    objective's `mode_head()` (a UL2 run's [S2S]; None or []: nothing).
    """
    dist = dist or Dist()
    seq_len = min(seq_len, store.n_tokens - 1)
    table = store.chunk_table(seq_len)
    n_windows = int(table[-1])
    if max_batches is not None:
        n_windows = min(n_windows, max_batches * batch_size)
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    layout = objective or (NextToken(model.config, head) if head else None)
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, tokens)
    # Every rank runs the same number of forwards, as collectives inside the model (expert
    # parallelism's all_to_all, FSDP's all-gathers) need: a rank short of a batch runs the first
    # again, uncounted
    n_batches = math.ceil(n_windows / batch_size)
    for turn in range(math.ceil(n_batches / dist.world)):
        first = (turn * dist.world + dist.rank) * batch_size
        counted = first < n_windows
        first = first if counted else 0
        rows = [store.window(i, seq_len, table) for i in range(first, min(first + batch_size, n_windows))]
        batch = torch.from_numpy(np.stack(rows).astype(np.int64)).to(device)
        inputs = layout.batch(batch) if layout else {"idx": batch[:, :-1], "targets": batch[:, 1:]}
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**inputs)
        n = (inputs["targets"] != -100).sum() * counted
        total[0] += loss.double() * n
        total[1] += n
    dist.all_reduce_sum(total)
    model.train(was_training)
    loss = (total[0] / total[1]).item()
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)),
            "bpb": loss / math.log(2) / store.bytes_per_token, "tokens": int(total[1].item())}


class NextToken:
    """An evaluation layout: the next-token loss over each window, after the run's `head` tokens
    (its objective's `mode_head()`). An encoder-decoder's encoder reads `head`. A decoder-only
    model reads it before the window, as a UL2 run's S and C examples start with [S2S]; the
    scored tokens stay the window's, so models trained with any objective compare (unless `head`
    and the window exceed max_seq_len: then the window's first tokens give way, see `after_head`)."""

    def __init__(self, model_config, head: list[int] | None = None):
        self.encoder_decoder = model_config.arch == "encoder_decoder"
        self.head, self.max_len = list(head or []), model_config.max_seq_len

    def batch(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        # batch: (B, T + 1) windows; the targets are tokens 1 ... T
        if not self.head:
            return {"idx": batch[:, :-1], "targets": batch[:, 1:]}
        head = torch.tensor(self.head, dtype=batch.dtype, device=batch.device).expand(batch.size(0), -1)
        if self.encoder_decoder:
            return {"idx": batch[:, :-1], "targets": batch[:, 1:], "encoder_ids": head}
        return after_head(head, batch, self.max_len)


def after_head(head: torch.Tensor, batch: torch.Tensor, max_len: int) -> dict[str, torch.Tensor]:
    """Decoder-only: `head` (B, h) then the windows (B, T + 1), scored on the windows' tokens 1 ...
    T. If h + T exceeds max_len (a window as long as the model's positions), the windows' first
    tokens are dropped to fit, and as many fewer tokens are scored."""
    drop = max(0, head.size(1) + batch.size(1) - 1 - max_len)
    batch = batch[:, drop:]
    ignored = torch.full_like(head, IGNORE_INDEX)
    return {"idx": torch.cat((head, batch[:, :-1]), dim=1), "targets": torch.cat((ignored, batch[:, 1:]), dim=1)}


class Continuation:
    """An evaluation layout: the loss on each window's second half given its first, read as the
    run's objective trains it. A decoder reads `head` (the objective's `mode_head()`, nothing for
    causal LM) and the first half, as causal context, or with `prefix_lm` (a denoising run) as a
    prefix, both ways, as the S-denoiser trains it. An encoder-decoder reads them in its encoder
    and its decoder writes the second half after <eos>. The scored tokens are the same in every
    layout, so all compare."""

    def __init__(self, model_config, eos_id: int, head: list[int] | None = None, prefix_lm: bool = False):
        self.encoder_decoder = model_config.arch == "encoder_decoder"
        self.eos_id, self.head, self.prefix_lm = eos_id, list(head or []), prefix_lm
        self.max_len = model_config.max_seq_len

    def batch(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        # batch: (B, T + 1) windows; the targets are tokens half + 1 ... T
        b, half = batch.size(0), (batch.size(1) - 1) // 2
        head = torch.tensor(self.head, dtype=batch.dtype, device=batch.device).expand(b, -1)
        if self.encoder_decoder:
            start = torch.full((b, 1), self.eos_id, dtype=batch.dtype, device=batch.device)
            return {"idx": torch.cat((start, batch[:, half + 1 : -1]), dim=1), "targets": batch[:, half + 1 :],
                    "encoder_ids": torch.cat((head, batch[:, : half + 1]), dim=1)}
        inputs = after_head(head, batch, self.max_len)
        first = inputs["idx"].size(1) - (batch.size(1) - 1 - half)  # the position of token `half`
        inputs["targets"][:, :first] = IGNORE_INDEX
        if self.prefix_lm:  # the prefix ends with token `half`, whose position predicts the first target
            inputs["prefix"] = torch.full((b,), first + 1, dtype=torch.long, device=batch.device)
        return inputs


def context_sweep(model, store: TokenStore, contexts: list[int], tokens: int, batch_tokens: int,
                  device: torch.device, dtype: torch.dtype = torch.float32,
                  head: list[int] | None = None) -> list[dict]:
    """`evaluate` at each context length on the same first `tokens` tokens of `store`, cut into
    non-overlapping windows of that length (Press et al.'s non-overlapping evaluation: every
    token is scored once, with the tokens before it in its window as context).

    Batches hold about `batch_tokens` tokens whatever the length. Returns one dict per length:
    `context` plus evaluate's loss, ppl, bpb, tokens.
    """
    results = []
    for context in contexts:
        if context + 1 > store.n_tokens:
            raise UserError(f"--context {context}: the evaluation text has only {store.n_tokens} tokens")
        batch = max(1, batch_tokens // context)
        windows = max(1, tokens // context)
        result = evaluate(model, store, context, batch, None, device, dtype, max_windows=windows, head=head)
        results.append({"context": context, **result})
    return results


def denoising_losses(model, store: TokenStore, seq_len: int, batch_size: int, max_batches: int | None,
                     device: torch.device, tokenizer) -> dict[str, float]:
    """The loss of each UL2 denoiser on the same held-out windows, keyed by denoiser name."""
    from stacklm.objectives.ul2 import UL2_MIXTURE, Denoising, UL2Config

    losses = {}
    for denoiser in UL2_MIXTURE:
        objective = Denoising(UL2Config(), tokenizer, model.config, mixture=(denoiser,))
        losses[denoiser.name] = evaluate(model, store, seq_len, batch_size, max_batches, device,
                                         objective=objective)["loss"]
    return losses

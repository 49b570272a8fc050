"""Autoregressive generation with the model's decode state (KV cache): prefill, then one token a step."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from stacklm.inference import cpu_step
from stacklm.model import cpu_kernels


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V): greedy at temperature 0, else top-k then nucleus."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float = 1.0, eos_id: int | None = None,
             generator: torch.Generator | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None, compile: bool = False, fused: bool = True,
             encoder_ids: torch.Tensor | None = None, encoder_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Continue `prompt` (B, T) by up to max_new_tokens; returns (B, T + n) ids. An
    encoder-decoder's decoder continues `prompt` reading `encoder_ids` (B, S), encoded once (of
    row b, the first encoder_lengths[b] are real, the rest padding).

    Stops when every sequence has produced `eos_id` (later positions of a finished sequence
    repeat it) or at model.max_seq_len. `on_token` receives each new (B,) column as it is made.
    The one-token steps of a single sequence on the CPU run as one C++ call
    (`stacklm.inference.cpu_step`) where the model's components allow it and `fused` is true; no
    compilation, and faster than either path below. Otherwise compile=True runs them through
    `compiled_decode_step(model)`: the first call compiles for tens of seconds, later tokens come
    several times faster on CPU than the modules' own forward.
    """
    was_training = model.training
    model.eval()
    b, t = prompt.shape
    max_new_tokens = max(0, min(max_new_tokens, model.config.max_seq_len - t))
    context = {} if encoder_ids is None else {"encoder_ids": encoder_ids, "encoder_lengths": encoder_lengths}
    state = model.new_state(b, t + max_new_tokens, **context)
    logits = model(prompt, state)[:, -1]
    step = cpu_step.fused_step(model) if b == 1 and fused else None
    if step is None:
        step = compiled_decode_step(model) if compile else model
    out = [prompt]
    done = torch.zeros(b, dtype=torch.bool, device=prompt.device)
    for i in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            token = token.masked_fill(done, eos_id)
            done |= token == eos_id
        out.append(token[:, None])
        if on_token is not None:
            on_token(token)
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        logits = step(token[:, None], state)[:, -1]
    model.train(was_training)
    return torch.cat(out, dim=1)


def compiled_decode_step(model) -> Callable:
    """`model` compiled for one-token steps: `step(ids (B, 1), state) -> logits (B, 1, V)`.

    Shapes are dynamic, so one graph serves every cache length. Each matmul with a single row
    (all of them at batch 1) reads every weight once, and decoding a token is little else. On CPU,
    in float32 and bfloat16, such a matmul (`mm`: a linear layer without bias) goes to stacklm's
    `matvec` kernel where the CPU kernels are loaded and enabled (it reads at the memory's
    bandwidth); otherwise to Inductor's fused reduction over the weight's contiguous rows (on a
    2-core Zen 4, MKL's matrix-vector product read the weights at 10 GB/s, the reduction at 27, of
    30 measured).
    """
    if next(model.parameters()).device.type == "cpu":
        cpu_kernels.load()  # before tracing: the traced graph uses them only if they are loaded
    return functools.partial(_compiled_forward(), model)


def _forward(model, ids: torch.Tensor, state) -> torch.Tensor:
    # Read here so that Dynamo guards on it: the backend lowers one-row matmuls to the matvec
    # kernel when it is true, and turning the kernels off must recompile.
    if cpu_kernels.active():
        return model(ids, state)
    return model(ids, state)


@functools.cache
def _compiled_forward():
    return torch.compile(_forward, dynamic=True, backend=_matvec_inductor)


def _matvec_inductor(gm, example_inputs):
    from torch._functorch import config as functorch_config
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    table = {**select_decomp_table(), torch.ops.aten.mm.default: _one_row_matmul}
    # AOTAutograd's cache keys a graph without its decompositions, so it could hand back a graph
    # made with the kernels after they were turned off; Inductor's own cache keys the decomposed
    # graph. The size asserts checked the inputs, as Dynamo's guards do, and the kernels' outputs
    # against their registered shapes, which tests/model/test_cpu_kernels.py checks instead.
    with functorch_config.patch(enable_autograd_cache=False):
        return compile_fx(gm, example_inputs, config_patches={"size_asserts": False}, decompositions=table)


def _one_row_matmul(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype | None = None):
    # a: (1, K), b: (K, N) -> (1, N), accumulated in float32; other matmuls stay as they are
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    if a.size(0) != 1 or out_dtype is not None:
        return NotImplemented
    weight = b.t()  # (N, K): a linear layer's weight, rows contiguous
    if (cpu_kernels.active() and cpu_kernels.fits(a, weight) and statically_known_true(weight.stride(1) == 1)
            and statically_known_true(weight.stride(0) == weight.size(1))):
        return torch.ops.stacklm.matvec(a, weight)
    return (a.float().unsqueeze(2) * b.float().unsqueeze(0)).sum(dim=1).to(a.dtype)

"""A batch-1 decode step on the CPU in one C++ call: `stacklm::decode_blocks` (model/csrc/decode_step.cpp).

Decoding one token reads each weight once and computes little, so on a CPU a step should take
about the weights' bytes over the memory bandwidth. Run as modules, a block is ten to twenty op
calls whose fixed costs add up to more than the reads of a sparse model; `torch.compile` fuses
the small ones but keeps Dynamo's guards and a Python wrapper around every step, and takes tens of
seconds to start. Here the embedding, the readout and the output projection (`matvec`) stay in
PyTorch, and every block runs in one call of the C++ kernels, with no compilation per model.

It covers the blocks built from these components, and refuses the rest (`why_not` says why), which
keep the module path:
- norm: `rmsnorm`;
- attention: `full`, with the `dense` or `multiplicative_conv` q/k/v;
- position: `rope`, `xpos`, `learned` or `none` (ALiBi and T5's bias add to the scores);
- FFN: `swiglu` or `sparse` (not MoE);
- a decoder-only model (`model.arch: decoder`), float32 or bfloat16, at batch 1, inference only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from stacklm.model import cpu_kernels
from stacklm.model.attention import CausalSelfAttention, DenseQKV, KVCache
from stacklm.model.ffn import SwiGLU
from stacklm.model.ffn_sparse import SparseFFN
from stacklm.model.norm import RMSNorm
from stacklm.model.position import Position, RotaryPosition
from stacklm.model.qkv_sparse import MultiplicativeConvQKV
from stacklm.model.transformer import Block, DecodeState, Transformer

# The kinds csrc/decode_step.cpp knows, numbered as there
QKV_KINDS = {DenseQKV: 0, MultiplicativeConvQKV: 1}
FFN_KINDS = {SwiGLU: 0, SparseFFN: 1}


def why_not(model) -> str | None:
    """Why `model`'s decode step cannot run as one C++ call (None: it can)."""
    if type(model) is not Transformer:
        return f"{type(model).__name__} is not the decoder-only Transformer"
    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) != 1 or not dtypes <= set(cpu_kernels.DTYPES):
        return f"parameters in {sorted(map(str, dtypes))}; the kernels take float32 or bfloat16, one for all"
    if model.lm_head.weight.device.type != "cpu":
        return "the model is not on the CPU"
    position = model.position
    rotation = type(position).rotate
    if position.has_bias or rotation not in (Position.rotate, RotaryPosition.rotate):
        return f"position {type(position).__name__}: only rotary tables or no rotation"
    for i, block in enumerate(model.blocks):
        parts = {"block": type(block) is Block, "attention": type(block.attn) is CausalSelfAttention,
                 "norm": type(block.attn_norm) is RMSNorm and type(block.ffn_norm) is RMSNorm}
        if all(parts.values()):
            parts["q/k/v"] = type(block.attn.proj) in QKV_KINDS
            parts["FFN"] = type(block.ffn) in FFN_KINDS
        for part, fits in parts.items():
            if not fits:
                return f"block {i}: its {part} is not one the C++ step runs"
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return "forward hooks on its modules, which the C++ step would not call"
    norms = {n.eps for b in model.blocks for n in (b.attn_norm, b.ffn_norm)}
    sparse = {(f.block_size, f.output_multiplier) for b in model.blocks if isinstance(f := b.ffn, SparseFFN)}
    if len(norms) > 1 or len(sparse) > 1:
        return "the blocks' norms or sparse FFNs differ in their options"
    return None


def fused_step(model) -> Callable | None:
    """`step(ids (1, 1), state) -> logits (1, 1, V)` with every block in one C++ call, or None
    where the kernels are off or `why_not(model)`. A call the step cannot take (another batch,
    autocast, gradients) goes through `model` itself."""
    if why_not(model) is not None or not cpu_kernels.available():  # a model it cannot take builds nothing
        return None
    return Step(model)


def qkv_weights(proj, empty: torch.Tensor) -> list[torch.Tensor]:
    """A q/k/v module's weights in the order decode_step.cpp lists above `kQKVWeights`; `empty`
    for a missing bias."""
    if isinstance(proj, DenseQKV):
        qkv, out = proj.qkv_proj, proj.out_proj
        return [qkv.weight, _or(qkv.bias, empty), out.weight, _or(out.bias, empty)]
    mult, weight, qk, v = proj.packed_weights()
    return [mult, weight, _or(proj.shared.bias, empty), qk, proj.qk_conv_bias, v, proj.v_conv_bias]


def ffn_weights(ffn, empty: torch.Tensor) -> list[torch.Tensor]:
    """An FFN's weights in the order decode_step.cpp lists above `kFFNWeights`; `empty` for a
    missing bias."""
    if isinstance(ffn, SwiGLU):
        return [ffn.gate_up_proj.weight, _or(ffn.gate_up_proj.bias, empty), ffn.out_proj.weight,
                _or(ffn.out_proj.bias, empty)]
    return [ffn.controller_down.weight, ffn.controller_up.weight, ffn.controller_up.bias, ffn.in_proj,
            _or(ffn.in_bias, empty), ffn.out_proj, _or(ffn.out_bias, empty)]


def _or(t: torch.Tensor | None, empty: torch.Tensor) -> torch.Tensor:
    return empty if t is None else t


class Step:
    """The model's weights listed once for decode_step.cpp, and its step. The sparse q/k/v's
    weights are copies, repacked for the kernel: a step sees the weights as they were when it was
    built (`generate` builds one per call)."""

    def __init__(self, model: Transformer):
        self.model = model
        ref = model.lm_head.weight
        self.dtype, self.empty = ref.dtype, ref.new_empty(0)  # the stand-in for a missing tensor
        empty = self.empty
        self.kinds, self.weights = [], []
        for block in model.blocks:
            self.kinds += [QKV_KINDS[type(block.attn.proj)], FFN_KINDS[type(block.ffn)]]
            self.weights += [block.attn_norm.weight, *qkv_weights(block.attn.proj, empty),
                             block.ffn_norm.weight, *ffn_weights(block.ffn, empty)]
        self.weights = [w.detach() for w in self.weights]
        position = model.position
        self.rotary = empty
        if isinstance(position, RotaryPosition):  # (4, max_len, hd / 2) in the model's dtype, as rotate casts them
            self.rotary = torch.stack([position.q_cos, position.q_sin, position.k_cos, position.k_sin]).to(self.dtype)
        first = model.blocks[0]
        sparse = [b.ffn for b in model.blocks if isinstance(b.ffn, SparseFFN)]
        self.options = dict(n_heads=first.attn.n_heads, block_size=sparse[0].block_size if sparse else 1,
                            eps=first.attn_norm.eps, q_mult=first.attn.q_mult,
                            ffn_multiplier=sparse[0].output_multiplier if sparse else 1.0)

    def takes(self, ids: torch.Tensor, state) -> bool:
        """Whether this call fits the C++ step: one new token of one sequence, inference, no autocast."""
        return (ids.shape == (1, 1) and isinstance(state, DecodeState) and not self.model.training
                and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu") and cpu_kernels.active()
                and all(isinstance(c, KVCache) and c.k.size(0) == 1 and c.k.dtype == self.dtype for c in state.layers))

    def __call__(self, ids: torch.Tensor, state) -> torch.Tensor:
        model = self.model
        if not self.takes(ids, state):
            return model(ids, state)
        start, caches = model.start(ids, state), state.layers
        if start >= caches[0].k.size(2):  # as KVCache.update says it
            raise ValueError(f"KV cache holds {caches[0].k.size(2)} positions; {start + 1} requested")
        x = model.position.embed(model.embed(ids), start)  # (1, 1, D)
        frames = [c.qkv_state.frames if c.qkv_state is not None else self.empty for c in caches]
        x = torch.ops.stacklm.decode_blocks(
            x.reshape(-1), self.weights, [c.k for c in caches], [c.v for c in caches], frames, self.kinds,
            self.rotary, start, **self.options)
        state.advance(1)
        x = model.readout(x.view(1, -1))
        return torch.ops.stacklm.matvec(x, model.lm_head.weight).view(1, 1, -1)

"""Attention layers, chosen by `model.attention.kind`. Built as ATTENTION.build(options, model_config).

An attention module takes `forward(x, position, cache, prefix)` and makes its own decode state with
`new_cache(batch, max_len, dtype, device)`, so kinds with other state (a sliding window, a
convolution's last inputs) keep it their own way. `prefix` (B,) holds prefix-LM prefix lengths:
those positions are visible to every query of their sequence; or it is a (B, 1, T, T) boolean mask
that replaces the causal one (packed rows of several sequences). Only `full` supports it;
objectives that need it refuse other kinds at config time, or do without (packing).

The projections into and out of the heads are a component of their own, chosen by
`model.attention.qkv` from the QKV registry: `dense` here, the Scaling Transformer's sparse
`multiplicative` and `multiplicative_conv` in `qkv_sparse.py`. Every attention kind uses them as
`q, k, v = self.proj(x, cache.qkv_state)` and `self.proj.out(y)`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from stacklm.device import compute_dtype
from stacklm.errors import UserError
from stacklm.model.mup import attention_mult
from stacklm.registry import ATTENTION, QKV, ComponentConfig, option


@dataclasses.dataclass
class AttentionConfig(ComponentConfig):
    kind: str = "full"
    bias: bool = option(False, help="biases on the q/k/v and output projections")
    qkv: str = option("dense", help="q/k/v projections: dense, multiplicative (S-module multiplicative "
                      "layers) or multiplicative_conv (one shared multiplicative layer, then a causal "
                      "convolution per q, k, v; no output projection) - the Scaling Transformer's sparse QKV")
    qkv_sparsity: int | None = option(None, ge=1, help="S, modules of the multiplicative layer; "
                                      "default n_heads (one module per head)")
    length_kernel: int = option(3, ge=1, help="multiplicative_conv: positions each convolution sees "
                                "(the token and the length_kernel - 1 before it)")

    def check(self, cfg) -> None:
        QKV.module_class(self.qkv, "model.attention.qkv")
        if self.qkv == "dense":
            return
        s = self.qkv_sparsity or cfg.n_heads
        if cfg.d_model % s:
            raise UserError(f"model.attention.qkv_sparsity ({s}) must divide model.d_model ({cfg.d_model})")
        if cfg.kv_heads != cfg.n_heads:
            raise UserError(f"model.attention.qkv={self.qkv} makes keys and values for every head; "
                            f"set model.n_kv_heads to null or to n_heads ({cfg.n_heads})")


@dataclasses.dataclass
class EfficientAttentionConfig(AttentionConfig):
    """Options shared by the kinds that approximate full attention (local, lsh)."""

    full_every: int = option(0, ge=0, help="every k-th layer (layers k-1, 2k-1, ...) uses full "
                             "attention instead (0: none)")
    recompute: bool = option(False, help="keep only the attention core's inputs for the backward pass "
                             "and compute its scores and probabilities again there: less memory at "
                             "long context, more time (docs/attention.md)")

    def for_layer(self, layer: int) -> AttentionConfig:
        if self.full_every and (layer + 1) % self.full_every == 0:
            return full_attention(self)
        return self


def full_attention(options: AttentionConfig) -> AttentionConfig:
    """`options` as full attention: the same projections (qkv, bias, ...) with kind `full`."""
    if options.kind == "full":
        return options
    shared = {f.name: getattr(options, f.name) for f in dataclasses.fields(AttentionConfig)}
    return AttentionConfig(**{**shared, "kind": "full"})


class KVCache:
    """Keys and values of the tokens seen so far, preallocated to max_len.

    `length` is the number of cached positions; the model advances it after each forward.
    """

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, qkv_state=None):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0
        self.qkv_state = qkv_state  # the projections' own decode state, if any

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: (B, Hkv, T, hd) -> all cached keys and values, (B, Hkv, length + T, hd)
        end = self.length + k.size(2)
        if end > self.k.size(2):
            raise ValueError(f"KV cache holds {self.k.size(2)} positions; {end} requested")
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


def causal_mask(t_q: int, t_k: int, device) -> torch.Tensor:
    """(t_q, t_k) boolean mask, True where query i (the last t_q of t_k positions) may look."""
    q_pos = torch.arange(t_k - t_q, t_k, device=device)[:, None]
    return torch.arange(t_k, device=device)[None, :] <= q_pos


@QKV.register("dense")
class DenseQKV(nn.Module):
    """q, k, v = x W_qkv (one fused matmul); out(y) = y W_o.

    With shared_qk (Reformer's shared-QK attention) there is no key projection and k is q.
    """

    per_position = True  # each position's q, k, v from its own x alone (rows may be packed)

    def __init__(self, options: AttentionConfig, cfg, shared_qk: bool = False):
        super().__init__()
        self.shared_qk = shared_qk
        q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        self.split = [q, kv] if shared_qk else [q, kv, kv]
        self.qkv_proj = nn.Linear(cfg.d_model, sum(self.split), bias=options.bias)
        self.out_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=options.bias)

    def new_state(self, batch: int, dtype: torch.dtype, device) -> None:
        return None

    def zero_query(self) -> None:
        """muP's zero-initialised query (not with shared QK, where the query is also the key)."""
        if not self.shared_qk:
            with torch.no_grad():
                self.qkv_proj.weight[: self.split[0]].zero_()

    def forward(self, x: torch.Tensor, state=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: (B, T, D) -> q (B, T, H * hd), k and v (B, T, Hkv * hd); k = q when shared
        if self.shared_qk:
            q, v = self.qkv_proj(x).split(self.split, dim=-1)
            return q, q, v
        return self.qkv_proj(x).split(self.split, dim=-1)

    def out(self, y: torch.Tensor) -> torch.Tensor:
        # y: (B, T, H * hd) -> (B, T, D)
        return self.out_proj(y)


@ATTENTION.register("full", AttentionConfig)
class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with grouped-query heads (GQA; MQA when n_kv_heads=1)."""

    def __init__(self, options: AttentionConfig, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.proj = QKV.module_class(options.qkv, "model.attention.qkv")(options, cfg)
        self.dropout = cfg.dropout
        self.q_mult = attention_mult(cfg)  # muP's 1/head_dim attention; 1 otherwise

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device) -> KVCache:
        return KVCache(batch, self.n_kv_heads, max_len, self.head_dim, dtype, device,
                       self.proj.new_state(batch, dtype, device))

    def forward(self, x: torch.Tensor, position, cache: KVCache | None = None,
                prefix: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, T, D); prefix: (B,) prefix-LM prefix lengths, a (B, 1, T, T) mask, or None
        b, t, _ = x.shape
        start = cache.length if cache is not None else 0
        q, k, v = self.proj(x, cache.qkv_state if cache is not None else None)
        q, k, v = heads(q, self.n_heads), heads(k, self.n_kv_heads), heads(v, self.n_kv_heads)
        q, k = position.rotate(q, k, start)
        q = q * self.q_mult if self.q_mult != 1 else q
        if cache is not None:
            k, v = cache.update(k, v)  # (B, Hkv, start + T, hd)
        positions = torch.arange(k.size(2), device=x.device).view(1, 1, -1)
        bias = position_bias(position, positions[..., start:], positions)
        y = causal_attention(q, k, v, bias, self.dropout if self.training else 0.0, prefix)
        return self.proj.out(y.transpose(1, 2).reshape(b, t, -1))


def heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, T, n_heads * hd) -> (B, n_heads, T, hd)."""
    return x.unflatten(-1, (n_heads, -1)).transpose(1, 2)


def causal_attention(q, k, v, bias: torch.Tensor | None, dropout: float = 0.0,
                     prefix: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention where the queries are the last Tq of Tk positions, with an optional
    additive position bias (..., H, Tq, Tk) and prefix-LM prefix lengths (B,) or a mask
    (B, 1, Tq, Tk) (`attention_mask`)."""
    # q: (..., H, Tq, hd), k, v: (..., Hkv, Tk, hd) -> (..., H, Tq, hd)
    t_q, t_k = q.size(-2), k.size(-2)
    if prefix is not None:
        return masked_attention(q, k, v, attention_mask(t_q, t_k, bias, q, prefix), dropout)
    if bias is None and t_q == 1:  # one new token sees every cached position
        if q.device.type == "cpu" and torch.compiler.is_compiling() and not dropout:
            return one_query_attention(q, k, v)
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:  # at any length: the flash kernel
            return explicit_attention(q, k, v, None, dropout)  # was 9x slower at 4096 keys
        return masked_attention(q, k, v, None, dropout)
    if bias is None and t_q == t_k and not dropout and prefer_blocks(q, t_k):
        return block_causal_attention(q, k, v)
    if bias is None and t_q == t_k and not prefer_explicit(q, t_k):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout,
                                              enable_gqa=k.size(-3) != q.size(-3))
    return masked_attention(q, k, v, attention_mask(t_q, t_k, bias, q), dropout)


def one_query_attention(q, k, v) -> torch.Tensor:
    """A decode step's attention as two reductions, for torch.compile: Inductor fuses them with the
    step's other kernels, where two matmuls would become an SDPA call by its pattern matcher. One
    layer at 64 / 512 / 4096 cached keys (16 heads of 64, Zen 5): float32 28 / 63 / 698 us against
    the compiled SDPA's 34 / 76 / 849, bfloat16 33 / 66 / 313 against 71 / 381 / 2986. (In eager
    mode the broadcast products make large temporaries; there the matmuls win.)"""
    # q: (B, H, 1, hd), k, v: (B, Hkv, T, hd) -> (B, H, 1, hd)
    b, h, _, hd = q.shape
    q = q.view(b, k.size(1), -1, 1, hd).float()  # (B, Hkv, groups, 1, hd)
    scores = (q * k.unsqueeze(2).float()).sum(-1) * hd**-0.5  # (B, Hkv, groups, T)
    probs = scores.softmax(dim=-1)
    out = (probs.unsqueeze(-1) * v.unsqueeze(2).float()).sum(-2)  # (B, Hkv, groups, hd)
    return out.view(b, h, 1, hd).to(v.dtype)


def masked_attention(q, k, v, mask: torch.Tensor | None, dropout: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + mask) v; mask boolean (True: may look), additive, or None."""
    # q: (..., H, Tq, hd), k, v: (..., Hkv, Tk, hd) -> (..., H, Tq, hd)
    if prefer_explicit(q, k.size(-2)):
        return explicit_attention(q, k, v, mask, dropout)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                          enable_gqa=k.size(-3) != q.size(-3))


def recomputed(fn, *args, enabled: bool):
    """fn(*args), its intermediate tensors computed again in the backward pass instead of kept
    (torch.utils.checkpoint; dropout draws the same mask again) when `enabled` and a gradient is
    being taken; otherwise a plain call."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def position_bias(position, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor | None:
    """The position's score bias for queries at q_pos (B|1, H|1, ..., Tq) and keys at k_pos
    (B|1, H|1, ..., Tk): (B|1, H, ..., Tq, Tk), or None for a position kind without one."""
    if not position.has_bias:
        return None
    return position.bias(q_pos[..., :, None] - k_pos[..., None, :])


def attention_mask(t_q: int, t_k: int, bias: torch.Tensor | None, q: torch.Tensor,
                   prefix: torch.Tensor | None = None) -> torch.Tensor:
    """The causal mask (boolean), or with a position bias the additive mask (-inf where masked).
    With `prefix` (B,) (prefix-LM), sequence b's first prefix[b] positions are visible to all its
    queries: (B, 1, Tq, Tk). A `prefix` of (B, 1, Tq, Tk) bools is the mask itself (True: may
    look), in place of the causal one: packed rows, several sequences each attending within itself."""
    if prefix is not None and prefix.dim() == 4:
        mask = prefix
    else:
        mask = causal_mask(t_q, t_k, q.device)
    if prefix is not None and prefix.dim() == 1:
        mask = mask | (torch.arange(t_k, device=q.device) < prefix.view(-1, 1, 1, 1))
    if bias is None:
        return mask
    return bias.to(q.dtype).masked_fill(~mask, float("-inf"))


# PyTorch's CPU flash-attention kernel is slower in bfloat16 than two plain matmuls and a softmax
# over short sequences: forward + backward of one 8-head layer on a 2-core Zen 4 took 33 vs 21 ms
# at 256 tokens, 55 vs 37 ms at 512, and the two drew level at 1024. float32 favours the kernel.
EXPLICIT_MAX_LEN = 512


def prefer_explicit(q: torch.Tensor, t_k: int) -> bool:
    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and t_k <= EXPLICIT_MAX_LEN


def repeat_kv(k: torch.Tensor, v: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query keys and values (..., Hkv, T, hd) repeated to n_heads, each for its group."""
    groups = n_heads // k.size(-3)
    if groups == 1:
        return k, v
    return k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)


def explicit_attention(q, k, v, mask: torch.Tensor | None, dropout: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + mask) v with the (Tq, Tk) scores in memory, as in the paper."""
    # q: (..., H, Tq, hd), k, v: (..., Hkv, Tk, hd) -> (..., H, Tq, hd)
    k, v = repeat_kv(k, v, q.size(-3))
    scores = (q @ k.transpose(-1, -2)) * q.size(-1) ** -0.5
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        scores = scores + mask
    probs = scores.softmax(dim=-1)
    if dropout:
        probs = F.dropout(probs, dropout)
    return probs @ v


# Causal attention on the CPU, up to BLOCK_MAX_LEN tokens, as plain matmuls over blocks of
# BLOCK_ROWS queries that skip the keys after each block: 3/4 of the full (T, T) work at 256 tokens,
# 9/16 at 1024, where PyTorch's CPU flash kernel did the full work's time. Forward + backward on a
# 2-core Zen 5 (benchmarks/causal_attention.py: 8 heads of 64, 2048 tokens), fused -> blocks:
# float32 24 -> 22 ms at 256 tokens, 45 -> 32 at 512, 65 -> 54 at 1024; bfloat16 24 -> 10,
# 39 -> 14, 47 -> 24 (the full-scores `explicit_attention`: 12, 22, 44). The probabilities are
# kept for backward, about half of the (T, T) scores per head, hence the length cap; with no
# gradient to take, float32 stays with the fused kernel, as fast there and keeping nothing.
BLOCK_MAX_LEN = 1024
BLOCK_ROWS = 128


def prefer_blocks(q: torch.Tensor, t_k: int) -> bool:
    if q.device.type != "cpu" or t_k > BLOCK_MAX_LEN:
        return False
    dtype = compute_dtype(q)
    return dtype == torch.bfloat16 or (dtype == torch.float32 and torch.is_grad_enabled() and q.requires_grad)


def block_causal_attention(q, k, v, rows: int = BLOCK_ROWS) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + causal mask) v, computed for `rows` queries at a time against
    the keys up to the block's last query."""
    # q: (B, H, T, hd), k, v: (B, Hkv, T, hd) -> (B, H, T, hd)
    k, v = repeat_kv(k, v, q.size(-3))
    dtype = compute_dtype(q)  # one op under autocast (see compute_dtype)
    with torch.autocast(q.device.type, enabled=False):
        return _BlockCausalAttention.apply(q.to(dtype), k.to(dtype).contiguous(), v.to(dtype).contiguous(), rows)


class _BlockCausalAttention(torch.autograd.Function):
    """Queries [s, e) see keys [0, e): scores (.., e - s, e), the last (e - s) columns masked above
    their diagonal. The backward pass is the textbook one over the kept probabilities p:
    dv = p^T g, ds = p * (g v^T - rowsum(g * out)), dq = ds k / sqrt(hd), dk = ds^T q / sqrt(hd)."""

    @staticmethod
    def forward(ctx, q, k, v, rows):
        t, scale = q.size(-2), q.size(-1) ** -0.5
        above = torch.ones(rows, rows, dtype=torch.bool, device=q.device).triu_(1)
        keep = any(ctx.needs_input_grad[:3])  # the probabilities, for backward
        outs, probs = [], []
        for s in range(0, t, rows):
            e = min(s + rows, t)
            scores = q[..., s:e, :] @ k[..., :e, :].transpose(-1, -2)
            scores[..., s:].masked_fill_(above[: e - s, : e - s], float("-inf"))
            p = scores.mul_(scale).softmax(dim=-1)
            outs.append(p @ v[..., :e, :])
            if keep:
                probs.append(p)
        out = torch.cat(outs, dim=-2)  # not matmul(out=) into slices: Dynamo breaks the graph there
        if keep:
            ctx.save_for_backward(q, k, v, out, *probs)
        ctx.rows = rows
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, k, v, out, *probs = ctx.saved_tensors
        t, scale, rows = q.size(-2), q.size(-1) ** -0.5, ctx.rows
        grad = grad.contiguous()
        delta = (grad.float() * out.float()).sum(-1, keepdim=True).to(q.dtype)  # rowsum(g * out)
        dq = []
        dk = torch.zeros_like(k, dtype=torch.float32)  # summed over blocks in float32
        dv = torch.zeros_like(v, dtype=torch.float32)
        for p, s in zip(probs, range(0, t, rows), strict=True):
            e = min(s + rows, t)
            g = grad[..., s:e, :]
            dv[..., :e, :] += p.transpose(-1, -2) @ g
            ds = torch.sub(g @ v[..., :e, :].transpose(-1, -2), delta[..., s:e, :]).mul_(p).mul_(scale)
            dq.append(ds @ k[..., :e, :])
            dk[..., :e, :] += ds.transpose(-1, -2) @ q[..., s:e, :]
        return torch.cat(dq, dim=-2), dk.to(k.dtype), dv.to(v.dtype), None

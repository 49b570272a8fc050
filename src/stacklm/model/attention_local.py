"""Causal sliding-window attention, `model.attention.kind: local`.

The query at position p sees the keys at p - window + 1 ... p (Beltagy et al. 2020's sliding
window; Mistral's layout). Training cost and memory are O(T window) instead of O(T^2), and the
decode cache is a ring of the last `window` keys and values, so generation memory is O(window)
however long the sequence. Stacked layers still pass information further back: L layers reach
L (window - 1) tokens.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from stacklm.model.attention import (
    EfficientAttentionConfig,
    causal_attention,
    heads,
    masked_attention,
    position_bias,
    recomputed,
)
from stacklm.model.mup import attention_mult
from stacklm.registry import ATTENTION, QKV, option


@dataclasses.dataclass
class LocalConfig(EfficientAttentionConfig):
    kind: str = "local"
    window: int = option(256, ge=1, help="keys each query sees: itself and the window - 1 before it")


class WindowCache:
    """A ring of the last `window` positions' keys and values: slot p % window holds position p,
    so a new position overwrites the one that has just left every later query's window, and a
    decoding step writes one slot and reads the ring as it is (attention does not care about the
    order of its keys)."""

    def __init__(self, batch: int, n_kv_heads: int, window: int, head_dim: int, dtype: torch.dtype,
                 device, qkv_state=None):
        self.k = torch.zeros(batch, n_kv_heads, window, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.window = window
        self.length = 0  # positions seen so far; the model advances it after each forward
        self.qkv_state = qkv_state

    def ordered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached keys and values oldest first: (B, Hkv, min(length, window), hd)."""
        n = min(self.length, self.window)
        slots = torch.arange(self.length - n, self.length, device=self.k.device) % self.window
        return self.k[:, :, slots], self.v[:, :, slots]

    def write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v: (B, Hkv, T, hd) at positions length ... length + T - 1; the last `window` are kept
        t = k.size(2)
        keep = min(t, self.window)
        slots = torch.arange(self.length + t - keep, self.length + t, device=k.device) % self.window
        self.k[:, :, slots], self.v[:, :, slots] = k[:, :, t - keep :], v[:, :, t - keep :]

    def slot_positions(self) -> torch.Tensor:
        """Absolute position held by each filled slot, once the step's keys are written."""
        last = self.length  # the one new position of a decoding step
        slots = torch.arange(min(last + 1, self.window), device=self.k.device)
        return last - (last - slots) % self.window


@ATTENTION.register("local", LocalConfig)
class LocalAttention(nn.Module):
    """Sliding-window attention computed blockwise: the sequence is cut into blocks of `window`
    queries, and each block attends to its own keys and the previous block's (2 window keys)
    under a band mask, so the scores never exceed (T, 2 window)."""

    def __init__(self, options: LocalConfig, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.window = options.window
        self.proj = QKV.module_class(options.qkv, "model.attention.qkv")(options, cfg)
        self.dropout = cfg.dropout
        self.q_mult = attention_mult(cfg)  # muP's 1/head_dim attention; 1 otherwise
        self.recompute = options.recompute

    def keys_per_query(self, seq_len: int) -> int:
        """Keys a query scores, counting FLOPs as for full attention (PaLM's seq_len)."""
        return min(seq_len, self.window)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device) -> WindowCache:
        return WindowCache(batch, self.n_kv_heads, min(self.window, max_len), self.head_dim, dtype, device,
                           self.proj.new_state(batch, dtype, device))

    def forward(self, x: torch.Tensor, position, cache: WindowCache | None = None,
                prefix: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, T, D)
        if prefix is not None:
            raise ValueError("prefix-LM attention needs model.attention.kind=full")
        b, t, _ = x.shape
        start = cache.length if cache is not None else 0
        q, k, v = self.proj(x, cache.qkv_state if cache is not None else None)
        q, k, v = heads(q, self.n_heads), heads(k, self.n_kv_heads), heads(v, self.n_kv_heads)
        q, k = position.rotate(q, k, start)
        q = q * self.q_mult if self.q_mult != 1 else q
        dropout = self.dropout if self.training else 0.0
        if cache is not None and t == 1:  # decoding: the query sees the whole ring, itself included
            cache.write(k, v)
            n = min(start + 1, cache.window)
            bias = None
            if position.has_bias:  # only then the slots' positions: this is the decode step
                bias = position_bias(position, torch.full((1, 1, 1), start, device=x.device),  # no host copy
                                     cache.slot_positions().view(1, 1, -1))
            y = causal_attention(q, cache.k[:, :, :n], cache.v[:, :, :n], bias, dropout)
            return self.proj.out(y.transpose(1, 2).reshape(b, t, -1))
        if cache is not None:
            past_k, past_v = cache.ordered()
            cache.write(k, v)
            k, v = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)  # (B, Hkv, cached + T, hd)
        cached = k.size(2) - t
        if k.size(2) <= self.window:  # every query sees every key (decoding): plain causal attention
            positions = torch.arange(k.size(2), device=x.device).view(1, 1, -1)
            y = causal_attention(q, k, v, position_bias(position, positions[..., cached:], positions), dropout)
        else:  # queries for the cached positions are never used: zeros keep q and k aligned
            y = self.attend(F.pad(q, (0, 0, cached, 0)), k, v, position)[:, :, cached:]
        return self.proj.out(y.transpose(1, 2).reshape(b, t, -1))

    def attend(self, q, k, v, position) -> torch.Tensor:
        # q: (B, H, L, hd), k, v: (B, Hkv, L, hd) at the same L positions -> (B, H, L, hd)
        w, length = self.window, q.size(2)
        dropout = self.dropout if self.training else 0.0
        first = slice(0, min(w, length))  # the first block has no block before it: plain causal
        ar = torch.arange(first.stop, device=q.device)
        y0 = causal_attention(q[:, :, first], k[:, :, first], v[:, :, first],
                              position_bias(position, ar.view(1, 1, -1), ar.view(1, 1, -1)), dropout)
        if length <= w:
            return y0
        pad = -length % w
        q = F.pad(q[:, :, w:], (0, 0, 0, pad))  # the queries of blocks 1, 2, ...
        k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
        blocks = (length + pad) // w - 1
        q = q.unflatten(2, (blocks, w)).transpose(1, 2)  # (B, blocks, H, w, hd)
        # keys of block i and the one before: windows of 2w starting every w
        k = k.unfold(2, 2 * w, w).permute(0, 2, 1, 4, 3)  # (B, blocks, Hkv, 2w, hd)
        v = v.unfold(2, 2 * w, w).permute(0, 2, 1, 4, 3)
        # query a of a block is at a + w relative to key j: distance w + a - j, the same in every block
        qa = torch.arange(w, device=q.device).view(1, 1, w) + w
        kj = torch.arange(2 * w, device=q.device).view(1, 1, 2 * w)
        distance = qa[..., :, None] - kj[..., None, :]  # (1, 1, w, 2w)
        band = (distance >= 0) & (distance < w)
        bias = position_bias(position, qa, kj)
        mask = band if bias is None else bias.to(q.dtype).masked_fill(~band, float("-inf"))
        y = recomputed(masked_attention, q, k, v, mask, dropout, enabled=self.recompute)  # (B, blocks, H, w, hd)
        y = y.transpose(1, 2).flatten(2, 3)[:, :, : length - w]
        return torch.cat((y0, y), dim=2)

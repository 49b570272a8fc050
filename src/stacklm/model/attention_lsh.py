"""Reformer's LSH attention (Kitaev et al. 2020), `model.attention.kind: lsh`, made strictly causal.

Shared-QK attention: the keys are the queries normalised to unit length, score = q.k / sqrt(hd).
A query scores only keys that angular LSH puts in its bucket: per round r the keys are rotated by
a fixed random R_r (hd, n_buckets/2) and bucket = argmax([kR_r, -kR_r]). Each round sorts the
positions by (bucket, position), cuts the sorted order into chunks of chunk_size and lets every
chunk attend to itself and the chunk before, so the scores are (T, 2 chunk_size) per round, not
(T, T). The n_hashes rounds are combined by their log-sum-exps:
out = sum_r softmax_r(lse_r) out_r.

The query at position p sees the key at m when they share the bucket, m <= p, and m is one of
the chunk_size most recent tokens of that bucket up to p. Plain Reformer instead lets a query
see whatever shares its bucket in its own and the previous chunk; where the chunk boundaries fall
depends on how many later tokens hash to lower buckets, so a query's keys change with future
tokens. The rule here depends on tokens at positions <= p only: the layer is exactly causal, and
decoding with a cache gives the full forward's outputs. Same-bucket tokens are contiguous in the
sorted order, so the allowed keys are the same-bucket ones at most chunk_size - 1 sorted places
behind the query, which its chunk and the one before always hold.

A token attends to itself only when nothing else is allowed (Reformer: q.k with itself would
dominate): SELF_SCORE is added to its score. Reformer replaces the score instead; adding lets the
exact mode run in PyTorch's fused attention with an additive mask, and the probabilities are the
same (zero for the self pair unless it is alone, then one).

Queries at positions below exact_below use exact shared-QK attention over all earlier tokens
instead (LSH costs more than exact attention over short spans). The mode depends on the query's
position only, so a sequence of at most exact_below tokens is exact attention throughout, and no
output depends on the sequence's length or on the size of a decode cache.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from stacklm.errors import UserError
from stacklm.model.attention import (
    DenseQKV,
    EfficientAttentionConfig,
    heads,
    masked_attention,
    position_bias,
    recomputed,
)
from stacklm.model.mup import attention_mult
from stacklm.registry import ATTENTION, option

# Finite, so a query with no other allowed key still attends to itself; far below any q.k / sqrt(hd)
# of a unit key, and within bfloat16 and float16 range. A position bias can go lower (ALiBi's
# steepest head at distances over 2e4), and then the self pair wins over such distant keys.
SELF_SCORE = -1e4


@dataclasses.dataclass
class LSHConfig(EfficientAttentionConfig):
    kind: str = "lsh"
    n_hashes: int = option(4, ge=1, help="hash rounds; each adds a full pass of chunked attention "
                           "(Reformer: 2 rounds lose quality, 4 come close to full attention)")
    n_buckets: int = option(32, ge=1, help="buckets per round, even (or 1: a single bucket); "
                            "Reformer uses about 2 T / chunk_size")
    chunk_size: int = option(64, ge=1, help="a query sees at most this many keys per round: the most "
                             "recent ones in its bucket")
    # 2048: a training step of configs/default.yaml in bf16 on a 2-core CPU took 1.08x full
    # attention's time with LSH at 2048 tokens and 0.95x at 3072 (benchmarks/long_context.py).
    exact_below: int = option(2048, ge=0, help="queries at positions below this attend exactly (shared-QK "
                              "attention over every earlier token); later ones use LSH")
    seed: int = option(0, help="seed of the fixed random rotations that hash the keys")

    def check(self, cfg) -> None:
        if self.qkv != "dense":
            raise UserError(f"model.attention.kind=lsh shares queries and keys; model.attention.qkv "
                            f"must be dense, not {self.qkv}")
        if cfg.position.kind == "xpos":
            raise UserError("model.position.kind=xpos scales queries and keys differently, but "
                            "model.attention.kind=lsh shares them; use rope, alibi, t5, learned or none")
        if self.n_buckets > 1 and self.n_buckets % 2:
            raise UserError(f"model.attention.n_buckets ({self.n_buckets}) must be even or 1: a "
                            "rotation gives n_buckets/2 directions and their opposites")
        super().check(cfg)


class LSHCache:
    """Unit keys, values and, in LSH mode, each key's bucket per round, preallocated to max_len."""

    def __init__(self, batch: int, max_len: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 n_hashes: int | None, dtype: torch.dtype, device):
        self.k = torch.zeros(batch, n_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, n_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.buckets = (None if n_hashes is None else  # int32: half of argmax's int64
                        torch.zeros(batch, n_heads, n_hashes, max_len, dtype=torch.int32, device=device))
        self.max_len = max_len
        self.length = 0  # positions seen so far; the model advances it after each forward
        self.qkv_state = None

    def update(self, k, v, buckets):
        # k: (B, H, T, hd), v: (B, Hkv, T, hd), buckets: (B, H, R, T) or None -> all up to length + T
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"LSH cache holds {self.max_len} positions; {end} requested")
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        if buckets is None:
            return self.k[:, :, :end], self.v[:, :, :end], None
        self.buckets[..., self.length : end] = buckets
        return self.k[:, :, :end], self.v[:, :, :end], self.buckets[..., :end]


@ATTENTION.register("lsh", LSHConfig)
class LSHAttention(nn.Module):
    """Causal shared-QK LSH attention; see the module docstring for the rule a query follows."""

    def __init__(self, options: LSHConfig, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.n_hashes, self.n_buckets = options.n_hashes, options.n_buckets
        self.chunk_size, self.exact_below = options.chunk_size, options.exact_below
        self.proj = DenseQKV(options, cfg, shared_qk=True)
        self.dropout = cfg.dropout
        self.q_mult = attention_mult(cfg)  # muP's 1/head_dim attention; 1 otherwise
        self.recompute = options.recompute
        # Fixed, not redrawn per batch as in Reformer, so decoding hashes a token as training did.
        generator = torch.Generator().manual_seed(options.seed)
        rotations = torch.randn(options.n_hashes, cfg.head_dim, options.n_buckets // 2, generator=generator,
                                device="cpu")  # the generator's device, even under a `with torch.device(...)`
        self.register_buffer("rotations", rotations, persistent=False)  # (R, hd, n_buckets/2)

    def keys_per_query(self, seq_len: int) -> int:
        """Keys a query scores, counting FLOPs as for full attention (PaLM's seq_len): all of
        them up to exact_below tokens; past it, two chunks per round (the exact queries at the
        start of a long sequence are left out of this estimate)."""
        return seq_len if seq_len <= self.exact_below else self.n_hashes * 2 * self.chunk_size

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device) -> LSHCache:
        n_hashes = None if max_len <= self.exact_below else self.n_hashes
        return LSHCache(batch, max_len, self.n_heads, self.n_kv_heads, self.head_dim, n_hashes, dtype, device)

    def forward(self, x: torch.Tensor, position, cache: LSHCache | None = None,
                prefix: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, T, D)
        if prefix is not None:
            raise ValueError("prefix-LM attention needs model.attention.kind=full")
        b, t, _ = x.shape
        start = cache.length if cache is not None else 0
        q, _, v = self.proj(x, None)
        q, v = heads(q, self.n_heads), heads(v, self.n_kv_heads)  # (B, H, T, hd), (B, Hkv, T, hd)
        q, k = position.rotate(q, q, start)
        k = F.normalize(k, dim=-1)
        q = q * self.q_mult if self.q_mult != 1 else q
        # hashes are needed once some query, now or later, is at a position >= exact_below
        hashed = cache.buckets is not None if cache is not None else t > self.exact_below
        buckets = self.hash(k) if hashed else None  # (B, H, R, T)
        if cache is not None:
            k, v, buckets = cache.update(k, v, buckets)  # every position so far: (B, H, start + T, ...)
        y = self.attend(q, k, v, buckets, position)
        return self.proj.out(y.transpose(1, 2).reshape(b, t, -1))

    def hash(self, k: torch.Tensor) -> torch.Tensor:
        """Angular LSH: the bucket of unit key k in round r is argmax([k R_r, -k R_r])."""
        # k: (B, H, T, hd) -> (B, H, R, T)
        b, h, t, _ = k.shape
        if self.n_buckets == 1:
            return torch.zeros(b, h, self.n_hashes, t, dtype=torch.long, device=k.device)
        # float32 even under autocast: bfloat16 would make near-ties, and so bucket flips, common
        with torch.no_grad(), torch.autocast(k.device.type, enabled=False):
            rotated = torch.einsum("bhtd,rdn->bhrtn", k.float(), self.rotations.float())
            return torch.cat((rotated, -rotated), dim=-1).argmax(dim=-1)

    def attend(self, q, k, v, buckets, position) -> torch.Tensor:
        """The queries' attention outputs: exact at positions below exact_below, LSH over the
        rounds from there on (buckets is None when no query gets that far)."""
        # q: (B, H, Tq, hd), the last Tq of the K positions of k: (B, H, K, hd), v: (B, Hkv, K, hd);
        # buckets: (B, H, R, K) or None -> (B, H, Tq, hd)
        t_q, t_k = q.size(2), k.size(2)
        if buckets is None or t_k <= self.exact_below:
            return self.exact(q, k, v, position)
        n_exact = max(0, self.exact_below - (t_k - t_q))  # queries at positions < exact_below
        if n_exact:
            first = t_k - t_q + n_exact
            exact = self.exact(q[:, :, :n_exact], k[:, :, :first], v[:, :, :first], position)
            return torch.cat((exact, self.attend(q[:, :, n_exact:], k, v, buckets, position)), dim=2)
        q = q * q.size(-1) ** -0.5
        if t_q < t_k and t_q <= self.chunk_size:
            return self.decode(q, k, v, buckets, position)
        # One round at a time: the scores, masks and biases in flight before the softmax exist for
        # one round only. Autograd keeps every round's sorted copies and probabilities, unless they
        # are recomputed in the backward pass (then only q, k, v and the buckets are kept).
        rounds = [recomputed(self.chunked, q, k, v, buckets[:, :, r], position, enabled=self.recompute)
                  for r in range(buckets.size(2))]
        y, lse = (torch.stack(parts, dim=2) for parts in zip(*rounds, strict=True))
        return combine(y, lse)

    def exact(self, q, k, v, position) -> torch.Tensor:
        """Shared-QK attention over every earlier key, the mode for short sequences."""
        # q: (B, H, Tq, hd), the last Tq of the K positions of k: (B, H, K, hd), v: (B, Hkv, K, hd)
        # -> (B, H, Tq, hd)
        t_q, t_k = q.size(2), k.size(2)
        positions = torch.arange(t_k, device=q.device)
        q_pos = positions[t_k - t_q :]
        bias = position_bias(position, q_pos.view(1, 1, -1), positions.view(1, 1, -1))  # (1, H, Tq, K)
        mask = torch.zeros(t_q, t_k, dtype=q.dtype, device=q.device) if bias is None else bias.to(q.dtype)
        mask = mask.masked_fill(positions > q_pos[:, None], float("-inf"))
        mask = torch.where(positions == q_pos[:, None], mask + SELF_SCORE, mask)
        v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # as many heads as the keys
        return masked_attention(q, k, v, mask, self.dropout if self.training else 0.0)

    def decode(self, q, k, v, buckets, position) -> torch.Tensor:
        """LSH for a few queries after a cached prefix (decoding): scoring them against every
        cached key costs less than sorting all K positions again. Each round masks the scores to
        the allowed keys: the chunk_size most recent of the query's bucket."""
        # q: (B, H, Tq, hd) scaled, the last Tq of the K positions of k: (B, H, K, hd), v: (B, Hkv, K, hd);
        # buckets: (B, H, R, K) -> (B, H, Tq, hd)
        t_q, t_k = q.size(2), k.size(2)
        positions = torch.arange(t_k, device=q.device)
        q_pos = positions[t_k - t_q :]
        scores = q @ k.transpose(-1, -2)  # (B, H, Tq, K)
        bias = position_bias(position, q_pos.view(1, 1, -1), positions.view(1, 1, -1))
        if bias is not None:
            scores = scores + bias.to(scores.dtype)
        causal = positions <= q_pos[:, None]  # (Tq, K)
        same = (buckets[..., t_k - t_q :, None] == buckets[..., None, :]) & causal  # (B, H, R, Tq, K)
        seen = same.cumsum(dim=-1, dtype=torch.int32)  # same-bucket keys at positions <= m
        allowed = same & (seen[..., -1:] - seen < self.chunk_size)  # fewer than chunk_size after m
        probs, lse = MaskedSoftmax.apply(scores.unsqueeze(2), allowed, positions == q_pos[:, None])
        v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1).unsqueeze(2)  # (B, H, 1, K, hd)
        return combine(F.dropout(probs, self.dropout, self.training) @ v, lse)

    def chunked(self, q, k, v, buckets, position) -> tuple[torch.Tensor, torch.Tensor]:
        """One hash round: sort by (bucket, position), attend within chunk_size-sized chunks of the
        sorted order and the chunk before, and return the outputs and log-sum-exps in position order."""
        # q: (B, H, Tq, hd) scaled, the last Tq of the K positions of k: (B, H, K, hd), v: (B, Hkv, K, hd);
        # buckets: (B, H, K) -> y (B, H, Tq, hd), lse (B, H, Tq)
        c, t_k = self.chunk_size, k.size(2)
        cached, pad = t_k - q.size(2), -t_k % c
        q = F.pad(q, (0, 0, cached, pad))  # cached positions get zero queries, their outputs unused
        k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
        buckets = F.pad(buckets, (0, pad), value=self.n_buckets)  # padding: a bucket of its own, sorted last
        sorted_buckets, order = buckets.sort(dim=-1, stable=True)  # (B, H, L): by bucket, then position
        n = order.size(-1) // c
        sorted_place = order.argsort(dim=-1)  # (B, H, L): where each position went
        # (B, H, n, c, hd): chunk i holds sorted places i c ... (i + 1) c - 1
        sq, sk, sv = (Permute.apply(x, order, sorted_place).unflatten(2, (n, c)) for x in (q, k, v))
        scores = sq @ look_back(sk).transpose(-1, -2)  # (B, H, n, c, 2c)
        q_pos = order.unflatten(2, (n, c))
        bias = position_bias(position, q_pos, look_back(q_pos))
        if bias is not None:
            scores += bias.to(scores.dtype)
        q_bucket = sorted_buckets.unflatten(2, (n, c))
        k_bucket = look_back(q_bucket)
        k_bucket[:, :, 0, :c] = -1  # chunk 0 has no chunk before it
        # sorted places from key j of the window back to query a of the chunk: (c, 2c)
        behind = c + torch.arange(c, device=q.device)[:, None] - torch.arange(2 * c, device=q.device)
        allowed = (behind >= 0) & (behind < c) & (q_bucket[..., :, None] == k_bucket[..., None, :])
        probs, lse = MaskedSoftmax.apply(scores, allowed, behind == 0)
        y = F.dropout(probs, self.dropout, self.training) @ look_back(sv)  # (B, H, n, c, hd)
        y = Permute.apply(y.flatten(2, 3), sorted_place, order)[:, :, cached:t_k]
        lse = Permute.apply(lse.flatten(2, 3).unsqueeze(-1), sorted_place, order)[:, :, cached:t_k, 0]
        return y, lse


class MaskedSoftmax(torch.autograd.Function):
    """Softmax over the allowed keys with SELF_SCORE added to the self pair's score, and its
    log-sum-exp (in float32 at least). Saves only the probabilities: d lse / d scores = probs."""

    @staticmethod
    def forward(ctx, scores, allowed, is_self):
        # scores: (..., Tq, Tk); allowed and is_self (the query-itself pairs): boolean, broadcast
        # to scores (a tensor, not a diagonal offset, so a compiled decode step fits every length)
        ctx.shape = scores.shape  # allowed may have more rounds than scores
        scores = torch.where(allowed, scores, float("-inf"))
        scores += is_self.to(scores.dtype) * SELF_SCORE
        probs = scores.softmax(dim=-1)
        ctx.save_for_backward(probs)
        # probs_j = exp(s_j - lse) at the top score j: lse = top - log(max probs), which is >= 1 / Tk.
        # The self pair is always allowed, so top is finite.
        acc = torch.promote_types(scores.dtype, torch.float32)
        lse = scores.amax(dim=-1).to(acc) - probs.amax(dim=-1).to(acc).log()
        return probs, lse

    @staticmethod
    def backward(ctx, grad_probs, grad_lse):
        (probs,) = ctx.saved_tensors
        # d probs_j / d s_i = probs_j (delta_ij - probs_i), d lse / d s_i = probs_i
        grad = grad_probs * probs
        inner = grad.sum(dim=-1, keepdim=True) - grad_lse.unsqueeze(-1).to(grad.dtype)
        grad.addcmul_(probs, inner, value=-1)
        return grad.sum_to_size(ctx.shape), None, None


def combine(y: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Rounds weighted by their share of the attention mass: sum_r softmax_r(lse_r) y_r."""
    # y: (B, H, R, T, hd), lse: (B, H, R, T) -> (B, H, T, hd)
    return (y * lse.softmax(dim=2).unsqueeze(-1).to(y.dtype)).sum(dim=2)


def look_back(x: torch.Tensor) -> torch.Tensor:
    """Per chunk, the previous chunk's entries then its own; chunk 0 gets the last chunk's, which
    the bucket mask hides."""
    # x: (B, H, n, c, ...) -> (B, H, n, 2c, ...)
    return torch.cat((x.roll(1, dims=2), x), dim=3)


class Permute(torch.autograd.Function):
    """x's rows in the order `index`, a permutation of the positions; the gradient goes back through
    the inverse permutation, a gather too (index_select's own backward is a slow scatter-add)."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        # x: (B, Hx, L, d), index, inverse: (B, H, L) -> (B, H, L, d)
        ctx.save_for_backward(inverse)
        ctx.groups = index.size(1) // x.size(1)
        return gather_positions(x, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        grad = gather_positions(grad, inverse)
        return grad.unflatten(1, (-1, ctx.groups)).sum(dim=2), None, None  # GQA: sum the sharing heads


def gather_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of x at positions `index`, query head h reading x's head h // (H / Hx) (GQA)."""
    # x: (B, Hx, L, d), index: (B, H, N) -> (B, H, N, d)
    b, hx, length, d = x.shape
    h = index.size(1)
    heads = torch.arange(h, device=x.device) // (h // hx)
    rows = torch.arange(b, device=x.device)[:, None] * hx + heads  # (B, H)
    flat = (rows[..., None] * length + index).flatten()
    return x.reshape(-1, d).index_select(0, flat).view(*index.shape, d)

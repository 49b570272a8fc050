"""Position encodings, chosen by `model.position.kind`. Built as POSITION.build(options, model_config).

A position module may act in three places; each hook defaults to doing nothing:
- `embed(x, start)`: add to the token embeddings (absolute positions: `learned`),
- `rotate(q, k, start)`: transform queries and keys (rotary positions: `rope`, `xpos`),
- `bias(distance)`: an additive attention-score bias from the query position minus the key
  position (relative positions: `alibi`, `t5`). Attention kinds compute the distances of the
  pairs they score (all pairs, a sliding window, LSH chunks), so a bias never needs a dense
  (T, T) matrix. `distance` is an integer tensor shaped (B or 1, H or 1, ..., Tq, Tk); the bias
  comes back shaped (B or 1, H, ..., Tq, Tk).
`start` is the absolute position of the first token of x (non-zero while decoding with a cache).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from stacklm.errors import UserError
from stacklm.registry import POSITION, ComponentConfig, option


@dataclasses.dataclass
class NoPositionConfig(ComponentConfig):
    kind: str = "none"


@dataclasses.dataclass
class RoPEConfig(ComponentConfig):
    kind: str = "rope"
    theta: float = option(10000.0, gt=0.0, help="base of the rotary frequencies")
    scaling: str = option("none", choices=("none", "linear", "ntk"), help="stretch RoPE past the "
                          "training length: linear divides positions by factor (position interpolation, "
                          "Chen et al. 2023); ntk raises theta by factor^(d/(d-2)) (NTK-aware scaling)")
    factor: float = option(1.0, ge=1.0, help="scaling factor, about (target length) / (training length)")

    def check(self, cfg) -> None:
        if cfg.head_dim % 2:
            raise UserError(f"model.position.kind={self.kind} needs an even head dim; "
                            f"d_model/n_heads = {cfg.head_dim}")


@dataclasses.dataclass
class XPosConfig(RoPEConfig):
    kind: str = "xpos"
    scale_base: float = option(512.0, gt=0.0, help="positions over which the xPos decay acts (paper: 512)")
    gamma: float = option(0.4, gt=0.0, help="zeta_i = (i / (d/2) + gamma) / (1 + gamma) (paper: 0.4)")

    def check(self, cfg) -> None:
        super().check(cfg)
        # The query and key factors reach zeta_0^(+-max_seq_len / (2 scale_base)); past e^(+-80)
        # they leave float32's (and bfloat16's) range.
        exponent = cfg.max_seq_len / (2 * self.scale_base) * math.log((1 + self.gamma) / self.gamma)
        if exponent > 80:
            longest = int(2 * self.scale_base * 80 / math.log((1 + self.gamma) / self.gamma))
            raise UserError(f"model.position.kind=xpos with scale_base={self.scale_base:g} covers at most "
                            f"{longest} positions in float32 (model.max_seq_len is {cfg.max_seq_len}); "
                            f"raise model.position.scale_base")


@dataclasses.dataclass
class LearnedConfig(ComponentConfig):
    kind: str = "learned"


@dataclasses.dataclass
class ALiBiConfig(ComponentConfig):
    kind: str = "alibi"


@dataclasses.dataclass
class T5BiasConfig(ComponentConfig):
    kind: str = "t5"
    num_buckets: int = option(32, ge=2, help="learned bias values per head")
    max_distance: int = option(128, ge=2, help="distances from here on share the last bucket")
    bidirectional: bool = option(False, help="separate buckets for keys after the query (encoders)")

    def check(self, cfg) -> None:
        exact = self.num_buckets // (4 if self.bidirectional else 2)
        if exact < 1 or self.max_distance <= exact:
            raise UserError(f"model.position.max_distance ({self.max_distance}) must exceed the "
                            f"{exact} exactly-bucketed distances of num_buckets={self.num_buckets}")


@POSITION.register("none", NoPositionConfig)
class Position(nn.Module):
    """No position information (NoPE): causal attention alone orders the tokens."""

    has_bias = False  # whether `bias` returns a tensor; attention skips the distances otherwise
    # whether attention sees positions only through their differences, so that a sequence packed
    # after others in a row (its positions shifted) is read as if it stood alone; a new kind that
    # uses absolute positions must set it False (as `learned` does), or packed rows will differ
    relative = True

    def __init__(self, options: ComponentConfig, cfg):
        super().__init__()

    def embed(self, x: torch.Tensor, start: int) -> torch.Tensor:
        return x

    def rotate(self, q: torch.Tensor, k: torch.Tensor, start: int):
        return q, k

    def bias(self, distance: torch.Tensor) -> torch.Tensor | None:
        return None


@POSITION.register("learned", LearnedConfig)
class LearnedPosition(Position):
    """A learned vector per absolute position added to the token embedding (GPT-2). Positions the
    training never reached keep their random initialisation, so the model does not extrapolate."""

    relative = False

    def __init__(self, options: ComponentConfig, cfg):
        super().__init__(options, cfg)
        self.table = nn.Embedding(cfg.max_seq_len, cfg.d_model)

    def embed(self, x: torch.Tensor, start: int) -> torch.Tensor:
        # x: (B, T, D)
        return x + self.table.weight[start : start + x.size(1)]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) for the two halves of the last dim of x."""
    # x: (..., T, hd); cos, sin: (T, hd/2)
    x1, x2 = x.chunk(2, dim=-1)
    if torch.compiler.is_compiling():  # Inductor fuses this into one kernel (and cannot trace out=)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    # Eager PyTorch would make a full-size temporary per operation; write into one buffer instead.
    out = torch.empty_like(x)
    o1, o2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin)
    return out


class Rotate(torch.autograd.Function):
    """`rotate` with autograd. The map is s * R(angle) per pair (s = 1 for RoPE, xPos's scale
    otherwise); its transpose, the gradient, is s * R(-angle): `rotate` with -sin."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return rotate(grad, cos, -sin), None, None


@POSITION.register("rope", RoPEConfig)
class RotaryPosition(Position):
    """RoPE (Su et al. 2021): rotate each (i, i + d/2) pair of q and k by angle pos * theta^(-2i/d).

    The pairs are the two halves of the head, the layout Llama checkpoints use, so weights move
    to and from Hugging Face without permutation.
    """

    def __init__(self, options: RoPEConfig, cfg):
        super().__init__(options, cfg)
        hd = cfg.head_dim
        theta = options.theta * (options.factor ** (hd / (hd - 2)) if options.scaling == "ntk" else 1.0)
        inv_freq = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        positions = torch.arange(cfg.max_seq_len, dtype=torch.float64)
        if options.scaling == "linear":
            positions = positions / options.factor
        angles = torch.outer(positions, inv_freq)  # (max_seq_len, hd/2)
        q_scale, k_scale = self.scales(options, cfg)
        self.register_buffer("q_cos", (angles.cos() * q_scale).float(), persistent=False)
        self.register_buffer("q_sin", (angles.sin() * q_scale).float(), persistent=False)
        self.register_buffer("k_cos", (angles.cos() * k_scale).float(), persistent=False)
        self.register_buffer("k_sin", (angles.sin() * k_scale).float(), persistent=False)

    def scales(self, options, cfg) -> tuple[float | torch.Tensor, float | torch.Tensor]:
        """Per-position, per-pair factors on the rotated queries and keys (none for RoPE)."""
        return 1.0, 1.0

    def rotate(self, q: torch.Tensor, k: torch.Tensor, start: int):
        # q: (B, H, T, hd), k: (B, Hkv, T, hd)
        t = q.size(-2)
        window = slice(start, start + t)
        q = Rotate.apply(q, self.q_cos[window].to(q.dtype), self.q_sin[window].to(q.dtype))
        k = Rotate.apply(k, self.k_cos[window].to(k.dtype), self.k_sin[window].to(k.dtype))
        return q, k


@POSITION.register("xpos", XPosConfig)
class XPos(RotaryPosition):
    """xPos (Sun et al. 2022, "A Length-Extrapolatable Transformer"): RoPE with the query at
    position n scaled by zeta^(n / scale_base) and the key at m by zeta^(-m / scale_base), so the
    score of pair i decays as zeta_i^((n - m) / scale_base), zeta_i = (2i/d + gamma) / (1 + gamma).

    Only n - m matters, so positions are counted from the middle of max_seq_len: the factors stay
    within zeta^(+-max_seq_len / (2 scale_base)) instead of growing without bound with n.
    """

    def scales(self, options: XPosConfig, cfg):
        hd = cfg.head_dim
        zeta = (torch.arange(0, hd, 2, dtype=torch.float64) / hd + options.gamma) / (1 + options.gamma)
        centred = torch.arange(cfg.max_seq_len, dtype=torch.float64) - cfg.max_seq_len // 2
        power = centred[:, None] / options.scale_base  # (max_seq_len, 1)
        return zeta ** power, zeta ** -power


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Press et al.'s head slopes: the geometric sequence 2^(-8/n), 2^(-16/n), ..., 2^(-8) for n
    a power of two; otherwise those of the power of two below n, then every other slope of the
    power of two above it."""
    def geometric(n: int) -> list[float]:
        return [2 ** (-8 * (i + 1) / n) for i in range(n)]

    below = 2 ** math.floor(math.log2(n_heads))
    slopes = geometric(below) + geometric(2 * below)[0::2][: n_heads - below]
    return torch.tensor(slopes)


def per_head(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values (H, N) looked up at index (B|1, H|1, ...) for each head -> (B|1, H, ...)."""
    heads = torch.arange(values.size(0), device=index.device).view(1, -1, *[1] * (index.dim() - 2))
    return values[heads, index]


@POSITION.register("alibi", ALiBiConfig)
class ALiBi(Position):
    """ALiBi (Press et al. 2022): score bias -m_h * |n - m|, a fixed slope m_h per head."""

    has_bias = True

    def __init__(self, options: ALiBiConfig, cfg):
        super().__init__(options, cfg)
        self.register_buffer("slopes", alibi_slopes(cfg.n_heads), persistent=False)

    def bias(self, distance: torch.Tensor) -> torch.Tensor:
        # distance: (B|1, H|1, ..., Tq, Tk) -> (B|1, H, ..., Tq, Tk)
        slopes = self.slopes.view(1, -1, *[1] * (distance.dim() - 2))
        return -slopes * distance.abs()


@POSITION.register("t5", T5BiasConfig)
class T5RelativeBias(Position):
    """T5's relative attention bias (Raffel et al. 2020): a learned scalar per head and distance
    bucket, shared by all layers. Half the buckets hold distances 0, 1, 2, ... exactly; the rest
    grow logarithmically up to max_distance. Bidirectional splits the buckets between keys before
    and after the query."""

    has_bias = True
    no_weight_decay = ("table",)

    def __init__(self, options: T5BiasConfig, cfg):
        super().__init__(options, cfg)
        self.options = options
        self.table = nn.Parameter(torch.zeros(cfg.n_heads, options.num_buckets))  # (H, buckets)

    def buckets(self, distance: torch.Tensor) -> torch.Tensor:
        n_buckets, max_distance = self.options.num_buckets, self.options.max_distance
        offset = torch.zeros_like(distance)
        if self.options.bidirectional:
            n_buckets //= 2
            offset = (distance < 0).long() * n_buckets  # keys after the query
            distance = distance.abs()
        else:
            distance = distance.clamp(min=0)
        exact = n_buckets // 2
        large = exact + (torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                         * (n_buckets - exact)).long()
        return offset + torch.where(distance < exact, distance, large.clamp(max=n_buckets - 1))

    def bias(self, distance: torch.Tensor) -> torch.Tensor:
        # distance: (B|1, H|1, ..., Tq, Tk) -> (B|1, H, ..., Tq, Tk)
        return per_head(self.table, self.buckets(distance))

"""UL2's mixture of denoisers (Tay et al. 2022, "UL2: Unifying Language Learning Paradigms"): the
span-corruption data transforms it is made of.

A denoiser corrupts spans of a token sequence and asks the model to restore them:
- R (regular): T5's span corruption, short spans, 15% of the tokens;
- X (extreme): long spans or a high corruption rate;
- S (sequential): prefix-LM, one span running from a random split point to the end.
Inputs keep the uncorrupted tokens with each corrupted span replaced by one sentinel
(<extra_id_0>, <extra_id_1>, ...); targets list each sentinel followed by the span it stands for.
`fill_sentinels` undoes `span_corrupt`, so the pair loses nothing.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import torch

from stacklm.errors import UserError
from stacklm.registry import OBJECTIVE, ComponentConfig, option


def random_partition(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """`total` items cut into `parts` non-empty runs at random: their lengths, summing to total."""
    cuts = np.sort(rng.choice(total - 1, parts - 1, replace=False) + 1)
    return np.diff(np.concatenate(([0], cuts, [total])))


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
    """T5's random-spans noise mask (Raffel et al. 2020): a boolean array of `length`, True on
    round(length * noise_density) tokens (at least 1, at most length - 1) that form
    round(noise / mean_noise_span_length) spans (at least 1), alternating with as many runs of kept
    tokens; the first token is always kept. Span and gap lengths are uniformly random partitions."""
    n = max(length, 2)
    noise = min(max(round(n * noise_density), 1), n - 1)
    spans = min(max(round(noise / mean_noise_span_length), 1), noise, n - noise)
    kept, noisy = random_partition(n - noise, spans, rng), random_partition(noise, spans, rng)
    lengths = np.stack((kept, noisy), axis=1).flatten()  # kept, noise, kept, noise, ...
    return np.repeat(np.tile([False, True], spans), lengths)[:length]


def prefix_noise_mask(length: int, rng: np.random.Generator) -> np.ndarray:
    """The S-denoiser's mask: one span from a uniformly random split point (1 ... length - 1) to
    the end, so the model continues a prefix."""
    split = int(rng.integers(1, max(length, 2)))
    return np.arange(length) >= split


def span_corrupt(tokens: np.ndarray, mask: np.ndarray, sentinels: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Inputs with each masked span replaced by the next sentinel, and targets: each sentinel then
    its span. Raises UserError when there are more spans than sentinels."""
    first = mask & ~np.concatenate(([False], mask[:-1]))  # the first token of each span
    n_spans = int(first.sum())
    if n_spans > len(sentinels):
        raise UserError(f"{n_spans} corrupted spans but only {len(sentinels)} sentinel tokens; "
                        f"raise data.sentinel_tokens or lower the span count")
    marks = np.asarray(sentinels[:n_spans], dtype=tokens.dtype)
    inputs = tokens.copy()
    inputs[first] = marks
    targets = np.insert(tokens[mask], np.flatnonzero(first[mask]), marks)
    return inputs[~mask | first], targets


def fill_sentinels(inputs: np.ndarray, targets: np.ndarray, sentinels: list[int]) -> np.ndarray:
    """The original tokens from `span_corrupt`'s inputs and targets."""
    is_mark = np.isin(targets, sentinels)
    spans = np.split(targets, np.flatnonzero(is_mark)[1:])  # each starts with its sentinel
    fill = {int(span[0]): span[1:] for span in spans if len(span)}
    return np.concatenate([fill[int(t)] if int(t) in fill else [t] for t in inputs]).astype(inputs.dtype)


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """One UL2 denoiser: `mode` R, X or S (its paradigm token [NLU], [NLG] or [S2S]), and for R and
    X the mean span length and the corrupted share of the tokens."""

    mode: str
    mean_span: float = 3.0
    corruption: float = 0.15
    weight: float = 1.0

    @property
    def name(self) -> str:
        return "S" if self.mode == "S" else f"{self.mode}({self.mean_span:g}, {self.corruption:g})"

    def mask(self, length: int, rng: np.random.Generator) -> np.ndarray:
        if self.mode == "S":
            return prefix_noise_mask(length, rng)
        return random_spans_noise_mask(length, self.corruption, self.mean_span, rng)


MODE_TOKEN = {"R": "[NLU]", "X": "[NLG]", "S": "[S2S]"}

# The UL2 paper's mixture (section 3.1.2 and table 6): two R, four X and one S denoiser. S takes 20%
# and the six others share the rest equally, the reading of UL2 reimplementations.
UL2_MIXTURE = (Denoiser("R", 3, 0.15, 0.8 / 6), Denoiser("R", 8, 0.15, 0.8 / 6),
               Denoiser("X", 3, 0.5, 0.8 / 6), Denoiser("X", 8, 0.5, 0.8 / 6),
               Denoiser("X", 64, 0.15, 0.8 / 6), Denoiser("X", 64, 0.5, 0.8 / 6),
               Denoiser("S", weight=0.2))
# UL2R (Tay et al. 2022, "Transcending Scaling Laws with 0.1% Extra Compute"), for continued
# training of a causal model: 50% S, 25% R(3, 0.15), 25% X(32, 0.5).
UL2R_MIXTURE = (Denoiser("S", weight=0.5), Denoiser("R", 3, 0.15, 0.25), Denoiser("X", 32, 0.5, 0.25))


def sample_denoiser(mixture: tuple[Denoiser, ...], rng: np.random.Generator) -> Denoiser:
    weights = np.array([d.weight for d in mixture], dtype=np.float64)
    return mixture[int(rng.choice(len(mixture), p=weights / weights.sum()))]


@dataclasses.dataclass
class PrefixLMConfig(ComponentConfig):
    kind: str = "prefix_lm"

    def check(self, cfg) -> None:
        needs_full_attention(self.kind, cfg)


@dataclasses.dataclass
class SpanCorruptionConfig(ComponentConfig):
    kind: str = "span_corruption"
    noise_density: float = option(0.15, gt=0.0, lt=1.0, help="share of the tokens corrupted (T5: 0.15)")
    mean_noise_span_length: float = option(3.0, ge=1.0, help="mean corrupted span length (T5: 3)")

    def check(self, cfg) -> None:
        needs_full_attention(self.kind, cfg)


@dataclasses.dataclass
class UL2Config(ComponentConfig):
    kind: str = "ul2"
    mixture: str = option("ul2", choices=("ul2", "ul2r"), help="ul2: the paper's seven denoisers; ul2r: "
                          "UL2R's 50% S, 25% R(3, 0.15), 25% X(32, 0.5), for continued training of a causal model")
    mode_tokens: bool = option(True, help="start each example with its paradigm token [NLU], [NLG] or [S2S]")

    def check(self, cfg) -> None:
        needs_full_attention(self.kind, cfg)


def needs_full_attention(kind: str, cfg) -> None:
    attention = cfg.attention
    if attention.kind != "full":
        raise UserError(f"train.objective.kind={kind} attends both ways over its inputs (a prefix LM), "
                        f"which model.attention.kind={attention.kind} cannot; use full")


@OBJECTIVE.register("prefix_lm", PrefixLMConfig)
@OBJECTIVE.register("span_corruption", SpanCorruptionConfig)
@OBJECTIVE.register("ul2", UL2Config)
class Denoising:
    """Denoising objectives for a decoder-only model, in the prefix-LM layout: each window becomes
    [mode token] inputs targets, the model attends both ways over the first part (the prefix) and
    causally over the targets, and the loss covers the targets only. `prefix_lm` is the S-denoiser
    alone, `span_corruption` T5's objective (one R-denoiser), `ul2` a mixture drawn per example.

    An example's denoiser and mask come from a generator seeded by the window's tokens: the same
    batch is corrupted the same way on every run, so resuming a run is exact without saving state.
    """

    def __init__(self, options: ComponentConfig, tokenizer, mixture: tuple[Denoiser, ...] | None = None):
        if mixture is not None:  # e.g. one denoiser, to score it alone
            self.mixture = mixture
        elif options.kind == "prefix_lm":
            self.mixture = (Denoiser("S"),)
        elif options.kind == "span_corruption":
            self.mixture = (Denoiser("R", options.mean_noise_span_length, options.noise_density),)
        else:
            self.mixture = UL2_MIXTURE if options.mixture == "ul2" else UL2R_MIXTURE
        use_modes = getattr(options, "mode_tokens", False)
        self.modes = {mode: tokenizer.token_id(token) for mode, token in MODE_TOKEN.items()} if use_modes else None
        self.sentinels = tokenizer.sentinel_ids
        self.pad_id = tokenizer.pad_id

    def example(self, window: np.ndarray, denoiser: Denoiser, rng: np.random.Generator):
        """One window (N tokens) -> (tokens (N,), prefix length, loss mask (N,)): [mode] inputs
        targets, the raw text shortened until the sentinels fit, padded to N."""
        n, head = len(window), int(self.modes is not None)
        raw = n - head
        while raw > 2 and denoiser.mode != "S" and head + raw + 2 * expected_spans(raw, denoiser) > n:
            raw -= 1
        tokens = window[:raw]
        mask = denoiser.mask(raw, rng)
        if denoiser.mode == "S":  # a prefix and its continuation: no sentinels needed
            inputs, targets = tokens[~mask], tokens[mask]
        else:
            inputs, targets = span_corrupt(tokens, mask, self.sentinels)
        parts = ([np.array([self.modes[denoiser.mode]], dtype=window.dtype)] if head else []) + [inputs, targets]
        sequence = np.concatenate(parts)
        out = np.full(n, self.pad_id, dtype=window.dtype)
        out[: len(sequence)] = sequence
        loss = np.zeros(n, dtype=bool)
        loss[head + len(inputs) : len(sequence)] = True
        return out, head + len(inputs), loss

    def batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T + 1) windows -> model inputs (B, T), targets (B, T) with -100 off the loss, prefix (B,)."""
        rows = batch.cpu().numpy()
        examples = []
        for row in rows:
            rng = np.random.default_rng(zlib.crc32(row.tobytes()))
            examples.append(self.example(row, sample_denoiser(self.mixture, rng), rng))
        tokens = torch.from_numpy(np.stack([e[0] for e in examples]).astype(np.int64))
        loss = torch.from_numpy(np.stack([e[2] for e in examples]))
        prefix = torch.tensor([e[1] for e in examples])
        targets = tokens[:, 1:].masked_fill(~loss[:, 1:], -100)
        device = batch.device
        return tokens[:, :-1].to(device), targets.to(device), prefix.to(device)

    def loss(self, model, batch: torch.Tensor) -> torch.Tensor:
        # batch: (B, T + 1) token ids
        inputs, targets, prefix = self.batch(batch)
        return model(inputs, targets=targets, prefix=prefix)


def expected_spans(length: int, denoiser: Denoiser) -> int:
    """The span count random_spans_noise_mask gives for `length` tokens (it is not random)."""
    n = max(length, 2)
    noise = min(max(round(n * denoiser.corruption), 1), n - 1)
    return min(max(round(noise / denoiser.mean_span), 1), noise, n - noise)

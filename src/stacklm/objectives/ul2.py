"""UL2's mixture of denoisers (Tay et al. 2022, "UL2: Unifying Language Learning Paradigms"): the
span-corruption data transforms it is made of.

A denoiser corrupts spans of a token sequence and asks the model to restore them:
- R (regular): T5's span corruption, short spans, 15% of the tokens;
- X (extreme): long spans or a high corruption rate;
- S (sequential): prefix-LM, one span running from a random split point to the end;
- C (causal, not one of the paper's): plain next-token prediction, the whole window as the
  target, for mixtures that keep a share of causal-LM examples (as CodeGen2, Nijkamp et al.
  2023, trains on a mixture of causal-LM and span-corruption examples).
Inputs keep the uncorrupted tokens with each corrupted span replaced by one sentinel
(<extra_id_0>, <extra_id_1>, ...); targets list each sentinel followed by the span it stands for.
`fill_sentinels` undoes `span_corrupt`, so the pair loses nothing.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import numpy as np
import torch

from stacklm.errors import UserError
from stacklm.model.loss import IGNORE_INDEX
from stacklm.objectives.causal import Objective
from stacklm.registry import OBJECTIVE, POSITION, QKV, ComponentConfig, option


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
    noise, spans = noise_counts(n, noise_density, mean_noise_span_length)
    kept, noisy = random_partition(n - noise, spans, rng), random_partition(noise, spans, rng)
    lengths = np.stack((kept, noisy), axis=1).flatten()  # kept, noise, kept, noise, ...
    return np.repeat(np.tile([False, True], spans), lengths)[:length]


def noise_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """The noise tokens and spans random_spans_noise_mask makes of `length` tokens (not random)."""
    n = max(length, 2)
    noise = min(max(round(n * noise_density), 1), n - 1)
    return noise, min(max(round(noise / mean_noise_span_length), 1), noise, n - noise)


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
    """One UL2 denoiser: `mode` R, X, S or C (its paradigm token [NLU], [NLG], [S2S] or, for C,
    [S2S] too: a prefix LM with an empty prefix), and for R and X the mean span length and the
    corrupted share of the tokens."""

    mode: str = option("R", choices=("R", "X", "S", "C"), help="R: regular span corruption; X: extreme "
                       "(long spans or much corruption); S: sequential (prefix LM); C: causal LM, the "
                       "whole window as the target")
    mean_span: float = option(3.0, ge=1.0, help="R, X: mean corrupted span length")
    corruption: float = option(0.15, gt=0.0, lt=1.0, help="R, X: share of the tokens corrupted")
    weight: float = option(1.0, gt=0.0, help="relative frequency in the mixture")

    @property
    def name(self) -> str:
        return self.mode if self.mode in ("S", "C") else f"{self.mode}({self.mean_span:g}, {self.corruption:g})"

    def mask(self, length: int, rng: np.random.Generator) -> np.ndarray:
        if self.mode == "S":
            return prefix_noise_mask(length, rng)
        if self.mode == "C":
            return np.ones(length, dtype=bool)
        return random_spans_noise_mask(length, self.corruption, self.mean_span, rng)


MODE_TOKEN = {"R": "[NLU]", "X": "[NLG]", "S": "[S2S]", "C": "[S2S]"}

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
class DenoisingConfig(ComponentConfig):
    """Options every denoising objective shares."""

    pack: bool = option(True, help="encoder-decoder: put several examples in one row (each reads "
                        "only its own input), so that short inputs and targets waste no padding; "
                        "needs full decoder attention, relative positions and per-position q/k/v "
                        "projections, padded otherwise (docs/ul2.md)")


@dataclasses.dataclass
class PrefixLMConfig(DenoisingConfig):
    kind: str = "prefix_lm"

    def check(self, cfg) -> None:
        needs_full_attention(self.kind, cfg)


@dataclasses.dataclass
class SpanCorruptionConfig(DenoisingConfig):
    kind: str = "span_corruption"
    noise_density: float = option(0.15, gt=0.0, lt=1.0, help="share of the tokens corrupted (T5: 0.15)")
    mean_noise_span_length: float = option(3.0, ge=1.0, help="mean corrupted span length (T5: 3)")

    def check(self, cfg) -> None:
        needs_full_attention(self.kind, cfg)


@dataclasses.dataclass
class UL2Config(DenoisingConfig):
    kind: str = "ul2"
    mixture: str = option("ul2", choices=("ul2", "ul2r"), help="ul2: the paper's seven denoisers; ul2r: "
                          "UL2R's 50% S, 25% R(3, 0.15), 25% X(32, 0.5), for continued training of a causal model")
    denoisers: list[Denoiser] | None = option(None, help="the mixture itself, replacing `mixture`'s: a "
                                              "list of {mode, mean_span, corruption, weight}; "
                                              "denoisers.N.field=value changes entry N of `mixture`'s")
    mode_tokens: bool = option(True, help="start each example with its paradigm token [NLU], [NLG] or [S2S]")

    @staticmethod
    def default_denoisers(raw: dict) -> tuple[Denoiser, ...]:
        """The list `denoisers.N.field=value` changes: the `mixture` preset's."""
        return UL2R_MIXTURE if raw.get("mixture") == "ul2r" else UL2_MIXTURE

    def check(self, cfg) -> None:
        needs_full_attention(self.kind, cfg)
        if cfg.arch == "encoder_decoder" and not self.mode_tokens and any(d.mode == "C" for d in self.denoisers or ()):
            # a batch of C examples alone would leave the encoder unused (and DDP waiting on its gradients)
            raise UserError("train.objective.denoisers: a C (causal) example's encoder input is its mode token "
                            "alone; with mode_tokens=false an encoder-decoder would read nothing. Set "
                            "train.objective.mode_tokens=true, or leave C out")


def needs_full_attention(kind: str, cfg) -> None:
    attention = cfg.attention
    if cfg.arch == "decoder" and attention.kind != "full":  # an encoder attends both ways anyway
        raise UserError(f"train.objective.kind={kind} attends both ways over its inputs (a prefix LM), "
                        f"which model.attention.kind={attention.kind} cannot; use full, or "
                        f"model.arch=encoder_decoder (its encoder reads the inputs)")


@OBJECTIVE.register("prefix_lm", PrefixLMConfig)
@OBJECTIVE.register("span_corruption", SpanCorruptionConfig)
@OBJECTIVE.register("ul2", UL2Config)
class Denoising(Objective):
    """Denoising objectives: `prefix_lm` is the S-denoiser alone, `span_corruption` T5's objective
    (one R-denoiser), `ul2` a mixture drawn per example. Each window becomes inputs and targets
    (`corrupt`), laid out for the model's architecture:

    - decoder-only, the prefix-LM layout: [mode] inputs targets, attending both ways over the
      prefix ([mode] inputs) and causally over the targets, the loss on the targets only;
    - encoder-decoder: the encoder reads [mode] inputs, the decoder <eos> targets (<eos> starts a
      document), the loss on the targets.

    An example's denoiser and mask come from a generator seeded by the window's tokens: the same
    batch is corrupted the same way on every run, so resuming a run is exact without saving state.
    """

    prefix_lm = True

    def __init__(self, options: ComponentConfig, tokenizer, model_config,
                 mixture: tuple[Denoiser, ...] | None = None):
        if mixture is not None:  # e.g. one denoiser, to score it alone
            self.mixture = mixture
        elif options.kind == "prefix_lm":
            self.mixture = (Denoiser("S"),)
        elif options.kind == "span_corruption":
            self.mixture = (Denoiser("R", options.mean_noise_span_length, options.noise_density),)
        elif options.denoisers:
            self.mixture = tuple(options.denoisers)
        else:
            self.mixture = UL2_MIXTURE if options.mixture == "ul2" else UL2R_MIXTURE
        use_modes = getattr(options, "mode_tokens", False)
        self.modes = {mode: tokenizer.token_id(token) for mode, token in MODE_TOKEN.items()} if use_modes else None
        self.sentinels = tokenizer.sentinel_ids
        self.pad_id, self.eos_id = tokenizer.pad_id, tokenizer.eos_id
        self.encoder_decoder = model_config.arch == "encoder_decoder"
        self.pack = self.encoder_decoder and getattr(options, "pack", False) and packable(model_config)
        self.max_width, self.d_model = model_config.max_seq_len, model_config.d_model

    def head(self, denoiser: Denoiser) -> list[int]:
        """The tokens an example's inputs start with: its paradigm token, if mode tokens are on."""
        return [self.modes[denoiser.mode]] if self.modes is not None else []

    def corrupt(self, window: np.ndarray, denoiser: Denoiser, rng: np.random.Generator,
                fits) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and targets from the longest start of `window` whose counts (raw length, noise
        tokens, spans) `fits`: S splits it in a prefix and its continuation (no sentinels), C makes
        all of it the target, R and X replace spans by sentinels (`span_corrupt`)."""
        raw = len(window)
        if denoiser.mode != "S":
            def counts(r: int) -> tuple[int, int]:  # noise tokens and sentinels
                return (r, 0) if denoiser.mode == "C" else noise_counts(r, denoiser.corruption, denoiser.mean_span)
            while raw > 2 and not fits(raw, *counts(raw)):
                raw -= 1
        tokens = window[:raw]
        mask = denoiser.mask(raw, rng)
        if denoiser.mode in ("S", "C"):
            return tokens[~mask], tokens[mask]
        return span_corrupt(tokens, mask, self.sentinels)

    def example(self, window: np.ndarray, denoiser: Denoiser, rng: np.random.Generator):
        """Decoder-only: one window (N tokens) -> (tokens (N,), prefix length, loss mask (N,)):
        [mode] inputs targets, the raw text shortened until the sentinels fit, padded to N."""
        n, head = len(window), self.head(denoiser)
        # inputs and targets hold the raw tokens and a sentinel per span each
        inputs, targets = self.corrupt(window[: n - len(head)], denoiser, rng,
                                       lambda raw, noise, spans: len(head) + raw + 2 * spans <= n)
        sequence = np.concatenate([np.array(head, dtype=window.dtype), inputs, targets])
        out = np.full(n, self.pad_id, dtype=window.dtype)
        out[: len(sequence)] = sequence
        loss = np.zeros(n, dtype=bool)
        loss[len(head) + len(inputs) : len(sequence)] = True
        return out, len(head) + len(inputs), loss

    def encoder_decoder_example(self, window: np.ndarray, denoiser: Denoiser,
                                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Encoder-decoder: one window (N tokens) -> the encoder's [mode] inputs (at most N - 1
        tokens, the model's input length) and the decoder's <eos> targets (at most N)."""
        n, head = len(window), self.head(denoiser)
        # encoder: the kept tokens and a sentinel per span; decoder: the noise and a sentinel per span
        inputs, targets = self.corrupt(
            window[: n - len(head)], denoiser, rng,
            lambda raw, noise, spans: len(head) + raw - noise + spans < n and 1 + noise + spans <= n)
        encoder = np.concatenate([np.array(head, dtype=window.dtype), inputs])
        decoder = np.concatenate([np.array([self.eos_id], dtype=window.dtype), targets])
        return encoder, decoder

    def batch(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, T + 1) windows -> the model's inputs: idx (B, T) and targets (B, T) with -100 off
        the loss, and prefix (B,) (decoder-only) or encoder_ids (B, S) and encoder_lengths (B,)."""
        rows = batch.cpu().numpy()
        draws = []
        for row in rows:
            rng = np.random.default_rng(zlib.crc32(row.tobytes()))
            draws.append((row, sample_denoiser(self.mixture, rng), rng))
        if self.encoder_decoder:
            return self.encoder_decoder_batch([self.encoder_decoder_example(*d) for d in draws], batch.device)
        examples = [self.example(*d) for d in draws]
        tokens = torch.from_numpy(np.stack([e[0] for e in examples]).astype(np.int64))
        loss = torch.from_numpy(np.stack([e[2] for e in examples]))
        prefix = torch.tensor([e[1] for e in examples])
        targets = tokens[:, 1:].masked_fill(~loss[:, 1:], IGNORE_INDEX)
        device = batch.device
        return {"idx": tokens[:, :-1].to(device), "targets": targets.to(device), "prefix": prefix.to(device)}

    def encoder_decoder_batch(self, examples: list[tuple[np.ndarray, np.ndarray]], device) -> dict[str, torch.Tensor]:
        """(encoder, decoder sequence) pairs -> idx (B, T) and targets (B, T), the decoder sequences
        shifted by one, and encoder_ids (B, S) with encoder_lengths (B,); packed, when that saves
        rows, fewer rows with segments (R, T) and encoder_segments (R, S) too (`packed_batch`)."""
        if self.pack:
            sizes = [(len(enc), len(dec) - 1) for enc, dec in examples]  # decoder: inputs, one fewer
            rows, width_enc, width_dec = pack_rows(sizes, self.max_width, self.d_model)
            if len(rows) < len(examples):  # else packing saves no positions, and padding needs no masks
                return self.packed_batch(examples, rows, width_enc, width_dec, device)
        # each side is padded to its longest example in the batch, not to the window: an R example's
        # decoder holds a fifth of the window, an S example's encoder a random share
        encoder = pad([e[0] for e in examples], self.pad_id)
        decoder = pad([e[1] for e in examples], self.pad_id)
        lengths = torch.tensor([len(e[0]) for e in examples])
        decoder_lengths = torch.tensor([len(e[1]) for e in examples])
        real = torch.arange(decoder.size(1) - 1)[None, :] < (decoder_lengths[:, None] - 1)
        targets = decoder[:, 1:].masked_fill(~real, IGNORE_INDEX)
        return {"idx": decoder[:, :-1].to(device), "targets": targets.to(device),
                "encoder_ids": encoder.to(device), "encoder_lengths": lengths.to(device)}

    def packed_batch(self, examples: list[tuple[np.ndarray, np.ndarray]], rows: list[list[int]],
                     width_enc: int, width_dec: int, device) -> dict[str, torch.Tensor]:
        """The examples laid out in `pack_rows`'s rows: each row holds one or more examples one
        after the other on both sides, and `segments` (R, T) and `encoder_segments` (R, S) number
        them 1, 2, ... in the row (0: padding). The model lets each decoder segment attend only
        within itself and to its own encoder segment, so the loss and its gradient are those of
        the padded batch (MoE layers aside: they route the two layouts differently)."""
        encoder = np.full((len(rows), width_enc), self.pad_id, dtype=np.int64)
        encoder_segments = np.zeros((len(rows), width_enc), dtype=np.int64)
        idx = np.full((len(rows), width_dec), self.pad_id, dtype=np.int64)
        targets = np.full((len(rows), width_dec), IGNORE_INDEX, dtype=np.int64)
        segments = np.zeros((len(rows), width_dec), dtype=np.int64)
        for r, row in enumerate(rows):
            at_enc = at_dec = 0
            for segment, i in enumerate(row, start=1):
                enc, dec = examples[i]
                n_enc, n_dec = len(enc), len(dec) - 1
                encoder[r, at_enc : at_enc + n_enc] = enc
                encoder_segments[r, at_enc : at_enc + n_enc] = segment
                idx[r, at_dec : at_dec + n_dec] = dec[:-1]
                targets[r, at_dec : at_dec + n_dec] = dec[1:]
                segments[r, at_dec : at_dec + n_dec] = segment
                at_enc, at_dec = at_enc + n_enc, at_dec + n_dec
        batch = {"idx": idx, "targets": targets, "segments": segments, "encoder_ids": encoder,
                 "encoder_segments": encoder_segments}
        return {k: torch.from_numpy(v).to(device) for k, v in batch.items()}

    def mode_head(self) -> list[int]:
        """The S-denoiser's paradigm token ([S2S]) if mode tokens are on: S and C examples start
        with it, so a decoder-only model reads plain text after it, and an encoder reads a
        system prompt after it."""
        return self.head(Denoiser("S"))


def packable(cfg) -> bool:
    """Whether an encoder-decoder's examples can share rows, each read as if it stood alone: its
    decoder attention takes a mask (full), its positions are relative, and its q, k, v projections
    read one position at a time (not the Scaling Transformer's convolution)."""
    position = POSITION.module_class(cfg.position.kind, "model.position.kind")
    qkv = QKV.module_class(cfg.attention.qkv, "model.attention.qkv")
    return cfg.attention.kind == "full" and position.relative and getattr(qkv, "per_position", False)


# Packed rows are at most this many times the largest example wide, as the attention's memory
# grows with the square of the width: fewer rows of at most 3x the width hold at most about 2.4x the
# padded batch's scores. On UL2's mixture (30 batches of 16 windows, d_model 256) a cap of 2 left
# 4% more positions than 3, and 4 chose no wider rows than 3.
ROW_WIDTH = 3


def pack_rows(sizes: list[tuple[int, int]], max_width: int, d_model: int) -> tuple[list[list[int]], int, int]:
    """Examples of (encoder, decoder) sizes grouped in rows: the examples of each row in order,
    and the rows' encoder and decoder widths. For up to 16 counts of rows the widths are the
    sizes' sums shared out evenly, and 10% and 25% more (at least the largest example, at most
    ROW_WIDTH times it and `max_width`); the examples go in first-fit decreasing, and the layout that costs
    least wins: positions, each weighted by one plus the attention's share of a position's work,
    about width / (6 d_model) (PaLM's count: 4 width d_model FLOPs against 24 d_model^2)."""
    # two capacities per row, each with its own width: no bin-packing library takes that, and
    # first-fit decreasing is a few lines
    enc, dec = np.array(sizes, dtype=np.int64).reshape(-1, 2).T
    cap_enc, cap_dec = min(max_width, ROW_WIDTH * int(enc.max())), min(max_width, ROW_WIDTH * int(dec.max()))
    if enc.max() > max_width or dec.max() > max_width:
        raise ValueError(f"an example of {enc.max()} + {dec.max()} tokens exceeds the width {max_width}")
    order = np.argsort(-(enc + dec), kind="stable")
    fewest = max(math.ceil(enc.sum() / cap_enc), math.ceil(dec.sum() / cap_dec))
    best = None
    for n_rows in np.unique(np.linspace(fewest, len(sizes), 16).round().astype(int)):
        for slack in (1.0, 1.1, 1.25):
            width_enc = min(cap_enc, max(int(enc.max()), math.ceil(slack * enc.sum() / n_rows)))
            width_dec = min(cap_dec, max(int(dec.max()), math.ceil(slack * dec.sum() / n_rows)))
            rows = first_fit(order, enc, dec, width_enc, width_dec)
            attention = (width_enc * width_enc + width_dec * (width_enc + width_dec)) / (6 * d_model)
            cost = len(rows) * (width_enc + width_dec + attention)
            if best is None or cost < best[0]:
                best = (cost, rows, width_enc, width_dec)
    return best[1], best[2], best[3]


def first_fit(order: np.ndarray, enc: np.ndarray, dec: np.ndarray, width_enc: int, width_dec: int) -> list[list[int]]:
    """The examples in `order`, each into the first row with room on both sides, or a new row."""
    rows: list[list[int]] = []
    room = np.empty((len(order), 2), dtype=np.int64)  # each row's room left, encoder and decoder
    for i in order.tolist():
        fits = np.flatnonzero((room[: len(rows), 0] >= enc[i]) & (room[: len(rows), 1] >= dec[i]))
        r = int(fits[0]) if len(fits) else len(rows)
        if r == len(rows):
            rows.append([])
            room[r] = (width_enc, width_dec)
        rows[r].append(i)
        room[r] -= (enc[i], dec[i])
    return rows


def pad(rows: list[np.ndarray], value: int) -> torch.Tensor:
    """Rows of different lengths -> (len(rows), longest) int64, padded with `value` on the right."""
    out = np.full((len(rows), max(len(r) for r in rows)), value, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return torch.from_numpy(out)

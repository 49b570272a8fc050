"""UL2 against plain causal-LM training at the same compute, decoder-only and encoder-decoder
(issue 6).

Five models on configs/default.yaml (same width, seed, batches of windows and steps):

- causal:       decoder-only, L layers, `train.objective.kind=causal`;
- ul2:          decoder-only, L layers, the paper's mixture in the prefix-LM layout;
- encdec-ul2:   encoder-decoder, L encoder + L decoder layers, the same mixture;
- encdec-span:  encoder-decoder, L + L layers, T5's span corruption (R(3, 0.15));
- ul2-causal:   decoder-only, L layers, half the examples plain causal LM (the C denoiser), half
                the paper's mixture at half its weights (a causal + span-corruption mixture, as
                CodeGen2 trains on).

An encoder-decoder with L + L layers has twice the parameters of the L-layer decoder and about its
FLOPs per token, each token going through one of the two stacks (T5, Raffel et al. 2020, section
3.2.2 and table 2). Its batches leave some padding (packed since 2026-12-01,
`train.objective.pack`; each side padded to its longest example before, as in the table of
2026-11-29 in docs/benchmarks.md), so the table gives each model's training FLOPs per window,
padding included, measured on 256 held-out windows.

Reported, all on held-out windows of 256 tokens:
- causal loss: next-token loss over the window, each model in its language-model mode
  (`stacklm.evaluate.NextToken`): a decoder-only UL2 model reads the [S2S] mode token before the
  window (its S and C examples start with it), an encoder-decoder's decoder reads an empty
  encoder input (nothing but [S2S] when the run uses mode tokens);
- continuation loss: the loss on the second half of each window given the first
  (`stacklm.evaluate.Continuation`): the causal model reads the first half as causal context, the
  decoder-only UL2 models as the S-denoiser's prefix ([S2S], then both ways), the
  encoder-decoders in their encoder;
- infilling, two ways, each scoring the first corrupted span of N held-out windows: exact match
  of the whole span, and the share of its tokens right. The causal model continues the span's
  left context greedily; the denoising models read the corrupted window ([NLU] then the window
  with a sentinel per span, as a prefix or in the encoder) and fill <extra_id_0>'s span greedily.
  - T5 spans: the window's tokens after the 64th corrupted as R(3, 0.15) corrupts in training
    (`random_spans_noise_mask`), about 10 spans; the first is scored;
  - one span: a single span of 1-3 tokens, 64-192 tokens in. No denoiser trains on one short span
    in a long input, and models trained on R's several spans do worse on it: on a synthetic corpus
    where each word names the next (`benchmarks/ul2_synthetic.py`), a span-corruption model filled
    52% of the first spans in windows corrupted at R's density and 27.5% of single spans. Kept for
    comparison with the earlier runs.

Headlines, for each UL2 model: causal loss / the causal model's (target <= 1.03) and T5-span
infilling exact match - the causal model's (target: clearly > 0).

    python -m benchmarks.ul2 [--quick] [--reuse] [--out runs/ul2] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import stacklm
from benchmarks.common import QUICK_MODEL, headline, load_average, machine, table, train_variants
from stacklm.data import prepare_data
from stacklm.evaluate import Continuation, evaluate
from stacklm.inference import generate
from stacklm.objectives.ul2 import UL2_MIXTURE, random_spans_noise_mask, span_corrupt
from stacklm.registry import OBJECTIVE

WINDOW = 256
HALF = WINDOW // 2


def variants() -> dict[str, list[str]]:
    half = ", ".join(f"{{mode: {d.mode}, mean_span: {d.mean_span}, corruption: {d.corruption}, weight: {d.weight / 2}}}"
                     for d in UL2_MIXTURE)
    return {"causal": ["train.objective.kind=causal"], "ul2": ["train.objective.kind=ul2"],
            "encdec-ul2": ["model.arch=encoder_decoder", "train.objective.kind=ul2"],
            "encdec-span": ["model.arch=encoder_decoder", "train.objective.kind=span_corruption"],
            "ul2-causal": ["train.objective.kind=ul2", f"train.objective.denoisers=[{{mode: C, weight: 0.5}}, {half}]"]}


def windows(store, n: int, rng: np.random.Generator) -> np.ndarray:
    """n held-out windows of WINDOW + 1 tokens, (n, WINDOW + 1) int64."""
    chunks = store.chunk_table(WINDOW)
    picks = rng.choice(int(chunks[-1]), size=n, replace=int(chunks[-1]) < n)
    return np.stack([store.window(int(i), WINDOW, chunks).astype(np.int64) for i in picks])


@torch.no_grad()
def window_flops(model, objective, rows: np.ndarray) -> float:
    """Training FLOPs per window of WINDOW tokens, padding included, over batches of 16 `rows`
    (an encoder-decoder's as `objective` lays them out: packed or padded)."""
    if model.config.arch == "decoder":
        return model.flops_per_token(WINDOW) * WINDOW
    total = 0.0
    for i in range(0, len(rows), 16):
        batch = objective.batch(torch.from_numpy(rows[i : i + 16]))
        # every query scores the row's keys: wider rows cost more attention per position
        encoder, decoder = model.stack_flops(batch["encoder_ids"].size(1), batch["idx"].size(1))
        total += 3 * (encoder * batch["encoder_ids"].numel() + decoder * batch["idx"].numel())
    return total / len(rows)


@torch.no_grad()
def greedy(model, tokens: list[int], n: int, prefix: int | None) -> list[int]:
    out = []
    for _ in range(n):
        ids = torch.tensor([tokens + out])
        logits = model(ids, prefix=None if prefix is None else torch.tensor([prefix]))
        out.append(int(logits[0, -1].argmax()))
    return out


def one_span(length: int, rng: np.random.Generator) -> np.ndarray:
    """A mask of `length` with one span of 1-3 tokens, 64-192 tokens in."""
    mask = np.zeros(length, dtype=bool)
    start = int(rng.integers(64, 192))
    mask[start : start + int(rng.integers(1, 4))] = True
    return mask


def t5_spans(length: int, rng: np.random.Generator) -> np.ndarray:
    """A mask of `length` whose tokens after the 64th are corrupted as R(3, 0.15) corrupts them."""
    mask = np.zeros(length, dtype=bool)
    mask[64:] = random_spans_noise_mask(length - 64, 0.15, 3.0, rng)
    return mask


def infill_cases(store, n: int, rng: np.random.Generator) -> dict[str, list]:
    """n held-out windows of WINDOW tokens, each with a mask per layout: {layout: [(window, mask)]}."""
    picked = [torch.from_numpy(w[:WINDOW]) for w in windows(store, n, rng)]
    return {layout: [(w, masks(WINDOW, rng)) for w in picked]
            for layout, masks in (("one span", one_span), ("T5 spans", t5_spans))}


def infill(run, objective, cases) -> tuple[float, float]:
    """Exact match and token accuracy of the first corrupted span of each (window, mask) case."""
    tok, kind = run.tokenizer, run.config.train.objective.kind
    s0 = tok.sentinel_id(0)
    modes = [tok.token_id("[NLU]")] if getattr(run.config.train.objective, "mode_tokens", False) else []
    exact, right, total = 0, 0, 0
    for window, mask in cases:
        start = int(np.argmax(mask))
        length = int(np.argmin(mask[start:])) or len(mask) - start  # to the first kept token
        span, left = window[start : start + length].tolist(), window[:start].tolist()
        corrupted, _ = span_corrupt(window.numpy(), mask, tok.sentinel_ids)
        inputs = [*modes, *corrupted.tolist()]  # the span-corruption layout the model was trained on
        if kind == "causal":
            guess = greedy(run.model, left, length, None)
        elif run.config.model.arch == "decoder":
            guess = greedy(run.model, inputs + [s0], length, prefix=len(inputs))
        else:
            out = generate(run.model, torch.tensor([[tok.eos_id, s0]]), length, temperature=0.0,
                           encoder_ids=torch.tensor([inputs]))
            guess = out[0, 2:].tolist()
        exact += guess == span
        right += sum(g == s for g, s in zip(guess, span, strict=True))
        total += length
    return exact / len(cases), right / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"smaller models ({' '.join(QUICK_MODEL)}), 100 spans")
    parser.add_argument("--reuse", action="store_true", help="score the runs already in --out")
    parser.add_argument("--out", default="runs/ul2")
    parser.add_argument("--spans", type=int, default=None, help="infilling cases (default 400)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for every model (after --quick's), e.g. a larger run on a GPU: "
                             "--set model.d_model=512 model.n_layers=8 train.steps=20000")
    args = parser.parse_args()
    print(f"machine: {machine()}; load average {load_average()}")
    out = Path(args.out)
    names = variants()
    train_variants(out, names, args.quick, args.reuse, args.set)
    rng = np.random.default_rng(0)
    rows, scores, flops, cases, held_out = [], {}, {}, None, None
    for name in names:
        run = stacklm.load_run(out / name)
        objective = OBJECTIVE.build(run.config.train.objective, run.tokenizer, run.config.model)
        data = prepare_data(run.config.data, run.config.model.vocab_size, run.tokenizer, progress=False,
                            log=lambda m: None)
        if cases is None:
            held_out = windows(data.val, 256, rng)
            cases = infill_cases(data.val, args.spans or (100 if args.quick else 400), rng)
        cpu, head = torch.device("cpu"), objective.mode_head()
        causal = evaluate(run.model, data.val, WINDOW, 16, 40, cpu, head=head)["loss"]
        layout = Continuation(run.config.model, run.tokenizer.eos_id, head, prefix_lm=objective.prefix_lm)
        continuation = evaluate(run.model, data.val, WINDOW, 16, 40, cpu, objective=layout)["loss"]
        filled = {layout: infill(run, objective, layout_cases) for layout, layout_cases in cases.items()}
        scores[name] = (causal, filled["T5 spans"][0])
        flops[name] = window_flops(run.model, objective, held_out)
        rows.append([name, f"{flops[name] / 1e9:.2f}", f"{flops[name] / flops['causal']:.2f}", f"{causal:.4f}",
                     f"{continuation:.4f}", *(f"{v:.3f}" for layout in cases for v in filled[layout])])
        print(rows[-1], flush=True)
    print(table(rows, ["model", "train GFLOPs/window", "vs causal", "causal loss", "continuation loss",
                       "one span: exact", "token acc", "T5 spans: exact", "token acc"]))
    print(f"{len(cases['T5 spans'])} windows, the first span scored; load average {load_average()}")
    for name, where, prefix in (("ul2", "decoder-only", ""), ("encdec-ul2", "encoder-decoder", "encdec_"),
                                ("ul2-causal", "decoder-only, half causal examples", "half_causal_")):
        headline(f"{prefix}causal_loss_ratio", scores[name][0] / scores["causal"][0], 1.03,
                 f"UL2 ({where}) / causal-LM held-out next-token loss, same steps")
        headline(f"{prefix}infill_gain", scores[name][1] - scores["causal"][1], 0.0,
                 f"UL2 ({where}) - causal-LM infilling exact match (first of T5's spans, share of windows)")


if __name__ == "__main__":
    main()

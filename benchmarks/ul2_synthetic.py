"""Can a span-corruption model infill at all? A synthetic check of the UL2 pipeline (issue 6).

The corpus: documents of 24 words in a fixed cyclic order of 64 made-up words, from a random
start, then " | " and the same 24 words again. Each word names the next, so a missing span follows
from the word before it: a causal model learns the rule at once, and a denoiser needs only to
find its sentinel in the input and read the word before it. Two decoder-only models of the same
size train on it for the same steps: `causal` and `span_corruption` (T5's R(3, 0.15), the
prefix-LM layout). Both are scored as benchmarks/ul2.py scores infilling, on held-out windows of
256 tokens, the first corrupted span of each:

- T5 spans: the window after its 64th token corrupted as R(3, 0.15) corrupts it in training;
- one span: a single span of 1-3 tokens, 64-192 tokens in.

A denoiser that fills the first but not the second has learned its task but not the one-span
case, which no denoiser trains on.

    python -m benchmarks.ul2_synthetic [--quick] [--out runs/ul2_synthetic]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

import stacklm
from benchmarks.common import headline, load_average, machine, table
from benchmarks.ul2 import WINDOW, infill, infill_cases
from stacklm.data import prepare_data
from stacklm.registry import OBJECTIVE

WORDS = [consonant + vowel for consonant in "bcdfghklmnprstvz" for vowel in "aeiou"][:64]


def document(rng: random.Random) -> str:
    start = rng.randrange(len(WORDS))
    words = " ".join(WORDS[(start + i) % len(WORDS)] for i in range(24))
    return f"{words} | {words}"


def write_corpus(path: Path, n: int = 20000) -> None:
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": document(rng)}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300 steps in place of 2000, 50 windows")
    parser.add_argument("--out", default="runs/ul2_synthetic")
    args = parser.parse_args()
    print(f"machine: {machine()}; load average {load_average()}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.jsonl"
    write_corpus(corpus)
    steps, n_windows = (300, 50) if args.quick else (2000, 200)
    common = [f"data.source={corpus}", "model.vocab_size=512", "model.d_model=128", "model.n_layers=4",
              "model.n_heads=4", f"model.max_seq_len={2 * WINDOW}", f"data.seq_len={WINDOW}",
              "data.sentinel_tokens=32", f"train.steps={steps}", "train.batch_size=8", "train.lr=2e-3",
              "train.warmup_steps=30", "train.eval_every=0", "train.ckpt_every=0", "train.progress=false",
              "eval.sample_tokens=0", "train.dtype=float32"]
    rows, exact = [], {}
    rng = np.random.default_rng(0)
    cases = None
    for kind in ("causal", "span_corruption"):
        run_dir = out / kind
        config = stacklm.Config.load("configs/tiny.yaml", [*common, f"train.objective.kind={kind}",
                                                            f"train.out_dir={run_dir}"])
        stacklm.train(config, overwrite=True, log=lambda m: None)
        run = stacklm.load_run(run_dir)
        objective = OBJECTIVE.build(run.config.train.objective, run.tokenizer, run.config.model)
        if cases is None:
            data = prepare_data(run.config.data, run.config.model.vocab_size, run.tokenizer, progress=False,
                                log=lambda m: None)
            cases = infill_cases(data.val, n_windows, rng)
        filled = {layout: infill(run, objective, layout_cases) for layout, layout_cases in cases.items()}
        exact[kind] = {layout: v[0] for layout, v in filled.items()}
        rows.append([kind, *(f"{v:.3f}" for layout in ("T5 spans", "one span") for v in filled[layout])])
        print(rows[-1], flush=True)
    print(table(rows, ["model", "T5 spans: exact", "token acc", "one span: exact", "token acc"]))
    print(f"{steps} steps each; {n_windows} held-out windows of {WINDOW} tokens; load average {load_average()}")
    for layout in ("T5 spans", "one span"):
        metric = layout.replace(" ", "_").lower()
        headline(f"span_corruption_infill_{metric}", exact["span_corruption"][layout], None,
                 f"exact match of the first span ({layout}), span-corruption model, synthetic corpus")
        headline(f"causal_infill_{metric}", exact["causal"][layout], None,
                 f"exact match of the first span ({layout}), causal model, synthetic corpus")


if __name__ == "__main__":
    main()

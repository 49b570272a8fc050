"""UL2 against plain causal-LM training at the same compute, decoder-only (issue 6; the
encoder-decoder rows come with the encoder-decoder model).

Two models, configs/default.yaml (same size, seed, batches and steps), trained with
`train.objective.kind` causal and ul2 (the paper's mixture, prefix-LM layout). Reported:

- held-out causal loss: next-token loss on the validation split, the same for both;
- infilling: N spans of 1-3 tokens cut from held-out windows of 256 tokens, 64-192 tokens in.
  The causal model continues the left context greedily; the UL2 model reads
  [NLU] left <extra_id_0> right, then after <extra_id_0> fills the span greedily. Exact match
  of the whole span, and the share of span tokens right.

causal_loss_ratio = UL2 causal loss / causal model's (target <= 1.03), infill_gain = UL2 exact
match - causal exact match (target: clearly > 0).

    python -m benchmarks.ul2 [--quick] [--reuse] [--out runs/ul2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import stacklm
from benchmarks.common import headline, load_average, machine, table, train_variants
from stacklm.data import prepare_data
from stacklm.evaluate import evaluate

OBJECTIVES = ("causal", "ul2")
WINDOW = 256


def spans(store, n: int, rng: np.random.Generator) -> list[tuple[np.ndarray, int, int]]:
    """(window, start, length) of n spans from held-out windows."""
    table = store.chunk_table(WINDOW)
    picks = rng.choice(int(table[-1]), size=n, replace=int(table[-1]) < n)
    return [(store.window(int(i), WINDOW, table)[:WINDOW].astype(np.int64), int(rng.integers(64, 192)),
             int(rng.integers(1, 4))) for i in picks]


@torch.no_grad()
def greedy(model, tokens: list[int], n: int, prefix: int | None) -> list[int]:
    out = []
    for _ in range(n):
        ids = torch.tensor([tokens + out])
        logits = model(ids, prefix=None if prefix is None else torch.tensor([prefix]))
        out.append(int(logits[0, -1].argmax()))
    return out


def infill(run, cases, objective: str) -> tuple[float, float]:
    tok = run.tokenizer
    exact, right, total = 0, 0, 0
    for window, start, length in cases:
        span = window[start : start + length].tolist()
        left, rest = window[:start].tolist(), window[start + length :].tolist()
        if objective == "causal":
            guess = greedy(run.model, left, length, None)
        else:  # the span-corruption layout the model was trained on
            s0 = tok.sentinel_id(0)
            inputs = [tok.token_id("[NLU]"), *left, s0, *rest]
            guess = greedy(run.model, inputs + [s0], length, prefix=len(inputs))
        exact += guess == span
        right += sum(g == s for g, s in zip(guess, span, strict=True))
        total += length
    return exact / len(cases), right / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2-layer, 128-wide models, 100 steps, 100 spans")
    parser.add_argument("--reuse", action="store_true", help="score the runs already in --out")
    parser.add_argument("--out", default="runs/ul2")
    parser.add_argument("--spans", type=int, default=None, help="infilling cases (default 400)")
    args = parser.parse_args()
    print(f"machine: {machine()}; load average {load_average()}")
    out = Path(args.out)
    train_variants(out, {objective: [f"train.objective.kind={objective}"] for objective in OBJECTIVES},
                   args.quick, args.reuse)
    cases = None
    rows, scores = [], {}
    for objective in OBJECTIVES:
        run = stacklm.load_run(out / objective)
        data = prepare_data(run.config.data, run.config.model.vocab_size, run.tokenizer, progress=False,
                            log=lambda m: None)
        cases = cases or spans(data.val, args.spans or (100 if args.quick else 400), np.random.default_rng(0))
        causal = evaluate(run.model, data.val, WINDOW, 16, 40, torch.device("cpu"))["loss"]
        exact, token_acc = infill(run, cases, objective)
        scores[objective] = (causal, exact)
        rows.append([objective, f"{causal:.4f}", f"{exact:.3f}", f"{token_acc:.3f}"])
        print(rows[-1], flush=True)
    print(table(rows, ["objective", "held-out causal loss", "infill exact match", "infill token accuracy"]))
    print(f"{len(cases)} spans of 1-3 tokens; load average {load_average()}")
    headline("causal_loss_ratio", scores["ul2"][0] / scores["causal"][0], 1.03,
             "UL2 / causal-LM held-out next-token loss, decoder-only, same steps")
    headline("infill_gain", scores["ul2"][1] - scores["causal"][1], 0.0,
             "UL2 - causal-LM infilling exact match (share of spans), decoder-only")


if __name__ == "__main__":
    main()

"""Length extrapolation: models trained at context 256 on the default corpus with each position
kind (rope, xpos, alibi, learned, none), then scored at 256, 512, 1024 and 2048 tokens (8x).

Every model has the same size, seed, batches and steps (configs/default.yaml, max_seq_len 2048
so learned positions have rows past 256 - rows that training never reaches). Perplexity at a
length is Press et al.'s non-overlapping evaluation: the same held-out tokens cut into windows
of that length, every token scored once, in float32. Two training-free variants are scored too,
set at evaluation time only: RoPE with NTK-aware scaling (factor = longest / 256) and xPos in a
256-token sliding window (local attention; the xPos paper's blockwise-causal evaluation is the
same idea).

extrapolation_4x = min over xPos and ALiBi of ppl(1024) / ppl(256). The runs stay in --out, and
--reuse scores runs already there without training again.

    python -m benchmarks.extrapolation [--quick] [--reuse] [--out runs/extrapolation]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import stacklm
from benchmarks.common import headline, load_average, machine, table, train_variants
from stacklm.data import prepare_data
from stacklm.evaluate import context_sweep
from stacklm.plots import line_plot

CPU = torch.device("cpu")  # load_run's default; evaluation in float32
TRAIN_LEN = 256
KINDS = ("rope", "xpos", "alibi", "learned", "none")


def score(out: Path, contexts: list[int], tokens: int) -> dict[str, list[dict]]:
    longest = max(contexts)
    variants = {kind: (kind, []) for kind in KINDS}
    variants[f"rope + ntk x{longest // TRAIN_LEN}"] = (
        "rope", ["model.position.scaling=ntk", f"model.position.factor={longest // TRAIN_LEN}"])
    variants[f"xpos + local {TRAIN_LEN}"] = (
        "xpos", ["model.attention.kind=local", f"model.attention.window={TRAIN_LEN}"])
    sweeps = {}
    for name, (kind, overrides) in variants.items():
        run = stacklm.load_run(out / kind, overrides=overrides)
        data = prepare_data(run.config.data, run.config.model.vocab_size, run.tokenizer, progress=False,
                            log=lambda m: None)
        sweeps[name] = context_sweep(run.model, data.val, contexts, tokens, 16 * TRAIN_LEN, CPU)
        print(f"{name}: " + ", ".join(f"{r['context']}: {r['ppl']:.2f}" for r in sweeps[name]), flush=True)
    return sweeps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 2-layer, 128-wide model, 100 steps; up to 4x")
    parser.add_argument("--reuse", action="store_true", help="score the runs already in --out")
    parser.add_argument("--out", default="runs/extrapolation", help="where the runs, context.json and .png go")
    parser.add_argument("--tokens", type=int, default=None, help="tokens scored at each length")
    args = parser.parse_args()
    print(f"machine: {machine()}; load average {load_average()}")
    out = Path(args.out)
    contexts = [TRAIN_LEN * f for f in ((1, 2, 4) if args.quick else (1, 2, 4, 8))]
    train_variants(out, {kind: [f"model.position.kind={kind}", "model.max_seq_len=2048", f"data.seq_len={TRAIN_LEN}"]
                         for kind in KINDS}, args.quick, args.reuse)
    sweeps = score(out, contexts, args.tokens or (32768 if args.quick else 65536))
    (out / "context.json").write_text(json.dumps(sweeps, indent=2))
    line_plot(out / "context.png", {name: ([r["context"] for r in rows], [r["ppl"] for r in rows])
                                    for name, rows in sweeps.items()},
              "evaluation context (tokens)", "perplexity", f"Trained at {TRAIN_LEN} tokens", logx=True)
    rows = [[name] + [f"{r['ppl']:.2f}" for r in rs] + [f"{rs[2]['ppl'] / rs[0]['ppl']:.3f}"]
            for name, rs in sweeps.items()]
    print(table(rows, ["position", *(str(c) for c in contexts), "ppl@4x / ppl@1x"]))
    print(f"wrote {out / 'context.json'} and {out / 'context.png'}; load average {load_average()}")
    ratio = min(sweeps[k][2]["ppl"] / sweeps[k][0]["ppl"] for k in ("xpos", "alibi"))
    headline("extrapolation_4x", ratio, 1.10, "best of xPos/ALiBi: perplexity at 4x / at 1x the training length")


if __name__ == "__main__":
    main()

"""muTransfer (issue 7): does the best learning rate stay put as the model widens?

The same learning-rate sweep at several widths, once under the standard parametrization and once
under muP with base_width the narrowest width (`stacklm.sweep`: every point a normal run
directory; a second call resumes the sweep). configs/default.yaml with 2 layers and short runs
(the claim is about where the optimum sits, which short runs show, Yang et al. 2022 figure 4).

Headlines:
- mup_lr_shift: under muP, the largest distance (in grid steps of 2x) of any width's best learning
  rate from the narrowest width's (target <= 1 over an 8x width range); standard_lr_shift the same
  under the standard parametrization, for comparison;
- mup_transfer_loss_ratio: the widest muP model's loss at the learning rate transferred from the
  narrowest width / the widest standard model's loss at its own best learning rate (target <= 1).

    python -m benchmarks.mup_transfer [--quick] [--out runs/mup_transfer]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from benchmarks.common import headline, load_average, machine, table
from stacklm.plots import line_plots
from stacklm.sweep import best_lr, run_sweep

FULL = {"widths": [64, 128, 256, 512], "lrs": [2.0**-e for e in range(11, 1, -1)],
        "overrides": ["model.n_layers=2", "data.seq_len=128", "train.steps=200", "train.warmup_steps=20",
                      "train.batch_size=16"]}
QUICK = {"widths": [32, 64, 128], "lrs": [2.0**-e for e in range(9, 4, -1)],
         "overrides": ["model.n_layers=2", "data.seq_len=64", "train.steps=60", "train.warmup_steps=6",
                       "train.batch_size=8", "train.eval_batches=4"]}
COMMON = ["train.progress=false", "eval.sample_tokens=0", "train.eval_every=0", "train.ckpt_every=0",
          "model.n_heads=4"]


def lr_shift(rows: list[dict], widths: list[int]) -> float:
    """Max over widths of |log2(best lr) - log2(best lr at the narrowest width)|: grid steps of 2x."""
    best = best_lr(rows)
    return max(abs(math.log2(best[w] / best[widths[0]])) for w in widths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 widths (4x range), 5 learning rates, 60 steps")
    parser.add_argument("--out", default="runs/mup_transfer")
    args = parser.parse_args()
    grid = QUICK if args.quick else FULL
    widths, lrs = grid["widths"], grid["lrs"]
    print(f"machine: {machine()}; load average {load_average()}")
    out = Path(args.out) / ("quick" if args.quick else "full")
    results = {}
    for parametrization in ("standard", "mup"):
        overrides = [*grid["overrides"], *COMMON, f"model.parametrization={parametrization}",
                     f"model.base_width={widths[0]}"]
        results[parametrization] = run_sweep("configs/default.yaml", overrides, widths, lrs, out / parametrization,
                                             log=lambda m: print(m, flush=True))
    (out / "sweep.json").write_text(json.dumps(results, indent=1))
    panels = [(name, {f"width {w}": ([r["lr"] for r in rows if r["width"] == w],
                                     [r["loss"] for r in rows if r["width"] == w]) for w in widths})
              for name, rows in results.items()]
    line_plots(out / "sweep.png", panels, "learning rate", "validation loss", logx=True, columns=2)
    rows = [[name, w] + [f"{r['loss']:.4f}" for r in results[name] if r["width"] == w] for name in results
            for w in widths]
    print(table(rows, ["parametrization", "width", *(f"lr {lr:.2e}" for lr in lrs)]))
    for name in results:
        print(f"{name}: best learning rate per width {best_lr(results[name])}")
    print(f"plot: {out / 'sweep.png'}; load average {load_average()}")
    widest, narrowest = widths[-1], widths[0]
    transferred = best_lr(results["mup"])[narrowest]
    mup_loss = next(r["loss"] for r in results["mup"] if r["width"] == widest and r["lr"] == transferred)
    standard_best = min(r["loss"] for r in results["standard"] if r["width"] == widest)
    span = f"{narrowest}-{widest} wide ({widest // narrowest}x)"
    headline("mup_lr_shift", lr_shift(results["mup"], widths), 1.0, f"grid steps (2x) the best lr moves, muP, {span}")
    headline("standard_lr_shift", lr_shift(results["standard"], widths), None,
             f"grid steps (2x) the best lr moves, standard, {span}")
    headline("mup_transfer_loss_ratio", mup_loss / standard_best, 1.0,
             "widest muP at the narrowest's best lr / widest standard at its best lr (validation loss)")


if __name__ == "__main__":
    main()

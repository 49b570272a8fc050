"""muTransfer (issue 7): does the best learning rate stay put as the model widens?

The same learning-rate sweep at several widths, once under the standard parametrization and once
under muP with base_width the narrowest width (`stacklm.sweep`: every point a normal run
directory; a second call resumes the sweep). configs/default.yaml with 2 layers and short runs
(the claim is about where the optimum sits, which short runs show, Yang et al. 2022 figure 4).

muP's own hyperparameters are tuned at the base width first, as muTransfer prescribes: the init
std of the weight matrices (`model.init_std`, which muP then scales down with width) is swept
with the learning rate at the narrowest width alone, and the muP sweep uses the best. The standard
models keep their usual init (0.02, GPT-2's) for the sweep over widths; the widest of them is also
swept with the muP-tuned init, and the transfer headline compares against the better of the two.
Run directories are named by parametrization and init std (`OUT/full/mup-std0.125/w512-lr...`).

Headlines:
- mup_lr_shift: under muP, the largest distance (in grid steps of 2x) of any width's best learning
  rate from the narrowest width's (target <= 1 over an 8x width range); standard_lr_shift the same
  under the standard parametrization, for comparison;
- mup_transfer_loss_ratio: the widest muP model's loss at the learning rate transferred from the
  narrowest width / the widest standard model's loss at its best learning rate, with the better
  of init 0.02 and the muP-tuned init (target <= 1).

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
        "init_stds": [0.02, 0.06, 0.125, 0.25],
        "overrides": ["model.n_layers=2", "data.seq_len=128", "train.steps=200", "train.warmup_steps=20",
                      "train.batch_size=16"]}
QUICK = {"widths": [32, 64, 128], "lrs": [2.0**-e for e in range(9, 4, -1)], "init_stds": [0.02, 0.125],
         "overrides": ["model.n_layers=2", "data.seq_len=64", "train.steps=60", "train.warmup_steps=6",
                       "train.batch_size=8", "train.eval_batches=4"]}
STANDARD_STD = 0.02  # model.init_std's default, GPT-2's
COMMON = ["train.progress=false", "eval.sample_tokens=0", "train.eval_every=0", "train.ckpt_every=0",
          "model.n_heads=4"]


def lr_shift(rows: list[dict], widths: list[int]) -> float:
    """Max over widths of |log2(best lr) - log2(best lr at the narrowest width)|: grid steps of 2x."""
    best = best_lr(rows)
    return max(abs(math.log2(best[w] / best[widths[0]])) for w in widths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 widths (4x range), 5 learning rates, 2 init stds, 60 steps")
    parser.add_argument("--out", default="runs/mup_transfer")
    args = parser.parse_args()
    grid = QUICK if args.quick else FULL
    widths, lrs = grid["widths"], grid["lrs"]
    print(f"machine: {machine()}; load average {load_average()}")
    out = Path(args.out) / ("quick" if args.quick else "full")
    narrowest, widest = widths[0], widths[-1]

    def sweep(parametrization: str, init_std: float, at: list[int], name: str) -> list[dict]:
        overrides = [*grid["overrides"], *COMMON, f"model.parametrization={parametrization}",
                     f"model.base_width={narrowest}", f"model.init_std={init_std}"]
        return run_sweep("configs/default.yaml", overrides, at, lrs, out / name, log=lambda m: print(m, flush=True))

    # muP's init std, tuned at the base width; the muP sweep below reuses the tuned std's base-width
    # points, and its directory gets the wider widths
    base = {std: sweep("mup", std, [narrowest], f"mup-std{std}") for std in grid["init_stds"]}
    best_loss = {std: min(r["loss"] for r in rows) for std, rows in base.items()}
    init_std = min(best_loss, key=best_loss.get)
    print(f"muP init std tuned at width {narrowest}: {init_std} "
          f"(best loss per std: { {std: round(loss, 4) for std, loss in best_loss.items()} })")
    results = {"standard": sweep("standard", STANDARD_STD, widths, f"standard-std{STANDARD_STD}"),
               "mup": sweep("mup", init_std, widths, f"mup-std{init_std}")}
    standard_tuned_init = (sweep("standard", init_std, [widest], f"standard-std{init_std}")
                           if init_std != STANDARD_STD else [])
    (out / "sweep.json").write_text(json.dumps({**results, "init_std": init_std, "mup_base": base,
                                                "standard_tuned_init": standard_tuned_init}, indent=1))
    panels = [(name, {f"width {w}": ([r["lr"] for r in rows if r["width"] == w],
                                     [r["loss"] for r in rows if r["width"] == w]) for w in widths})
              for name, rows in results.items()]
    line_plots(out / "sweep.png", panels, "learning rate", "validation loss", logx=True, columns=2)
    rows = [[name, w] + [f"{r['loss']:.4f}" for r in results[name] if r["width"] == w] for name in results
            for w in widths]
    if standard_tuned_init:
        rows += [[f"standard, init {init_std}", widest] + [f"{r['loss']:.4f}" for r in standard_tuned_init]]
    print(table(rows, ["parametrization", "width", *(f"lr {lr:.2e}" for lr in lrs)]))
    for name in results:
        print(f"{name}: best learning rate per width {best_lr(results[name])}")
    print(f"plot: {out / 'sweep.png'}; load average {load_average()}")
    transferred = best_lr(results["mup"])[narrowest]
    mup_loss = next(r["loss"] for r in results["mup"] if r["width"] == widest and r["lr"] == transferred)
    standard_best = min(r["loss"] for r in [*results["standard"], *standard_tuned_init] if r["width"] == widest)
    span = f"{narrowest}-{widest} wide ({widest // narrowest}x)"
    headline("mup_lr_shift", lr_shift(results["mup"], widths), 1.0, f"grid steps (2x) the best lr moves, muP, {span}")
    headline("standard_lr_shift", lr_shift(results["standard"], widths), None,
             f"grid steps (2x) the best lr moves, standard, {span}")
    headline("mup_transfer_loss_ratio", mup_loss / standard_best, 1.0,
             "widest muP at the narrowest's best lr / widest standard at its best lr and init (validation loss)")


if __name__ == "__main__":
    main()

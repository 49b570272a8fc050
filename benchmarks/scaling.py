"""The scaling law of the default corpus: Chinchilla's L(N, D) fitted to a sweep of small models.

A grid of models on configs/default.yaml (4 layers, 4 heads, sequence 256, batch 16, the same seed
and data order), model.d_model in {64, 96, 128, 192} x train.steps in {150, 300, 600}: 12 runs, each
with its own cosine schedule ending at its last step (a schedule longer than the run overstates its
loss: Hoffmann et al. 2022, appendix B). The learning rate is the preset's for every width, not
tuned per size. Then `stacklm.scaling` fits L(N, D) = E + A / N^alpha + B / D^beta to the runs' last
validation losses, Hoffmann et al.'s approach 3 (Huber loss on log L, L-BFGS from their grid of 4,500
starts), with 95% percentile intervals from refits to resamples of the runs.

N: the parameters in matmuls (all of them here: the embedding is tied to the output projection);
D: tokens trained, steps x 16 x 256. See docs/scaling.md.

Reported: the runs, the five constants with intervals, the compute-optimal exponents, and the
compute-optimal tokens per parameter at the compute of the sweep's largest run (6 N D), with the
interval of the same over the refits. Headlines (no targets): alpha, beta and that ratio.

`--quick`: 9 runs of 2-layer models, d_model {32, 48, 64} x steps {30, 60, 120}, batch 8 of 128
tokens; for checking the script, not for figures (9 points barely constrain 5 constants).

    python -m benchmarks.scaling [--quick] [--reuse] [--out runs/scaling] [--bootstrap 200]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from benchmarks.common import headline, load_average, machine, table, train_variants
from stacklm.scaling import (
    bootstrap,
    compute_optimal,
    fit_scaling_law,
    fit_table,
    interval,
    intervals,
    load_points,
)

SWEEP = {"widths": (64, 96, 128, 192), "steps": (150, 300, 600), "overrides": []}
QUICK = {"widths": (32, 48, 64), "steps": (30, 60, 120),
         "overrides": ["model.n_layers=2", "train.batch_size=8", "data.seq_len=128", "train.warmup_steps=5"]}


def variants(quick: bool) -> dict[str, list[str]]:
    sweep = QUICK if quick else SWEEP
    return {f"d{width}-s{steps}": [f"model.d_model={width}", f"train.steps={steps}", *sweep["overrides"]]
            for width in sweep["widths"] for steps in sweep["steps"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="9 tiny runs, to check the script")
    parser.add_argument("--reuse", action="store_true", help="fit the runs already in --out")
    parser.add_argument("--out", default="runs/scaling")
    parser.add_argument("--bootstrap", type=int, default=200, help="resamples of the runs for the intervals")
    args = parser.parse_args()
    print(f"machine: {machine()}; load average {load_average()}")
    out = Path(args.out)
    names = variants(args.quick)
    # not train_variants' quick: its smaller model would override the widths and steps swept here
    train_variants(out, names, quick=False, reuse=args.reuse)
    N, D, loss = load_points([out / name for name in names])
    fit = fit_scaling_law(N, D, loss)
    refits = bootstrap(N, D, loss, fit, samples=args.bootstrap, seed=0)
    fit = dataclasses.replace(fit, ci=intervals(refits))
    rows = [[name, f"{n / 1e6:.3f}M", f"{d / 1e6:.3f}M", f"{x:.4f}", f"{float(fit.loss(n, d)):.4f}"]
            for name, n, d, x in zip(names, N, D, loss, strict=True)]
    print(table(rows, ["run", "N (parameters)", "D (tokens)", "validation loss", "fitted L(N, D)"]))
    print(fit_table(fit, args.bootstrap))
    budget = float(np.max(6 * N * D))
    plan = compute_optimal(budget, fit)
    ratio_ci = interval([compute_optimal(budget, r).tokens_per_param for r in refits])
    a_ci = interval([r.exponents()[0] for r in refits])
    print(f"N_opt exponent a = beta / (alpha + beta): {fit.exponents()[0]:.3f} (95% interval "
          f"{a_ci[0]:.3f} - {a_ci[1]:.3f})")
    ratio_text = f"95% interval {ratio_ci[0]:.2f} - {ratio_ci[1]:.2f}"
    print(f"at {budget:.3g} FLOPs (the largest run): N_opt {plan.N / 1e6:.3f}M, D_opt {plan.D / 1e6:.3f}M, "
          f"{plan.tokens_per_param:.2f} tokens per parameter ({ratio_text})")
    print(f"load average {load_average()}")
    for name, of in (("alpha", "N"), ("beta", "D")):
        low, high = fit.ci[name]
        headline(f"scaling_{name}", getattr(fit, name), None,
                 f"exponent of {of} in L(N, D) (95% interval {low:.3f} - {high:.3f})")
    headline("tokens_per_param", plan.tokens_per_param, None,
             f"compute-optimal D / N at {budget:.3g} FLOPs ({ratio_text})")


if __name__ == "__main__":
    main()

"""Mixture-of-Experts against its dense twin, in one run: configs/switch-moe.yaml (8 SwiGLU experts,
top-1, capacity factor 1.25, in every layer) vs configs/default.yaml (one SwiGLU FFN of the same
width), so both pass each token through the same number of weights.

1. Dispatch: one MoE layer at the preset's size, forward + backward over a training batch, bf16
   autocast, with three implementations on the same weights: a naive loop over experts that
   gathers each expert's tokens with a boolean mask (the way HF Mixtral's reference code does),
   stacklm's sort-by-expert with one matmul per expert's contiguous slice (`dispatch: loop`), and
   the same with one grouped GEMM (`dispatch: grouped`, `torch._grouped_mm`); the dense FFN of the
   same width is the floor.
2. Training step time (forward, backward, AdamW) of the two presets, bf16 autocast, eager.
3. Decoding: batch-1 ms/token with the KV cache, (time for n tokens - time for 1) / (n - 1), eager
   and with the compiled one-token step.
4. Quality: both presets trained for the same steps, seed and batches on the default corpus, the
   MoE validated every `--eval-every` steps. steps_to_dense_loss is the first step at which the
   MoE's validation loss reaches the dense model's final one (linear between validations), over
   the dense model's steps. With `--seeds`, the pair is trained once per seed (other initial
   weights and batch order each time) and the headline is the median over seeds; one pair moves
   with the seed as much as the twins differ, so one seed cannot say whether the target holds.
   That reading takes the MoE's loss part way through a cosine schedule set for the dense model's
   length. A run of its own that long decays its learning rate sooner, which can end lower (hence
   the advice that the cycle match the training length: Hoffmann et al. 2022; Hagele et al. 2024)
   or higher (far from trained, as at d_model 64 here: docs/benchmarks.md). `--shorter 0.6,0.7`
   also trains the MoE for those fractions of the steps, each with its own schedule (same warmup),
   and reports the shortest that ends at the dense model's final loss (linear between the lengths
   tried, the full run the longest): `steps_to_dense_loss_own_schedule`. Over several seeds the
   final-loss gaps (MoE - dense) are also summarised: mean, standard deviation, standard error.
   `--jobs N` trains N runs at once (one process each); `--out DIR` keeps the runs and reuses the
   finished ones on a later call with the same settings.

All timed calls take turns (A B A B ...); each ratio is the median of the per-round ratios.

    python -m benchmarks.moe [--quick] [--skip-quality | --skip-speed] [--steps N] [--moe KEY=VALUE ...]
                             [--both KEY=VALUE ...] [--seeds S,S,...] [--shorter F,F,...]
                             [--jobs N] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
import torch.nn.functional as F

import stacklm
from benchmarks.common import alternate, headline, load_average, machine, median, speedup, table
from stacklm.device import keep_freed_memory_on_cpu
from stacklm.model.moe import MoE
from stacklm.training.metrics import read_metrics
from stacklm.training.optim import param_groups
from stacklm.training.trainer import first_difference

PRESETS = {"dense": "default", "MoE": "switch-moe"}
STEPS_TARGET = 0.7  # the steps_to_dense_loss target


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The reference loop: for each expert, mask out its tokens, run it, scatter back (dropless)."""
    flat = x.reshape(-1, x.size(-1))
    probs = F.linear(flat.float(), moe.router.weight.float()).softmax(-1)
    gate, expert = probs.max(-1)
    out = torch.zeros_like(flat, dtype=torch.float32)
    w_in, w_out = moe.experts.gate_up_proj, moe.experts.out_proj
    for e in range(moe.n_experts):
        mask = expert == e
        if mask.any():
            g, u = F.linear(flat[mask], w_in[e]).chunk(2, -1)
            out[mask] = (F.linear(F.silu(g) * u, w_out[e]) * gate[mask, None]).float()
    return out.view_as(x)


def dispatch(rounds: int, batch: int, seq_len: int) -> list:
    config = stacklm.Config.load("configs/switch-moe.yaml", ["model.ffn.dropless=true"])
    dense = stacklm.build_model(stacklm.Config.load("configs/default.yaml")).blocks[0].ffn
    moe = stacklm.build_model(config).blocks[0].ffn.train()
    x = torch.randn(batch, seq_len, config.model.d_model, requires_grad=True)

    def run(f):
        def call():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = f(x)
            y.float().square().mean().backward()
        return call

    def sorted_with(impl):
        def f(x):
            moe.experts.dispatch = impl
            return moe(x)
        return f

    fns = {"dense FFN (floor)": run(dense), "naive mask loop": run(lambda x: naive_moe(moe, x)),
           "sorted + loop": run(sorted_with("loop")), "sorted + grouped GEMM": run(sorted_with("grouped"))}
    times = alternate(fns, rounds)
    base = times["naive mask loop"]
    return [[name, f"{1000 * median(t):.1f}", f"{speedup(base, t):.2f}x", f"{median(t) / median(times['dense FFN (floor)']):.2f}x"]
            for name, t in times.items()]


def models():
    return {name: stacklm.build_model(stacklm.Config.load(f"configs/{preset}.yaml")) for name, preset in PRESETS.items()}


def train_steps(rounds: int, batch: int, seq_len: int) -> tuple[list, list[float]]:
    keep_freed_memory_on_cpu()
    fns = {}
    for name, model in models().items():
        opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, fused=True)
        ids = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1))

        def step(model=model, opt=opt, ids=ids):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(ids[:, :-1], targets=ids[:, 1:])
                aux = model.auxiliary_loss()
            (loss if aux is None else loss + aux).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        fns[name] = step
    times = alternate(fns, rounds)
    ratios = [m / d for m, d in zip(times["MoE"], times["dense"], strict=True)]
    rows = [[name, f"{1000 * median(times[name]):.0f}", f"{median(ratios) if name == 'MoE' else 1.0:.2f}x"]
            for name in fns]
    return rows, ratios


def decode(rounds: int, new_tokens: int) -> list:
    """Batch-1 ms/token, eager and with the compiled one-token step (`generate(compile=True)`); the
    modules' steps both (`fused=False`: the C++ step takes the dense model but not the MoE)."""
    built = {name: m.eval() for name, m in models().items()}
    prompt = torch.randint(0, 8192, (1, 16))
    rows = []
    for compiled in (False, True):
        calls = {(name, n): (lambda m=m, n=n, c=compiled: stacklm.generate(m, prompt, n, temperature=0, compile=c,
                                                                           fused=False))
                 for name, m in built.items() for n in (new_tokens, 1)}
        times = alternate(calls, rounds)
        steps = {name: [(t - t1) / (new_tokens - 1) for t, t1 in zip(times[name, new_tokens], times[name, 1], strict=True)]
                 for name in built}
        rows += [[f"{name}, {'compiled' if compiled else 'eager'}", f"{1000 * median(steps[name]):.2f}",
                  f"{speedup(steps['dense'], steps[name]):.2f}x"] for name in built]
    return rows


def quality_runs(steps: int | None, total: int, eval_every: int, moe_overrides: list[str], both: list[str],
                 shorter: list[float], seeds: list[int | None], jobs: int) -> list[tuple]:
    """(seed, name, preset, overrides) of every training run: per seed the twins trained for `steps`
    (None: the presets', `total`) and the MoE trained again for each fraction f in `shorter` of them
    ("MoE f"): the same warmup, its cosine ending at its own last step."""
    warmup = max(1, steps // 10) if steps is not None else None
    threads = [f"train.threads={max(1, (os.cpu_count() or 1) // jobs)}"] if jobs > 1 else []
    runs = []
    for seed in seeds:
        lengths = [(name, preset, steps) for name, preset in PRESETS.items()]
        lengths += [(f"MoE {f:g}", PRESETS["MoE"], max(1, round(f * total))) for f in shorter]
        for name, preset, length in lengths:
            overrides = ["train.progress=false", "eval.sample_tokens=0", f"train.eval_every={eval_every}",
                         "train.eval_batches=10", "train.ckpt_every=0", *threads, *both]
            if seed is not None:
                overrides.append(f"train.seed={seed}")
            if preset == PRESETS["MoE"]:
                overrides += moe_overrides
            if length is not None:
                overrides.append(f"train.steps={length}")
            if warmup is not None:
                overrides.append(f"train.warmup_steps={min(warmup, length)}")
            runs.append((seed, name, preset, overrides))
    return runs


# Settings that do not change what a run computes (train.threads can move the last bits of a
# reduction, not the run's outcome): a finished run that differs only in these is reused.
INCIDENTAL = ("out_dir", "threads", "progress")


def finished_curve(config: stacklm.Config, out_dir: Path) -> list[tuple[int, float]] | None:
    """The validation curve of the run already in out_dir if it has finished, None if there is no
    run or an unfinished one; a UserError if the run there has other settings than `config`
    (up to INCIDENTAL ones)."""
    if not (out_dir / "config.yaml").exists():
        return None
    try:
        saved = stacklm.Config.load(out_dir / "config.yaml")
    except stacklm.UserError as e:
        raise stacklm.UserError(f"{e}; give --out another folder") from None
    saved.train = dataclasses.replace(saved.train, **{key: getattr(config.train, key) for key in INCIDENTAL})
    key = first_difference(saved, config)
    if key:
        old, new = (functools.reduce(getattr, key.split("."), c) for c in (saved, config))
        raise stacklm.UserError(f"{out_dir} holds a run with another {key} ({old!r}, not {new!r}); "
                                "give --out another folder")
    curve = val_curve(out_dir) if (out_dir / "metrics.jsonl").exists() else []
    return curve if curve and curve[-1][0] == config.train.steps else None


def val_curve(out_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(out_dir, "val")]


def run_config(preset: str, overrides: list[str], out_dir: Path) -> stacklm.Config:
    return stacklm.Config.load(f"configs/{preset}.yaml", [*overrides, f"train.out_dir={out_dir}"])


def train_run(preset: str, overrides: list[str], out_dir: Path) -> list[tuple[int, float]]:
    """Validation curve [(step, loss)] of one run trained into out_dir (an unfinished run there, with
    the same settings, is trained again from the start)."""
    stacklm.train(run_config(preset, overrides, out_dir), overwrite=True)
    return val_curve(out_dir)


def quality(runs: list[tuple], out: Path, jobs: int) -> dict:
    """Validation curves {(seed, name): [(step, loss)]}: the finished runs already in out read back,
    the others trained in turn, or `jobs` at a time in processes of their own, each into
    out/[seed-S/]name. Every run there is checked before any training starts."""
    def out_dir(seed, name):
        return out / ("" if seed is None else f"seed-{seed}") / name.replace(" ", "-")

    def report(seed, name, curve):
        print(f"{'' if seed is None else f'seed {seed}, '}{name}: validation loss by step {curve}", flush=True)

    curves, todo = {}, []
    for seed, name, preset, overrides in runs:
        curve = finished_curve(run_config(preset, overrides, out_dir(seed, name)), out_dir(seed, name))
        if curve is None:
            todo.append((seed, name, preset, overrides))
        else:
            curves[seed, name] = curve
            report(seed, name, curve)
    if jobs == 1 or len(todo) <= 1:
        for seed, name, preset, overrides in todo:
            curves[seed, name] = train_run(preset, overrides, out_dir(seed, name))
            report(seed, name, curves[seed, name])
        return curves
    with ProcessPoolExecutor(min(jobs, len(todo)), mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = {pool.submit(train_run, preset, overrides, out_dir(seed, name)): (seed, name)
                   for seed, name, preset, overrides in todo}
        for future in as_completed(pending):
            curves[pending[future]] = future.result()
            report(*pending[future], curves[pending[future]])
    return curves


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """First step at which the curve reaches `target`, linear between points; None if never."""
    previous = (0, float("inf"))
    for step, loss in curve:
        if loss <= target:
            s0, l0 = previous
            return step if l0 == float("inf") else s0 + (step - s0) * (l0 - target) / (l0 - loss)
        previous = (step, loss)
    return None


def gap_summary(gaps: list[float]) -> str:
    """The final-loss gaps (MoE - dense) of the seeds' pairs, summarised: a pair moves with its seed,
    so what the pairs say together is their mean and its standard error (the pairs are independent)."""
    mean, sd = statistics.mean(gaps), statistics.stdev(gaps)
    se = sd / math.sqrt(len(gaps))
    return (f"final loss, MoE - dense, over {len(gaps)} seeds: mean {mean:+.4f}, standard deviation {sd:.4f}, "
            f"standard error {se:.4f} (mean +- 2 se: {mean - 2 * se:+.4f} to {mean + 2 * se:+.4f}); "
            f"the MoE ends ahead with {sum(g < 0 for g in gaps)} of {len(gaps)} seeds")


def seed_list(value: str) -> list[int]:
    seeds = [int(s) for s in value.split(",")]
    if len(set(seeds)) < len(seeds):  # one run folder per seed
        raise argparse.ArgumentTypeError(f"a seed is repeated in {value}")
    return seeds


def fraction_list(value: str) -> list[float]:
    fractions = [float(f) for f in value.split(",")]
    if not all(0 < f < 1 for f in fractions):
        raise argparse.ArgumentTypeError(f"fractions of the steps must lie between 0 and 1, got {value}")
    if len(set(fractions)) < len(fractions):
        raise argparse.ArgumentTypeError(f"a fraction is repeated in {value}")
    return sorted(fractions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and 100 training steps per model")
    parser.add_argument("--skip-quality", action="store_true", help="no training of the twins")
    parser.add_argument("--skip-speed", action="store_true", help="only the training of the twins")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps of each twin (default: the presets' 350; 100 with --quick)")
    parser.add_argument("--eval-every", type=int, default=None, help="MoE validation interval (default steps/14)")
    parser.add_argument("--moe", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides of the MoE preset for the quality runs, e.g. model.ffn.shared_expert=true")
    parser.add_argument("--both", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides of both twins for the quality runs, e.g. train.batch_size=64")
    parser.add_argument("--shorter", type=fraction_list, default=[], metavar="F,F,...",
                        help="also train the MoE for these fractions of the steps, each with its own schedule, "
                             "and report the shortest that ends at the dense model's final loss")
    parser.add_argument("--seeds", type=seed_list, default=None, metavar="S,S,...",
                        help="train the pair once per seed (train.seed) and report the median (default: the "
                             "presets' seed, once)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="quality runs trained at once, each in its own process on cpu_count / N threads")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="keep the quality runs in DIR (default: a temporary folder); a finished run "
                             "already there with the same settings is read, not trained again, so a "
                             "many-seed reading can be stopped, resumed and extended")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    torch.manual_seed(0)
    print(f"machine: {machine()}; load average {load_average()}")
    rounds = 3 if args.quick else 7
    if not args.skip_speed:
        print(table(dispatch(rounds, 8 if args.quick else 16, 256),
                    ["one MoE layer, fwd+bwd bf16", "ms", "vs naive", "vs dense FFN"]), flush=True)
        step_rows, ratios = train_steps(rounds, 8 if args.quick else 16, 256)
        print(table(step_rows, ["training step, bf16", "ms/step", "time vs dense"]), flush=True)
        print(table(decode(rounds, 16 if args.quick else 48), ["decode, batch 1", "ms/token", "speed vs dense"]),
              flush=True)
        headline("step_time_ratio", median(ratios), 1.35, "x (MoE / dense-active training step time, bf16, CPU)")
    if not args.skip_quality:
        steps = args.steps or (100 if args.quick else None)
        total = steps or stacklm.Config.load("configs/default.yaml").train.steps
        seeds = args.seeds or [None]
        eval_every = args.eval_every or max(1, total // 14)
        jobs = min(args.jobs, len(seeds) * (2 + len(args.shorter)))  # no more processes than runs
        runs = quality_runs(steps, total, eval_every, args.moe, args.both, args.shorter, seeds, jobs)
        with contextlib.ExitStack() as stack:
            out = Path(args.out) if args.out else Path(stack.enter_context(tempfile.TemporaryDirectory()))
            all_curves = quality(runs, out, jobs)
        fractions, own, gaps = [], [], []
        for seed in seeds:
            curves = {name: all_curves[seed, name] for s, name, *_ in runs if s == seed}
            dense_final = curves["dense"][-1][1]
            gaps.append(curves["MoE"][-1][1] - dense_final)
            reached = steps_to_reach(curves["MoE"], dense_final)
            fractions.append(reached / total if reached is not None else float("inf"))
            if args.shorter:
                finals = [(f, curves[f"MoE {f:g}"][-1][1]) for f in args.shorter] + [(1.0, curves["MoE"][-1][1])]
                fraction = steps_to_reach(finals, dense_final)
                own.append(float("inf") if fraction is None else fraction)
                print(table([[f"{f:g}", f"{loss:.4f}", f"{loss - dense_final:+.4f}"] for f, loss in finals],
                            ["MoE trained for this share of the steps", "final val loss", "- dense final"]))
                print(f"with its own schedule the MoE ends at the dense model's final loss at "
                      f"{'never' if fraction is None else f'{fraction:.3f}'} of the steps"
                      + (" (or sooner: the shortest run tried)" if fraction == args.shorter[0] else ""), flush=True)
            print(table([[name, f"{c[-1][1]:.4f}"] for name, c in curves.items()], ["model", "final val loss"]))
            print(f"{'' if seed is None else f'seed {seed}: '}dense final validation loss {dense_final:.4f} "
                  f"after {total} steps; MoE reaches it at {'never' if reached is None else f'step {reached:.0f}'}",
                  flush=True)
        if len(seeds) > 1:
            print(table([[seed, f"{f:.3f}", f"{g:+.4f}"] for seed, f, g in zip(seeds, fractions, gaps, strict=True)],
                        ["seed", "steps_to_dense_loss", "final loss, MoE - dense"]))
            print(f"target <= {STEPS_TARGET} met with {sum(f <= STEPS_TARGET for f in fractions)} of {len(seeds)} seeds")
            print(gap_summary(gaps))
        if args.shorter and len(seeds) > 1:
            print(table([[seed, f"{f:.3f}"] for seed, f in zip(seeds, own, strict=True)],
                        ["seed", "steps_to_dense_loss, own schedule"]))
        print(f"load average after: {load_average()}")
        headline("steps_to_dense_loss", median(fractions), STEPS_TARGET,
                 "fraction of the dense model's steps the MoE needs to reach its final validation loss"
                 + (f" (median of {len(seeds)} seeds)" if len(seeds) > 1 else ""))
        if args.shorter:
            headline("steps_to_dense_loss_own_schedule", median(own), STEPS_TARGET,
                     "shortest MoE run, each with its own cosine schedule (linear between the lengths tried), "
                     "that ends at the dense model's final validation loss, over the dense model's steps"
                     + (f" (median of {len(seeds)} seeds)" if len(seeds) > 1 else ""))


if __name__ == "__main__":
    try:
        main()
    except stacklm.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

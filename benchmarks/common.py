"""Shared helpers for the benchmarks: side-by-side timing, machine probes, JSON headline lines."""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def time_once(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternate(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each call of each fn, timed in turns (A B A B ...) so drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(time_once(fn))
    return times


def median(times: list[float]) -> float:
    return statistics.median(times)


def speedup(baseline: list[float], candidate: list[float]) -> float:
    """Median over rounds of baseline time / candidate time, each pair timed back to back.

    On a shared machine the load moves between rounds; the ratio within a round moves less.
    """
    return statistics.median(b / c for b, c in zip(baseline, candidate, strict=True))


def matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...] = (1024, 2048, 3072), rounds: int = 5) -> float:
    """FLOP/s of the fastest large square matmul in `dtype` on this machine (median of `rounds`)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        seconds = median(alternate({"mm": functools.partial(torch.mm, a, b)}, rounds, warmup=2)["mm"])
        best = max(best, 2 * n**3 / seconds)
    return best


def read_bandwidth(n_bytes: int = 1 << 30, rounds: int = 5) -> float:
    """Bytes/s read by a reduction over a tensor much larger than the caches."""
    x = torch.ones(n_bytes // 4, dtype=torch.float32)
    return n_bytes / median(alternate({"sum": lambda: x.sum()}, rounds)["sum"])


class ReadProbe:
    """A bandwidth probe to time in turns with other calls (`alternate`): each call sums a tensor
    of `n_bytes`, far beyond the caches, three times back to back and keeps the fastest in
    `seconds`. A VM's first read after a pause can be slow (on a 2-core Xeon 7-13 GB/s, against 21
    once busy), while a decode step's reads follow one another; one sum a round gave bounds that
    the steps beat (0.6-0.8x)."""

    def __init__(self, n_bytes: int = 1 << 30):
        self.n_bytes, self.x, self.seconds = n_bytes, torch.ones(n_bytes // 4, dtype=torch.float32), []

    def __call__(self) -> None:
        self.seconds.append(min(time_once(self.x.sum) for _ in range(3)))

    def last(self, rounds: int) -> list[float]:
        """The seconds of the last `rounds` calls (the rounds after `alternate`'s warmup)."""
        return self.seconds[-rounds:]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")


def load_average() -> str:
    """The 1-minute load average: above the CPU count, other processes shared the machine."""
    return f"{os.getloadavg()[0]:.2f}"


def headline(metric: str, value: float, target: float | None, unit: str) -> None:
    """One JSON line; a value that is not finite (a target never reached) is null, as strict JSON has no
    Infinity."""
    value = round(value, 4) if math.isfinite(value) else None
    print(json.dumps({"metric": metric, "value": value, "target": target, "unit": unit}, allow_nan=False))


def table(rows: list[list[object]], header: list[str]) -> str:
    cells = [header] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


QUICK_MODEL = ["model.d_model=128", "model.n_layers=2", "train.steps=100", "train.warmup_steps=10"]


def train_variants(out, variants: dict[str, list[str]], quick: bool, reuse: bool, extra: list[str] = ()) -> None:
    """Train configs/default.yaml with each variant's overrides into out/<name> (a smaller model
    with `quick`), then `extra` overrides for all; with `reuse`, skip runs that already have a
    checkpoint."""
    import stacklm
    from stacklm.training.checkpoint import Checkpointer

    for name, overrides in variants.items():
        run = out / name
        if reuse and Checkpointer(run / "checkpoints").latest() is not None:
            continue
        overrides = [*overrides, f"train.out_dir={run}", "train.progress=false", "eval.sample_tokens=0",
                     "train.eval_every=0", "train.ckpt_every=0", *(QUICK_MODEL if quick else []), *extra]
        result = stacklm.train(stacklm.Config.load("configs/default.yaml", overrides), overwrite=True,
                               log=lambda m: None)
        print(f"trained {name}: {result.step} steps, validation loss {result.val['loss']:.4f}", flush=True)

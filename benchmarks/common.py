"""Shared helpers for the benchmarks: side-by-side timing, machine probes, JSON headline lines."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable

import torch


def time_once(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternate(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each fn, timed in turns (A B A B ...) so drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(time_once(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def matmul_peak(dtype: torch.dtype, n: int = 2048, rounds: int = 5) -> float:
    """FLOP/s of a large square matmul in `dtype` on this machine (median of `rounds`)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    seconds = alternate({"mm": lambda: a @ b}, rounds)["mm"]
    return 2 * n**3 / seconds


def read_bandwidth(n_bytes: int = 1 << 30, rounds: int = 5) -> float:
    """Bytes/s read by a reduction over a tensor much larger than the caches."""
    x = torch.ones(n_bytes // 4, dtype=torch.float32)
    seconds = alternate({"sum": lambda: x.sum()}, rounds)["sum"]
    return n_bytes / seconds


def headline(metric: str, value: float, target: float | None, unit: str) -> None:
    print(json.dumps({"metric": metric, "value": round(value, 4), "target": target, "unit": unit}))


def table(rows: list[list[object]], header: list[str]) -> str:
    cells = [header] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

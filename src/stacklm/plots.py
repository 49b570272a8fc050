"""PNG plots for the command line's reports; matplotlib is the optional `plot` extra."""

from __future__ import annotations

from pathlib import Path


def line_plot(path: str | Path, series: dict[str, tuple[list[float], list[float]]], xlabel: str,
              ylabel: str, title: str, logx: bool = False) -> bool:
    """Write one line per series (label -> (xs, ys)) to a PNG; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if logx:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({x for xs, _ in series.values() for x in xs}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True

"""PNG plots for the command line's reports; matplotlib is the optional `plot` extra."""

from __future__ import annotations

from pathlib import Path

Series = dict[str, tuple[list[float], list[float]]]  # label -> (xs, ys)


def line_plot(path: str | Path, series: Series, xlabel: str, ylabel: str, title: str, logx: bool = False) -> bool:
    """Write one line per series to a PNG; False if matplotlib is missing."""
    return line_plots(path, [(title, series)], xlabel, ylabel, logx=logx)


def line_plots(path: str | Path, panels: list[tuple[str, Series]], xlabel: str, ylabel: str,
               logx: bool = False, logy: bool = False, columns: int = 1) -> bool:
    """Panels (title, series) side by side, `columns` to a row, in one PNG; False if matplotlib is
    missing. logx puts the x axis in powers of 2 (widths, context lengths)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.4 if columns == 1 else 4.2 * columns, 4.2 * rows),
                             squeeze=False)
    for ax, (title, series) in zip(axes.flat, panels, strict=False):
        for label, (xs, ys) in series.items():
            ax.plot(xs, ys, marker="o", label=label)
        if logx:
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({x for xs, _ in series.values() for x in xs}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.3g}"))
            ax.tick_params(axis="x", labelrotation=45)
        if logy:
            ax.set_yscale("log")
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        if 1 < len(series) <= 12:
            ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True

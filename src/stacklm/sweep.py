"""A grid of training runs over widths and learning rates: the experiment behind muTransfer (Yang
et al. 2022, figure 1). Each point is a normal run directory, `OUT/w{width}-lr{lr}`; the grid runs
one point after another, and a second call skips the finished points and resumes an interrupted
one, so a sweep survives being stopped.

    stacklm sweep configs/default.yaml model.parametrization=mup --widths 64,128,256 --lr 1e-3,2e-3,4e-3
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from stacklm.config import Config
from stacklm.errors import TrainingError
from stacklm.training.checkpoint import Checkpointer
from stacklm.training.metrics import read_metrics


def point_dir(out: Path, width: int, lr: float) -> Path:
    return out / f"w{width}-lr{lr:g}"


DIVERGED = "diverged.txt"  # in a point's run directory: training stopped on non-finite losses


def final_val_loss(run_dir: Path, steps: int) -> float | None:
    """The validation loss a run recorded at step `steps` (inf if it diverged), or None if it has
    not got there."""
    if (run_dir / DIVERGED).exists():
        return math.inf
    rows = [r for r in read_metrics(run_dir, "val") if r["step"] == steps] if (run_dir / "metrics.jsonl").exists() else []
    return rows[-1]["loss"] if rows else None


def run_sweep(config_path: str | None, overrides: list[str], widths: list[int], lrs: list[float], out: Path,
              log: Callable[[str], None] = print) -> list[dict]:
    """Train every (width, lr) point of the grid that has not finished; returns one row per point:
    {"width", "lr", "loss", "run"} (loss: the final validation loss; inf for a point whose
    training diverged, as large learning rates do)."""
    from stacklm.training.trainer import train

    rows = []
    for width in widths:
        for lr in lrs:
            run = point_dir(out, width, lr)
            config = Config.load(config_path, [*overrides, f"model.d_model={width}", f"train.lr={lr}",
                                               f"train.out_dir={run}"])
            loss = final_val_loss(run, config.train.steps)
            if loss is None:
                resume = Checkpointer(run / "checkpoints").latest() is not None
                log(f"{'resuming' if resume else 'training'} width {width}, lr {lr:g} -> {run}")
                try:
                    loss = train(config, resume=resume, overwrite=not resume, log=lambda m: None).val["loss"]
                except TrainingError as e:
                    run.mkdir(parents=True, exist_ok=True)
                    (run / DIVERGED).write_text(f"{e}\n")
                    loss = math.inf
            rows.append({"width": width, "lr": lr, "loss": loss, "run": str(run)})
            log(f"width {width}, lr {lr:g}: validation loss {loss:.4f}")
    return rows


def best_lr(rows: list[dict]) -> dict[int, float]:
    """Per width, the learning rate with the lowest final validation loss."""
    best: dict[int, dict] = {}
    for row in rows:
        if row["width"] not in best or row["loss"] < best[row["width"]]["loss"]:
            best[row["width"]] = row
    return {width: row["lr"] for width, row in best.items()}

"""Metrics: one JSON object per line in RUN/metrics.jsonl, and TensorBoard events when installed."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.file = open(run_dir / "metrics.jsonl", "a") if enabled else None
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # TensorBoard is an optional extra
                pass

    def truncate_after(self, step: int) -> None:
        """Drop records past `step`: a run resumed from that checkpoint will write them again."""
        if not self.enabled:
            return
        path = Path(self.file.name)
        self.file.close()
        kept = [line for line in path.read_text().splitlines(keepends=True)
                if line.strip() and json.loads(line)["step"] <= step]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
        self.file = open(path, "a")

    def log(self, step: int, split: str, **values: float) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, "split": split, "time": round(time.time(), 3), **values}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for name, value in values.items():
                for suffix, v in ([(f"/{i}", v) for i, v in enumerate(value)] if isinstance(value, list)
                                  else [("", value)]):
                    self.tb.add_scalar(f"{split}/{name}{suffix}", v, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path, split: str | None = None) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if split is None or r["split"] == split]

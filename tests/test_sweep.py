import json
import math
import shutil
from types import SimpleNamespace

import pytest

import stacklm.training.trainer
from stacklm.errors import TrainingError
from stacklm.sweep import best_lr, run_sweep


def test_a_diverged_point_counts_as_infinite_and_is_not_retried(tmp_path, monkeypatch):
    calls = []

    def fake_train(config, resume, overwrite, log):
        calls.append((config.model.d_model, config.train.lr))
        if config.train.lr > 1e-2:
            raise TrainingError("loss or gradient non-finite for 5 steps in a row")
        return SimpleNamespace(val={"loss": 5.0 - 100 * config.train.lr + config.model.d_model / 1000})

    monkeypatch.setattr(stacklm.training.trainer, "train", fake_train)
    grid = ("configs/tiny.yaml", [], [32, 64], [1e-3, 5e-3, 2e-2], tmp_path)
    rows = run_sweep(*grid, log=lambda m: None)
    assert [r["loss"] for r in rows if r["lr"] == 2e-2] == [math.inf, math.inf]
    assert (tmp_path / "w32-lr0.02" / "diverged.txt").read_text().startswith("loss or gradient")
    assert best_lr(rows) == {32: 5e-3, 64: 5e-3}
    calls.clear()
    again = run_sweep(*grid, log=lambda m: None)  # the fake writes no metrics: only divergence is remembered
    assert again == rows and calls == [(w, lr) for w in (32, 64) for lr in (1e-3, 5e-3)]


def test_best_lr_picks_the_lowest_loss_per_width():
    rows = [{"width": 64, "lr": lr, "loss": loss} for lr, loss in ((1e-3, 3.0), (2e-3, 2.5), (4e-3, math.inf))]
    assert best_lr(rows) == {64: 2e-3}
    with pytest.raises(KeyError):
        best_lr(rows)[128]


def test_an_interrupted_point_resumes_from_its_checkpoint(tmp_path, cache_dir):
    """A point stopped after a mid-run checkpoint is resumed, not retrained, and ends as it would
    have (float32, deterministic: the same loss)."""
    overrides = [f"data.cache_dir={cache_dir}", "train.progress=false", "train.steps=4", "train.ckpt_every=2",
                 "train.keep_last=5", "train.deterministic=true", "train.dtype=float32", "train.threads=1"]
    grid = ("configs/tiny.yaml", overrides, [32], [1e-3], tmp_path)
    [straight] = run_sweep(*grid, log=lambda m: None)
    run = tmp_path / "w32-lr0.001"
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    (run / "checkpoints" / "latest").unlink()
    metrics = run / "metrics.jsonl"
    metrics.write_text("".join(line for line in metrics.read_text().splitlines(keepends=True)
                               if json.loads(line)["step"] <= 2))
    logged = []
    [resumed] = run_sweep(*grid, log=logged.append)
    assert logged[0].startswith("resuming width 32") and resumed == straight

import os
import subprocess
import sys

import pytest

from stacklm.training.metrics import read_metrics
from stacklm.training.trainer import train


@pytest.mark.parametrize("model", [(), ("model.parametrization=mup", "model.base_width=32"),
                                   ("model.arch=encoder_decoder", "train.objective.kind=ul2")],
                         ids=["dense", "mup", "ul2-encdec"])
def test_two_process_ddp_matches_one_process(tiny, tmp_path, cache_dir, model):
    """2 ranks x batch 4 (gloo, CPU) take the same steps as 1 process with batch 8: with muP's
    per-group learning rates, and with UL2, whose rows hold different numbers of target tokens (the
    ranks' mean losses are weighted by their counts)."""
    common = ["train.steps=6", "train.log_every=1", "train.dtype=float32", "train.threads=1",
              f"data.cache_dir={cache_dir}", "train.progress=false", "eval.sample_tokens=0", *model]
    single = train(tiny(*common, "train.batch_size=8", f"train.out_dir={tmp_path / 'one'}"), log=lambda m: None)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "stacklm.cli", "train", "configs/tiny.yaml", *common, "train.batch_size=4",
           f"train.out_dir={tmp_path / 'two'}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [r["loss"] for r in read_metrics(tmp_path / "two", "train")]
    assert losses == pytest.approx(single.losses, rel=1e-5)
    assert "validation after 6 steps" in proc.stdout and proc.stdout.count("validation after") == 1

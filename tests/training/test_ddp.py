import os
import shutil
import subprocess
import sys

import pytest
import torch

from stacklm.errors import UserError
from stacklm.runs import load_run
from stacklm.training.checkpoint import Checkpointer
from stacklm.training.metrics import read_metrics
from stacklm.training.trainer import train

COMMON = ["train.log_every=1", "train.dtype=float32", "train.threads=1", "train.progress=false",
          "eval.sample_tokens=0"]
MUP = ["model.parametrization=mup", "model.base_width=32"]


def torchrun_train(*items: str, ranks: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           "-m", "stacklm.cli", "train", "configs/tiny.yaml", *items]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def train_losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir, "train")]


@pytest.mark.parametrize("model", [(), MUP, ("model.arch=encoder_decoder", "train.objective.kind=ul2")],
                         ids=["dense", "mup", "ul2-encdec"])
def test_two_process_data_parallel_matches_one_process(tiny, tmp_path, cache_dir, model):
    """2 ranks x batch 4 (gloo, CPU), under DDP and under FSDP2, take the same steps as 1 process
    with batch 8: with muP's per-group learning rates, and with UL2, whose rows hold different
    numbers of target tokens (the ranks' mean losses are weighted by their counts)."""
    common = [*COMMON, "train.steps=6", f"data.cache_dir={cache_dir}", *model]
    single = train(tiny(*common, "train.batch_size=8", f"train.out_dir={tmp_path / 'one'}"), log=lambda m: None)
    for kind in ("ddp", "fsdp"):
        proc = torchrun_train(*common, "train.batch_size=4", f"train.data_parallel={kind}",
                              f"train.out_dir={tmp_path / kind}")
        assert train_losses(tmp_path / kind) == pytest.approx(single.losses, rel=1e-5), kind
        assert "validation after 6 steps" in proc.stdout and proc.stdout.count("validation after") == 1


def test_fsdp_checkpoint_is_whole_and_resumes_exactly(tiny, tmp_path, cache_dir):
    """An FSDP run under muP, with gradient accumulation and clipping, matches one process step
    for step; its checkpoint is the unsharded model (one process loads the same weights), and it
    resumes from its middle checkpoint with the straight run's losses: the optimizer state, with
    muP's per-group learning rates, survives the round trip through its unsharded form, which 3
    ranks then take up. The vocabulary is odd, so the (tied) embedding's rows split unevenly."""
    common = [*COMMON, *MUP, "model.vocab_size=509", "train.steps=6", "train.grad_accum=2", "train.batch_size=2",
              "train.grad_clip=0.2", "train.ckpt_every=3", "train.eval_every=3", "train.eval_batches=2",
              f"data.cache_dir={cache_dir}"]
    one = tmp_path / "one"
    single = train(tiny(*common, "train.batch_size=4", f"train.out_dir={one}"), log=lambda m: None)
    run = tmp_path / "fsdp"
    torchrun_train(*common, "train.data_parallel=fsdp", f"train.out_dir={run}")
    straight = train_losses(run)
    assert straight == pytest.approx(single.losses, rel=1e-5)
    assert min(r["grad_norm"] for r in read_metrics(run, "train")) > 0.2  # so clipping acted on every step
    for (name, p), q in zip(load_run(run).model.named_parameters(), load_run(one).model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)

    ckpt = Checkpointer(run / "checkpoints")
    shutil.rmtree(ckpt.latest())
    (run / "checkpoints" / "latest").unlink()
    torchrun_train(*common, "train.data_parallel=fsdp", f"train.out_dir={run}", "--resume")
    assert train_losses(run) == straight
    torchrun_train(*common, "train.data_parallel=fsdp", f"train.out_dir={run}", "train.steps=8", "--resume",
                   ranks=3)
    assert len(train_losses(run)) == 8 and Checkpointer(run / "checkpoints").latest().name == "step_00000008"

    with pytest.raises(UserError, match="saved with FSDP and this run has no sharding"):
        train(tiny(*common, f"train.out_dir={run}", "train.steps=9"), resume=True, log=lambda m: None)


import pytest
import torch

from stacklm.errors import UserError
from stacklm.runs import load_run
from stacklm.training.distributed import init_distributed
from stacklm.training.metrics import read_metrics
from stacklm.training.trainer import train

COMMON = ["train.log_every=1", "train.dtype=float32", "train.threads=1", "train.progress=false",
          "eval.sample_tokens=0"]
MUP = ["model.parametrization=mup", "model.base_width=32"]


def train_losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir, "train")]


@pytest.mark.parametrize("model", [(), MUP, ("model.arch=encoder_decoder", "train.objective.kind=ul2")],
                         ids=["dense", "mup", "ul2-encdec"])
def test_two_process_data_parallel_matches_one_process(tiny, tmp_path, cache_dir, torchrun_train, model):
    """2 ranks x batch 4 (gloo, CPU), under DDP and under FSDP2, take the same steps as 1 process
    with batch 8: with muP's per-group learning rates, and with UL2, whose rows hold different
    numbers of target tokens (the ranks' mean losses are weighted by their counts)."""
    common = [*COMMON, "train.steps=6", f"data.cache_dir={cache_dir}", *model]
    single = train(tiny(*common, "train.batch_size=8", f"train.out_dir={tmp_path / 'one'}"), log=lambda m: None)
    for kind in ("ddp", "fsdp"):
        proc = torchrun_train(*common, "train.batch_size=4", f"train.data_parallel={kind}",
                              f"train.out_dir={tmp_path / kind}")
        assert train_losses(tmp_path / kind) == pytest.approx(single.losses, rel=1e-5), kind
        assert read_metrics(tmp_path / kind, "val")[-1]["trained_tokens"] == 6 * 2 * 4 * 64  # all ranks'
        assert "validation after 6 steps" in proc.stdout and proc.stdout.count("validation after") == 1


def test_fsdp_checkpoints_are_whole_and_resume_anywhere(tiny, tmp_path, cache_dir, torchrun_train, stopped_copy):
    """FSDP under muP, with gradient accumulation and clipping, matches one process step for
    step. Its checkpoint is the unsharded model and optimizer state: it resumes exactly under
    FSDP on 2 ranks, on 3 ranks (against one process with the same global batch), and in one
    process; and one process's checkpoint resumes under FSDP. The optimizer's state and muP's
    per-group learning rates survive each conversion. The vocabulary is odd, so the (tied)
    embedding's rows split unevenly over the ranks."""
    common = [*COMMON, *MUP, "model.vocab_size=509", "train.grad_accum=2", "train.grad_clip=0.2",
              "train.ckpt_every=3", "train.eval_every=0", "train.eval_batches=2", f"data.cache_dir={cache_dir}"]
    one, run = tmp_path / "one", tmp_path / "fsdp"
    single = train(tiny(*common, "train.steps=6", "train.batch_size=4", f"train.out_dir={one}"), log=lambda m: None)
    torchrun_train(*common, "train.steps=6", "train.batch_size=2", "train.data_parallel=fsdp", f"train.out_dir={run}")
    straight = train_losses(run)
    assert straight == pytest.approx(single.losses, rel=1e-5)
    assert min(r["grad_norm"] for r in read_metrics(run, "train")) > 0.2  # so clipping acted on every step
    for (name, p), q in zip(load_run(run).model.named_parameters(), load_run(one).model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)

    again = stopped_copy(run, 3, tmp_path / "again")
    torchrun_train(*common, "train.steps=6", "train.batch_size=2", "train.data_parallel=fsdp",
                   f"train.out_dir={again}", "--resume")
    assert train_losses(again) == straight

    # From the step-6 checkpoint, 2 more steps of a global batch of 6: 3 ranks x 2, or 1 x 6
    three = stopped_copy(run, 6, tmp_path / "three")
    torchrun_train(*common, "train.steps=8", "train.batch_size=2", "train.data_parallel=fsdp",
                   f"train.out_dir={three}", "--resume", ranks=3)
    alone = train(tiny(*common, "train.steps=8", "train.batch_size=6", f"train.out_dir={stopped_copy(run, 6, tmp_path / 'alone')}"),
                  resume=True, log=lambda m: None)
    assert train_losses(three)[6:] == pytest.approx(alone.losses, rel=1e-5)

    # One process's step-3 checkpoint, resumed under FSDP: the single run's last 3 steps
    converted = stopped_copy(one, 3, tmp_path / "converted")
    torchrun_train(*common, "train.steps=6", "train.batch_size=2", "train.data_parallel=fsdp",
                   f"train.out_dir={converted}", "--resume")
    assert train_losses(converted) == pytest.approx(single.losses, rel=1e-5)


def test_fsdp_matches_ddp_for_moe_with_sparse_experts(tmp_path, cache_dir, torchrun_train):
    """MoE capacity is per rank, so 2 ranks do not take one process's steps; FSDP and DDP take the
    same ones, with muP scaling the sparse experts' parameters."""
    common = [*COMMON, *MUP, "train.steps=4", "train.batch_size=4", f"data.cache_dir={cache_dir}", "model.ffn=moe",
              "model.ffn.n_experts=4", "model.ffn.expert=sparse", "model.ffn.expert.block_size=8"]
    for kind in ("ddp", "fsdp"):
        torchrun_train(*common, f"train.data_parallel={kind}", f"train.out_dir={tmp_path / kind}")
    assert train_losses(tmp_path / "fsdp") == pytest.approx(train_losses(tmp_path / "ddp"), rel=1e-5)


def test_one_gpu_for_every_rank_is_refused(monkeypatch):
    """Under torchrun, train.device=cuda:N would put every rank on GPU N: one clear error, before
    any GPU or process group is touched (so it is checked on a CPU machine too)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(UserError, match=r"train.device=cuda:0 with 2 processes .* use cuda or auto"):
        init_distributed("cuda:0")

import os
import re
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stacklm.config import Config
from stacklm.errors import UserError
from stacklm.model.transformer import build_model
from stacklm.runs import load_run
from stacklm.training.checkpoint import Checkpointer, load_state
from stacklm.training.distributed import Dist
from stacklm.training.expert_parallel import ExpertParallel, apply_expert_parallel
from stacklm.training.metrics import read_metrics
from stacklm.training.trainer import restore_optimizer, train

WORLD = 2
CASES = {
    "switch, dense experts, capacity drops": ["model.ffn.capacity_factor=1.0"],
    "top-2, sparse experts": ["model.ffn.router=topk", "model.ffn.expert=sparse",
                              "model.ffn.expert.block_size=8", "model.ffn.expert.quant_prob=0"],
}


def build(overrides):
    torch.manual_seed(0)  # the same weights on every rank
    cfg = Config.load("configs/tiny.yaml", ["model.d_model=32", "model.n_heads=4", "model.d_ff=64",
                                            "model.ffn=moe", "model.ffn.n_experts=4", *overrides])
    return build_model(cfg).train()


def loss_of(model, ids):
    return model(ids[:, :-1], targets=ids[:, 1:]) + model.auxiliary_loss()


def worker(rank: int, store: str, overrides: list[str]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        reference = build(overrides)
        batches = [torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(r)) for r in range(WORLD)]
        # One process holding every expert: the summed loss of both ranks' batches
        sum(loss_of(reference, ids) for ids in batches).backward()
        ref_loss = loss_of(reference, batches[rank]).item()

        model = apply_expert_parallel(build(overrides))
        moe = model.blocks[0].ffn
        assert isinstance(moe.experts, ExpertParallel) and moe.experts.n_local == 2
        loss = loss_of(model, batches[rank])
        if "model.ffn.capacity_factor=1.0" in overrides:
            assert moe.stats["dropped_fraction"].item() > 0  # the drop path is exercised
        loss.backward()
        torch.testing.assert_close(loss.item(), ref_loss, rtol=1e-5, atol=1e-6)
        expected = dict(reference.named_parameters())
        first = moe.experts.first
        for name, p in model.named_parameters():
            grad = p.grad
            listed = re.search(r"\.experts\.local\.experts\.(\d+)\.", name)
            if listed:  # a whole expert module: local i is global first + i
                want = expected[name.replace(listed.group(0), f".experts.experts.{first + int(listed.group(1))}.")].grad
            elif ".experts.local." in name:  # stacked weights: this rank's slice
                want = expected[name.replace(".experts.local.", ".experts.")].grad[first : first + 2]
            else:  # replicated: the ranks' gradients add up, as a DDP all-reduce would
                dist.all_reduce(grad := grad.clone())
                want = expected[name].grad
            torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6, msg=name)
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()
    # About one run in six, a rank that has passed every check and destroyed its process group
    # aborts in interpreter teardown ("terminate called without an active exception", from a C++
    # thread; seen before and after the 2026-11-29 changes, not reproduced by funcol alone). Until
    # its cause is found, a rank that got here leaves without that teardown.
    os._exit(0)


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_match_one_process_holding_all_experts(case, tmp_path):
    """2 gloo processes, each with half the experts and its own batch, give the same losses and
    gradients as one process with every expert running both batches."""
    mp.spawn(worker, args=(str(tmp_path / "store"), CASES[case]), nprocs=WORLD, join=True)


# both compiled runs are in the slow suite (on a 2-core Xeon 50 s beside DDP; beside FSDP 144 s with
# empty compile caches, which took the fast suite past 10 minutes)
@pytest.mark.parametrize("data_parallel, compiled", [("ddp", False), pytest.param("ddp", True, marks=pytest.mark.slow),
                                                     ("fsdp", False), pytest.param("fsdp", True, marks=pytest.mark.slow)],
                         ids=["ddp", "ddp-compiled", "fsdp", "fsdp-compiled"])
def test_stacklm_train_with_expert_parallelism(data_parallel, compiled, tiny, tmp_path, cache_dir, torchrun_train):
    """`stacklm train ... train.expert_parallel=true` under torchrun, the rest of the model under
    DDP or FSDP (each eager and compiled, `train.compile=true`), takes the same steps as plain
    DDP (gradient clipping on the global norm included, and muP's per-group learning rates, which
    the sharded experts take by their unsharded names), writes the unsharded model, and resumes
    exactly from a checkpoint holding each distinct optimizer state once."""
    moe = ["model.ffn=moe", "model.ffn.n_experts=4", "model.ffn.capacity_factor=1.0",
           "model.parametrization=mup", "model.base_width=32"]
    common = [*moe, "train.steps=6", "train.log_every=1", "train.dtype=float32", "train.threads=1",
              "train.batch_size=4", "train.ckpt_every=3", "train.eval_every=3", "train.grad_clip=0.2",
              "train.eval_batches=3", f"data.cache_dir={cache_dir}", "train.progress=false",
              "eval.sample_tokens=0"]
    runs = {name: tmp_path / name for name in ("dp", "ep")}
    torchrun_train(*common, f"train.out_dir={runs['dp']}")
    sharded = ["train.expert_parallel=true", f"train.data_parallel={data_parallel}", f"train.compile={compiled}"]
    torchrun_train(*common, *sharded, f"train.out_dir={runs['ep']}")
    dp, ep = (read_metrics(runs[name], "train") for name in ("dp", "ep"))
    assert [r["loss"] for r in ep] == pytest.approx([r["loss"] for r in dp], rel=1e-4)
    assert [r["grad_norm"] for r in ep] == pytest.approx([r["grad_norm"] for r in dp], rel=1e-4)
    assert min(r["grad_norm"] for r in dp) > 0.2  # so clipping acted on every step
    assert ([r["loss"] for r in read_metrics(runs["ep"], "val")]
            == pytest.approx([r["loss"] for r in read_metrics(runs["dp"], "val")], rel=1e-4))

    # The checkpoint is the whole model: one process loads it and gets DDP's weights
    ep_model, dp_model = load_run(runs["ep"]).model, load_run(runs["dp"]).model
    for (name, p), q in zip(ep_model.named_parameters(), dp_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)

    # Each distinct optimizer state is saved once: rank 1's entry holds its experts' states and,
    # beside DDP, none of the replicated parameters' (rank 0's entry has them), beside FSDP its shards
    ckpt = Checkpointer(runs["ep"] / "checkpoints")
    first, second = (set(entry["state"]) for entry in load_state(ckpt.latest())["optimizer"])
    assert second and (second == first if data_parallel == "fsdp" else second < first)

    # Resume from step 3 on 2 ranks: the same losses as the straight run (rank 1 reading the
    # replicated states from rank 0's entry)
    straight = [r["loss"] for r in ep]
    shutil.rmtree(ckpt.latest())
    (runs["ep"] / "checkpoints" / "latest").unlink()
    torchrun_train(*common, *sharded, f"train.out_dir={runs['ep']}", "--resume")
    assert [r["loss"] for r in read_metrics(runs["ep"], "train")] == straight

    # One process cannot take up the two ranks' optimizer states
    beside = " and FSDP" if data_parallel == "fsdp" else ""
    with pytest.raises(UserError, match=f"saved with expert parallelism{beside} over 2 ranks and this run "
                                        "has no sharding"):
        train(tiny(*common, f"train.out_dir={runs['ep']}", "train.steps=9"), resume=True, log=lambda m: None)


def test_expert_parallel_needs_experts(tiny):
    with pytest.raises(UserError, match="train.expert_parallel shards MoE experts"):
        train(tiny("train.expert_parallel=true", "train.steps=1"), log=lambda m: None)


def test_expert_groups_smaller_than_the_world(tiny, tmp_path, cache_dir, torchrun_train):
    """4 ranks in expert groups of 2 (`train.expert_parallel_size=2`: ranks 0-1 and 2-3 each split
    the 4 experts, ranks 0 and 2 holding the same two): the same steps as DDP on 4 ranks, beside
    DDP and beside FSDP; the checkpoint is the whole model; a resumed run repeats the losses."""
    common = ["model.ffn=moe", "model.ffn.n_experts=4", "model.ffn.capacity_factor=1.0", "train.steps=4",
              "train.log_every=1", "train.dtype=float32", "train.threads=1", "train.batch_size=2",
              "train.ckpt_every=2", "train.eval_every=2", "train.grad_clip=0.2", "train.eval_batches=2",
              f"data.cache_dir={cache_dir}", "train.progress=false", "eval.sample_tokens=0"]
    groups = ["train.expert_parallel=true", "train.expert_parallel_size=2"]
    runs = {name: tmp_path / name for name in ("dp", "ddp", "fsdp")}
    torchrun_train(*common, f"train.out_dir={runs['dp']}", ranks=4)
    torchrun_train(*common, *groups, f"train.out_dir={runs['ddp']}", ranks=4)
    torchrun_train(*common, *groups, "train.data_parallel=fsdp", f"train.out_dir={runs['fsdp']}", ranks=4)
    dp = read_metrics(runs["dp"], "train")
    for name in ("ddp", "fsdp"):
        ep = read_metrics(runs[name], "train")
        assert [r["loss"] for r in ep] == pytest.approx([r["loss"] for r in dp], rel=1e-4), name
        assert [r["grad_norm"] for r in ep] == pytest.approx([r["grad_norm"] for r in dp], rel=1e-4), name
    assert min(r["grad_norm"] for r in dp) > 0.2  # clipping acted on every step

    dp_model = load_run(runs["dp"]).model
    for name, wrapping in (("ddp", []), ("fsdp", ["train.data_parallel=fsdp"])):
        for (key, p), q in zip(load_run(runs[name]).model.named_parameters(), dp_model.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")
        # The second group's ranks leave their experts' states to their replicas in the first
        ckpt = Checkpointer(runs[name] / "checkpoints")
        entries = [set(entry["state"]) for entry in load_state(ckpt.latest())["optimizer"]]
        assert entries[2] == entries[3] and entries[2] < entries[1], name
        assert bool(entries[2]) == (name == "fsdp"), name  # beside DDP, nothing of their own
        straight = [r["loss"] for r in read_metrics(runs[name], "train")]
        shutil.rmtree(ckpt.latest())
        (runs[name] / "checkpoints" / "latest").unlink()
        torchrun_train(*common, *groups, *wrapping, f"train.out_dir={runs[name]}", "--resume", ranks=4)
        assert [r["loss"] for r in read_metrics(runs[name], "train")] == straight, name

    with pytest.raises(UserError, match="saved with expert parallelism in groups of 2 over 4 ranks and this "
                                        "run has no sharding"):
        train(tiny(*common, f"train.out_dir={runs['ddp']}", "train.steps=6"), resume=True, log=lambda m: None)


def test_expert_parallel_size_needs_expert_parallel():
    with pytest.raises(UserError, match="train.expert_parallel_size is set but train.expert_parallel is false"):
        Config.load("configs/tiny.yaml", ["train.expert_parallel_size=2"])


def test_expert_parallel_states_resume_only_as_saved(tmp_path):
    """A checkpoint's per-rank optimizer states resume on the same ranks in expert groups of the
    same size; one saved before the size was recorded counts as groups spanning its ranks; a rank
    takes the replicated parameters' states from rank 0's entry."""
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    ranks = [optimizer.state_dict()] * 4
    info = Dist(rank=1, world=4, local_rank=1)
    older = {"layout": "expert_parallel", "optimizer": ranks}
    restore_optimizer(optimizer, model, older, "expert_parallel", info, tmp_path, expert_size=4)
    with pytest.raises(UserError, match="saved with expert parallelism over 4 ranks and this run has expert "
                                        "parallelism in groups of 2 over 4 ranks"):
        restore_optimizer(optimizer, model, older, "expert_parallel", info, tmp_path, expert_size=2)
    grouped = {**older, "expert_parallel_size": 2}
    restore_optimizer(optimizer, model, grouped, "expert_parallel", info, tmp_path, expert_size=2)
    # Saved once (rank 0's entry holding the replicated states) or whole in every entry (older
    # checkpoints), rank 1 resumes with the same state
    whole = optimizer.state_dict()
    once = {**older, "optimizer": [whole] + [{**whole, "state": {}}] * 3}
    optimizer.state.clear()
    restore_optimizer(optimizer, model, once, "expert_parallel", info, tmp_path, expert_size=4)
    torch.testing.assert_close(optimizer.state_dict(), whole)
    with pytest.raises(UserError, match="in groups of 2 over 4 ranks and this run has expert parallelism and "
                                        "FSDP in groups of 2 over 4 ranks"):
        restore_optimizer(optimizer, model, grouped, "expert_parallel_fsdp", info, tmp_path, expert_size=2)

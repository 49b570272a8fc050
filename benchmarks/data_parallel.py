"""DDP against FSDP2 (`train.data_parallel`), side by side in the same processes: 2 gloo ranks on
the CPU, one thread each, the model of configs/default.yaml (with --quick a smaller one).

Both wrappings train copies of the same model (same seed) on the same random batches, with the
trainer's own pieces (stacklm.training.distributed and optim): forward, backward, gradient
clipping, AdamW. Their steps take turns (DDP, FSDP, DDP, FSDP, ...); the time ratio is the median
of the per-round ratios FSDP / DDP on rank 0. Their losses must agree step for step (checked).

The state each rank holds for training (parameters, gradients and AdamW's two moments, all
float32) is counted from its tensors: DDP keeps all of it on every rank, FSDP 1 / world of it
plus, while a block runs, that block's gathered weights. Then the memory is measured: each
wrapping alone, in fresh processes, trains a larger model (d_model 512, 8 layers; --quick: the
timed one) for a few steps; each rank's peak resident memory over what it held before the model
was built is read from /proc (the larger of the two ranks'), once for building and wrapping the
model (every rank builds it whole before FSDP shards it) and once, restarted, for the steps.

With --moe the model is configs/switch-moe.yaml's (8 experts in every layer) and each wrapping
also shards the experts across the ranks (`train.expert_parallel`): expert parallelism beside DDP
against expert parallelism beside FSDP, with the trainer's expert-parallel pieces (the experts'
gradients scaled to a mean over ranks, clipping on the whole model's norm).

    python -m benchmarks.data_parallel [--quick] [--moe] [--rounds N]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

import stacklm
from benchmarks.common import alternate, headline, load_average, machine, median, speedup, table
from stacklm.training import distributed, expert_parallel
from stacklm.training.optim import build_optimizer

WORLD = 2
QUICK = ["model.d_model=128", "model.n_layers=2", "model.vocab_size=4096", "data.seq_len=128"]
MEMORY = ["model.d_model=512", "model.n_layers=8", "model.n_heads=8"]
MOE = ["model.ffn=moe", "model.ffn.n_experts=8"]  # switch-moe.yaml's layer (its other settings are the defaults)


def resident(field: str) -> int:
    """This process's VmRSS or VmHWM (its peak) in bytes."""
    with open("/proc/self/status") as f:
        return 1024 * int(next(line.split()[1] for line in f if line.startswith(f"{field}:")))


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of parameters, gradients and optimizer state held on this rank (local shards)."""
    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    params = list({id(p): p for p in model.parameters()}.values())
    held = sum(local(p).nbytes for p in params) + sum(local(p.grad).nbytes for p in params if p.grad is not None)
    for state in optimizer.state.values():
        held += sum(local(v).nbytes for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return held


def worker(rank: int, store: str, overrides: list[str], kinds: tuple[str, ...], rounds: int, batch: int,
           experts: bool, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    info, device = distributed.Dist(rank, WORLD, rank), torch.device("cpu")
    config = stacklm.Config.load("configs/default.yaml", overrides)
    seq_len, vocab = config.data.seq_len, config.model.vocab_size
    before = resident("VmRSS")
    setups = {}
    for kind in kinds:
        torch.manual_seed(0)  # the same weights in both, and on every rank
        model = stacklm.build_model(config).train()
        if experts:  # as the trainer's shard_experts: every rank keeps its slice of rank 0's experts
            distributed.broadcast_weights(model)
            expert_parallel.apply_expert_parallel(model)
        parallel = distributed.wrap_data_parallel(model, info, device, kind,
                                                  expert_parallel.sharded_parameter_names(model))
        setups[kind] = (model, parallel, build_optimizer(model, config.train, device))
    built = resident("VmHWM") - before  # the whole model is built on each rank before sharding
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # restart the peak (VmHWM) from the present resident memory
    generator = torch.Generator().manual_seed(rank)
    batches = [torch.randint(0, vocab, (batch, seq_len + 1), generator=generator) for _ in range(4)]
    losses: dict[str, list[float]] = {kind: [] for kind in setups}
    autocast = torch.autocast("cpu", dtype=stacklm.device.resolve_dtype(config.train.dtype, device))

    def step(kind: str) -> None:
        model, parallel, optimizer = setups[kind]
        ids = batches[len(losses[kind]) % len(batches)]
        with autocast:
            loss = parallel(ids[:, :-1], targets=ids[:, 1:])
            aux = model.auxiliary_loss()
        (loss if aux is None else loss + aux).backward()
        if experts:
            expert_parallel.finish_sharded_grads(model, WORLD)
            expert_parallel.clip_grad_norm_(model, config.train.grad_clip)
        else:
            distributed.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        optimizer.step()
        for p in model.parameters():  # zeroed, not freed, to count their memory (one by one: zero_grad's
            if p.grad is not None:    # foreach cannot mix FSDP's DTensors with the experts' plain tensors)
                p.grad.zero_()
        losses[kind].append(info.all_reduce_sum(loss.detach()).item() / WORLD)

    times = alternate({kind: (lambda kind=kind: step(kind)) for kind in setups}, rounds, warmup=2)
    results[rank] = dict(times=times, losses=losses, built=built, peak=resident("VmHWM") - before,
                         bytes={kind: state_bytes(m, o) for kind, (m, _, o) in setups.items()},
                         params=setups[kinds[0]][0].num_params(), dtype=str(autocast.fast_dtype))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # see tests/training/test_expert_parallel.py: gloo's teardown aborts now and then


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model and fewer rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed steps of each (default 20, quick 8)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank")
    parser.add_argument("--moe", action="store_true", help="an MoE model, its experts sharded across the "
                        "ranks beside each wrapping (expert parallelism)")
    args = parser.parse_args()
    rounds = args.rounds or (8 if args.quick else 20)
    moe = MOE if args.moe else []
    overrides = [*moe, *(QUICK if args.quick else [])]
    print(f"machine: {machine()}; load {load_average()}; {WORLD} gloo ranks x 1 thread"
          f"{'; MoE, experts sharded across the ranks' if args.moe else ''}")
    results = spawn(overrides, ("ddp", "fsdp"), rounds, args.batch, args.moe)[0]  # rank 0's
    times, losses, held = results["times"], results["losses"], results["bytes"]
    agree = max(abs(a - b) / abs(a) for a, b in zip(losses["ddp"], losses["fsdp"], strict=True))
    print(f"model: {results['params'] / 1e6:.1f}M parameters, batch {args.batch} x {WORLD} ranks, "
          f"autocast {results['dtype']}; largest relative loss difference FSDP vs DDP over "
          f"{len(losses['ddp'])} steps: {agree:.1e}")
    rows = [[kind.upper(), 1e3 * median(times[kind]), held[kind] / 2**20] for kind in ("ddp", "fsdp")]
    print(table(rows, ["wrapping", "step ms (median)", "training state MiB / rank"]))
    if not math.isfinite(agree) or agree > 1e-2:  # bf16 autocast amplifies the reductions' rounding
        raise SystemExit(f"FSDP and DDP took different steps (relative loss difference {agree:.1e})")
    peak, built, state = {}, {}, {}
    for kind in ("ddp", "fsdp"):
        ranks = spawn(overrides if args.quick else [*moe, *MEMORY], (kind,), 3, 2, args.moe)
        peak[kind] = max(r["peak"] for r in ranks.values())
        built[kind] = max(r["built"] for r in ranks.values())
        state[kind] = ranks[0]["bytes"][kind]
    print(f"memory ({ranks[0]['params'] / 1e6:.1f}M parameters, batch 2 x {WORLD} ranks, 5 steps; MiB per "
          f"rank, resident memory over what the rank held before building the model):")
    rows = [[kind.upper(), state[kind] / 2**20, built[kind] / 2**20, peak[kind] / 2**20] for kind in ("ddp", "fsdp")]
    print(table(rows, ["wrapping", "training state", "peak while building", "peak while training"]))
    prefix, beside = ("ep_", ", experts sharded beside both") if args.moe else ("", "")
    headline(f"{prefix}fsdp_step_time_ratio", 1 / speedup(times["ddp"], times["fsdp"]), None, f"x (FSDP / DDP{beside})")
    headline(f"{prefix}fsdp_state_bytes_ratio", held["fsdp"] / held["ddp"], None if args.moe else 1 / WORLD,
             f"x (FSDP / DDP, per rank{beside})")
    headline(f"{prefix}fsdp_peak_memory_ratio", peak["fsdp"] / peak["ddp"], None,
             f"x (FSDP / DDP, per rank, measured{beside})")


def spawn(overrides: list[str], kinds: tuple[str, ...], rounds: int, batch: int, experts: bool = False) -> dict[int, dict]:
    """Run `worker` on WORLD fresh processes; each rank's results."""
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(f"{tmp}/store", overrides, kinds, rounds, batch, experts, results), nprocs=WORLD,
                 join=True)
        return dict(results)


if __name__ == "__main__":
    main()

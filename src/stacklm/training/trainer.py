"""The training loop: it composes the data, the model, the optimizer, checkpoints and metrics."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from stacklm.config import Config
from stacklm.data import PackedLoader, Tokenizer, prepare_data
from stacklm.device import keep_freed_memory_on_cpu, resolve_dtype
from stacklm.errors import TrainingError, UserError
from stacklm.evaluate import evaluate
from stacklm.model.moe import MoE
from stacklm.model.transformer import build_model
from stacklm.registry import OBJECTIVE
from stacklm.training import distributed, expert_parallel
from stacklm.training.checkpoint import Checkpointer, load_state, load_weights
from stacklm.training.distributed import Dist, init_distributed, shutdown, wrap_data_parallel
from stacklm.training.metrics import MetricsLogger
from stacklm.training.optim import build_optimizer, lr_at, set_lr

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "config.yaml"


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    step: int
    val: dict  # loss, ppl, bpb, tokens of the final validation
    losses: list[float]  # training loss of each step this call ran
    skipped_steps: int  # steps skipped for a non-finite loss or gradient, over the whole run


def first_difference(a, b, prefix: str = "") -> str | None:
    """Dotted key of the first field where two config dataclasses differ."""
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if dataclasses.is_dataclass(x) and dataclasses.is_dataclass(y) and type(x) is type(y):
            found = first_difference(x, y, f"{prefix}{f.name}.")
            if found:
                return found
        elif x != y:
            return f"{prefix}{f.name}"
    return None


def check_run_dir(config: Config, resume: bool, overwrite: bool) -> tuple[Path, Checkpointer]:
    """Refuse to clobber a run, or to resume one with another model or data; writes nothing."""
    run_dir = Path(config.train.out_dir)
    ckpt = Checkpointer(run_dir / "checkpoints", config.train.keep_last)
    latest = ckpt.latest()
    if resume:
        if latest is None:
            raise UserError(f"--resume: no checkpoint in {run_dir}/checkpoints to resume from")
        saved = Config.load(run_dir / CONFIG_FILE)
        for section in ("model", "data"):
            key = first_difference(getattr(saved, section), getattr(config, section), f"{section}.")
            if key:
                raise UserError(f"--resume: {key} differs from the run's saved {run_dir / CONFIG_FILE}; "
                                f"a resumed run keeps its model and data")
    elif latest is not None and not overwrite:
        raise UserError(f"{run_dir} already holds a run (checkpoint {latest.name}); pass --resume to "
                        f"continue it, --overwrite to replace it, or set train.out_dir")
    return run_dir, ckpt


def init_run_dir(config: Config, run_dir: Path, info: Dist, resume: bool, overwrite: bool) -> None:
    if info.main:
        if overwrite and not resume:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            for name in ("metrics.jsonl", "tensorboard"):
                path = run_dir / name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / CONFIG_FILE)
    info.barrier()


def shard_experts(model: torch.nn.Module, info: Dist, size: int | None, device: torch.device) -> bool:
    """Apply `train.expert_parallel` over expert groups of `size` ranks (None: all of them);
    returns whether the experts are now sharded (not when alone, or in groups of one)."""
    if not any(isinstance(m, MoE) for m in model.modules()):
        raise UserError("train.expert_parallel shards MoE experts, and this model has none; set "
                        "model.ffn=moe, or train.expert_parallel=false")
    size = size or info.world
    if info.world == 1 or size == 1:
        return False
    group, replicas = expert_parallel.expert_groups(device.type, size)
    for moe in (m for m in model.modules() if isinstance(m, MoE)):  # DDP or FSDP broadcasts the rest
        distributed.broadcast_weights(moe.experts)  # each rank keeps its slice of the same experts: rank 0's
    expert_parallel.apply_expert_parallel(model, group, replicas)
    return True


def optimizer_layout(sharded_experts: bool, fully_sharded: bool) -> str:
    """How a checkpoint holds the optimizer state: one replica's `state_dict()` ("replicated": one
    process or DDP), the unsharded state by name ("fsdp"), or one entry per rank, with sharded
    experts ("expert_parallel" beside DDP, "expert_parallel_fsdp" beside FSDP: each rank's shards),
    each distinct state in one of them (`expert_parallel.optimizer_state_sources`)."""
    if sharded_experts:
        return "expert_parallel_fsdp" if fully_sharded else "expert_parallel"
    return "fsdp" if fully_sharded else "replicated"


def restore_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module, state: dict, layout: str,
                      info: Dist, checkpoint: Path, expert_size: int | None = None) -> None:
    """Load this rank's optimizer state from a checkpoint's trainer state. A whole state (one
    process, DDP, FSDP) resumes under any of them, on any number of ranks; expert-parallel
    states only as they were saved (`expert_size`: the ranks of an expert group)."""
    saved = state.get("layout") or ("expert_parallel" if state.get("expert_parallel") else "replicated")
    saved_ranks = len(state["optimizer"]) if saved.startswith("expert_parallel") else None
    saved_size = state.get("expert_parallel_size", saved_ranks)  # older checkpoints: over every rank
    as_saved = saved == layout and saved_ranks == info.world and saved_size == expert_size
    whole = ("replicated", "fsdp")
    if saved in whole and layout == "replicated":
        optim = state["optimizer"]
        optimizer.load_state_dict(optim if saved == "replicated" else
                                  distributed.rekey_optimizer_state(model, optimizer, optim, by_name=False))
    elif saved in whole and layout == "fsdp":
        optim = state["optimizer"] if info.main else None  # each tensor is broadcast from rank 0
        if optim is not None and saved == "replicated":
            optim = distributed.rekey_optimizer_state(model, optimizer, optim, by_name=True)
        distributed.load_full_optimizer_state(model, optimizer, optim)
    elif as_saved:  # from the mapped file, only this rank's parameters' states copied out
        mine = expert_parallel.rank_optimizer_state(model, optimizer, state["optimizer"], info.rank)
        if layout == "expert_parallel_fsdp":
            distributed.load_local_optimizer_state(optimizer, mine)
        else:
            optimizer.load_state_dict(mine)
    else:
        def describe(layout: str, ranks: int | None, size: int | None) -> str:
            if not layout.startswith("expert_parallel"):
                return {"replicated": "no sharding (one process or DDP)", "fsdp": "FSDP"}[layout]
            groups = f"in groups of {size} " if size != ranks else ""
            beside = " and FSDP" if layout.endswith("fsdp") else ""
            return f"expert parallelism{beside} {groups}over {ranks} ranks"

        raise UserError(f"--resume: {checkpoint} was saved with {describe(saved, saved_ranks, saved_size)} "
                        f"and this run has {describe(layout, info.world, expert_size)}; a run with sharded "
                        f"experts resumes with the same train.expert_parallel, train.expert_parallel_size, "
                        f"train.data_parallel and number of processes")


def train(config: Config, resume: bool = False, overwrite: bool = False,
          log: Callable[[str], None] = print) -> TrainResult:
    """Train the model `config` describes; under torchrun, as one rank of data-parallel training
    (DDP or FSDP2, `train.data_parallel`)."""
    info, device = init_distributed(config.train.device)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        if config.train.threads:
            torch.set_num_threads(config.train.threads)
        if config.train.deterministic and device.type == "cuda":  # cuBLAS refuses otherwise
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(config.train.deterministic or deterministic)
        return _train(config, info, device, resume, overwrite, log if info.main else (lambda _: None))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        shutdown(info)


def _train(config: Config, info: Dist, device: torch.device, resume: bool, overwrite: bool,
           log: Callable[[str], None]) -> TrainResult:
    tcfg, seq_len = config.train, config.data.seq_len
    if device.type == "cpu":
        keep_freed_memory_on_cpu()
    torch.manual_seed(tcfg.seed)
    run_dir, ckpt = check_run_dir(config, resume, overwrite)

    tokenizer = Tokenizer.load(run_dir / TOKENIZER_FILE) if resume else None
    for turn in (0, 1):  # the main rank fills the cache first; the others then read it
        if info.main == (turn == 0):
            data = prepare_data(config.data, config.model.vocab_size, tokenizer,
                                progress=tcfg.progress and info.main, log=log)
        info.barrier()
    if data.train is None:
        raise UserError(f"data.source {config.data.source!r}: no training documents")
    init_run_dir(config, run_dir, info, resume, overwrite)
    if info.main and not resume:
        data.tokenizer.save(run_dir / TOKENIZER_FILE)

    model = build_model(config).to(device)
    n_params, flops = model.num_params(), model.flops_per_token(seq_len)  # of the whole model
    latest = ckpt.latest() if resume else None
    if latest is not None:
        load_weights(model, latest)  # checkpoints hold the unsharded model
    sharded = shard_experts(model, info, tcfg.expert_parallel_size, device) if tcfg.expert_parallel else False
    expert_size = (tcfg.expert_parallel_size or info.world) if sharded else None
    parallel = wrap_data_parallel(model, info, device, tcfg.data_parallel,
                                  expert_parallel.sharded_parameter_names(model))
    layout = optimizer_layout(sharded, distributed.is_fully_sharded(model))
    objective = OBJECTIVE.build(tcfg.objective, data.tokenizer, config.model)
    optimizer = build_optimizer(model, tcfg, device)
    loader = PackedLoader(data.train, seq_len, tcfg.batch_size, tcfg.seed, rank=info.rank, world=info.world)
    tokens_per_step = tcfg.batch_size * seq_len * tcfg.grad_accum * info.world
    step, skipped, trained_tokens = 0, 0, 0  # trained_tokens: of the steps taken, over all ranks (D)
    if latest is not None:
        # Mapped from the file where a rank reads part of the optimizer state (FSDP: rank 0 reads
        # it, and every rank keeps a copy of its shard; sharded experts: each rank copies its
        # parameters' states out of the entries holding them); read whole otherwise, as the
        # optimizer keeps what it is given
        state = load_state(latest, mmap=layout != "replicated")
        restore_optimizer(optimizer, model, state, layout, info, latest, expert_size)
        loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"]["torch"])
        step, skipped = state["step"], state["skipped_steps"]
        trained_tokens = state.get("trained_tokens", step * tokens_per_step)
        log(f"resuming {run_dir} from step {step}")
        del state
    net = torch.compile(parallel) if tcfg.compile else parallel

    autocast_dtype = resolve_dtype(tcfg.dtype, device)
    log(f"model: {n_params / 1e6:.2f}M parameters, {flops / 1e6:.1f} MFLOPs/token (train); "
        f"{tokens_per_step} tokens/step on {info.world} x {device}, {tcfg.dtype} -> {autocast_dtype}")
    autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32)
    metrics = MetricsLogger(run_dir, enabled=info.main)
    if resume:
        metrics.truncate_after(step)
    bar = tqdm(total=tcfg.steps, initial=step, disable=not (tcfg.progress and info.main),
               desc="train", dynamic_ncols=True)

    def validate() -> dict:
        val = evaluate(model, data.val, seq_len, config.eval.batch_size, tcfg.eval_batches, device,
                       autocast_dtype, info, head=objective.mode_head())
        metrics.log(step, "val", **val, trained_tokens=trained_tokens)
        return val

    def save(at: int) -> Path | None:
        # Sharded runs gather on the main rank, which writes the unsharded model: FSDP with the
        # unsharded optimizer state; sharded experts with each rank's part of the optimizer state
        # (each distinct state once: expert_parallel.optimizer_state_sources)
        if layout == "fsdp":
            weights, optim_state = distributed.full_state(model, optimizer)
        elif sharded:  # through host memory (info.host_group): rank 0's GPU need not hold every rank's state
            gathered = distributed.full_model_state(model) if layout == "expert_parallel_fsdp" else None
            weights = expert_parallel.full_state_dict(model, gathered)
            optim_state = [None] * info.world if info.main else None
            mine = expert_parallel.saved_optimizer_state(model, optimizer, info.rank)
            torch.distributed.gather_object(mine, optim_state, group=info.host_group)
        else:
            weights, optim_state = model, optimizer.state_dict()
        if not info.main:
            return None
        state = {"step": at, "skipped_steps": skipped, "trained_tokens": trained_tokens,
                 "optimizer": optim_state, "layout": layout, "expert_parallel_size": expert_size,
                 "loader": loader.state_dict(), "rng": {"torch": torch.get_rng_state()}}
        return ckpt.save(at, weights, state)

    losses: list[float] = []
    in_a_row = 0
    model.train()
    while step < tcfg.steps:
        t0 = time.perf_counter()
        lr = lr_at(step, tcfg)
        set_lr(optimizer, lr)
        loss_sum = torch.zeros((), device=device)
        for micro in range(tcfg.grad_accum):
            batch = next(loader).to(device, non_blocking=True)
            last = micro == tcfg.grad_accum - 1
            with distributed.gradient_sync(parallel, last):
                with autocast:
                    loss, count = objective.loss(net, batch)
                    aux = model.auxiliary_loss()  # MoE load balance and router z-loss, if any
                if info.world > 1:
                    # DDP and FSDP average the ranks' gradients; ranks whose batches hold more target
                    # tokens (denoising objectives) weigh more, so that the step is the gradient of
                    # the mean over all ranks' tokens, as in one process. 1 when the counts are equal.
                    loss = loss * (count * info.world / info.all_reduce_sum(count.clone()).clamp_min(1))
                ((loss if aux is None else loss + aux) / tcfg.grad_accum).backward()
            loss_sum += loss.detach()
        if sharded:
            expert_parallel.finish_sharded_grads(model, info.world)
            grad_norm = expert_parallel.clip_grad_norm_(model, tcfg.grad_clip or math.inf)
        else:
            grad_norm = distributed.clip_grad_norm_(model.parameters(), tcfg.grad_clip or math.inf)
        mean_loss = info.all_reduce_sum(loss_sum / tcfg.grad_accum).item() / info.world
        if torch.isfinite(grad_norm) and math.isfinite(mean_loss):
            optimizer.step()
            trained_tokens += tokens_per_step
            in_a_row = 0
        else:
            skipped += 1
            in_a_row += 1
            if in_a_row >= tcfg.max_nonfinite:
                kept = ckpt.latest()
                raise TrainingError(
                    f"loss or gradient non-finite for {in_a_row} steps in a row (step {step + 1}); "
                    f"stopped. Last checkpoint: {kept or 'none'}. Try a lower train.lr, "
                    f"train.grad_clip, or train.dtype=float32")
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(mean_loss)
        tokens_per_s = tokens_per_step / (time.perf_counter() - t0)
        bar.update(1)
        bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        if step % tcfg.log_every == 0 or step == tcfg.steps:
            metrics.log(step, "train", loss=mean_loss, lr=lr, grad_norm=float(grad_norm),
                        tokens_per_s=tokens_per_s, skipped_steps=skipped, **model.layer_metrics())
        if tcfg.eval_every and step % tcfg.eval_every == 0 and step < tcfg.steps:
            val = validate()
            bar.write(f"step {step}: val loss {val['loss']:.4f}  ppl {val['ppl']:.2f}  bpb {val['bpb']:.4f}")
        if tcfg.ckpt_every and step % tcfg.ckpt_every == 0 and step < tcfg.steps:
            save(step)
    bar.close()
    val = validate()
    metrics.close()
    save(step)
    info.barrier()
    if skipped:
        log(f"skipped {skipped} steps with a non-finite loss or gradient")
    return TrainResult(run_dir, step, val, losses, skipped)

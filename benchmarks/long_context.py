"""Attention kinds at long context: forward + backward time and peak memory of one training
step (no optimizer) against sequence length, for full / local / lsh at one model size.

The model is configs/default.yaml's (4 layers, d_model 256, 4 heads of 64) with max_seq_len
raised to the longest length, batch 1, in the dtype training picks on this machine (`--dtype
auto`: bf16 autocast where bf16 is fast, float32 where it is emulated). `local` uses
a 256-token window; `lsh` 4 hashes, 32 buckets, chunks of 64, with its exact-attention fallback
switched off (exact_below=0) so the LSH path itself is measured.

- Time: at each length the three kinds take turns (A B C A B C ...); the ratio to full is the
  median of the per-round ratios.
- Memory: each (kind, length) runs in a fresh process, which reports its peak resident memory
  during the step minus its resident memory just before (model, optimizer-free, inputs built);
  on a GPU (`--device cuda`), the peak of `torch.cuda.max_memory_allocated` during the step minus
  what was allocated before it. On the CPU the process runs with glibc's mmap threshold fixed
  (MALLOC_MMAP_THRESHOLD_), so that a freed tensor's pages go back to the system at once and the
  resident peak is the step's tensors, as the GPU figure is: with the default, adaptive
  threshold, glibc keeps freed blocks of up to 32 MiB on its heap and reuses them only partly,
  which added two thirds to LSH's peak at 8192 tokens and 2% to full attention's.
- `--recompute` runs local and lsh with `model.attention.recompute=true`: their scores and
  probabilities are computed again in the backward pass instead of kept. Their steps without it
  are timed in the same rounds, and the time it costs is printed per length.
- The memory of full attention with its (T, T) scores materialised (the baseline the Reformer
  and Longformer papers compare with) is shown up to 8192 tokens for reference; stacklm's `full`
  runs PyTorch's fused kernel, whose memory grows linearly. On a GPU that baseline is SDPA
  restricted to its math backend, which materialises the scores.
- Crossover: the shortest length at which lsh's step is faster than full's (the `exact_below`
  default of `model.attention.kind=lsh` comes from this figure).

memory_ratio and time_ratio are the larger of local/full and lsh/full at the longest length run.

    python -m benchmarks.long_context [--quick] [--lengths 1024,2048,...] [--device cuda] [--dtype D] [--recompute]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import stacklm
import stacklm.model.attention as attention
from benchmarks.common import alternate, headline, load_average, machine, median, speedup, table
from stacklm.device import resolve_dtype

KINDS = {
    "full": ["model.attention.kind=full"],
    "local": ["model.attention.kind=local", "model.attention.window=256"],
    "lsh": ["model.attention.kind=lsh", "model.attention.n_hashes=4", "model.attention.n_buckets=32",
            "model.attention.chunk_size=64", "model.attention.exact_below=0"],
}


# Memory only, up to EXPLICIT_UP_TO tokens: full attention with its (T, T) scores in memory, the
# textbook baseline of the Reformer and Longformer papers (stacklm's full uses a fused kernel).
EXPLICIT = "full, T x T scores"
EXPLICIT_UP_TO = 8192


RECOMPUTE = "model.attention.recompute=true"


def build(kind: str, length: int, args: argparse.Namespace):
    """One training step's forward and backward for `kind` at `length` tokens, in args.dtype on
    args.device (with args.recompute for local and lsh); on a GPU it waits for the device, so that
    a timer around it measures the step."""
    device, dtype = args.device, args.dtype
    sdpa = contextlib.nullcontext
    if kind == EXPLICIT:
        attention.EXPLICIT_MAX_LEN = length  # this process only: the child that measures memory
        attention.BLOCK_MAX_LEN = 0  # not the block-causal path, which keeps half the scores
        sdpa = lambda: sdpa_kernel(SDPBackend.MATH)  # noqa: E731 -- the GPU's (T, T)-scores kernel
        kind = "full"
    overrides = [*KINDS[kind], RECOMPUTE] if args.recompute and kind != "full" else KINDS[kind]
    config = stacklm.Config.load("configs/default.yaml", [f"model.max_seq_len={length}", *overrides])
    torch.manual_seed(0)
    model = stacklm.build_model(config).train().to(device)
    ids = torch.randint(0, config.model.vocab_size, (1, length + 1), device=device)

    def step():
        with sdpa(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(ids[:, :-1], targets=ids[:, 1:])
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def status_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, in MiB. Not getrusage's
    ru_maxrss: Linux carries that over exec from the parent that started this process."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


def child(kind: str, length: int, args: argparse.Namespace) -> None:
    """One step in this process: print the peak memory it added, in MiB (resident memory on the
    CPU, allocated device memory on a GPU)."""
    device = args.device
    step = build(kind, length, args)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        extra = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    else:
        before = status_mb("VmRSS")
        step()
        extra = status_mb("VmHWM") - before
    print(json.dumps({"extra_mb": extra}))


def peak_memory(kind: str, length: int, args: argparse.Namespace) -> float:
    # 128 KiB, glibc's initial threshold: from there on every block that size or larger is mapped
    # on its own and unmapped when freed (see the module docstring)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    flags = ["--device", str(args.device), "--dtype", str(args.dtype).removeprefix("torch.")]
    out = subprocess.run([sys.executable, "-m", "benchmarks.long_context", *flags, "--child", kind, str(length),
                          *(["--recompute"] if args.recompute else [])],
                         capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["extra_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1k to 8k tokens, 2 rounds")
    parser.add_argument("--lengths", default=None, help="comma-separated sequence lengths")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu (the default) or cuda[:N]")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="auto: bfloat16 autocast where bf16 matmuls are fast, else float32 (as training)")
    parser.add_argument("--recompute", action="store_true",
                        help="local and lsh with model.attention.recompute=true")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
        parser.error(f"--device {args.device}: this machine offers cpu"
                     + (" and cuda" if torch.cuda.is_available() else " only (no CUDA device)"))
    args.device, args.dtype = device, resolve_dtype(args.dtype, device)
    if args.child:
        child(args.child[0], int(args.child[1]), args)
        return
    gpu = f"; {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"machine: {machine()}{gpu}; {args.dtype}{', recompute' if args.recompute else ''}; "
          f"load average {load_average()}", flush=True)
    default = (1024, 2048, 4096, 8192) if args.quick else (512, 1024, 2048, 4096, 8192, 16384, 32768)
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else list(default)
    rounds = args.rounds or (2 if args.quick else 3)
    rows, crossover, last = [], None, {}
    header = ["tokens", *(f"{k} ms" for k in KINDS), *(f"{k} MiB" for k in KINDS), f"{EXPLICIT} MiB",
              "local/full time", "lsh/full time"]
    for length in lengths:
        # memory first, each in its own process, while this one holds no model or cached device memory
        memory = {kind: peak_memory(kind, length, args) for kind in KINDS}
        explicit = f"{peak_memory(EXPLICIT, length, args):.0f}" if length <= EXPLICIT_UP_TO else "-"
        steps = {kind: build(kind, length, args) for kind in KINDS}
        if args.recompute:  # the same kinds keeping their scores, timed in the same rounds
            kept = argparse.Namespace(**vars(args) | {"recompute": False})
            steps |= {f"{kind}, kept": build(kind, length, kept) for kind in ("local", "lsh")}
        times = alternate(steps, rounds if length <= 8192 else max(1, rounds - 1))
        del steps
        if device.type == "cuda":
            torch.cuda.empty_cache()
        last = {kind: (speedup(times[kind], times["full"]), memory[kind] / memory["full"]) for kind in KINDS}
        rows.append([length] + [f"{median(times[k]) * 1e3:.0f}" for k in KINDS]
                    + [f"{memory[k]:.0f}" for k in KINDS] + [explicit]
                    + [f"{last['local'][0]:.2f}", f"{last['lsh'][0]:.2f}"])
        print(table(rows[-1:], header), flush=True)
        if args.recompute:
            print(f"time with recompute over without, side by side: "
                  f"local {speedup(times['local'], times['local, kept']):.2f}x, "
                  f"lsh {speedup(times['lsh'], times['lsh, kept']):.2f}x", flush=True)
        if crossover is None and last["lsh"][0] < 1.0:
            crossover = length
    print(table(rows, header))
    print(f"lsh is faster than full from {crossover or 'no length run'} tokens on; load average {load_average()}")
    headline("memory_ratio", max(last["local"][1], last["lsh"][1]), 0.25,
             f"max of local/full and lsh/full peak memory at {lengths[-1]} tokens")
    headline("time_ratio", max(last["local"][0], last["lsh"][0]), 1.0,
             f"max of local/full and lsh/full step time at {lengths[-1]} tokens")


if __name__ == "__main__":
    main()

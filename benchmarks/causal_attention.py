"""Causal self-attention on the CPU, forward + backward: PyTorch's fused (flash) kernel, the
full-scores `explicit_attention`, and stacklm's `block_causal_attention`, which skips the keys
after each block of 128 queries (the one `causal_attention` takes for training on the CPU up to
`BLOCK_MAX_LEN` tokens).

8 heads of 64, 2048 tokens a batch (batch = 2048 / length), float32 and bfloat16, eager. The three
take turns (A B A B ...); times are medians, each speed-up the median of the per-round ratios
against the fused kernel. The outputs and gradients are checked against float32 SDPA first.

    python -m benchmarks.causal_attention [--quick]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import alternate, headline, load_average, machine, median, speedup, table
from stacklm.device import keep_freed_memory_on_cpu
from stacklm.model.attention import block_causal_attention, causal_mask, explicit_attention


def fused(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def explicit(q, k, v):
    return explicit_attention(q, k, v, causal_mask(q.size(-2), q.size(-2), q.device))


KERNELS = {"fused (flash)": fused, "explicit": explicit, "blocks": block_causal_attention}


def largest_error(kernel, q, k, v, grad) -> float:
    """Largest |difference| of the output and the three gradients from float32 SDPA's, over the
    largest |value| of the reference."""
    def run(fn, inputs, g):
        inputs = [x.detach().clone().requires_grad_() for x in inputs]
        out = fn(*inputs)
        return [out, *torch.autograd.grad(out, inputs, g)]

    ours = run(kernel, (q, k, v), grad)
    reference = run(fused, [x.float() for x in (q, k, v)], grad.float())
    return max(((a.float() - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, reference, strict=True))


def measure(dtype: torch.dtype, length: int, rounds: int):
    """Seconds of forward + backward of each kernel by turns, and each one's largest_error."""
    q, k, v = (torch.randn(2048 // length, 8, length, 64, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)
    errors = {label: largest_error(kernel, q, k, v, grad) for label, kernel in KERNELS.items()}
    times = alternate({label: lambda kernel=kernel: kernel(q, k, v).backward(grad)
                       for label, kernel in KERNELS.items()}, rounds, warmup=2)
    return times, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="256 and 512 tokens, 5 rounds")
    args = parser.parse_args()
    keep_freed_memory_on_cpu()
    torch.manual_seed(0)
    lengths, rounds = ((256, 512), 5) if args.quick else ((256, 512, 1024), 15)
    print(f"machine: {machine()}; load average {load_average()}")
    rows, headlines = [], {}
    for dtype in (torch.float32, torch.bfloat16):
        name = "fp32" if dtype == torch.float32 else "bf16"
        for length in lengths:
            times, errors = measure(dtype, length, rounds)
            for label in KERNELS:
                ratio = speedup(times["fused (flash)"], times[label])
                rows.append([name, length, label, f"{median(times[label]) * 1e3:.1f}", f"{ratio:.2f}x",
                             f"{errors[label]:.1e}"])
                if label == "blocks":
                    headlines[f"block_attention_speedup_{name}_{length}"] = ratio
    print(f"load average after: {load_average()}")
    print(table(rows, ["dtype", "tokens", "kernel", "ms fwd+bwd", "vs fused", "rel. error"]))
    for metric, value in headlines.items():
        headline(metric, value, None, "x (fused SDPA / block_causal_attention time, forward + backward)")


if __name__ == "__main__":
    main()

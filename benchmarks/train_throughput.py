"""Training tokens/s of stacklm against transformers' LlamaForCausalLM with identical dimensions.

One full step each: forward and float32 cross-entropy as each library trains (stacklm: `model(inputs,
targets=...)`, the chunked linear + cross-entropy its trainer uses; HF: the logits, then
`F.cross_entropy` on them in float32, as HF's own loss does), backward, fused AdamW step (stacklm's
parameter groups, for both). One process; the
implementations take turns (A B A B ...) after warmup; step times are medians and each speed-up is
the median of the per-round ratios. float32 eager, and bf16 autocast with float32 master weights;
stacklm also under torch.compile unless --quick or --no-compile. Both run with the allocator
setting stacklm's trainer applies on CPU (`keep_freed_memory_on_cpu`). MFU is model FLOPs/s
(PaLM's estimate, `Transformer.flops_per_token`) over the fastest large square matmul measured here
in the same dtype.

    python -m benchmarks.train_throughput [--quick]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import stacklm
from benchmarks.common import alternate, headline, load_average, machine, matmul_peak, median, speedup, table
from stacklm.device import keep_freed_memory_on_cpu
from stacklm.training.optim import param_groups


def build(d_model, n_layers, n_heads, d_ff, vocab, seq_len):
    config = stacklm.Config.from_dict({
        "model": {"vocab_size": vocab, "d_model": d_model, "n_layers": n_layers, "n_heads": n_heads,
                  "d_ff": d_ff, "max_seq_len": seq_len, "tie_embeddings": False},
        "data": {"seq_len": seq_len}})
    ours = stacklm.build_model(config)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=d_model, intermediate_size=d_ff, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_heads, max_position_embeddings=seq_len,
        rms_norm_eps=1e-5, tie_word_embeddings=False, attn_implementation="sdpa"))
    return ours, hf


def stacklm_loss(model, inputs, targets):
    return model(inputs, targets=targets)


def hf_loss(model, inputs, targets):
    return F.cross_entropy(model(inputs).logits.flatten(0, 1).float(), targets.flatten())


def step_fn(model, batch, dtype, loss_of):
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, fused=True)
    inputs, targets = batch[:, :-1], batch[:, 1:]

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = loss_of(model, inputs, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 layers, 3 rounds, no compile")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3 quick, 15 full)")
    parser.add_argument("--no-compile", action="store_true", help="skip stacklm under torch.compile")
    args = parser.parse_args()
    keep_freed_memory_on_cpu()
    torch.manual_seed(0)
    dims = dict(d_model=512, n_layers=4 if args.quick else 8, n_heads=8, d_ff=1376, vocab=8192, seq_len=256)
    batch_size, rounds = 8, args.rounds or (3 if args.quick else 15)
    compile_too = not (args.quick or args.no_compile)
    ours, hf = build(**dims)
    batch = torch.randint(0, dims["vocab"], (batch_size, dims["seq_len"] + 1))
    tokens = batch_size * dims["seq_len"]
    flops = ours.flops_per_token(dims["seq_len"])
    print(f"machine: {machine()}; load average {load_average()}")
    print(f"model: {dims}, batch {batch_size}: {ours.num_params() / 1e6:.1f}M parameters, "
          f"{flops / 1e6:.0f} MFLOPs/token; {rounds} rounds")

    rows, figures = [], {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        peak = matmul_peak(dtype)
        print(f"{name}: matmul peak {peak / 1e9:.0f} GFLOP/s")
        fns = {"stacklm": step_fn(ours, batch, dtype, stacklm_loss),
               "hf": step_fn(hf, batch, dtype, hf_loss)}
        if compile_too:  # shares the eager model's parameters; its own optimizer state
            fns["stacklm compiled"] = step_fn(torch.compile(ours), batch, dtype, stacklm_loss)
        times = alternate(fns, rounds, warmup=2)
        for impl, ts in times.items():
            rate = tokens / median(ts)
            ratio = speedup(times["hf"], ts)
            mfu = flops * rate / peak
            rows.append([name, impl, round(1000 * median(ts)), round(rate), f"{ratio:.3f}x", f"{100 * mfu:.1f}%"])
            figures[name, impl] = ratio, mfu
    print(f"load average after: {load_average()}")
    print(table(rows, ["dtype", "implementation", "ms/step", "tokens/s", "vs HF", "MFU"]))
    best = "stacklm compiled" if compile_too else "stacklm"
    headline("train_speedup_fp32", figures["fp32", "stacklm"][0], 1.0, "x (stacklm eager / HF tokens/s, fp32)")
    headline("train_speedup_bf16", figures["bf16", best][0], 1.3, f"x ({best} / HF tokens/s, bf16)")
    headline("train_speedup_bf16_eager", figures["bf16", "stacklm"][0], None, "x (stacklm eager / HF, bf16)")
    if compile_too:
        headline("train_speedup_fp32_compiled", figures["fp32", best][0], None, f"x ({best} / HF, fp32)")
    headline("mfu_fp32", figures["fp32", best][1], None, f"fraction of fp32 matmul peak ({best})")
    headline("mfu_bf16", figures["bf16", best][1], None, f"fraction of bf16 matmul peak ({best})")


if __name__ == "__main__":
    main()

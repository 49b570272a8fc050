"""Training tokens/s of stacklm against transformers' LlamaForCausalLM with identical dimensions.

One full step each (forward, float32 cross-entropy, backward, fused AdamW step), in one process,
alternating stacklm and HF, medians; float32 eager and bf16 autocast (float32 master weights);
stacklm also under torch.compile unless --no-compile. MFU is model FLOPs/s (PaLM's estimate,
`Transformer.flops_per_token`) over this machine's measured matmul peak for that dtype.

    python benchmarks/train_throughput.py [--quick]
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import stacklm
from benchmarks.common import alternate, headline, matmul_peak, table
from stacklm.device import keep_freed_memory_on_cpu


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


def step_fn(model, batch, dtype, logits_of):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    inputs, targets = batch[:, :-1], batch[:, 1:]

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            logits = logits_of(model(inputs))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 layers, fewer rounds, no compile")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    keep_freed_memory_on_cpu()  # the same allocator for both libraries
    torch.manual_seed(0)
    dims = dict(d_model=512, n_layers=4 if args.quick else 8, n_heads=8, d_ff=1376, vocab=8192, seq_len=256)
    batch_size, rounds = 8, args.rounds or (3 if args.quick else 7)
    compile_too = not (args.quick or args.no_compile)
    ours, hf = build(**dims)
    batch = torch.randint(0, dims["vocab"], (batch_size, dims["seq_len"] + 1))
    tokens = batch_size * dims["seq_len"]
    flops = ours.flops_per_token(dims["seq_len"])
    print(f"model: {dims}, batch {batch_size}: {ours.num_params() / 1e6:.1f}M parameters, "
          f"{flops / 1e6:.0f} MFLOPs/token; {torch.get_num_threads()} threads")

    rows, results = [], {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        peak = matmul_peak(dtype)
        fns = {"stacklm": step_fn(ours, batch, dtype, lambda out: out),
               "hf": step_fn(hf, batch, dtype, lambda out: out.logits)}
        if compile_too:
            compiled = torch.compile(ours)
            fns["stacklm compiled"] = step_fn(compiled, batch, dtype, lambda out: out)
        seconds = alternate(fns, rounds, warmup=2 if compile_too else 1)
        for impl, s in seconds.items():
            rate = tokens / s
            rows.append([name, impl, round(s * 1000), round(rate), f"{rate / (tokens / seconds['hf']):.2f}x",
                         f"{100 * flops * rate / peak:.1f}%"])
        best = min(v for k, v in seconds.items() if k.startswith("stacklm"))
        results[name] = (seconds["hf"] / seconds["stacklm"], seconds["hf"] / best, flops * tokens / best / peak)
        print(f"{name}: matmul peak {peak / 1e9:.0f} GFLOP/s")
    print(table(rows, ["dtype", "implementation", "ms/step", "tokens/s", "vs HF", "MFU"]))
    headline("train_speedup_fp32", results["fp32"][0], 1.0, "x (stacklm eager / HF tokens/s)")
    headline("train_speedup_bf16", results["bf16"][1], 1.3, "x (best stacklm / HF tokens/s)")
    headline("mfu_bf16", results["bf16"][2], None, "fraction of measured bf16 matmul peak")


if __name__ == "__main__":
    main()

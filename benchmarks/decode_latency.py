"""Batch-1 decoding latency with the KV cache: stacklm against transformers' `generate` on the same
weights, and against the memory-bandwidth bound.

The bound: each new token reads every weight matrix once (the embedding lookup reads one row), so
a token cannot take less than (matrix weight bytes) / (read bandwidth), the bandwidth measured in
every round as the fastest of three sums over 1 GiB (common.ReadProbe). Greedy decoding
of a 16-token prompt; both libraries produce the same number of tokens (HF with min_new_tokens),
and the table shows how many of them match HF's. stacklm runs three ways: its modules' forward
(`generate(..., fused=False)`, eager), compiled (`compile=True, fused=False`: the compiled one-token
step, its compilation in the warmup), and `fused`, the C++ step `generate` takes by default
(stacklm.inference.cpu_step).
All calls take turns (A B A B ...). ms/token is one decode step: the time of generating N tokens
less that of generating 1 (the prompt's prefill and the first token), over N - 1, median of the
rounds; end-to-end ms/token is the whole call over N. Each speed-up is the median of the
per-round ratios of step times.

    python -m benchmarks.decode_latency [--quick]
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import stacklm
from benchmarks.common import (
    ReadProbe,
    alternate,
    headline,
    load_average,
    machine,
    median,
    read_bandwidth,
    speedup,
    table,
)
from stacklm.interop.hf import weight_map

SMALL = dict(d_model=512, n_layers=8, n_heads=8, d_ff=1376, vocab=8192)  # 34M parameters
LARGE = dict(d_model=1024, n_layers=24, n_heads=16, d_ff=2816, vocab=32000)  # 374M parameters
MEDIUM = dict(d_model=1024, n_layers=8, n_heads=16, d_ff=2816, vocab=32000)  # 168M, for --quick
PROBE_BYTES = 1 << 30  # read by the bandwidth probe: far beyond the caches


def build(d_model, n_layers, n_heads, d_ff, vocab, max_len=1024):
    config = stacklm.Config.from_dict({
        "model": {"vocab_size": vocab, "d_model": d_model, "n_layers": n_layers, "n_heads": n_heads,
                  "d_ff": d_ff, "max_seq_len": max_len, "tie_embeddings": False},
        "data": {"seq_len": min(256, max_len)}})
    return stacklm.build_model(config).eval()


def to_hf(model) -> LlamaForCausalLM:
    """The same weights in transformers' Llama (the mapping of `stacklm export --format hf`)."""
    m = model.config
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.ffn_dim,
        num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads, num_key_value_heads=m.kv_heads,
        max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm.eps, tie_word_embeddings=False,
        attn_implementation="sdpa"))
    state = model.state_dict()
    hf_state = {hf_name: w for name, parts in weight_map(m).items()
                for (hf_name, _), w in zip(parts, state[name].split([n for _, n in parts]), strict=True)}
    hf.load_state_dict(hf_state, strict=True)
    return hf.to(next(model.parameters()).dtype).eval()


def matrix_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters()
               if p.dim() == 2 and not name.startswith("embed."))


def decoders(model, hf, prompt, new_tokens) -> dict:
    """Greedy decoding of exactly new_tokens tokens by each implementation."""
    return {"stacklm": lambda: stacklm.generate(model, prompt, new_tokens, temperature=0, fused=False),
            "stacklm compiled": lambda: stacklm.generate(model, prompt, new_tokens, temperature=0, compile=True,
                                                         fused=False),
            "stacklm fused": lambda: stacklm.generate(model, prompt, new_tokens, temperature=0),
            "hf": lambda: hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      do_sample=False, use_cache=True, pad_token_id=0)}


def agreement(a: torch.Tensor, b: torch.Tensor, prompt_len: int) -> str:
    """How many new tokens two greedy decodings share before they first differ."""
    differ = (a[0, prompt_len:] != b[0, prompt_len:]).nonzero()
    n = a.size(1) - prompt_len
    return f"{int(differ[0, 0]) if len(differ) else n}/{n}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="fewer tokens and rounds; an 8-layer (168M) model in place of the 374M one")
    args = parser.parse_args()
    torch.manual_seed(0)
    prompt_len, rounds = 16, 2 if args.quick else 5
    print(f"machine: {machine()}; load average {load_average()}")
    print(f"read bandwidth before: {read_bandwidth() / 1e9:.1f} GB/s")
    # The bandwidth a VM gets moves with its neighbours, so each round measures it next to the decoding.
    probe = ReadProbe(PROBE_BYTES)
    large_label, large = ("168M", MEDIUM) if args.quick else ("374M", LARGE)
    cases = [("34M", SMALL, torch.float32, 32 if args.quick else 128),
             (large_label, large, torch.float32, 16 if args.quick else 64),
             (large_label, large, torch.bfloat16, 16 if args.quick else 64)]
    rows, figures = [], {}
    for label, dims, dtype, new_tokens in cases:
        model = build(**dims).to(dtype)
        hf = to_hf(model)
        prompt = torch.randint(0, dims["vocab"], (1, prompt_len))
        full, prefill = decoders(model, hf, prompt, new_tokens), decoders(model, hf, prompt, 1)
        outputs = {impl: decode() for impl, decode in full.items()}  # the warmup compiles stacklm's step
        times = alternate({**full, **{f"{impl} prefill": f for impl, f in prefill.items()},
                           "bandwidth probe": probe}, rounds)
        reads = probe.last(rounds)
        # a decode step: (generate new_tokens - generate 1 token) / (new_tokens - 1), round by round
        steps = {impl: [(t - t1) / (new_tokens - 1) for t, t1 in zip(times[impl], times[f"{impl} prefill"],
                                                                       strict=True)]
                 for impl in full}
        bounds = [matrix_bytes(model) * t / PROBE_BYTES for t in reads]  # s/token
        name = f"{label} {str(dtype).removeprefix('torch.')}"
        for impl, ts in steps.items():
            ms, ratio = 1000 * median(ts), speedup(steps["hf"], ts)
            to_bound = median([t / b for t, b in zip(ts, bounds, strict=True)])
            end_to_end = 1000 * median(times[impl]) / new_tokens
            rows.append([name, impl, f"{ms:.2f}", f"{ratio:.2f}x", f"{to_bound:.2f}x", f"{end_to_end:.2f}",
                         agreement(outputs[impl], outputs["hf"], prompt_len)])
            figures[name, impl] = ratio, to_bound
        print(f"{name}: {matrix_bytes(model) / 1e6:.0f} MB of matrices; read bandwidth "
              f"{PROBE_BYTES / median(reads) / 1e9:.1f} GB/s (median of the rounds), "
              f"so a bound of {1000 * median(bounds):.2f} ms/token")
        del model, hf, full, prefill, outputs
    print(f"load average after: {load_average()}")
    print(table(rows, ["model", "implementation", "ms/token", "vs HF", "/ bound", "end-to-end ms/token",
                       "tokens as HF's"]))
    small, large_fp32, large_bf16 = (f"{label} {dt}" for label, dt in
                                     (("34M", "float32"), (large_label, "float32"), (large_label, "bfloat16")))
    headline("decode_speedup_vs_hf", figures[small, "stacklm compiled"][0], 2.0,
             "x (HF ms/token / stacklm compiled ms/token, 34M float32)")
    headline("decode_speedup_vs_hf_eager", figures[small, "stacklm"][0], None,
             "x (HF ms/token / stacklm eager ms/token, 34M float32)")
    headline("decode_vs_bandwidth_bound", figures[large_fp32, "stacklm compiled"][1], 1.5,
             f"x (stacklm compiled ms/token / bandwidth bound, {large_fp32})")
    headline("decode_vs_bandwidth_bound_bf16", figures[large_bf16, "stacklm compiled"][1], 1.5,
             f"x (stacklm compiled ms/token / bandwidth bound, {large_bf16})")
    headline("decode_speedup_vs_hf_fused", figures[small, "stacklm fused"][0], None,
             "x (HF ms/token / stacklm fused C++ step ms/token, 34M float32)")
    headline("decode_vs_bandwidth_bound_fused", figures[large_fp32, "stacklm fused"][1], None,
             f"x (stacklm fused C++ step ms/token / bandwidth bound, {large_fp32})")
    headline("decode_vs_bandwidth_bound_fused_bf16", figures[large_bf16, "stacklm fused"][1], None,
             f"x (stacklm fused C++ step ms/token / bandwidth bound, {large_bf16})")
    headline("decode_vs_bandwidth_bound_eager", figures[large_fp32, "stacklm"][1], None,
             f"x (stacklm eager ms/token / bandwidth bound, {large_fp32})")


if __name__ == "__main__":
    main()

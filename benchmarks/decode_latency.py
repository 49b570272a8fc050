"""Batch-1 decoding latency with the KV cache: stacklm against transformers' `generate` on the same
weights, and against the memory-bandwidth bound.

The bound: each new token reads every weight matrix once (the embedding lookup reads one row), so
a token cannot take less than (matrix weight bytes) / (measured read bandwidth). Greedy decoding;
both libraries produce the same number of tokens (HF with min_new_tokens); timings alternate and
take medians.

    python benchmarks/decode_latency.py [--quick]
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import stacklm
from benchmarks.common import alternate, headline, read_bandwidth, table
from stacklm.interop.hf import weight_map

SMALL = dict(d_model=512, n_layers=8, n_heads=8, d_ff=1376, vocab=8192)  # ~30M parameters
LARGE = dict(d_model=1024, n_layers=24, n_heads=16, d_ff=2816, vocab=32000)  # ~340M parameters


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
    """Greedy decoding of exactly new_tokens tokens by each library."""
    return {"stacklm": lambda: stacklm.generate(model, prompt, new_tokens, temperature=0),
            "hf": lambda: hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      do_sample=False, use_cache=True, pad_token_id=0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer tokens and rounds")
    args = parser.parse_args()
    torch.manual_seed(0)
    prompt_len, rounds = 16, 3 if args.quick else 5
    bandwidth = read_bandwidth()
    print(f"measured read bandwidth: {bandwidth / 1e9:.1f} GB/s; {torch.get_num_threads()} threads")
    rows, figures = [], {}
    cases = [("30M", SMALL, torch.float32, 32 if args.quick else 128),
             ("340M", LARGE, torch.float32, 8 if args.quick else 32),
             ("340M", LARGE, torch.bfloat16, 8 if args.quick else 32)]
    for label, dims, dtype, new_tokens in cases:
        model = build(**dims).to(dtype)
        hf = to_hf(model)
        prompt = torch.randint(0, dims["vocab"], (1, prompt_len))
        with torch.inference_mode():
            same = torch.equal(*(decode() for decode in decoders(model, hf, prompt, new_tokens).values()))
            seconds = alternate(decoders(model, hf, prompt, new_tokens), rounds)
        bound_ms = 1000 * matrix_bytes(model) / bandwidth
        ms = {k: 1000 * v / new_tokens for k, v in seconds.items()}
        name = f"{label} {str(dtype).removeprefix('torch.')}"
        rows.append([name, f"{model.num_params() / 1e6:.0f}M", round(ms["stacklm"], 2), round(ms["hf"], 2),
                     f"{ms['hf'] / ms['stacklm']:.2f}x", round(bound_ms, 2),
                     f"{ms['stacklm'] / bound_ms:.2f}x", "yes" if same else "no"])
        figures[name] = (ms["hf"] / ms["stacklm"], ms["stacklm"] / bound_ms)
        del model, hf
    print(table(rows, ["model", "params", "stacklm ms/token", "HF ms/token", "speed-up", "bound ms/token",
                       "stacklm / bound", "same tokens"]))
    headline("decode_speedup_vs_hf", figures["30M float32"][0], 2.0, "x (HF ms/token / stacklm ms/token, 30M)")
    headline("decode_vs_bandwidth_bound", figures["340M float32"][1], 1.5,
             "x (stacklm ms/token / bandwidth bound, 340M float32)")
    headline("decode_vs_bandwidth_bound_bf16", figures["340M bfloat16"][1], 1.5,
             "x (stacklm ms/token / bandwidth bound, 340M bfloat16)")


if __name__ == "__main__":
    main()

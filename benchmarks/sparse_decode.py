"""The Scaling Transformer's sparsity (Jaszczur et al. 2021) against its dense baseline, in one run.

1. Decoding: batch-1 ms/token with the KV cache for a dense model, its sparse-FFN twin and its
   sparse-FFN + sparse-QKV twin, all with the same parameter count (within a few percent): the
   dense SwiGLU FFN of width F has three matrices, so the sparse FFN (two matrices) gets width 1.5 F,
   and with sparse QKV the attention's saved parameters widen it further (about 2 F). Sizes: a
   small model and the paper's ~800M shape (d_model 1024, 16 heads, 24 layers, F 4096, N 64,
   S 16, vocabulary 32000), float32 and bfloat16, three ways: `eager` runs the modules' forward
   (`generate(fused=False)`), `compiled` compiles it (`generate(compile=True, fused=False)`) and
   `fused` is the C++ step that `generate` takes by default (stacklm.inference.cpu_step).
   ms/token is one decode step: (time to generate n tokens - time to generate 1) / (n - 1), median of
   the rounds. The bound of each model is the bytes a token must read (every weight matrix, but
   only the chosen d_ff / N rows of the sparse FFN's two matrices, one embedding row, the KV cache)
   over the read bandwidth measured in the same round (the fastest of three sums over 1 GiB, back
   to back: common.ReadProbe). The eager and compiled sparse models run stacklm's CPU kernels for
   a one-token layer (model/cpu_kernels.py); the row
   "sparse FFN+QKV, PyTorch ops" is the same model with them turned off.
2. Training step time (forward, backward, AdamW) of the three twins at the preset size.
3. Quality: the presets configs/scaling-transformer-{dense,sparse-ffn,sparse}.yaml trained for the
   same steps and seed on the default corpus; validation loss and bits per byte.

All timed calls take turns (A B A B ...); each ratio is the median of the per-round ratios.

    python -m benchmarks.sparse_decode [--quick] [--skip-quality]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import tempfile

import torch

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
from stacklm.device import keep_freed_memory_on_cpu
from stacklm.model import cpu_kernels
from stacklm.model.ffn_sparse import SparseFFN
from stacklm.training.optim import param_groups

SMALL = dict(d_model=512, n_layers=8, n_heads=8, d_ff=2048, vocab=8192, block_size=32)
PAPER = dict(d_model=1024, n_layers=24, n_heads=16, d_ff=4096, vocab=32000, block_size=64)  # Table 1, 800M
MEDIUM = dict(PAPER, n_layers=8)  # --quick
VARIANTS = {"dense": ("swiglu", "dense"), "sparse FFN": ("sparse", "dense"),
            "sparse FFN+QKV": ("sparse", "multiplicative_conv")}
PRESETS = {"dense": "dense", "sparse FFN": "sparse-ffn", "sparse FFN+QKV": "sparse"}
PROBE_BYTES = 1 << 30
PYTORCH_OPS = "sparse FFN+QKV, PyTorch ops"  # the same model with stacklm's CPU kernels turned off


def model_config(d_model, n_layers, n_heads, d_ff, vocab, block_size, ffn="swiglu", qkv="dense"):
    ffn_options = {"kind": "sparse", "block_size": block_size} if ffn == "sparse" else {"kind": ffn}
    return stacklm.Config.from_dict({
        "model": {"vocab_size": vocab, "d_model": d_model, "n_layers": n_layers, "n_heads": n_heads,
                  "d_ff": d_ff, "max_seq_len": 512, "tie_embeddings": False, "ffn": ffn_options,
                  "attention": {"qkv": qkv}},
        "data": {"seq_len": 256}})


def count(config) -> int:
    with torch.device("meta"):
        return stacklm.build_model(config).num_params()


def twin(dims: dict, ffn: str, qkv: str):
    """The config of `ffn`/`qkv` whose FFN width (a multiple of N) brings its parameter count
    closest to the dense model's."""
    if ffn != "sparse":
        return model_config(**dims, ffn=ffn, qkv=qkv)
    target, n = count(model_config(**dims)), dims["block_size"]
    widths = range(n, 4 * dims["d_ff"], n)
    return min((model_config(**{**dims, "d_ff": w}, ffn=ffn, qkv=qkv) for w in widths),
               key=lambda c: abs(count(c) - target))


def decode_bytes(model, context: int) -> int:
    """Bytes one decode step reads at `context` cached positions (see the module docstring)."""
    sparse = {id(p): m.n_blocks for m in model.modules() if isinstance(m, SparseFFN)
              for p in (m.in_proj, m.out_proj)}
    total = 0
    for name, p in model.named_parameters():
        if name.startswith("embed."):
            total += p[0].numel() * p.element_size()
        elif id(p) in sparse:
            total += sparse[id(p)] * p.size(1) * p.element_size()
        else:
            total += p.numel() * p.element_size()
    m = model.config
    return total + 2 * m.n_layers * context * m.kv_heads * m.head_dim * p.element_size()


IMPLS = {"eager": {"fused": False}, "compiled": {"compile": True, "fused": False}, "fused": {"fused": True}}


def generate(model, prompt, n: int, impl: str, kernels: bool) -> None:
    with contextlib.nullcontext() if kernels else cpu_kernels.disabled():
        stacklm.generate(model, prompt, n, temperature=0, **IMPLS[impl])


def decode(cases, rounds: int, prompt_len: int = 16) -> tuple[list, dict]:
    rows, figures = [], {}
    probe = ReadProbe(PROBE_BYTES)
    for label, dims, dtype, new_tokens in cases:
        torch._dynamo.reset()  # a compiled step per model; drop the previous case's
        models = {name: stacklm.build_model(twin(dims, *kinds)).eval().to(dtype)
                  for name, kinds in VARIANTS.items()}
        runs = {name: (model, True) for name, model in models.items()}
        if cpu_kernels.load():  # and the sparse model without them, for comparison
            runs[PYTORCH_OPS] = models["sparse FFN+QKV"], False
        prompt = torch.randint(0, dims["vocab"], (1, prompt_len))
        calls = {(name, impl, n): functools.partial(generate, model, prompt, n, impl, kernels)
                 for name, (model, kernels) in runs.items() for impl in IMPLS for n in (new_tokens, 1)
                 if kernels or impl != "fused"}  # without the kernels there is no C++ step
        times = alternate({**calls, "probe": probe}, rounds)  # the warmup compiles each step
        reads = probe.last(rounds)
        case = f"{label} {str(dtype).removeprefix('torch.')}"
        context = prompt_len + new_tokens // 2
        for impl in IMPLS:
            names = [name for name in runs if (name, impl, 1) in calls]
            steps = {name: [(t - t1) / (new_tokens - 1) for t, t1 in
                            zip(times[name, impl, new_tokens], times[name, impl, 1], strict=True)]
                     for name in names}
            for name in names:
                model = runs[name][0]
                bound = [decode_bytes(model, context) * t / PROBE_BYTES for t in reads]
                to_bound = median([s / b for s, b in zip(steps[name], bound, strict=True)])
                ratio = speedup(steps["dense"], steps[name])
                rows.append([case, impl, name, f"{model.num_params() / 1e6:.0f}M", model.config.ffn_dim,
                             f"{1000 * median(steps[name]):.2f}", f"{1000 * median(bound):.2f}",
                             f"{to_bound:.2f}x", f"{ratio:.2f}x"])
                figures[case, impl, name] = ratio, to_bound
        print(f"{case}: read bandwidth {PROBE_BYTES / median(reads) / 1e9:.1f} GB/s (median)", flush=True)
        del models, calls
    return rows, figures


def train_steps(rounds: int, batch: int, seq_len: int) -> list:
    """Step time of each twin at the preset size, float32 and bfloat16 autocast."""
    keep_freed_memory_on_cpu()
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        fns = {}
        for name, preset in PRESETS.items():
            model = stacklm.build_model(stacklm.Config.load(f"configs/scaling-transformer-{preset}.yaml"))
            opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, fused=True)
            ids = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1))

            def step(model=model, opt=opt, ids=ids, dtype=dtype):
                with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                    loss = model(ids[:, :-1], targets=ids[:, 1:])
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            fns[name] = step
        times = alternate(fns, rounds)
        for name in fns:
            rows.append([str(dtype).removeprefix("torch."), name, f"{1000 * median(times[name]):.0f}",
                         f"{speedup(times[name], times['dense']):.2f}x"])
    return rows


def quality(steps: int | None) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, preset in PRESETS.items():
            overrides = [f"train.out_dir={tmp}/{preset}", "train.progress=false", "eval.sample_tokens=0"]
            if steps is not None:
                overrides += [f"train.steps={steps}", f"train.warmup_steps={max(1, steps // 10)}",
                              f"train.eval_every={steps}", "train.eval_batches=10"]
            config = stacklm.Config.load(f"configs/scaling-transformer-{preset}.yaml", overrides)
            results[name] = stacklm.train(config).val
            print(f"{name}: {results[name]}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="an 8-layer model in place of the 24-layer one "
                        "and no small one, fewer tokens and rounds, 30 training steps per twin")
    parser.add_argument("--skip-quality", action="store_true", help="no training of the twins")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"machine: {machine()}; load average {load_average()}")
    print(f"read bandwidth: {read_bandwidth() / 1e9:.1f} GB/s")
    large_label, large = ("medium (8 layers)", MEDIUM) if args.quick else ("paper 800M shape", PAPER)
    new_tokens, rounds = (16, 2) if args.quick else (48, 5)
    cases = ([] if args.quick else [("small", SMALL, torch.float32, new_tokens)]) + [
        (large_label, large, dt, new_tokens) for dt in (torch.float32, torch.bfloat16)]
    rows, figures = decode(cases, rounds)
    print(table(rows, ["case", "step", "model", "params", "d_ff", "ms/token", "bound ms", "/ bound",
                       "vs dense"]))
    train_rows = train_steps(2 if args.quick else 5, 4 if args.quick else 16, 256)
    print(table(train_rows, ["dtype", "model", "ms/step", "time vs dense"]))
    val = None if args.skip_quality else quality(30 if args.quick else None)
    if val is not None:
        print(table([[name, f"{v['loss']:.4f}", f"{v['bpb']:.4f}", f"{v['loss'] / val['dense']['loss']:.4f}"]
                     for name, v in val.items()], ["model", "val loss", "bits/byte", "loss / dense"]))
    print(f"load average after: {load_average()}")
    fp32, bf16 = f"{large_label} float32", f"{large_label} bfloat16"
    headline("speedup", figures[fp32, "fused", "sparse FFN+QKV"][0], 2.6,
             f"x (dense / sparse FFN+QKV decode ms/token, the C++ step, batch 1, {fp32})")
    headline("speedup_bf16", figures[bf16, "fused", "sparse FFN+QKV"][0], 2.6,
             f"x (dense / sparse FFN+QKV decode ms/token, the C++ step, batch 1, {bf16})")
    headline("speedup_compiled", figures[fp32, "compiled", "sparse FFN+QKV"][0], None,
             f"x (dense / sparse FFN+QKV compiled decode ms/token, batch 1, {fp32})")
    for name in VARIANTS:
        headline(f"vs_bound_{name.replace(' ', '_').replace('+', '_')}", figures[fp32, "fused", name][1], 1.5,
                 f"x (decode ms/token with the C++ step / its bandwidth bound, {fp32})")
    headline("vs_bound_sparse_FFN_QKV_compiled", figures[fp32, "compiled", "sparse FFN+QKV"][1], None,
             f"x (compiled decode ms/token / its bandwidth bound, {fp32})")
    if val is not None:
        headline("loss_ratio", val["sparse FFN+QKV"]["loss"] / val["dense"]["loss"], 1.02,
                 "sparse FFN+QKV / dense validation loss, same steps and seed")
        headline("loss_ratio_sparse_ffn", val["sparse FFN"]["loss"] / val["dense"]["loss"], 1.02,
                 "sparse FFN / dense validation loss, same steps and seed")


if __name__ == "__main__":
    main()

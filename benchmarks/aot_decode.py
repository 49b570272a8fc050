"""An ahead-of-time compiled decode step (AOTInductor) against the `torch.compile` one, batch 1.

A probe, not a stacklm feature yet (docs/benchmarks.md, "A second look at the fp32 step"): the
compiled step spends about 3 ms a token in Python, Dynamo's guards and the graph's wrapper, which
an AOTInductor package has none of. The one-token step of the 800M-shape models of
benchmarks/sparse_decode.py is exported with `torch.export` - the KV caches, the convolutions'
frames and the cache length (a 0-d tensor) as inputs - its one-row matmuls decomposed to stacklm's
`matvec` as under `torch.compile`, and built with AOTInductor. Both steps decode greedily from the same prompt,
and the table counts the tokens each shares with eager decoding (and the AOT step with the
compiled one) before they first part (in bfloat16 a rounding apart can swap two near-tied logits
of a random model, and the sequences part there); ms/token is the median over rounds, A B A B, and the ratio the median
of the per-round ratios (not the ratio of the medians). The build takes minutes and writes a package holding the weights (about
1.9 GB at 24 layers in float32) to a temporary directory.

    python -m benchmarks.aot_decode [--quick] [--variants dense "sparse FFN+QKV"] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import functools
import importlib
import tempfile

import torch

import stacklm
from benchmarks.common import (
    alternate,
    headline,
    load_average,
    machine,
    median,
    read_bandwidth,
    speedup,
    table,
)
from benchmarks.sparse_decode import PAPER, VARIANTS, twin
from stacklm.model import cpu_kernels
from stacklm.model.attention import KVCache
from stacklm.model.qkv_sparse import ConvState, MultiplicativeConvQKV
from stacklm.model.transformer import DecodeState

compiled_step = importlib.import_module("stacklm.inference.generate")  # the module, not the function


class ExportedStep(torch.nn.Module):
    """The model's one-token step over a decode state given as tensors: returns the logits and the
    convolutions' new frames (which the model rebinds rather than writes in place)."""

    def __init__(self, model, max_len: int):
        super().__init__()
        self.model, self.max_len = model, max_len
        # the sparse q/k/v's weights repacked once, as a sequence's first step would, and exported
        # as constants (a new ConvState each call would repack them every token)
        self.packed = [b.attn.proj.packed_weights() if isinstance(b.attn.proj, MultiplicativeConvQKV) else None
                       for b in model.blocks] if cpu_kernels.active() else [None] * len(model.blocks)

    def forward(self, ids, length, ks, vs, frames):
        n = length.item()
        torch._check(n >= 0)
        torch._check(n + 1 <= self.max_len)
        layers = []
        for i, (k, v) in enumerate(zip(ks, vs, strict=True)):
            cache = object.__new__(KVCache)  # around the given tensors, without allocating
            cache.k, cache.v, cache.length = k, v, n
            cache.qkv_state = ConvState(frames[i]) if frames else None
            if frames:
                cache.qkv_state.packed = self.packed[i]
            layers.append(cache)
        logits = self.model(ids, DecodeState(layers))
        return logits, [cache.qkv_state.frames for cache in layers] if frames else []


def state_tensors(state: DecodeState):
    frames = [c.qkv_state.frames for c in state.layers] if state.layers[0].qkv_state is not None else []
    return [c.k for c in state.layers], [c.v for c in state.layers], frames


def build(model, state: DecodeState, max_len: int, path: str):
    ks, vs, frames = state_tensors(state)
    ids = torch.zeros(1, 1, dtype=torch.long)
    with torch.no_grad():
        program = torch.export.export(ExportedStep(model, max_len), (ids, torch.tensor(state.length), ks, vs, frames))
        # the default table too: given only the mm entry, export keeps aten.linear whole and
        # AOTInductor calls MKL's mm for it
        table = torch.export.default_decompositions()
        table[torch.ops.aten.mm.default] = compiled_step._one_row_matmul
        program = program.run_decompositions(table)
        return torch._inductor.aoti_load_package(torch._inductor.aoti_compile_and_package(program, package_path=path))


def aot_step(runner):
    def step(ids, state):
        ks, vs, frames = state_tensors(state)
        logits, new_frames = runner(ids, torch.tensor(state.length), ks, vs, frames)
        if new_frames:  # the model rebinds the frames rather than writing into them
            for cache, f in zip(state.layers, new_frames, strict=True):
                cache.qkv_state.frames = f
        state.advance(1)
        return logits
    return step


@torch.no_grad()
def decode(step, model, prompt, n: int, max_len: int) -> list[int]:
    state = model.new_state(1, max_len)
    token = model(prompt, state)[:, -1:].argmax(-1)
    tokens = []
    for _ in range(n):
        token = step(token, state)[:, -1:].argmax(-1)
        tokens.append(token.item())
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 layers of the 800M shape, fewer tokens and rounds")
    parser.add_argument("--variants", nargs="+", default=["sparse FFN+QKV", "dense"], choices=list(VARIANTS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    if not cpu_kernels.load():
        raise SystemExit("the CPU kernels did not build; matvec is what the exported step calls")
    dims = dict(PAPER, n_layers=4) if args.quick else PAPER
    new_tokens, rounds, prompt_len = (16, 3, 16) if args.quick else (48, 5, 16)
    max_len = prompt_len + new_tokens + 1
    print(f"machine: {machine()}; load average {load_average()}")
    print(f"read bandwidth: {read_bandwidth() / 1e9:.1f} GB/s")
    torch.manual_seed(0)
    prompt = torch.randint(0, dims["vocab"], (1, prompt_len))
    rows, ratios = [], {}
    for name in args.variants:
        torch._dynamo.reset()
        model = stacklm.build_model(twin(dims, *VARIANTS[name])).eval().to(getattr(torch, args.dtype))
        with tempfile.TemporaryDirectory() as tmp:
            state = model.new_state(1, max_len)
            with torch.no_grad():
                model(prompt, state)
            steps = {"compiled": compiled_step.compiled_decode_step(model),
                     "aot": aot_step(build(model, state, max_len, f"{tmp}/step.pt2"))}
            tokens = {impl: decode(step, model, prompt, new_tokens, max_len) for impl, step in steps.items()}
            eager = decode(model, model, prompt, new_tokens, max_len)
            calls = {(impl, n): functools.partial(decode, step, model, prompt, n, max_len)
                     for impl, step in steps.items() for n in (new_tokens, 1)}
            times = alternate(calls, rounds)
        per_token = {impl: [(t - t1) / (new_tokens - 1) for t, t1 in zip(times[impl, new_tokens], times[impl, 1],
                                                                           strict=True)] for impl in steps}
        ratios[name] = speedup(per_token["compiled"], per_token["aot"])
        def agree(a, b):  # the tokens two decodings share before they first part
            shared = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
            return f"{shared}/{new_tokens}"

        for impl in steps:
            rows.append([name, impl, f"{1000 * median(per_token[impl]):.2f}", agree(tokens[impl], eager),
                         agree(tokens[impl], tokens["compiled"]) if impl == "aot" else ""])
        rows.append([name, "compiled / aot", f"{ratios[name]:.2f}x", "", ""])
        del model, steps, calls
    print(table(rows, ["model", "step", "ms/token", "tokens as eager's", "as compiled's"]))
    print(f"load average after: {load_average()}")
    shape = "4-layer 800M shape" if args.quick else "800M shape"
    for name, ratio in ratios.items():
        headline(f"aot_speedup_{name.replace(' ', '_').replace('+', '_')}", ratio, None,
                 f"x (compiled / AOTInductor decode ms/token, batch 1, {shape}, {args.dtype})")


if __name__ == "__main__":
    main()

"""Packed encoder-decoder batches (`train.objective.pack`, issue 6) against padded ones.

An encoder-decoder example puts part of a window in the encoder and the rest in the decoder, in
shares that vary with its denoiser (an R example reads most of the window in its encoder, an X
example half, an S example a random share). Padded, each side of a batch is as wide as its longest
example, so about a third of a UL2 batch is padding. Packed, examples share rows, each attending
within itself and reading only its own encoder input (`stacklm.objectives.ul2.pack_rows`).

For configs/default.yaml's encoder-decoder (4 + 4 layers), trained with UL2's mixture and with
T5's span corruption, on batches of 16 windows of 256 tokens from the default corpus's held-out
split, each laid out both ways:
- positions per window (encoder + decoder), and the share of them that are real tokens;
- training FLOPs per window, padding included, against the causal decoder's (4 layers): the UL2
  benchmark's "same compute";
- the training step (laying out the batch, forward and backward, one fresh model) timed in
  turns, padded then packed and packed then padded, the speedup the median of the per-batch
  time ratios;
- the loss of each layout, which must agree (the same examples and weights).

    python -m benchmarks.ul2_packing [--quick] [--batches N] [--rounds N]
"""

from __future__ import annotations

import argparse
import functools

import numpy as np
import torch

from benchmarks.common import QUICK_MODEL, alternate, headline, load_average, machine, speedup, table
from benchmarks.ul2 import WINDOW, window_flops, windows
from stacklm.config import Config
from stacklm.data import prepare_data
from stacklm.model.transformer import build_model
from stacklm.registry import OBJECTIVE


def train_step(model, objective, windows: torch.Tensor) -> None:
    """One forward and backward pass, laying out the batch included (packing chooses its rows)."""
    model.zero_grad(set_to_none=True)
    model(**objective.batch(windows)).backward()


def encoder_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The real (not padding) encoder tokens of a padded or a packed batch."""
    if "encoder_segments" in batch:
        return int((batch["encoder_segments"] > 0).sum())
    return int(batch["encoder_lengths"].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"a smaller model ({' '.join(QUICK_MODEL)})")
    parser.add_argument("--batches", type=int, default=None, help="batches of 16 windows timed (default 8, quick 4)")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds over the batches")
    args = parser.parse_args()
    print(f"machine: {machine()}; load average {load_average()}")
    small = QUICK_MODEL if args.quick else []
    causal = build_model(Config.load("configs/default.yaml", ["train.objective.kind=causal", *small]))
    causal_flops = causal.flops_per_token(WINDOW) * WINDOW
    config = Config.load("configs/default.yaml", small)
    data = prepare_data(config.data, config.model.vocab_size, progress=False, log=lambda m: None)
    rows_held_out = windows(data.val, 16 * (args.batches or (4 if args.quick else 8)), np.random.default_rng(0))
    rows, figures = [], {}
    for objective_kind in ("ul2", "span_corruption"):
        overrides = ["model.arch=encoder_decoder", f"train.objective.kind={objective_kind}", *small]
        torch.manual_seed(0)
        model = build_model(Config.load("configs/default.yaml", overrides)).train()
        layouts = {}
        for layout, pack in (("padded", "false"), ("packed", "true")):
            cfg = Config.load("configs/default.yaml", [*overrides, f"train.objective.pack={pack}"])
            layouts[layout] = OBJECTIVE.build(cfg.train.objective, data.tokenizer, cfg.model)
        batches = [torch.from_numpy(rows_held_out[i : i + 16]) for i in range(0, len(rows_held_out), 16)]
        inputs = {layout: [objective.batch(b) for b in batches] for layout, objective in layouts.items()}
        ratios = []
        for i in range(len(batches)):
            for order in (("padded", "packed"), ("packed", "padded")):  # each layout first half the time
                times = alternate({layout: functools.partial(train_step, model, layouts[layout], batches[i])
                                   for layout in order}, args.rounds)
                ratios.append(speedup(times["padded"], times["packed"]))
        with torch.no_grad():
            losses = {layout: float(np.mean([model(**x).item() for x in inputs[layout]])) for layout in layouts}
        for layout, objective in layouts.items():
            positions = sum(x["idx"].numel() + x["encoder_ids"].numel() for x in inputs[layout]) / len(rows_held_out)
            real = sum(int((x["targets"] != -100).sum()) + encoder_tokens(x) for x in inputs[layout])
            flops = window_flops(model, objective, rows_held_out)
            figures[objective_kind, layout] = flops / causal_flops
            rows.append([f"encdec {objective_kind}", layout, f"{positions:.0f}",
                         f"{real / len(rows_held_out) / positions:.2f}", f"{flops / 1e9:.2f}",
                         f"{flops / causal_flops:.2f}", f"{losses[layout]:.4f}",
                         f"{float(np.median(ratios)):.2f}x" if layout == "packed" else ""])
            print(rows[-1], flush=True)
        figures[objective_kind, "speedup"] = float(np.median(ratios))
    print(table(rows, ["model", "layout", "positions / window", "real share", "train GFLOPs / window",
                       "vs causal", "loss", "step speedup"]))
    print(f"{len(rows_held_out)} windows; causal decoder {causal_flops / 1e9:.2f} GFLOPs / window; "
          f"load average {load_average()}")
    headline("encdec_ul2_packed_flops_vs_causal", figures["ul2", "packed"], 1.0,
             "encoder-decoder UL2 training FLOPs per window, packed, / the causal decoder's (same compute: 1)")
    headline("encdec_ul2_padded_flops_vs_causal", figures["ul2", "padded"], 1.0,
             "the same, padded to each side's longest example")
    headline("encdec_ul2_packing_speedup", figures["ul2", "speedup"], 1.0,
             "padded / packed training step time, UL2 mixture (median of per-batch ratios)")
    headline("encdec_span_packing_speedup", figures["span_corruption", "speedup"], 1.0,
             "padded / packed training step time, T5 span corruption")


if __name__ == "__main__":
    main()

"""The coordinate check of Tensor Programs V (Yang et al. 2022, section 8 and appendix D.1): train
the same model at several widths for a few steps and record the typical size of every layer's
output coordinates. Under muP the sizes stay put as the width grows; under the standard
parametrization some (the logits, the attention and FFN outputs) grow with it after the first
updates, which is what keeps the best learning rate from transferring.

    stacklm mup coord-check CONFIG --widths 64,128,256,512 --steps 5
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from stacklm.config import Config
from stacklm.training.optim import build_optimizer, set_lr


def layer_outputs(model) -> dict[str, torch.nn.Module]:
    """The modules whose outputs the check follows: the embedding, each block's attention, FFN and
    output, and the readout (its output is the logits)."""
    out = {"embed": model.embed}
    for stack, blocks in model.stacks().items():
        for i, block in enumerate(blocks):
            out |= {f"{stack}block{i}.attn": block.attn, f"{stack}block{i}.ffn": block.ffn, f"{stack}block{i}": block}
    return out | {"logits": model.lm_head}


def coord_check(config: Config, widths: list[int], steps: int, batches: list[torch.Tensor]) -> list[dict]:
    """Train `config`'s model at each d_model in `widths` for `steps` steps of AdamW at the constant
    learning rate train.lr (no warmup: the check is about the first updates), on `batches`
    ((B, T + 1) windows, reused in turn), and record the mean |x| of every followed output at every
    step. Returns rows {"width", "step" (1-based: the forward of that step), "layer", "scale"}."""
    from stacklm.model.transformer import build_model

    rows, scales = [], {}

    def recorder(name: str):
        def hook(module, args, out):
            scales[name] = out.detach().float().abs().mean().item()
        return hook

    for width in widths:
        cfg = Config.from_dict({**config.to_dict(), "model": {**config.to_dict()["model"], "d_model": width}})
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg).train()
        optimizer = build_optimizer(model, cfg.train, torch.device("cpu"))
        set_lr(optimizer, cfg.train.lr)
        hooks = [module.register_forward_hook(recorder(name)) for name, module in layer_outputs(model).items()]
        try:
            for step in range(steps):
                batch = batches[step % len(batches)]
                logits = model(batch[:, :-1])
                loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
                aux = model.auxiliary_loss()
                (loss if aux is None else loss + aux).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                rows += [{"width": width, "step": step + 1, "layer": name, "scale": value}
                         for name, value in scales.items()]
        finally:
            for hook in hooks:
                hook.remove()
    return rows


def width_slopes(rows: list[dict], step: int) -> dict[str, float]:
    """Per layer, the least-squares slope of log(scale) against log(width) at `step`: 0 when the
    scale does not depend on the width, 1 when it grows in proportion to it."""
    slopes = {}
    for layer in dict.fromkeys(r["layer"] for r in rows):
        points = [(math.log(r["width"]), math.log(r["scale"])) for r in rows
                  if r["layer"] == layer and r["step"] == step and r["scale"] > 0]
        if len(points) < 2:
            continue
        mx = sum(x for x, _ in points) / len(points)
        my = sum(y for _, y in points) / len(points)
        slopes[layer] = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return slopes

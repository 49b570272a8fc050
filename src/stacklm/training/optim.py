"""AdamW with decay only on weight matrices, and a linear-warmup cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; leave norms, biases, embeddings (tied or not) and the parameters a module
    lists in its `no_weight_decay` attribute (scales such as a multiplicative layer's) undecayed."""
    keep = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    keep |= {id(getattr(m, name)) for m in model.modules() for name in getattr(m, "no_weight_decay", ())}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in keep else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, tcfg, device: torch.device) -> torch.optim.AdamW:
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(param_groups(model, tcfg.weight_decay), lr=tcfg.lr,
                             betas=(tcfg.beta1, tcfg.beta2), eps=tcfg.eps, fused=fused)


def lr_at(step: int, tcfg) -> float:
    """Linear warmup to train.lr over warmup_steps, then cosine decay to lr * min_lr_ratio."""
    if step < tcfg.warmup_steps:
        return tcfg.lr * (step + 1) / tcfg.warmup_steps
    span = max(tcfg.steps - tcfg.warmup_steps, 1)
    progress = min((step - tcfg.warmup_steps) / span, 1.0)
    floor = tcfg.lr * tcfg.min_lr_ratio
    return floor + (tcfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))

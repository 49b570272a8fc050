"""AdamW with decay only on weight matrices, muP's per-parameter learning rates, and a
linear-warmup cosine schedule."""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

from stacklm.config import ModelConfig
from stacklm.model import mup
from stacklm.training.expert_parallel import unsharded_name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; leave norms, biases, embeddings (tied or not) and the parameters a module
    lists in its `no_weight_decay` attribute (scales such as a multiplicative layer's) undecayed.
    Each group's `lr_mult` scales the schedule's learning rate: 1, or under muP each parameter's
    (`stacklm.model.mup.Role.lr_mult`)."""
    keep = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    keep |= {id(getattr(m, name)) for m in model.modules() for name in getattr(m, "no_weight_decay", ())}
    config = getattr(model, "config", None)  # any module trains; only stacklm's carry muP roles
    roles = mup.roles(config) if isinstance(config, ModelConfig) and config.parametrization == "mup" else {}
    groups: dict[tuple[bool, float], list] = {(True, 1.0): [], (False, 1.0): []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.dim() >= 2 and id(p) not in keep
        lr_mult = roles[unsharded_name(name)].lr_mult if roles else 1.0
        groups.setdefault((decay, lr_mult), []).append(p)
    return split_mixed([{"params": params, "weight_decay": weight_decay if decay else 0.0, "lr_mult": lr_mult}
                        for (decay, lr_mult), params in groups.items() if params or lr_mult == 1.0])


def split_mixed(groups: list[dict]) -> list[dict]:
    """Each group holding both FSDP's DTensors and plain tensors (the sharded experts FSDP leaves
    alone) as two groups: fused AdamW steps a group's tensors together and cannot mix the two."""
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)  # none made if not loaded
    if dtensor is None:
        return groups
    out = []
    for group in groups:
        parts = [[p for p in group["params"] if isinstance(p, dtensor) == kind] for kind in (True, False)]
        out += [{**group, "params": part} for part in parts] if all(parts) else [group]
    return out


def build_optimizer(model: nn.Module, tcfg, device: torch.device) -> torch.optim.AdamW:
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(param_groups(model, tcfg.weight_decay), lr=tcfg.lr,
                             betas=(tcfg.beta1, tcfg.beta2), eps=tcfg.eps, fused=fused)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's learning rate, times each group's `lr_mult` (muP)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


def lr_at(step: int, tcfg) -> float:
    """Linear warmup to train.lr over warmup_steps, then cosine decay to lr * min_lr_ratio."""
    if step < tcfg.warmup_steps:
        return tcfg.lr * (step + 1) / tcfg.warmup_steps
    span = max(tcfg.steps - tcfg.warmup_steps, 1)
    progress = min((step - tcfg.warmup_steps) / span, 1.0)
    floor = tcfg.lr * tcfg.min_lr_ratio
    return floor + (tcfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))

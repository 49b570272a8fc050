"""The maximal update parametrization, `model.parametrization: mup` (Yang et al. 2022, "Tensor
Programs V: Tuning Large Neural Networks via Zero-Shot Hyperparameter Transfer"; reference
library microsoft/mup).

Under muP the best hyperparameters of a model (learning rate, init scale, multipliers) stay put as
its width grows, so they are tuned on a narrow model and reused on a wide one. At
`model.base_width` muP is the standard parametrization; at d_model = m * base_width each parameter
is scaled by its role, found by comparing its shape in models of two widths (a dimension that grows
with d_model is "infinite"):

    role     infinite dims                 init std    Adam lr    e.g.
    input    its output dims only          x 1         x 1        embeddings, norm gains, biases
    hidden   its fan-in and an output dim  x 1/sqrt(m) x 1/m      attention and FFN matrices, experts
    output   its fan-in only               x 1/m       x 1/m      MoE router, a finite d_ff's W1
    finite   none                          x 1         x 1        T5 bias table
    readout  (the untied lm_head)          zero        x 1        lm_head, logits x output_mult / m

(m is each parameter's own fan-in ratio to the base model; the table is Tensor Programs V's table 3,
muP for Adam). The readout (`lm_head`, tied or not) is an output weight written the other way, as
microsoft/mup's MuReadout: logits are multiplied by output_mult / m and the weight keeps the
learning rate, which is the only form a readout tied to the embedding admits; an untied readout
starts at zero. Attention logits are q.k * sqrt(base_head_dim) / head_dim, 1/d instead of 1/sqrt(d), and the
query starts at zero, as the paper advises (a module's `zero_query`; none with LSH's shared QK).

A parameter whose role cannot be read from its module (a raw nn.Parameter of two or more
dimensions in a module that does not declare `fan_in_dims`) is an error, not a silent default.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from stacklm.errors import UserError

ROLES = ("input", "hidden", "output", "finite", "readout")


@dataclasses.dataclass(frozen=True)
class Role:
    kind: str  # one of ROLES
    fan_in_mult: float  # this parameter's fan-in / its fan-in at base_width (1 when finite)

    @property
    def init_mult(self) -> float:
        return {"hidden": self.fan_in_mult ** -0.5, "output": 1 / self.fan_in_mult}.get(self.kind, 1.0)

    @property
    def lr_mult(self) -> float:
        return 1 / self.fan_in_mult if self.kind in ("hidden", "output") else 1.0


def fan_in_dims(module: nn.Module, name: str, p: torch.Tensor) -> tuple[int, ...] | None:
    """The dims of parameter `name` of `module` that its inputs contract over: () for a gain or a
    bias, None when unknown."""
    declared = getattr(module, "fan_in_dims", {})
    if name in declared:
        return declared[name]
    if p.dim() == 1:
        return ()
    if isinstance(module, nn.Linear):
        return (1,)
    if isinstance(module, nn.Embedding):
        return (0,)  # a lookup is a matmul with a one-hot vector of vocabulary size
    return None


def roles(model_config) -> dict[str, Role]:
    """Each parameter's muP role for the model `model_config` describes, by name (as in
    `named_parameters`, shared tensors once)."""
    from stacklm.model.transformer import build_model

    # (Config.validate has checked that base_width fits the heads)
    base, wide = (dataclasses.replace(model_config, d_model=w, parametrization="standard")
                  for w in (model_config.base_width, 2 * model_config.base_width))
    with torch.device("meta"):
        models = [build_model(c) for c in (base, wide, dataclasses.replace(model_config, parametrization="standard"))]
    shapes = [{name: p.shape for name, p in m.named_parameters()} for m in models]
    owners = dict(models[2].named_modules())
    out = {}
    for name, p in models[2].named_parameters():
        module_name, _, attr = name.rpartition(".")
        infinite = {d for d in range(p.dim()) if shapes[0][name][d] != shapes[1][name][d]}
        fan_in = fan_in_dims(owners[module_name], attr, p)
        if fan_in is None:
            if infinite:
                raise UserError(f"model.parametrization=mup cannot scale {name} {tuple(p.shape)} of "
                                f"{type(owners[module_name]).__name__}: its module does not declare fan_in_dims")
            fan_in = ()
        grows_in = [d for d in fan_in if d in infinite]
        grows_out = infinite - set(fan_in)
        mult = math.prod(p.shape[d] / shapes[0][name][d] for d in grows_in)
        kind = ("hidden" if grows_out else "output") if grows_in else ("input" if grows_out else "finite")
        out[name] = Role(kind, mult if grows_in else 1.0)
    if "lm_head.weight" in out:  # untied; scaled by the logits' multiplier instead
        out["lm_head.weight"] = Role("readout", out["lm_head.weight"].fan_in_mult)
    return out


def apply_init(model: nn.Module, roles_by_name: dict[str, Role]) -> None:
    """Rescale a standard-initialised model's weights to muP: hidden and output weights by their
    role, the readout (untied) and the query projections to zero."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            role = roles_by_name[name]
            if role.init_mult != 1.0:
                p.mul_(role.init_mult)
        if not model.config.tie_embeddings:
            model.lm_head.weight.zero_()
        for m in model.modules():
            if hasattr(m, "zero_query"):
                m.zero_query()


def width_mult(model_config) -> float:
    """m = d_model / base_width: the readout's divisor."""
    return model_config.d_model / model_config.base_width


def attention_mult(model_config) -> float:
    """The factor on q that turns 1/sqrt(head_dim) attention into muP's sqrt(base_head_dim) / head_dim
    (1 under the standard parametrization, and at base_width)."""
    if model_config.parametrization != "mup":
        return 1.0
    base_head_dim = model_config.base_width / model_config.n_heads
    return math.sqrt(base_head_dim / model_config.head_dim)

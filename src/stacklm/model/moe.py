"""Mixture-of-Experts feed-forward layer, `model.ffn.kind: moe` (Switch Transformer, Fedus et al.
2021; ST-MoE, Zoph et al. 2022; expert choice, Zhou et al. 2022).

A router (a float32 linear map D -> E) scores every token against E experts, each a feed-forward
layer of the kind `expert` names (dense SwiGLU, or the Scaling Transformer's sparse FFN):

    p = softmax(x W_r)                      (E,) per token
    switch:        y = p_e FFN_e(x),  e = argmax p
    topk:          y = sum_{e in top-k(p)} (p_e / sum_top-k p) FFN_e(x)
    expert_choice: each expert takes the C tokens of the batch with the highest p_e

Each expert takes at most C = ceil(capacity_factor * tokens * k / E) tokens; the rest of its
tokens are dropped, i.e. pass through the residual connection only. Token choice fills capacity in
order of choice (all first choices before any second choice) and then of position, sequence after
sequence at each position, so whether a token is dropped depends only on tokens at its position or
before it: the layer stays causal. Decoding with the KV cache and `dropless: true` never drop.

Dispatch sorts the (token, expert) assignments by expert, so each expert reads one contiguous slice;
dense experts run as one grouped GEMM (`torch._grouped_mm`) over those slices. Decoding a few
tokens through dense experts skips all of that: each token runs through its k experts' weights
directly, and a compiled decode step stays one graph (no shape depends on the routing).

Auxiliary losses, added to the training loss by the trainer (`aux_loss`):
    load balance (Switch eq. 4):  E * sum_e f_e * P_e, f_e the share of assignments routed to e,
                                  P_e the mean router probability of e; 1.0 when balanced
    router z-loss (ST-MoE eq. 5): mean over tokens of logsumexp(x W_r)^2
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from stacklm.device import compute_dtype
from stacklm.errors import UserError
from stacklm.model.ffn import SwiGLUConfig
from stacklm.registry import FFN, ComponentConfig, option

FFN.alias("dense", "swiglu")  # `model.ffn.expert: dense | sparse`, as the MoE literature says it


@dataclasses.dataclass
class MoEConfig(ComponentConfig):
    kind: str = "moe"
    n_experts: int = option(8, ge=2, help="E, experts per MoE layer")
    router: str = option("switch", choices=("switch", "topk", "expert_choice"),
                         help="switch: top-1; topk: top-k with gates renormalised to sum to 1; "
                         "expert_choice: each expert picks its tokens (not causal: encoders only; "
                         "the decoder of an encoder-decoder then routes with switch)")
    top_k: int = option(2, ge=1, help="experts per token for router=topk")
    expert: ComponentConfig = option(factory=SwiGLUConfig, registry=FFN,
                                     help="the experts' FFN: dense (SwiGLU), gelu or sparse")
    every: int = option(1, ge=1, help="MoE in every k-th layer (layers k-1, 2k-1, ...); the other "
                        "layers run one FFN of the expert kind")
    shared_expert: bool = option(False, help="add one FFN of the expert kind that every token passes")
    capacity_factor: float = option(1.25, gt=0.0, help="expert capacity in training, as a multiple "
                                    "of an even share of the tokens (expert_choice: experts per token)")
    eval_capacity_factor: float = option(2.0, gt=0.0, help="the same in evaluation")
    dropless: bool = option(False, help="no capacity limit: no token is ever dropped")
    jitter: float = option(0.0, ge=0.0, lt=1.0, help="multiply the router input by U(1-j, 1+j) in training")
    load_balance_coef: float = option(0.01, ge=0.0, help="weight of the Switch load-balancing loss")
    router_z_loss_coef: float = option(1e-3, ge=0.0, help="weight of the ST-MoE router z-loss")
    dispatch: str = option("grouped", choices=("grouped", "loop"),
                           help="dense experts as one grouped GEMM, or a loop of one matmul per expert")

    def check(self, cfg) -> None:
        if self.expert.kind == "moe":
            raise UserError("model.ffn.expert.kind: an expert cannot itself be moe; valid: "
                            + ", ".join(k for k in FFN.kinds if k != "moe"))
        if self.router == "topk" and self.top_k > self.n_experts:
            raise UserError(f"model.ffn.top_k ({self.top_k}) must be <= model.ffn.n_experts ({self.n_experts})")
        if self.router == "expert_choice" and cfg.arch == "decoder":
            raise UserError("model.ffn.router=expert_choice is not causal: each expert picks its tokens "
                            "from the whole batch, so a token's route depends on later tokens (Zhou et "
                            "al. 2022 name this limit). A decoder cannot use it; use switch or topk")
        if self.expert.kind == "swiglu" and self.expert.bias:
            raise UserError("model.ffn.expert.bias: grouped dense experts have no biases; set it false")
        check = getattr(self.expert, "check", None)
        if check is not None:
            check(cfg)

    def for_layer(self, layer: int) -> ComponentConfig:
        return self if (layer + 1) % self.every == 0 else self.expert

    def causal(self) -> ComponentConfig:
        return dataclasses.replace(self, router="switch") if self.router == "expert_choice" else self


class GroupedSwiGLU(nn.Module):
    """E SwiGLU experts with stacked weights (the layout of HF Mixtral's experts), applied to tokens
    already sorted by expert: x (M, D) with counts[e] rows for expert e, in expert order."""

    fan_in_dims = {"gate_up_proj": (2,), "out_proj": (2,)}  # (E, out, in), for muP

    def __init__(self, n_experts: int, d_model: int, d_ff: int, dispatch: str = "grouped"):
        super().__init__()
        self.n_experts, self.dispatch = n_experts, dispatch
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * d_ff, d_model))
        self.out_proj = nn.Parameter(torch.empty(n_experts, d_model, d_ff))

    def init_weights(self, std: float, residual_std: float) -> None:
        nn.init.normal_(self.gate_up_proj, 0.0, std)
        nn.init.normal_(self.out_proj, 0.0, residual_std)

    def select(self, experts: range) -> GroupedSwiGLU:
        """A module with only the given experts (expert parallelism keeps a rank's share), on the
        device and in the dtype of these weights (a CUDA model's share stays on its GPU)."""
        with torch.device("meta"):
            out = GroupedSwiGLU(len(experts), self.out_proj.size(1), self.out_proj.size(2), self.dispatch)
        for name in ("gate_up_proj", "out_proj"):
            weight = getattr(self, name)
            share = weight.detach()[experts.start:experts.stop].clone()
            setattr(out, name, nn.Parameter(share, requires_grad=weight.requires_grad))
        return out

    @staticmethod
    def merge_state(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The state dict of the whole set from those of `select`ed consecutive shares, in order."""
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}

    def per_token(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Each token of x (N, D) through its own experts (N, k) -> (N, k, D), reading only those
        experts' weights: for decoding's few tokens, with no sort and no data-dependent shape."""
        dtype = compute_dtype(x)
        x = x.to(dtype)
        if torch.compiler.is_compiling():
            # Written as reductions, Inductor fuses the gather into them and reads each chosen
            # expert's weights once; a matmul would take a gathered copy of them first
            w_in = self.gate_up_proj[experts].to(dtype)  # (N, k, 2F, D)
            gate, up = (w_in * x[:, None, None, :]).sum(-1).chunk(2, dim=-1)
            return (self.out_proj[experts].to(dtype) * (F.silu(gate) * up)[..., None, :]).sum(-1)
        out = x.new_empty(*experts.shape, x.size(-1))
        for i, row in enumerate(experts.tolist()):
            for j, e in enumerate(row):
                gate, up = F.linear(x[i], self.gate_up_proj[e].to(dtype)).chunk(2)
                out[i, j] = F.linear(F.silu(gate) * up, self.out_proj[e].to(dtype))
        return out

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # x: (M, D) sorted by expert, counts: (E,) -> (M, D)
        device, dtype = x.device.type, compute_dtype(x)
        x, w_in, w_out = x.to(dtype), self.gate_up_proj.to(dtype), self.out_proj.to(dtype)
        # torch.compile's shape check for _grouped_mm admits only bf16, though eager CPU runs float32
        grouped_ok = dtype == torch.bfloat16 or not torch.compiler.is_compiling()
        if self.dispatch == "grouped" and device in ("cpu", "cuda") and grouped_ok:
            offsets = counts.cumsum(0).to(torch.int32)
            gate, up = torch._grouped_mm(x, w_in.transpose(-2, -1), offs=offsets).chunk(2, dim=-1)
            return torch._grouped_mm(F.silu(gate) * up, w_out.transpose(-2, -1), offs=offsets)
        outs = []
        for e, xs in enumerate(x.split(counts.tolist())):
            gate, up = F.linear(xs, w_in[e]).chunk(2, dim=-1)
            outs.append(F.linear(F.silu(gate) * up, w_out[e]))
        return torch.cat(outs)


class ExpertList(nn.Module):
    """E experts of any registered FFN kind (the sparse FFN), each run on its contiguous slice."""

    def __init__(self, experts: list[nn.Module]):
        super().__init__()
        self.n_experts = len(experts)
        self.experts = nn.ModuleList(experts)

    def select(self, experts: range) -> ExpertList:
        return ExpertList([self.experts[e] for e in experts])

    @staticmethod
    def merge_state(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The state dict of the whole set from those of `select`ed consecutive shares, in order:
        share r's expert i is expert sum(sizes before r) + i."""
        merged, first = {}, 0
        for part in parts:
            indices = {int(key.split(".")[1]) for key in part}
            for key, value in part.items():
                _, i, rest = key.split(".", 2)
                merged[f"experts.{first + int(i)}.{rest}"] = value
            first += len(indices)
        return merged

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # x: (M, D) sorted by expert, counts: (E,) -> (M, D)
        # With gradients, every expert runs, on an empty slice if no token reached it, so that each
        # has a (zero) gradient on every rank: DDP and FSDP reduce the same gradients everywhere
        grads = torch.is_grad_enabled()
        outs = [expert(xs) for expert, xs in zip(self.experts, x.split(counts.tolist()), strict=True)
                if xs.size(0) or grads]
        return torch.cat(outs) if outs else x.new_empty(0, x.size(-1))


@FFN.register("moe", MoEConfig)
class MoE(nn.Module):
    def __init__(self, options: MoEConfig, cfg):
        super().__init__()
        self.n_experts, self.router_kind, self.jitter = options.n_experts, options.router, options.jitter
        self.top_k = {"switch": 1, "topk": options.top_k, "expert_choice": 1}[options.router]
        self.capacity_factor, self.eval_capacity_factor = options.capacity_factor, options.eval_capacity_factor
        self.dropless = options.dropless
        self.load_balance_coef, self.router_z_loss_coef = options.load_balance_coef, options.router_z_loss_coef
        self.router = nn.Linear(cfg.d_model, self.n_experts, bias=False)
        if options.expert.kind == "swiglu":
            self.experts = GroupedSwiGLU(self.n_experts, cfg.d_model, cfg.ffn_dim, options.dispatch)
        else:
            self.experts = ExpertList([FFN.build(options.expert, cfg) for _ in range(self.n_experts)])
        self.shared_expert = FFN.build(options.expert, cfg) if options.shared_expert else None
        self.aux_loss: torch.Tensor | None = None  # of the last forward; the trainer adds it to the loss
        self.stats: dict[str, torch.Tensor] = {}  # of the last forward, detached; see metrics()

    def active_matmul_params(self) -> float:
        """Weights of matmuls one token runs through: the router, k of the E experts, the shared one."""
        def matmul(module):
            return sum(p.numel() for p in module.parameters() if p.dim() >= 2)
        shared = matmul(self.shared_expert) if self.shared_expert is not None else 0
        return self.router.weight.numel() + self.top_k / self.n_experts * matmul(self.experts) + shared

    def route(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, D) -> router logits (N, E) in float32, whatever the autocast dtype
        if self.training and self.jitter:
            x = x * torch.empty_like(x).uniform_(1 - self.jitter, 1 + self.jitter)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.router.weight.float())

    def capacity(self, n_tokens: int, decoding: bool) -> int:
        if self.dropless or decoding:
            return n_tokens * self.top_k
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        return math.ceil(factor * n_tokens * self.top_k / self.n_experts)

    def forward(self, x: torch.Tensor, decoding: bool = False, valid: torch.Tensor | None = None) -> torch.Tensor:
        """`valid` (B, T) marks the real tokens (None: all); padding is not routed, so it takes no
        capacity and no expert's choice, and its output is zero."""
        # x: (B, T, D) -> (B, T, D)
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        # Few assignments (a decode step): straight through the experts' weights. The bound keeps
        # the compiled form's gathered weights within one copy of the experts; more tokens go
        # faster through the sorted grouped GEMM
        if decoding and valid is None and B * T * self.top_k <= self.n_experts and hasattr(self.experts, "per_token"):
            return self.decode(flat).view(B, T, D)
        n = torch.arange(B * T, device=x.device) if valid is None else valid.flatten().nonzero().squeeze(1)
        real = flat if valid is None else flat.index_select(0, n)  # (N, D)
        logits = self.route(real)  # (N, E)
        probs = logits.softmax(dim=-1)
        capacity = self.capacity(len(n), decoding)
        if self.router_kind == "expert_choice":
            tokens, gates, counts, routed, dropped = self.expert_choice(probs, capacity)
        else:
            tokens, gates, counts, routed, dropped = self.token_choice(probs, capacity, n, B, T)
        y = self.experts(real.index_select(0, tokens), counts)  # (M, D), sorted by expert
        out = torch.zeros(len(n), D, dtype=torch.float32, device=x.device)
        out.index_add_(0, tokens, y * gates[:, None])
        if self.shared_expert is not None:
            out = out + self.shared_expert(real)
        self.record(logits, probs, routed, dropped)
        if valid is not None:
            out = torch.zeros(B * T, D, dtype=out.dtype, device=x.device).index_copy_(0, n, out)
        return out.view(B, T, D).to(y.dtype)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Decoding's few tokens x (N, D) -> (N, D), each through its k experts: no capacity (the
        cache never drops), no sort, no routing statistics."""
        gates, experts = self.route(x).softmax(dim=-1).topk(self.top_k, dim=-1)  # (N, k)
        if self.router_kind == "topk":
            gates = gates / gates.sum(dim=-1, keepdim=True)
        y = self.experts.per_token(x, experts)  # (N, k, D)
        out = (y.float() * gates[..., None]).sum(dim=1)
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        return out.to(y.dtype)

    def token_choice(self, probs: torch.Tensor, capacity: int, n: torch.Tensor, B: int, T: int):
        """Each token picks its top-k experts; `n` (N,) numbers the routed tokens in the (B, T)
        batch (b * T + t). Returns the kept assignments sorted by expert: their tokens (M,) as rows
        of probs, gates (M,), the count per expert (E,); the count before dropping (E,), and the
        share of assignments dropped."""
        N, k, E = len(n), self.top_k, self.n_experts
        gates, experts = probs.topk(k, dim=-1)  # (N, k)
        if self.router_kind == "topk":
            gates = gates / gates.sum(dim=-1, keepdim=True)
        # Sort key: expert, then choice slot, then position, then sequence
        priority = (torch.arange(k, device=probs.device) * B * T)[None, :] + (n % T * B + n // T)[:, None]
        order = (experts * (B * T * k) + priority).flatten().argsort()  # assignment a = row * k + slot
        routed = torch.bincount(experts.flatten(), minlength=E)
        counts = routed
        if capacity < N * k and int(routed.max()) > capacity:
            start = routed.cumsum(0) - routed
            rank = torch.arange(N * k, device=probs.device) - start.repeat_interleave(routed)
            order = order[rank < capacity]
            counts = routed.clamp(max=capacity)
        dropped = 1 - counts.sum() / (N * k)
        return order // k, gates.flatten()[order], counts, routed, dropped

    def expert_choice(self, probs: torch.Tensor, capacity: int):
        """Each expert picks the `capacity` tokens with its highest router probability; a token no
        expert picks is dropped."""
        N, E = probs.shape
        capacity = min(capacity, N)
        gates, tokens = probs.t().topk(capacity, dim=-1)  # (E, C)
        counts = torch.full((E,), capacity, device=probs.device)
        picked = torch.zeros(N, device=probs.device).index_fill_(0, tokens.flatten(), 1.0)
        return tokens.flatten(), gates.flatten(), counts, counts, 1 - picked.mean()

    def record(self, logits, probs, routed, dropped) -> None:
        """The auxiliary losses and routing statistics of this forward."""
        share = routed.float() / routed.sum()  # f_e
        z_loss = torch.logsumexp(logits, dim=-1).square().mean()
        balance = self.n_experts * (share * probs.mean(dim=0)).sum()
        self.aux_loss = self.router_z_loss_coef * z_loss
        if self.router_kind != "expert_choice":  # expert choice is balanced by construction
            self.aux_loss = self.aux_loss + self.load_balance_coef * balance
        self.stats = {"load_balance_loss": balance.detach(), "router_z_loss": z_loss.detach(),
                      "dropped_fraction": dropped.detach(), "expert_load": share.detach()}

    def metrics(self) -> dict[str, float | list[float]]:
        """Routing statistics of the last forward: the two auxiliary losses (unweighted), the share
        of token-expert assignments dropped for capacity, and each expert's share of them."""
        return {name: v.tolist() if v.dim() else v.item() for name, v in self.stats.items()}

"""The decoder-only Transformer, composed from the registered components named in ModelConfig."""

from __future__ import annotations

import math

import torch
from torch import nn

from stacklm.config import Config, ModelConfig
from stacklm.model import mup
from stacklm.model.loss import linear_cross_entropy
from stacklm.registry import ATTENTION, FFN, NORM, POSITION, ComponentConfig


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int, attention: ComponentConfig | None = None,
                 ffn: ComponentConfig | None = None):
        super().__init__()
        self.attn_norm = NORM.build(cfg.norm, cfg.d_model)
        self.attn = ATTENTION.build(attention or cfg.attention.for_layer(layer), cfg)
        self.ffn_norm = NORM.build(cfg.norm, cfg.d_model)
        self.ffn = FFN.build(ffn or cfg.ffn.for_layer(layer), cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, position, cache=None, prefix: torch.Tensor | None = None,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, T, D); valid: (B, T) real tokens against padding, or None
        x = x + self.dropout(self.attn(self.attn_norm(x), position, cache, prefix))
        return x + self.dropout(self.ffn(self.ffn_norm(x), cache is not None, valid))


class DecodeState:
    """Per-layer decode state (e.g. KV caches) for incremental generation."""

    def __init__(self, layers: list):
        self.layers = layers

    @property
    def length(self) -> int:
        return self.layers[0].length

    def advance(self, n: int) -> None:
        for layer in self.layers:
            layer.length += n


class Transformer(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab_size), or with `targets` (B, T) the mean
    cross-entropy over targets other than -100, without materialising the logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.position = POSITION.build(cfg.position, cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(self.make_block(cfg, i) for i in range(cfg.n_layers))
        self.norm = NORM.build(cfg.norm, cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.add_stacks(cfg)
        self.reset_parameters()

    def make_block(self, cfg: ModelConfig, layer: int) -> nn.Module:
        return Block(cfg, layer)

    def add_stacks(self, cfg: ModelConfig) -> None:
        """Modules an architecture adds to the decoder (an encoder), before the weights are initialised."""

    def reset_parameters(self) -> None:
        """Weight matrices ~ N(0, init_std), residual output projections (`out_proj`) scaled down
        by sqrt(2 n_layers) as in GPT-2, biases zero; a component with other needs (a
        multiplicative layer's scales) defines `init_weights(std, residual_std)`, called after.
        Under muP each weight is then rescaled by its role (`stacklm.model.mup`)."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # norm gains keep their own init; biases start at zero
            nn.init.normal_(p, 0.0, residual_std if name.endswith("out_proj.weight") else std)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if hasattr(m, "init_weights"):
                m.init_weights(std, residual_std)
        if self.config.parametrization == "mup":
            mup.apply_init(self, mup.roles(self.config))

    def forward(self, idx: torch.Tensor, state: DecodeState | None = None,
                targets: torch.Tensor | None = None, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """`prefix` (B,) makes a prefix LM: sequence b's first prefix[b] positions attend to each
        other both ways (the rest stays causal)."""
        # idx: (B, T) -> logits (B, T, V); with targets: (B, T) -> scalar loss
        start = self.start(idx, state)
        x = self.drop(self.position.embed(self.embed(idx), start))
        for i, block in enumerate(self.blocks):
            x = block(x, self.position, state.layers[i] if state is not None else None, prefix)
        return self.head(x, idx, state, targets)

    def start(self, idx: torch.Tensor, state: DecodeState | None) -> int:
        """The position of idx's first token: the decode state's length (0 without one)."""
        start = state.length if state is not None else 0
        if start + idx.size(1) > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + idx.size(1)} tokens exceeds model.max_seq_len "
                             f"({self.config.max_seq_len})")
        return start

    def head(self, x: torch.Tensor, idx: torch.Tensor, state: DecodeState | None,
             targets: torch.Tensor | None) -> torch.Tensor:
        """The last blocks' output -> logits, or the loss on targets; advances the decode state."""
        if state is not None:
            state.advance(idx.size(1))
        x = self.readout(x)
        if targets is not None:
            return linear_cross_entropy(x, self.lm_head.weight, targets)
        return self.lm_head(x)

    def readout(self, x: torch.Tensor) -> torch.Tensor:
        """The last blocks' output -> the output projection's input: the final norm, and muP's
        readout multiplier (on x rather than on the logits: the same factor)."""
        x = self.norm(x)
        if self.config.parametrization == "mup":
            x = x * (self.config.output_mult / mup.width_mult(self.config))
        return x

    def new_state(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> DecodeState:
        """Empty decode state for `batch` sequences of up to `max_len` tokens."""
        max_len = min(max_len or self.config.max_seq_len, self.config.max_seq_len)
        ref = self.lm_head.weight
        return DecodeState([b.attn.new_cache(batch, max_len, dtype or ref.dtype, ref.device)
                            for b in self.blocks])

    def auxiliary_loss(self) -> torch.Tensor | None:
        """The sum of the auxiliary losses (MoE load balance, router z-loss) that modules kept as
        `aux_loss` in the last forward, which training adds to the objective's loss; None if none."""
        losses = [m.aux_loss for m in self.modules() if isinstance(getattr(m, "aux_loss", None), torch.Tensor)]
        return sum(losses) if losses else None

    def layer_metrics(self) -> dict[str, float | list[float]]:
        """Statistics of the last forward from the layers that keep some (MoE routing), keyed
        `layer{i}.{name}`, plus their means over layers keyed by name."""
        out, totals = {}, {}
        for stack, blocks in self.stacks().items():
            for i, block in enumerate(blocks):
                metrics = getattr(block.ffn, "metrics", None)
                for name, value in (metrics() if metrics is not None else {}).items():
                    out[f"{stack}layer{i}.{name}"] = value
                    if not isinstance(value, list):
                        totals.setdefault(name, []).append(value)
        return {**{name: sum(v) / len(v) for name, v in totals.items()}, **out}

    def stacks(self) -> dict[str, nn.ModuleList]:
        """The model's stacks of blocks by the prefix their layer metrics take."""
        return {"": self.blocks}

    def num_params(self, embedding: bool = True) -> int:
        """Parameter count (shared tensors once); without the input embedding if embedding=False."""
        n = sum(p.numel() for p in self.parameters())
        if not embedding and not self.config.tie_embeddings:
            n -= self.embed.weight.numel()
        return n

    def flops_per_token(self, seq_len: int, training: bool = True) -> float:
        """Matmul FLOPs per token, as in PaLM (Chowdhery et al. 2022, appendix B):
        2N for the weight matmuls (N the active ones: an MoE layer's router and top-k experts) plus
        4 * seq_len * d_attn per layer for the attention scores and their weighted sum (seq_len:
        the keys a query scores, fewer for local and LSH attention), tripled for forward + backward."""
        cfg = self.config
        keys = sum(getattr(b.attn, "keys_per_query", lambda t: t)(seq_len) for b in self.blocks)
        forward = 2 * (matmul_weights(self.blocks) + self.lm_head.weight.numel()) + 4 * keys * cfg.n_heads * cfg.head_dim
        return 3 * forward if training else forward


def matmul_weights(module: nn.Module) -> float:
    """Weights of the matmuls one token runs through in `module`: every 2-D weight, except in
    modules that count their own (`active_matmul_params`: an MoE layer its router and the k experts
    a token takes; the sparse QKV layers their multiply-adds per token)."""
    routed = [m for m in module.modules() if hasattr(m, "active_matmul_params")]
    inside = {id(p) for m in routed for p in m.parameters()}
    return (sum(p.numel() for p in module.parameters() if p.dim() == 2 and id(p) not in inside)
            + sum(m.active_matmul_params() for m in routed))


# model.arch -> model class; stacklm.model.encoder_decoder adds its own
ARCHITECTURES: dict[str, type[Transformer]] = {"decoder": Transformer}


def build_model(config: Config | ModelConfig) -> Transformer:
    """A freshly initialised model for `config` (a whole Config or its ModelConfig)."""
    cfg = config.model if isinstance(config, Config) else config
    return ARCHITECTURES[cfg.arch](cfg)


# registers model.arch=encoder_decoder (it builds on the classes above)
from stacklm.model import encoder_decoder  # noqa: E402, F401

"""The encoder-decoder Transformer, `model.arch: encoder_decoder` (T5, Raffel et al. 2020), the
architecture UL2 (Tay et al. 2022) trains with its mixture of denoisers beside decoder-only.

The encoder reads its input both ways; each decoder block puts cross-attention to the encoder's
output h between its causal self-attention and its FFN:

    encoder:  x = x + SelfAttn(norm(x))  (full attention, every input position visible)
              x = x + FFN(norm(x))
    decoder:  x = x + SelfAttn(norm(x))  (causal, any attention kind)
              x = x + CrossAttn(norm(x), h)  (queries from x, keys and values from h)
              x = x + FFN(norm(x))

Both stacks are built from the registered components of ModelConfig: the encoder takes
`model.attention` as full attention (same projections) and the position kind with its
bidirectional variant (T5's bias buckets for keys after the query); the decoder's FFN takes its
causal variant (an expert-choice MoE routes with switch there). The stacks share the token embedding
(tied, also the output projection) and keep position modules of their own.

An encoder input may be empty (no encoder_ids, or a length of 0): cross-attention over no positions
adds nothing, and the decoder is a plain language model. Generation encodes once:
`new_state(..., encoder_ids=...)` keeps each decoder layer's cross-attention keys and values beside
its self-attention KV cache.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from stacklm.config import ModelConfig
from stacklm.model.attention import causal_mask, full_attention, heads, masked_attention
from stacklm.model.mup import attention_mult
from stacklm.model.transformer import ARCHITECTURES, Block, DecodeState, Transformer, matmul_weights
from stacklm.registry import NORM, POSITION


@dataclasses.dataclass
class Encoded:
    """The encoded input, as every decoder layer's cross-attention reads it."""

    h: torch.Tensor  # (B, S, D) the encoder's output
    visible: torch.Tensor  # (B, 1, 1|T, S) bool: the input positions each decoder position reads
    present: torch.Tensor  # (B, 1|T, 1) bool: the input (packed: the position's own) is not empty


@dataclasses.dataclass
class Memory:
    """What one decoder layer's cross-attention reads of the encoded input."""

    k: torch.Tensor  # (B, Hkv, S, hd)
    v: torch.Tensor  # (B, Hkv, S, hd)
    visible: torch.Tensor  # (B, 1, 1|T, S) bool: the input positions each decoder position reads
    present: torch.Tensor  # (B, 1|T, 1) bool: the input (packed: the position's own) is not empty


class CrossAttention(nn.Module):
    """softmax(q k^T / sqrt(hd)) v with q from the decoder and k, v from the encoder's output; no
    positions (as in T5), grouped-query heads as in self-attention."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        bias = cfg.attention.bias
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=bias)
        self.kv_proj = nn.Linear(cfg.d_model, 2 * cfg.kv_heads * cfg.head_dim, bias=bias)
        self.out_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=bias)
        self.dropout = cfg.dropout
        self.q_mult = attention_mult(cfg)  # muP's 1/head_dim attention; 1 otherwise

    def zero_query(self) -> None:
        """muP's zero-initialised query."""
        with torch.no_grad():
            self.q_proj.weight.zero_()

    def memory(self, encoded: Encoded) -> Memory:
        k, v = self.kv_proj(encoded.h).chunk(2, dim=-1)  # (B, S, Hkv * hd) each
        return Memory(heads(k, self.n_kv_heads), heads(v, self.n_kv_heads), encoded.visible, encoded.present)

    def forward(self, x: torch.Tensor, memory: Memory) -> torch.Tensor:
        # x: (B, T, D) -> (B, T, D)
        b, t, _ = x.shape
        q = heads(self.q_proj(x), self.n_heads)
        q = q * self.q_mult if self.q_mult != 1 else q
        y = masked_attention(q, memory.k, memory.v, memory.visible, self.dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, -1)).masked_fill(~memory.present, 0.0)


class DecoderBlock(Block):
    """Pre-norm residual block with cross-attention: self-attention, cross-attention, FFN."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(cfg, layer, ffn=cfg.ffn.causal().for_layer(layer))
        self.cross_norm = NORM.build(cfg.norm, cfg.d_model)
        self.cross_attn = CrossAttention(cfg)

    def forward(self, x: torch.Tensor, position, cache=None, memory: Memory | Encoded | None = None,
                mask: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
        """`memory`: the cross-attention keys and values a decode state keeps, or the encoded input
        they are computed from here, in the block's own forward (where FSDP has its weights).
        Packed rows: `mask` (B, 1, T, T) the positions each may attend to, `valid` (B, T) the
        real ones."""
        # x: (B, T, D)
        x = x + self.dropout(self.attn(self.attn_norm(x), position, cache, mask))
        if isinstance(memory, Encoded):
            memory = self.cross_attn.memory(memory)
        if memory is not None:
            x = x + self.dropout(self.cross_attn(self.cross_norm(x), memory))
        return x + self.dropout(self.ffn(self.ffn_norm(x), cache is not None, valid))


class Encoder(nn.Module):
    """The bidirectional stack: embedded input (B, S, D) and its lengths (B,) -> h (B, S, D)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.position = POSITION.build(cfg.encoder_position, cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i, attention=full_attention(cfg.attention.for_layer(i)))
                                    for i in range(cfg.encoder_layers or cfg.n_layers))
        self.norm = NORM.build(cfg.norm, cfg.d_model)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None, segments: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, S, D), lengths: (B,) -> (B, S, D); positions past a length are padding. Packed
        # rows: segments (B, S) numbers each position's example (0: padding), lengths unused
        x = self.drop(self.position.embed(x, 0))
        if segments is None:
            # as a prefix-LM prefix (B,) that covers the input: each real position sees every real one
            visible = lengths
            valid = torch.arange(x.size(1), device=x.device)[None, :] < lengths[:, None]  # (B, S)
        else:  # as a mask (B, 1, S, S): each position sees its own example's
            visible, valid = same_segment(segments, segments), segments > 0
        for block in self.blocks:
            x = block(x, self.position, None, visible, valid)
        return self.norm(x)


def same_segment(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Segment ids (B, Tq) and (B, Tk) -> (B, 1, Tq, Tk) bool: query and key in the same segment."""
    return (query[:, None, :, None] == key[:, None, None, :])


class EncoderDecoderState(DecodeState):
    """The decoder's per-layer KV caches and its cross-attention memories (None: empty input)."""

    def __init__(self, layers: list, memories: list[Memory] | None):
        super().__init__(layers)
        self.memories = memories


class EncoderDecoder(Transformer):
    """Decoder ids (B, T) and encoder ids (B, S) -> next-token logits (B, T, vocab_size), or with
    `targets` (B, T) the mean cross-entropy over targets other than -100."""

    def add_stacks(self, cfg: ModelConfig) -> None:
        self.encoder = Encoder(cfg)

    def make_block(self, cfg: ModelConfig, layer: int) -> nn.Module:
        return DecoderBlock(cfg, layer)

    def stacks(self) -> dict[str, nn.ModuleList]:
        return {"": self.blocks, "encoder.": self.encoder.blocks}

    def stack_flops(self, seq_len: int, decoder_len: int | None = None) -> tuple[float, float]:
        """Forward matmul FLOPs per encoder position and per decoder position (PaLM's count, as
        `Transformer.flops_per_token`) for an input of seq_len tokens (the encoder's keys and the
        cross-attention's) and decoder_len (default seq_len) decoder tokens. The cross-attention
        key/value projections run once per encoder position."""
        cfg = self.config
        d_attn = cfg.n_heads * cfg.head_dim
        kv = sum(b.cross_attn.kv_proj.weight.numel() for b in self.blocks)
        encoder = 2 * (matmul_weights(self.encoder.blocks) + kv) + 4 * seq_len * d_attn * len(self.encoder.blocks)
        cross = 4 * seq_len * d_attn * len(self.blocks) - 2 * kv
        return encoder, super().flops_per_token(decoder_len or seq_len, training=False) + cross

    def flops_per_token(self, seq_len: int, training: bool = True, encoder_share: float = 0.5) -> float:
        """FLOPs per position of either stack, `encoder_share` of them the encoder's. T5 (Raffel et
        al. 2020, section 3.2.2) counts an L + L layer encoder-decoder as about an L-layer decoder:
        each token goes through one stack. Padding positions cost as much as real ones."""
        encoder, decoder = self.stack_flops(seq_len)
        forward = encoder_share * encoder + (1 - encoder_share) * decoder
        return 3 * forward if training else forward

    def forward(self, idx: torch.Tensor, state: EncoderDecoderState | None = None,
                targets: torch.Tensor | None = None, encoder_ids: torch.Tensor | None = None,
                encoder_lengths: torch.Tensor | None = None, prefix: torch.Tensor | None = None,
                segments: torch.Tensor | None = None, encoder_segments: torch.Tensor | None = None) -> torch.Tensor:
        """`encoder_ids` (B, S), with `encoder_lengths` (B,) real tokens each (default S, the rest
        padding), is the encoder's input; with a decode `state` it was given to `new_state`.

        Packed rows (training several examples in a row): `segments` (B, T) and `encoder_segments`
        (B, S) number each position's example, 1, 2, ... (0: padding). A decoder position then
        attends causally within its example and reads only its example's input (nothing if that
        is empty); with relative positions each example is read as if alone in its row."""
        # idx: (B, T) -> logits (B, T, V); with targets: (B, T) -> scalar loss
        if prefix is not None:
            raise ValueError("prefix is the decoder-only prefix-LM layout; an encoder-decoder reads "
                             "the prefix with its encoder (encoder_ids)")
        if state is not None and (encoder_ids is not None or encoder_lengths is not None):
            raise ValueError("the decode state holds the encoded input; give encoder_ids to new_state")
        if (segments is None) != (encoder_segments is None) or (segments is not None and state is not None):
            raise ValueError("packed rows take segments and encoder_segments together, and no decode state")
        mask = valid = None
        if state is None:
            encoded = self.encoded(encoder_ids, encoder_lengths, encoder_segments, segments)
            caches, memories = [None] * len(self.blocks), [encoded] * len(self.blocks)
            if segments is not None:
                causal = causal_mask(idx.size(1), idx.size(1), idx.device)
                mask, valid = same_segment(segments, segments) & causal, segments > 0
        else:
            caches, memories = state.layers, state.memories or [None] * len(self.blocks)
        start = self.start(idx, state)
        x = self.drop(self.position.embed(self.embed(idx), start))
        for block, cache, memory in zip(self.blocks, caches, memories, strict=True):
            x = block(x, self.position, cache, memory, mask, valid)
        return self.head(x, idx, state, targets)

    def encode(self, encoder_ids: torch.Tensor, encoder_lengths: torch.Tensor | None = None,
               segments: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's output h (B, S, D) for ids (B, S) of which the first `encoder_lengths`
        (default all S) are real, or packed rows with `segments` (B, S) (see `forward`)."""
        b, s = encoder_ids.shape
        if s > self.config.max_seq_len:
            raise ValueError(f"encoder input of {s} tokens exceeds model.max_seq_len ({self.config.max_seq_len})")
        if encoder_lengths is None and segments is None:
            encoder_lengths = torch.full((b,), s, device=encoder_ids.device)
        return self.encoder(self.embed(encoder_ids), encoder_lengths, segments)

    def encoded(self, encoder_ids: torch.Tensor | None, encoder_lengths: torch.Tensor | None,
                encoder_segments: torch.Tensor | None = None, segments: torch.Tensor | None = None) -> Encoded | None:
        """The encoded input with its masks; None when empty."""
        if encoder_ids is None or encoder_ids.size(1) == 0:
            return None
        b, s = encoder_ids.shape
        if encoder_segments is not None:
            h = self.encode(encoder_ids, segments=encoder_segments)
            own = same_segment(segments, encoder_segments) & (segments > 0)[:, None, :, None]  # (B, 1, T, S)
            present = own.any(-1, keepdim=True)  # (B, 1, T, 1)
            # a position with no input of its own (padding) reads the whole row, so that no softmax
            # is over nothing, and `present` zeroes what it reads
            return Encoded(h, own | ~present, present.squeeze(1))
        if encoder_lengths is None:
            encoder_lengths = torch.full((b,), s, device=encoder_ids.device)
        h = self.encode(encoder_ids, encoder_lengths)
        # an empty row still shows its first (padding) position, so no softmax is over nothing;
        # `present` then zeroes that row's cross-attention
        shown = encoder_lengths.clamp(min=1).view(b, 1, 1, 1)
        visible = torch.arange(s, device=h.device).view(1, 1, 1, s) < shown
        return Encoded(h, visible, (encoder_lengths > 0).view(b, 1, 1))

    def new_state(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None,
                  encoder_ids: torch.Tensor | None = None,
                  encoder_lengths: torch.Tensor | None = None) -> EncoderDecoderState:
        """Empty decoder caches for `batch` sequences of up to `max_len` tokens, and the encoded
        `encoder_ids` (B, S) their cross-attention reads (None: an empty input)."""
        state = super().new_state(batch, max_len, dtype)
        encoded = self.encoded(encoder_ids, encoder_lengths)
        memories = None if encoded is None else [block.cross_attn.memory(encoded) for block in self.blocks]
        return EncoderDecoderState(state.layers, memories)


ARCHITECTURES["encoder_decoder"] = EncoderDecoder

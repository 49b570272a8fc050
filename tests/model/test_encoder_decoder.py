import pytest
import torch

from stacklm.config import Config
from stacklm.errors import UserError
from stacklm.inference import generate
from stacklm.model.encoder_decoder import EncoderDecoder
from stacklm.model.transformer import build_model


def config(*overrides):
    return Config.load("configs/tiny.yaml", ["model.max_seq_len=64", "model.arch=encoder_decoder",
                                             "train.objective.kind=ul2", *overrides])


def small(*overrides):
    return build_model(config(*overrides)).eval()


# the components the encoder and the decoder are built from, as in test_transformer
CASES = [(), ("model.n_kv_heads=1",), ("model.position.kind=t5",), ("model.position.kind=alibi",),
         ("model.position.kind=learned",), ("model.encoder_layers=1",),
         ("model.ffn.kind=sparse", "model.ffn.block_size=8", "model.attention.qkv=multiplicative_conv"),
         ("model.ffn.kind=moe", "model.ffn.dropless=true"),
         ("model.attention.kind=local", "model.attention.window=5")]
# MoE layers with a tight capacity: padding must take none of it (decoding never drops, so these
# would not match a full forward in the decoder)
PADDING_CASES = [*CASES, ("model.ffn.kind=moe", "model.ffn.router=expert_choice", "model.ffn.eval_capacity_factor=1"),
                 ("model.ffn.kind=moe", "model.ffn.eval_capacity_factor=1")]


def inputs(b=2, s=12, t=16, lengths=(12, 7)):
    gen = torch.Generator().manual_seed(0)
    enc = torch.randint(0, 512, (b, s), generator=gen)
    return enc, torch.tensor(lengths), torch.randint(0, 512, (b, t), generator=gen)


@pytest.mark.parametrize("overrides", PADDING_CASES)
def test_encoder_is_bidirectional_and_ignores_padding(overrides):
    model = small(*overrides)
    enc, lengths, _ = inputs()
    h = model.encode(enc, lengths)
    later = enc.clone()
    later[:, 6] = (later[:, 6] + 1) % 512  # a real position of both rows
    moved = model.encode(later, lengths)
    assert not torch.allclose(h[:, :6], moved[:, :6])  # earlier positions see a later token
    padding = enc.clone()
    padding[1, 7:] = 0  # row 1's padding
    torch.testing.assert_close(model.encode(padding, lengths)[:, :7], h[:, :7])  # both rows


@pytest.mark.parametrize("overrides", CASES)
def test_decoder_is_causal_and_reads_the_encoder(overrides):
    model = small(*overrides)
    enc, lengths, x = inputs()
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % 512
    out = model(x, encoder_ids=enc, encoder_lengths=lengths)
    torch.testing.assert_close(out[:, :10], model(y, encoder_ids=enc, encoder_lengths=lengths)[:, :10])
    other = enc.roll(1, dims=1)
    assert not torch.allclose(out, model(x, encoder_ids=other, encoder_lengths=lengths))


@pytest.mark.parametrize("overrides", CASES)
def test_kv_cache_decode_equals_full_forward(overrides):
    model = small(*overrides)
    enc, lengths, x = inputs()
    full = model(x, encoder_ids=enc, encoder_lengths=lengths)
    state = model.new_state(2, 16, encoder_ids=enc, encoder_lengths=lengths)
    steps = [model(x[:, :5], state)] + [model(x[:, t : t + 1], state) for t in range(5, 16)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)


def test_an_empty_encoder_input_adds_nothing():
    model = small()
    enc, _, x = inputs()
    alone = model(x)
    torch.testing.assert_close(model(x, encoder_ids=enc, encoder_lengths=torch.tensor([0, 0])), alone)
    torch.testing.assert_close(model(x, encoder_ids=enc[:, :0]), alone)
    mixed = model(x, encoder_ids=enc, encoder_lengths=torch.tensor([12, 0]))
    torch.testing.assert_close(mixed[1], alone[1])
    assert not torch.allclose(mixed[0], alone[0])
    mixed.sum().backward()  # the empty row's masked softmax leaves no NaN behind
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_stacks_share_the_embedding_and_count_their_layers():
    model = small("model.encoder_layers=3")
    assert isinstance(model, EncoderDecoder)
    assert len(model.encoder.blocks) == 3 and len(model.blocks) == 2
    names = [name for name, _ in model.named_parameters()]
    assert not any("embed" in name for name in names if name.startswith("encoder."))
    assert sum("cross_attn.q_proj" in name for name in names) == 2  # one per decoder block
    decoder_only = build_model(Config.load("configs/tiny.yaml", ["model.max_seq_len=64"]))
    encoder_blocks = sum(p.numel() for p in model.encoder.blocks.parameters())
    cross = sum(p.numel() for b in model.blocks for p in [*b.cross_attn.parameters(), *b.cross_norm.parameters()])
    assert model.num_params() == decoder_only.num_params() + encoder_blocks + cross + model.config.d_model


def test_flops_count_each_stack_per_position():
    model, cfg = small(), config().model
    d, t = cfg.d_model, 64
    encoder, decoder = model.stack_flops(t)
    linear = {name: p.numel() for name, p in model.named_parameters() if p.dim() == 2}
    kv = sum(n for name, n in linear.items() if "cross_attn.kv_proj" in name)
    in_encoder = sum(n for name, n in linear.items() if name.startswith("encoder."))
    in_decoder = sum(n for name, n in linear.items() if name.startswith("blocks.")) - kv + linear["embed.weight"]
    # PaLM's count per position: 2 N + 4 T d per attention (self, and cross for the decoder)
    assert encoder == 2 * (in_encoder + kv) + 4 * t * d * 2
    assert decoder == 2 * in_decoder + 4 * t * d * 2 * 2
    assert model.flops_per_token(t) == 3 * (encoder + decoder) / 2
    assert model.flops_per_token(t, training=False, encoder_share=1.0) == encoder
    # a decoder of 16 tokens: its self-attention scores 16 keys, its cross-attention still t
    assert model.stack_flops(t, 16) == (encoder, decoder - 4 * (t - 16) * d * 2)


def test_encoder_takes_bidirectional_options_and_decoder_causal_ones():
    model = small("model.position.kind=t5", "model.attention.kind=local", "model.attention.window=5",
                  "model.ffn.kind=moe", "model.ffn.router=expert_choice")
    assert model.encoder.position.options.bidirectional and not model.position.options.bidirectional
    assert type(model.encoder.blocks[0].attn).__name__ == "CausalSelfAttention"  # full attention
    assert type(model.blocks[0].attn).__name__ == "LocalAttention"
    assert model.encoder.blocks[0].ffn.router_kind == "expert_choice"
    assert model.blocks[0].ffn.router_kind == "switch"


def test_greedy_generation_reads_the_encoder_and_equals_the_full_forward():
    model = small()
    with torch.no_grad():  # at init the encoder barely moves the argmax: make it count
        for block in model.blocks:
            block.cross_attn.out_proj.weight.mul_(30)
    enc, lengths, x = inputs()
    prompt = x[:, :4]
    out = generate(model, prompt, 10, temperature=0, encoder_ids=enc, encoder_lengths=lengths)
    logits = model(out[:, :-1], encoder_ids=enc, encoder_lengths=lengths)
    assert logits[:, 3:].argmax(-1).equal(out[:, 4:])
    other = generate(model, prompt, 10, temperature=0, encoder_ids=enc.flip(1), encoder_lengths=lengths)
    assert not other.equal(out)


@pytest.mark.parametrize(("overrides", "message"), [
    (("model.position.kind=xpos",), "a bidirectional encoder cannot use"),
    (("train.objective.kind=causal",), "leaves an encoder-decoder's encoder unused"),
    (("model.arch=decoder", "model.encoder_layers=2"), "model.arch=decoder has no encoder"),
])
def test_bad_configs_are_refused(overrides, message):
    with pytest.raises(UserError, match=message):
        config(*overrides)


def test_packed_rows_keep_examples_apart():
    """Two examples in one row read as each alone, and a second example with an empty input (no
    encoder segment of its own) is a plain language model, as an empty input is unpacked."""
    model = small("model.position.kind=t5")
    enc, lengths, dec = inputs(b=1, s=12, t=16, lengths=(12,))
    alone = model(dec[:, :10], encoder_ids=enc[:, :7])
    empty = model(dec[:, 10:])
    segments = torch.tensor([[1] * 10 + [2] * 5 + [0]])
    encoder_segments = torch.tensor([[1] * 7 + [0] * 5])
    packed = model(dec, encoder_ids=enc, segments=segments, encoder_segments=encoder_segments)
    torch.testing.assert_close(packed[:, :10], alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(packed[:, 10:15], empty[:, :5], rtol=1e-4, atol=1e-5)
    assert packed.isfinite().all()  # the padding position too
    with pytest.raises(ValueError, match="segments and encoder_segments together"):
        model(dec, encoder_ids=enc, segments=segments)


def test_prefix_and_an_encoded_state_are_refused():
    model = small()
    enc, lengths, x = inputs()
    with pytest.raises(ValueError, match="reads the prefix with its encoder"):
        model(x, prefix=torch.tensor([3, 3]))
    state = model.new_state(2, 16, encoder_ids=enc)
    with pytest.raises(ValueError, match="give encoder_ids to new_state"):
        model(x, state, encoder_ids=enc)
    with pytest.raises(ValueError, match="give encoder_ids to new_state"):
        model(x, state, encoder_lengths=lengths)

import pytest
import torch

from stacklm.config import Config
from stacklm.model.transformer import build_model
from stacklm.registry import ATTENTION, FFN, NORM, POSITION


def small(*overrides):
    return build_model(Config.load("configs/tiny.yaml", ["model.max_seq_len=64", *overrides])).eval()


CASES = [(), ("model.n_kv_heads=2",), ("model.n_kv_heads=1",), ("model.ffn.kind=gelu",),
         ("model.norm.kind=layernorm",), ("model.position.kind=none",), ("model.tie_embeddings=false",),
         ("model.ffn.kind=sparse", "model.ffn.block_size=8"), ("model.attention.qkv=multiplicative",),
         ("model.attention.qkv=multiplicative_conv",),
         ("model.ffn.kind=sparse", "model.ffn.block_size=8", "model.attention.qkv=multiplicative_conv",
          "model.attention.qkv_sparsity=2"),
         ("model.ffn.kind=moe", "model.ffn.dropless=true"),
         ("model.ffn.kind=moe", "model.ffn.router=topk", "model.ffn.every=2", "model.ffn.shared_expert=true"),
         ("model.ffn.kind=moe", "model.ffn.expert=sparse", "model.ffn.expert.block_size=8", "model.ffn.dropless=true"),
         ("model.position.kind=alibi",), ("model.position.kind=t5",), ("model.position.kind=xpos",),
         ("model.position.kind=learned",), ("model.position.scaling=ntk", "model.position.factor=4"),
         ("model.attention.kind=local", "model.attention.window=7", "model.n_kv_heads=2"),
         ("model.attention.kind=local", "model.attention.window=5", "model.attention.full_every=2",
          "model.position.kind=t5"),
         ("model.attention.kind=local", "model.attention.window=6", "model.attention.qkv=multiplicative_conv"),
         ("model.attention.kind=lsh", "model.attention.exact_below=0", "model.attention.chunk_size=4",
          "model.attention.n_buckets=4", "model.position.kind=alibi"),
         ("model.attention.kind=lsh", "model.attention.full_every=2")]


@pytest.mark.parametrize("overrides", CASES)
def test_causal(overrides):
    model = small(*overrides)
    x = torch.randint(0, 512, (2, 32))
    y = x.clone()
    y[:, 20:] = torch.randint(0, 512, (2, 12))
    torch.testing.assert_close(model(x)[:, :20], model(y)[:, :20])
    assert not torch.allclose(model(x)[:, 20:], model(y)[:, 20:])


@pytest.mark.parametrize("overrides", CASES)
def test_kv_cache_logits_equal_full_forward(overrides):
    """Prefill a prompt, then decode one token at a time: every step's logits match the full pass."""
    model = small(*overrides)
    x = torch.randint(0, 512, (3, 40))
    full = model(x)
    state = model.new_state(3, 40)
    steps = [model(x[:, :9], state)] + [model(x[:, t : t + 1], state) for t in range(9, 33)]
    steps.append(model(x[:, 33:], state))  # a multi-token chunk after the prefix
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)


def test_gqa_shares_key_value_heads():
    model = small("model.n_kv_heads=2")
    attn = model.blocks[0].attn
    d = model.config.d_model
    assert attn.proj.qkv_proj.weight.shape == (d + 2 * 2 * model.config.head_dim, d)


def test_tied_embeddings_and_counts():
    tied, untied = small(), small("model.tie_embeddings=false")
    assert tied.lm_head.weight is tied.embed.weight
    assert untied.num_params() - tied.num_params() == 512 * 64
    # PaLM's estimate: 6 N + 12 L d T, with N the matmul parameters (the head counts, the lookup not)
    cfg = tied.config
    n = sum(p.numel() for n_, p in tied.named_parameters() if p.dim() == 2)
    assert tied.flops_per_token(64) == 6 * n + 12 * cfg.n_layers * cfg.d_model * 64
    local = small("model.attention.kind=local", "model.attention.window=16", "model.attention.full_every=2")
    assert local.flops_per_token(64) == 6 * n + 12 * cfg.d_model * (16 + 64)  # one local layer, one full


def test_init_scales_residual_projections():
    model = build_model(Config.load("configs/tiny.yaml", ["model.d_model=256", "model.n_layers=8"]))
    std = model.blocks[0].ffn.out_proj.weight.std().item()
    assert abs(std - 0.02 / 4) < 0.001  # 0.02 / sqrt(2 * 8)
    assert abs(model.blocks[0].ffn.gate_up_proj.weight.std().item() - 0.02) < 0.002


def test_registries_list_builtin_kinds():
    assert set(ATTENTION.kinds) >= {"full"}
    assert set(FFN.kinds) >= {"swiglu", "gelu"}
    assert set(POSITION.kinds) >= {"rope", "none"}
    assert set(NORM.kinds) >= {"rmsnorm", "layernorm"}


def test_too_long_sequence_is_refused():
    model = small()
    with pytest.raises(ValueError, match="exceeds model.max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("overrides", [(), ("model.position.kind=alibi",), ("model.n_kv_heads=1",)])
def test_prefix_lm_is_bidirectional_over_the_prefix_only(overrides):
    model = small(*overrides)
    x = torch.randint(0, 512, (2, 32))
    prefix = torch.tensor([10, 20])
    out = model(x, prefix=prefix)
    y = x.clone()
    y[:, 5] = (x[:, 5] + 1) % 512  # inside both prefixes: earlier positions see it now
    changed = (model(y, prefix=prefix) - out).abs().amax(-1) > 1e-6  # (B, T)
    assert changed[:, :5].all() and changed[:, 5:].all()
    z = x.clone()
    z[0, 15], z[1, 25] = (x[0, 15] + 1) % 512, (x[1, 25] + 1) % 512  # after each prefix: causal
    changed = (model(z, prefix=prefix) - out).abs().amax(-1) > 1e-6
    assert not changed[0, :15].any() and changed[0, 15:].all()
    assert not changed[1, :25].any() and changed[1, 25:].all()
    torch.testing.assert_close(model(x, prefix=torch.tensor([1, 1])), model(x))  # a 1-token prefix is causal


def test_prefix_lm_decodes_after_a_bidirectional_prefill():
    model = small()
    x = torch.randint(0, 512, (2, 30))
    full = model(x, prefix=torch.tensor([12, 12]))
    state = model.new_state(2, 30)
    steps = [model(x[:, :12], state, prefix=torch.tensor([12, 12]))]
    steps += [model(x[:, t : t + 1], state) for t in range(12, 30)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)

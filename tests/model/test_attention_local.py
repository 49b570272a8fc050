import pytest
import torch

from stacklm.config import Config
from stacklm.errors import UserError
from stacklm.model.attention import CausalSelfAttention
from stacklm.model.attention_local import LocalAttention
from stacklm.model.transformer import build_model


def model(*overrides):
    cfg = Config.load("configs/tiny.yaml", ["model.max_seq_len=64", "model.attention.kind=local", *overrides])
    return build_model(cfg).eval()


def band_reference(q, k, v, window, bias=None):
    """Dense attention where query p sees keys p - window + 1 ... p."""
    t = q.size(2)
    distance = torch.arange(t)[:, None] - torch.arange(t)[None, :]
    scores = q @ k.transpose(-1, -2) * q.size(-1) ** -0.5 + (0 if bias is None else bias)
    scores = scores.masked_fill(~((distance >= 0) & (distance < window)), float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("window", "t"), [(4, 4), (4, 19), (5, 20), (8, 37), (1, 9)])
def test_blockwise_equals_dense_band(window, t, dtype):
    layer = model(f"model.attention.window={window}").blocks[0].attn
    position = model("model.position.kind=none").position
    q, k, v = (torch.randn(2, 4, t, 16, dtype=dtype) for _ in range(3))
    expected = band_reference(q.float(), k.float(), v.float(), window)
    torch.testing.assert_close(layer.attend(q, k, v, position).float(), expected,
                               **({} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}))


def test_alibi_bias_inside_the_window():
    m = model("model.attention.window=6", "model.position.kind=alibi", "model.n_heads=4")
    q, k, v = (torch.randn(1, 4, 23, 16) for _ in range(3))
    distance = torch.arange(23)[:, None] - torch.arange(23)[None, :]
    bias = -m.position.slopes.view(4, 1, 1) * distance.abs()
    torch.testing.assert_close(m.blocks[0].attn.attend(q, k, v, m.position), band_reference(q, k, v, 6, bias))


def test_window_covering_the_sequence_is_full_attention():
    local = model("model.attention.window=64")
    full = build_model(Config.load("configs/tiny.yaml", ["model.max_seq_len=64"])).eval()
    full.load_state_dict(local.state_dict())
    x = torch.randint(0, 512, (2, 50))
    torch.testing.assert_close(local(x), full(x))


def test_decode_cache_holds_one_window():
    m = model("model.attention.window=8")
    state = m.new_state(2, 64)
    m(torch.randint(0, 512, (2, 30)), state)
    for _ in range(5):
        m(torch.randint(0, 512, (2, 1)), state)
    cache = state.layers[0]
    assert cache.length == 35 and cache.k.shape[2] == 8 and cache.v.shape[2] == 8  # however long the text


def test_full_every_mixes_attention_kinds_per_layer():
    m = model("model.n_layers=4", "model.attention.full_every=2", "model.attention.window=8")
    kinds = [type(b.attn) for b in m.blocks]
    assert kinds == [LocalAttention, CausalSelfAttention, LocalAttention, CausalSelfAttention]


def test_bad_window_is_a_user_error():
    with pytest.raises(UserError, match="model.attention.window"):
        Config.load("configs/tiny.yaml", ["model.attention.kind=local", "model.attention.window=0"])


@pytest.mark.parametrize("kind", ["rope", "xpos", "alibi", "t5", "learned", "none"])
def test_kv_cache_decode_equals_full_forward_for_every_position(kind):
    m = model("model.attention.window=6", f"model.position.kind={kind}")
    if kind == "t5":
        torch.nn.init.normal_(m.position.table)  # a bias that matters
    x = torch.randint(0, 512, (2, 30))
    state = m.new_state(2, 30)
    steps = [m(x[:, :9], state)] + [m(x[:, t : t + 1], state) for t in range(9, 21)] + [m(x[:, 21:], state)]
    torch.testing.assert_close(torch.cat(steps, dim=1), m(x), atol=1e-5, rtol=1e-4)

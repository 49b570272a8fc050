import pytest
import torch
import torch.nn.functional as F

from stacklm.config import Config
from stacklm.errors import UserError
from stacklm.model.attention import CausalSelfAttention
from stacklm.model.attention_lsh import SELF_SCORE, LSHAttention
from stacklm.model.transformer import build_model

# LSH mode on short sequences: small chunks and several buckets, so the rule restricts something
LSH = ("model.attention.exact_below=0", "model.attention.chunk_size=4", "model.attention.n_buckets=8")
EXACT = ("model.attention.exact_below=64",)


def model(*overrides):
    cfg = Config.load("configs/tiny.yaml", ["model.max_seq_len=64", "model.attention.kind=lsh", *overrides])
    m = build_model(cfg).eval()
    if cfg.model.position.kind == "t5":  # the table starts at zero: give the bias something to do
        m.position.table.data.normal_()
    return m


def allowed_keys(buckets, chunk):
    """(B, H, T, T): for query p, the `chunk` most recent positions m <= p in p's bucket."""
    b, h, t = buckets.shape
    allowed = torch.zeros(b, h, t, t, dtype=torch.bool)
    for i in range(b):
        for j in range(h):
            for p in range(t):
                same = [m for m in range(p + 1) if buckets[i, j, m] == buckets[i, j, p]]
                allowed[i, j, p, same[-chunk:]] = True
    return allowed


def reference(q, k, v, buckets=None, chunk=None, bias=None):
    """Dense shared-QK attention from the rule: query p sees the keys m <= p (with buckets (B, H, R, T):
    allowed_keys of each round), itself with SELF_SCORE added; rounds weighted by softmax of their lse."""
    t = k.size(2)
    v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
    scores = q @ k.transpose(-1, -2) * q.size(-1) ** -0.5 + (0 if bias is None else bias)
    scores = scores + SELF_SCORE * torch.eye(t)
    if buckets is None:
        allowed = [torch.ones(t, t, dtype=torch.bool).tril()]
    else:
        allowed = [allowed_keys(buckets[:, :, r], chunk) for r in range(buckets.size(2))]
    rounds = [scores.masked_fill(~a, float("-inf")) for a in allowed]
    lse = torch.stack([s.logsumexp(-1) for s in rounds])
    out = torch.stack([s.softmax(-1) @ v for s in rounds])
    return (lse.softmax(0)[..., None] * out).sum(0)


def random_qkv(b=2, h=4, h_kv=4, t=30, hd=16):
    q = torch.randn(b, h, t, hd)
    return q, F.normalize(q, dim=-1), torch.randn(b, h_kv, t, hd)


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_causal(position):
    m = model(*LSH, f"model.position.kind={position}")
    x = torch.randint(0, 512, (2, 48))
    y = x.clone()
    y[:, 30:] = torch.randint(0, 512, (2, 18))
    torch.testing.assert_close(m(x)[:, :30], m(y)[:, :30])
    assert not torch.allclose(m(x)[:, 30:], m(y)[:, 30:])


@pytest.mark.parametrize("position", ["none", "alibi"])
def test_exact_mode_equals_dense_reference(position):
    m = model(*EXACT, f"model.position.kind={position}", "model.n_kv_heads=2")
    q, k, v = random_qkv(h_kv=2)
    bias = None
    if position == "alibi":
        bias = -m.position.slopes.view(4, 1, 1) * (torch.arange(30)[:, None] - torch.arange(30)).abs()
    y = m.blocks[0].attn.attend(q, k, v, None, m.position)
    torch.testing.assert_close(y, reference(q, k, v, bias=bias))


def test_one_bucket_with_a_chunk_covering_the_sequence_is_exact():
    exact = model(*EXACT)
    lsh = model("model.attention.exact_below=0", "model.attention.n_buckets=1",
                "model.attention.chunk_size=64")
    lsh.load_state_dict(exact.state_dict())
    x = torch.randint(0, 512, (2, 50))
    torch.testing.assert_close(lsh(x), exact(x))


DECODE_CASES = [(mode, f"model.position.kind={p}")
                for mode in (LSH, EXACT) for p in ("rope", "alibi", "t5", "none")]


@pytest.mark.parametrize(("mode", "position"), [*DECODE_CASES, (LSH, "model.n_kv_heads=2"),
                                               (EXACT, "model.n_kv_heads=1")])
def test_kv_cache_logits_equal_full_forward(mode, position):
    """Prefill, one token at a time, then a multi-token chunk: the logits of the full pass."""
    m = model(*mode, position)
    x = torch.randint(0, 512, (3, 40))
    full = m(x)
    state = m.new_state(3, 40)
    assert (state.layers[0].buckets is None) == (mode == EXACT)
    steps = [m(x[:, :9], state)] + [m(x[:, t : t + 1], state) for t in range(9, 33)]
    steps.append(m(x[:, 33:], state))  # 7 tokens, more than a chunk: the sorted path after a prefix
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("t_q", [30, 10, 3])  # the whole sequence, a long and a short continuation
def test_query_sees_the_chunk_size_most_recent_keys_of_its_bucket(t_q):
    layer = model(*LSH).blocks[0].attn
    position = model(*LSH, "model.position.kind=none").position
    q, k, _ = random_qkv(t=30)
    buckets = layer.hash(k)[:, :, :1]  # one round
    v = torch.eye(30).expand(2, 4, 30, 30)  # one-hot values: the output is the attention weights
    weights = layer.attend(q[:, :, -t_q:], k, v, buckets, position)  # (B, H, Tq, K)
    seen = weights > 0
    query_bucket = buckets[:, :, 0, -t_q:, None]
    assert (seen.sum(-1) <= layer.chunk_size).all()
    assert (buckets[:, :, 0, None, :] == query_bucket)[seen].all()
    # the allowed keys other than the query itself; itself only when nothing else is allowed
    allowed = allowed_keys(buckets[:, :, 0], layer.chunk_size)[:, :, -t_q:]
    itself = torch.eye(30, dtype=torch.bool)[-t_q:]
    alone = allowed.sum(-1, keepdim=True) == 1
    assert torch.equal(seen, allowed & (~itself | alone))
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, t_q))


@pytest.mark.parametrize("t_q", [30, 3])
def test_rounds_combine_by_log_sum_exp(t_q):
    m = model(*LSH, "model.attention.n_hashes=3", "model.position.kind=alibi", "model.n_kv_heads=2")
    layer = m.blocks[0].attn
    q, k, v = random_qkv(h_kv=2)
    buckets = layer.hash(k)
    assert not torch.equal(buckets[:, :, 0], buckets[:, :, 1])
    bias = -m.position.slopes.view(4, 1, 1) * (torch.arange(30)[:, None] - torch.arange(30)).abs()
    expected = reference(q, k, v, buckets, layer.chunk_size, bias)[:, :, -t_q:]
    torch.testing.assert_close(layer.attend(q[:, :, -t_q:], k, v, buckets, m.position), expected)
    # rounds that hash alike are one round
    same = buckets[:, :, :1].expand(-1, -1, 3, -1)
    torch.testing.assert_close(layer.attend(q, k, v, same, m.position),
                               layer.attend(q, k, v, same[:, :, :1], m.position))


def test_gradients_equal_finite_differences():
    m = model(*LSH, "model.position.kind=t5", "model.n_heads=2", "model.n_kv_heads=1")
    layer, position = m.blocks[0].attn, m.position.double()
    q = torch.randn(1, 2, 9, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 9, 4, dtype=torch.float64, requires_grad=True)
    buckets = torch.randint(0, 3, (1, 2, 2, 9))  # two rounds

    def attend(q, v, t_q):
        return layer.attend(q[:, :, -t_q:], F.normalize(q, dim=-1), v, buckets, position)

    for t_q in (9, 2):  # the sorted chunks and the dense decoding path
        assert torch.autograd.gradcheck(lambda q, v, t_q=t_q: attend(q, v, t_q), (q, v), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_is_finite(dtype):
    m = model(*LSH, "model.position.kind=alibi", "model.dropout=0.1").train()
    x = torch.randint(0, 512, (2, 45))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = m(x[:, :-1], targets=x[:, 1:])
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    assert m.blocks[0].attn.proj.qkv_proj.weight.grad.abs().sum() > 0


def test_full_every_mixes_attention_kinds_per_layer():
    m = model("model.n_layers=4", "model.attention.full_every=2")
    assert [type(b.attn) for b in m.blocks] == [LSHAttention, CausalSelfAttention] * 2


@pytest.mark.parametrize(("overrides", "message"), [
    (("model.attention.qkv=multiplicative",), "model.attention.qkv must be dense"),
    (("model.position.kind=xpos",), "model.position.kind=xpos"),
    (("model.attention.n_buckets=7",), "model.attention.n_buckets"),
])
def test_unsupported_combinations_are_user_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        Config.load("configs/tiny.yaml", ["model.attention.kind=lsh", *overrides])


def test_mode_follows_the_query_position_not_the_sequence_length():
    mixed = model("model.attention.exact_below=20", "model.attention.chunk_size=4", "model.attention.n_buckets=8")
    exact = model(*EXACT)
    exact.load_state_dict(mixed.state_dict())
    x = torch.randint(0, 512, (2, 40))
    full = mixed(x)
    torch.testing.assert_close(full[:, :20], exact(x)[:, :20])  # positions < exact_below: exact
    assert not torch.allclose(full[:, 20:], exact(x)[:, 20:])  # later ones: LSH
    for max_len in (40, 64):  # the cache's size changes nothing
        state = mixed.new_state(2, max_len)
        steps = [mixed(x[:, :9], state)] + [mixed(x[:, t : t + 1], state) for t in range(9, 33)]
        steps.append(mixed(x[:, 33:], state))
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)
    short = mixed.new_state(2, 20)  # a cache that never reaches LSH positions keeps no buckets
    assert short.layers[0].buckets is None
    torch.testing.assert_close(mixed(x[:, :12], short), full[:, :12])

import pytest
import torch
import torch.nn.functional as F

from stacklm.config import Config
from stacklm.model import attention
from stacklm.model.attention import block_causal_attention, causal_attention
from stacklm.model.transformer import build_model


def grads(fn, *inputs):
    """fn(*inputs) and the gradients of <fn(*inputs), g> for a fixed random g."""
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    return [out, *torch.autograd.grad(out, inputs, g)]


@pytest.mark.parametrize(("t", "rows"), [(37, 8), (32, 8), (5, 8), (64, 64)])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_block_causal_attention_equals_sdpa(t, rows, kv_heads):
    q = torch.randn(2, 4, t, 16)
    k, v = torch.randn(2, kv_heads, t, 16), torch.randn(2, kv_heads, t, 16)
    ours = grads(lambda q, k, v: block_causal_attention(q, k, v, rows), q, k, v)
    reference = grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                      q, k, v)
    for a, b in zip(ours, reference, strict=True):  # output, dq, dk, dv
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_block_causal_attention_in_bfloat16():
    q, k, v = (torch.randn(2, 4, 45, 32) for _ in range(3))
    ours = grads(lambda *x: block_causal_attention(*x, rows=16), *(x.bfloat16() for x in (q, k, v)))
    reference = grads(lambda *x: F.scaled_dot_product_attention(*x, is_causal=True), q, k, v)
    for a, b in zip(ours, reference, strict=True):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, atol=2e-2 * b.abs().max().item(), rtol=0)


def test_block_causal_attention_under_autocast():
    """float32 inputs under bf16 autocast: computed in bf16 as one op, and its backward runs."""
    q, k, v = (torch.randn(1, 2, 20, 8) for _ in range(3))

    def attend(*x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return block_causal_attention(*x, rows=8)

    ours = grads(attend, q, k, v)
    reference = grads(lambda *x: F.scaled_dot_product_attention(*x, is_causal=True), q, k, v)
    assert ours[0].dtype == torch.bfloat16 and ours[1].dtype == torch.float32
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a.float(), b, atol=2e-2 * b.abs().max().item(), rtol=0)


def test_training_on_the_cpu_takes_the_block_path(monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "block_causal_attention", lambda *a: calls.append(1) or attention.explicit_attention(
        *a, attention.causal_mask(a[0].size(-2), a[0].size(-2), "cpu")))
    q, k, v = (torch.randn(1, 2, 8, 4, requires_grad=True) for _ in range(3))
    causal_attention(q, k, v, None)
    with torch.no_grad():  # float32 without a gradient: the fused kernel
        causal_attention(q, k, v, None)
    causal_attention(q, k, v, None, dropout=0.1)  # dropout: the fused kernel's
    assert len(calls) == 1
    causal_attention(*(x.bfloat16() for x in (q, k, v)), None)
    assert len(calls) == 2
    causal_attention(*(x.double() for x in (q, k, v)), None)  # float64: SDPA keeps its precision
    assert len(calls) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_step_traces_as_one_graph(dtype):
    """torch.compile sees the whole loss, attention included, as one graph (a graph break per
    layer cost a fifth of the compiled bf16 step)."""
    model = build_model(Config.load("configs/tiny.yaml", ["model.max_seq_len=256"])).train()
    ids = torch.randint(0, model.config.vocab_size, (1, 201))  # two blocks of queries

    def loss(inputs, targets):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            return model(inputs, targets=targets)

    explained = torch._dynamo.explain(loss)(ids[:, :-1], ids[:, 1:])
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


@pytest.mark.parametrize("kv_heads", [4, 1])
def test_one_query_attention_equals_sdpa(kv_heads):
    q, k, v = torch.randn(3, 4, 1, 16), torch.randn(3, kv_heads, 9, 16), torch.randn(3, kv_heads, 9, 16)
    torch.testing.assert_close(attention.one_query_attention(q, k, v),
                               F.scaled_dot_product_attention(q, k, v, enable_gqa=True))


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd keeps for fn()'s backward pass (a checkpointed part's
    inputs are kept outside these hooks and not counted)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


RECOMPUTED_KINDS = [
    ("model.attention.kind=local", "model.attention.window=8"),
    ("model.attention.kind=lsh", "model.attention.exact_below=0", "model.attention.chunk_size=4",
     "model.attention.n_buckets=4"),
]


@pytest.mark.parametrize("kind", RECOMPUTED_KINDS)
def test_recompute_gives_the_same_gradients_and_keeps_less(kind):
    # t5: a learned position bias inside the recomputed part; dropout: the same mask drawn again
    overrides = ["model.max_seq_len=64", "model.position.kind=t5", "model.dropout=0.1", *kind]
    x = torch.randint(0, 512, (2, 41))
    results = []
    for recompute in (False, True):
        torch.manual_seed(0)
        m = build_model(Config.load("configs/tiny.yaml", [*overrides, f"model.attention.recompute={recompute}"]))
        m.position.table.data.normal_()  # the table starts at zero: give the bias something to do
        torch.manual_seed(1)
        loss = m(x[:, :-1], targets=x[:, 1:])
        loss.backward()
        h = torch.randn(2, 40, 64, requires_grad=True)  # one attention layer alone, for what it keeps
        saved = saved_bytes(lambda m=m, h=h: m.blocks[0].attn(h, m.position))
        results.append((loss, saved, {n: p.grad for n, p in m.named_parameters()}))
    (loss, saved, grads), (loss_r, saved_r, grads_r) = results
    torch.testing.assert_close(loss_r, loss)
    assert grads_r.keys() == grads.keys()
    for name, g in grads.items():
        assert g is not None and g.abs().sum() > 0, name
        torch.testing.assert_close(grads_r[name], g, msg=name)
    assert saved_r < 0.8 * saved


@pytest.mark.parametrize("kind", RECOMPUTED_KINDS)
def test_recompute_traces_as_one_graph(kind):
    """torch.compile takes the checkpointed attention core into the step's one graph."""
    model = build_model(Config.load("configs/tiny.yaml", ["model.max_seq_len=64", *kind,
                                                          "model.attention.recompute=true"])).train()
    ids = torch.randint(0, 512, (2, 41))
    explained = torch._dynamo.explain(lambda x, y: model(x, targets=y))(ids[:, :-1], ids[:, 1:])
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]

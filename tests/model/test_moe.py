import math

import pytest
import torch
import torch.nn.functional as F

from stacklm.config import Config
from stacklm.errors import UserError
from stacklm.model.ffn_sparse import SparseFFN
from stacklm.model.moe import MoE, MoEConfig
from stacklm.model.transformer import build_model

D, E = 32, 4


def model_config(**moe):
    return Config.load("configs/tiny.yaml", ["model.d_model=32", "model.n_heads=4", "model.d_ff=64",
                                             "model.ffn.kind=moe", f"model.ffn.n_experts={E}",
                                             *[f"model.ffn.{k}={v}" for k, v in moe.items()]]).model


def layer(**moe) -> MoE:
    cfg = model_config(**moe)
    model = build_model(cfg)  # the model's init, then the layer alone
    return model.blocks[0].ffn


def reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: the router's top-k experts, each applied to the token alone."""
    flat = x.reshape(-1, x.size(-1))
    probs = F.linear(flat, moe.router.weight).softmax(-1)
    out = torch.zeros_like(flat)
    for n in range(flat.size(0)):
        gates, experts = probs[n].topk(moe.top_k)
        if moe.router_kind == "topk":
            gates = gates / gates.sum()
        for g, e in zip(gates, experts.tolist(), strict=True):
            counts = torch.zeros(moe.n_experts, dtype=torch.long)
            counts[e] = 1
            out[n] += g * moe.experts(flat[n : n + 1], counts)[0]
    return out.view_as(x)


def steer(moe: MoE, experts: torch.Tensor, sharpness: float = 20.0) -> torch.Tensor:
    """Inputs whose router logits pick `experts[n]` for token n with probability ~1."""
    n = experts.numel()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:, :E] = sharpness * torch.eye(E)
    x = torch.zeros(n, D)
    x[torch.arange(n), experts] = 1.0
    return x.view(1, n, D)


@pytest.mark.parametrize("options", [dict(router="switch"), dict(router="topk", top_k=2),
                                     dict(router="topk", top_k=3, dispatch="loop"),
                                     dict(router="switch", expert="sparse", **{"expert.block_size": 8})])
def test_matches_token_by_token_reference(options):
    moe = layer(dropless="true", **options).eval()
    x = torch.randn(2, 12, D)
    torch.testing.assert_close(moe(x), reference(moe, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_grouped_dispatch_matches_eager(dtype):
    """Under torch.compile float32 takes the per-expert loop (the compiler's grouped GEMM check
    admits only bf16); both dtypes train through it."""
    moe = layer(dropless="true").train()
    x = torch.randn(2, 12, D)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        want = moe(x)
        got = torch.compile(moe, backend="aot_eager")(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    got.float().square().mean().backward()
    assert moe.experts.gate_up_proj.grad is not None


def test_sparse_experts_are_sparse_ffns():
    moe = layer(expert="sparse", **{"expert.block_size": 8})
    assert len(moe.experts.experts) == E and all(isinstance(e, SparseFFN) for e in moe.experts.experts)


def test_an_expert_no_token_reaches_still_gets_a_gradient():
    """Zero, not None: data-parallel ranks must reduce the same gradients whatever their routing.
    (Grouped dense experts are one stacked tensor, whose gradient always exists.)"""
    moe = layer(dropless="true", expert="sparse", **{"expert.block_size": 8}).train()
    moe(steer(moe, torch.zeros(6, dtype=torch.long))).sum().backward()  # every token to expert 0
    for e in range(1, E):
        grads = [p.grad for p in moe.experts.experts[e].parameters()]
        assert all(g is not None and not g.any() for g in grads), e


def test_permutation_round_trip_is_exact():
    """With experts that return their input, dispatch then combine gives back gate * x bitwise."""
    moe = layer(dropless="true")
    moe.experts.forward = lambda x, counts: x
    x = torch.randn(3, 10, D)
    gate = F.linear(x, moe.router.weight).softmax(-1).amax(-1, keepdim=True)
    assert torch.equal(moe(x), x * gate)


@pytest.mark.parametrize("device, dtype", [("cpu", torch.bfloat16), ("meta", torch.float32)])
def test_a_share_of_the_experts_keeps_their_device_and_dtype(device, dtype):
    """Expert parallelism keeps a rank's share with `select`: on a GPU model it must stay on the GPU
    in the model's dtype (the meta device stands in for CUDA here)."""
    experts = layer().experts.to(device=device, dtype=dtype)
    share = experts.select(range(1, 3))
    for name in ("gate_up_proj", "out_proj"):
        weight = getattr(share, name)
        assert (weight.device.type, weight.dtype, weight.size(0)) == (device, dtype, 2)
        assert weight.requires_grad
        if device == "cpu":
            assert torch.equal(weight, getattr(experts, name)[1:3])
            # a copy: a view would keep every expert's weights alive on each rank
            assert weight.untyped_storage().data_ptr() != getattr(experts, name).untyped_storage().data_ptr()


def test_topk_gates_sum_to_one():
    moe = layer(router="topk", top_k=3, dropless="true")
    moe.experts.forward = lambda x, counts: x
    x = torch.randn(2, 16, D)
    torch.testing.assert_close(moe(x), x)  # sum of gates * x
    tokens, gates, _, _, _ = moe.token_choice(torch.rand(32, E).softmax(-1), capacity=96, n=torch.arange(32), B=2, T=16)
    torch.testing.assert_close(torch.zeros(32).index_add_(0, tokens, gates), torch.ones(32))


def test_balanced_router_loss_is_one_and_collapsed_is_larger():
    moe = layer(load_balance_coef=0.01, router_z_loss_coef=0.0).train()
    balanced = steer(moe, torch.arange(64) % E)
    moe(balanced)
    assert moe.stats["load_balance_loss"].item() == pytest.approx(1.0, abs=1e-3)
    assert moe.aux_loss.item() == pytest.approx(0.01, abs=1e-5)
    assert moe.stats["expert_load"].tolist() == [0.25] * E
    collapsed = steer(moe, torch.zeros(64, dtype=torch.long))
    moe(collapsed)
    assert moe.stats["load_balance_loss"].item() == pytest.approx(E, rel=1e-3)
    assert moe.stats["expert_load"].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_router_z_loss_is_mean_squared_logsumexp():
    moe = layer(load_balance_coef=0.0, router_z_loss_coef=1.0)
    x = torch.randn(2, 8, D)
    moe(x)
    logits = F.linear(x.reshape(-1, D), moe.router.weight)
    expected = torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(moe.aux_loss, expected)


@pytest.mark.parametrize("factor", [1.0, 1.25, 2.0])
def test_capacity_drops_the_latest_tokens_of_a_crowded_expert(factor):
    moe = layer(capacity_factor=factor).train()
    x = steer(moe, torch.zeros(40, dtype=torch.long))  # all 40 tokens want expert 0
    out = moe(x)[0]
    kept = math.ceil(factor * 40 / E)
    assert moe.stats["dropped_fraction"].item() == pytest.approx(1 - kept / 40)
    assert out[:kept].abs().sum(-1).gt(0).all()
    assert torch.equal(out[kept:], torch.zeros_like(out[kept:]))  # the residual alone carries them


def test_capacity_fills_position_by_position_so_dropping_stays_causal():
    """Tokens at later positions (of any sequence) never push out an earlier token."""
    moe = layer(capacity_factor=1.0).train()
    x = torch.randn(4, 16, D)
    y = x.clone()
    y[:, 9:] = torch.randn(4, 7, D) * 5
    out_x, out_y = moe(x), moe(y)
    assert moe.stats["dropped_fraction"].item() > 0
    torch.testing.assert_close(out_x[:, :9], out_y[:, :9])


def test_dropless_and_decoding_never_drop():
    moe = layer(capacity_factor=0.5).train()
    x = steer(moe, torch.zeros(16, dtype=torch.long))
    moe(x, decoding=True)
    assert moe.stats["dropped_fraction"].item() == 0
    dropless = layer(capacity_factor=0.5, dropless="true").train()
    dropless.load_state_dict(moe.state_dict())
    dropless(x)
    assert dropless.stats["dropped_fraction"].item() == 0


def test_kv_cache_decode_is_dropless_even_when_evaluation_drops():
    cfg = model_config(eval_capacity_factor=0.25)
    model = build_model(cfg).eval()
    dropless = build_model(model_config(dropless="true")).eval()
    dropless.load_state_dict(model.state_dict())
    x = torch.randint(0, 512, (2, 24))
    model(x)
    assert model.layer_metrics()["dropped_fraction"] > 0  # a plain evaluation forward drops
    state = model.new_state(2, 24)
    steps = [model(x[:, :5], state)] + [model(x[:, t : t + 1], state) for t in range(5, 24)]
    torch.testing.assert_close(torch.cat(steps, 1), dropless(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("options", [dict(router="switch"), dict(router="topk", top_k=2, shared_expert="true")])
@pytest.mark.parametrize("batch", [1, 2])
def test_decoding_runs_each_token_through_its_experts(options, batch):
    """A one-token decode step takes the per-token path: eager, and compiled as one graph
    (`fullgraph`: the sorted dispatch's bincount would break it), both equal to the reference."""
    moe = layer(**options).eval()
    x = torch.randn(batch, 1, D)
    want = reference(moe, x) + (moe.shared_expert(x) if moe.shared_expert is not None else 0)
    torch.testing.assert_close(moe(x, decoding=True), want, atol=1e-5, rtol=1e-4)
    assert moe.stats == {}  # the sorted dispatch records routing statistics; this path does not
    compiled = torch.compile(moe, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, decoding=True), want, atol=1e-5, rtol=1e-4)


def test_gradients_reach_router_and_every_used_expert():
    moe = layer(router="topk", top_k=2, shared_expert="true").train()
    x = torch.randn(2, 32, D, requires_grad=True)
    (moe(x).square().sum() + moe.aux_loss).backward()
    assert moe.router.weight.grad.abs().sum() > 0
    for grad in (moe.experts.gate_up_proj.grad, moe.experts.out_proj.grad):
        assert grad.flatten(1).abs().sum(1).gt(0).all()  # every expert got tokens and a gradient
    assert all(p.grad is not None for p in moe.shared_expert.parameters())
    assert x.grad.abs().sum() > 0


def test_load_balancing_loss_alone_trains_towards_balance():
    moe = layer(load_balance_coef=1.0, router_z_loss_coef=0.0).train()
    x = torch.randn(1, 256, D)
    with torch.no_grad():
        moe.router.weight[0] += 0.5 * x[0].mean(0) / x[0].mean(0).norm()  # most tokens favour expert 0
    opt = torch.optim.SGD(moe.router.parameters(), lr=1.0)
    moe(x)
    before = moe.stats["load_balance_loss"].item()
    for _ in range(50):
        moe(x)
        opt.zero_grad()
        moe.aux_loss.backward()
        opt.step()
    assert moe.stats["load_balance_loss"].item() < before


def test_expert_choice_gives_each_expert_its_capacity():
    moe = MoE(MoEConfig(router="expert_choice", n_experts=E, capacity_factor=1.0), model_config()).train()
    torch.nn.init.normal_(moe.router.weight, std=0.5)
    for p in (moe.experts.gate_up_proj, moe.experts.out_proj):
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 16, D, requires_grad=True)
    out = moe(x)
    tokens, gates, counts, _, dropped = moe.expert_choice(F.linear(x.reshape(-1, D), moe.router.weight).softmax(-1), 8)
    assert counts.tolist() == [8] * E and tokens.view(E, 8).unique(dim=1).size(1) == 8
    assert 0 <= moe.stats["dropped_fraction"].item() < 1
    out.sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("router", ["switch", "topk", "expert_choice"])
def test_padding_takes_no_capacity_and_no_expert_choice(router):
    """With `valid`, padding is not routed: whatever it holds, and however much of it there is,
    the real tokens' outputs are those of the real tokens routed alone."""
    moe = MoE(MoEConfig(router=router, n_experts=E, capacity_factor=1.0), model_config()).eval()
    moe.eval_capacity_factor = 1.0  # tight capacity, so that padding would crowd real tokens out
    torch.nn.init.normal_(moe.router.weight, std=0.5)
    moe.experts.init_weights(0.1, 0.1)  # built alone, not by a model: nothing initialised them
    real = torch.randn(1, 12, D)
    alone = moe(real)
    padded = torch.cat((real, 5 * torch.randn(1, 20, D)), dim=1)  # 20 positions of padding
    valid = torch.arange(32)[None, :] < 12
    out = moe(padded, valid=valid)
    torch.testing.assert_close(out[:, :12], alone)
    assert (out[:, 12:] == 0).all()
    assert not torch.allclose(moe(padded)[:, :12], alone)  # unmasked, padding takes capacity


def test_moe_every_kth_layer_and_config_errors():
    cfg = Config.load("configs/tiny.yaml", ["model.n_layers=4", "model.ffn=moe", "model.ffn.every=2"])
    kinds = [type(b.ffn).__name__ for b in build_model(cfg).blocks]
    assert kinds == ["SwiGLU", "MoE", "SwiGLU", "MoE"]
    for overrides, message in [(["model.ffn.router=expert_choice"], "not causal"),
                               (["model.ffn.expert=moe"], "cannot itself be moe"),
                               (["model.ffn.router=topk", "model.ffn.top_k=9"], "must be <= model.ffn.n_experts"),
                               (["model.ffn.expert=sparse", "model.ffn.expert.block_size=7"], "must divide"),
                               (["model.ffn.routr=topk"], "did you mean model.ffn.router"),
                               (["model.ffn.expert=dens"], "did you mean 'dense'")]:
        with pytest.raises(UserError, match=message):
            Config.load("configs/tiny.yaml", ["model.ffn=moe", *overrides])
    assert Config.load("configs/tiny.yaml", ["model.ffn=moe", "model.ffn.expert=dense"]).model.ffn.expert.kind == "swiglu"

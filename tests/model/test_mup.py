import math

import pytest
import torch

from stacklm.config import Config
from stacklm.coord_check import coord_check, width_slopes
from stacklm.errors import UserError
from stacklm.model import mup
from stacklm.model.transformer import build_model
from stacklm.training.optim import param_groups


def config(*overrides, width=128):
    return Config.load("configs/tiny.yaml", ["model.parametrization=mup", "model.base_width=32",
                                             f"model.d_model={width}", *overrides])


def test_roles_by_shape():
    roles = mup.roles(config("model.tie_embeddings=false", "model.position.kind=t5").model)
    assert roles["embed.weight"] == mup.Role("input", 1.0)
    assert roles["blocks.0.attn_norm.weight"].kind == "input"
    assert roles["blocks.0.attn.proj.qkv_proj.weight"] == mup.Role("hidden", 4.0)  # fan-in 128 / 32
    assert roles["blocks.0.ffn.out_proj.weight"].kind == "hidden"
    assert roles["lm_head.weight"].kind == "readout"
    assert roles["position.table"] == mup.Role("finite", 1.0)  # (heads, buckets): no width in it


@pytest.mark.parametrize("overrides", [
    ("model.ffn.kind=moe",), ("model.ffn.kind=sparse", "model.ffn.block_size=8"),
    ("model.attention.qkv=multiplicative_conv",), ("model.attention.qkv=multiplicative",),
    ("model.arch=encoder_decoder", "train.objective.kind=ul2"), ("model.attention.kind=lsh",),
])
def test_every_parameter_of_every_component_has_a_role(overrides):
    roles = mup.roles(config(*overrides).model)
    model = build_model(config(*overrides))
    assert set(roles) == {name for name, _ in model.named_parameters()}
    if "model.ffn.kind=moe" in overrides:  # the router reads the width and writes E scores
        assert roles["blocks.0.ffn.router.weight"] == mup.Role("output", 4.0)
        assert roles["blocks.0.ffn.experts.gate_up_proj"].kind == "hidden"


def test_an_undeclared_parameter_is_an_error(monkeypatch):
    from stacklm.model.moe import GroupedSwiGLU

    monkeypatch.delattr(GroupedSwiGLU, "fan_in_dims")
    with pytest.raises(UserError, match="cannot scale blocks.0.ffn.experts.gate_up_proj"):
        mup.roles(config("model.ffn.kind=moe").model)


def test_init_learning_rates_and_multipliers_follow_the_roles():
    torch.manual_seed(0)
    standard = build_model(Config.load("configs/tiny.yaml", ["model.d_model=128"]))
    torch.manual_seed(0)
    model = build_model(config())
    w, w0 = model.blocks[0].ffn.gate_up_proj.weight, standard.blocks[0].ffn.gate_up_proj.weight
    torch.testing.assert_close(w, w0 / 2)  # std x 1/sqrt(4)
    assert torch.equal(model.embed.weight, standard.embed.weight)
    q = model.blocks[0].attn.proj.qkv_proj.weight[:128]
    assert (q == 0).all() and model.blocks[0].attn.q_mult == 0.5  # sqrt(base head dim 16 / 64)
    by_mult = {g["lr_mult"]: g for g in param_groups(model, 0.1) if g["params"]}
    assert set(by_mult) == {1.0, 1 / 4, 1 / 3}  # inputs; fan-in d_model 128 / 32; fan-in d_ff 384 / 128
    hidden = {id(p) for g in param_groups(model, 0.1) if g["lr_mult"] == 0.25 for p in g["params"]}
    assert id(model.blocks[0].attn.proj.qkv_proj.weight) in hidden and id(model.embed.weight) not in hidden
    # the readout's multiplier: logits are (output_mult / m) of the standard head's
    x = torch.randint(0, 512, (1, 8))
    h = model.norm(torch.randn(1, 8, 128))
    torch.testing.assert_close(model.head(h, x, None, None), model.lm_head(h) * 0.25)


@pytest.mark.parametrize("qkv", ["dense", "multiplicative", "multiplicative_conv"])
def test_the_query_starts_at_zero_and_the_keys_do_not(qkv):
    model = build_model(config(f"model.attention.qkv={qkv}")).eval()
    q, k, v = model.blocks[0].attn.proj(torch.randn(2, 5, 128))
    assert (q == 0).all() and k.abs().sum() > 0 and v.abs().sum() > 0


def test_mup_at_base_width_is_the_standard_parametrization_but_for_zero_query():
    torch.manual_seed(0)
    standard = build_model(Config.load("configs/tiny.yaml", ["model.d_model=32"]))
    torch.manual_seed(0)
    at_base = build_model(config(width=32))
    for (name, a), (_, b) in zip(standard.named_parameters(), at_base.named_parameters(), strict=True):
        if name.endswith("qkv_proj.weight"):
            a, b = a[32:], b[32:]  # the query rows are zero under muP
        assert torch.equal(a, b), name
    assert all(g["lr_mult"] == 1.0 for g in param_groups(at_base, 0.1))


def test_base_width_must_fit_the_heads():
    with pytest.raises(UserError, match="model.base_width .30. must be a multiple of model.n_heads"):
        config("model.base_width=30")


def test_coordinate_check_is_flat_under_mup_and_drifts_under_standard():
    """Tensor Programs V's coordinate check on three widths (4x range), a few steps of Adam: the
    slope of log |x| against log width is near 0 for every layer under muP (the readout may
    shrink, its init's O(1/sqrt(width)) still visible) and near 1 or more under the standard
    parametrization, whose fixed-std weights and width-blind learning rate let updates grow."""
    torch.manual_seed(0)
    batches = [torch.randint(0, 512, (8, 65)) for _ in range(4)]
    slopes = {}
    for parametrization in ("standard", "mup"):
        cfg = config(f"model.parametrization={parametrization}", "train.lr=3e-3", width=32)
        slopes[parametrization] = width_slopes(coord_check(cfg, [32, 64, 128], 4, batches), step=4)
    inner = {k: v for k, v in slopes["mup"].items() if k != "logits"}
    assert max(abs(v) for v in inner.values()) < 0.3, slopes["mup"]
    assert slopes["mup"]["logits"] < 0.1
    assert max(slopes["standard"].values()) > 1.0, slopes["standard"]
    assert all(math.isfinite(v) for s in slopes.values() for v in s.values())

import pytest
import torch
from torch import nn

from stacklm.config import Config
from stacklm.errors import UserError
from stacklm.model.qkv_sparse import MultiplicativeDense
from stacklm.model.transformer import build_model

D, H = 64, 4  # 4 modules (one per head) of 16 units


def projections(qkv: str, *overrides):
    config = Config.load("configs/tiny.yaml", [f"model.d_model={D}", f"model.n_heads={H}",
                                               f"model.attention.qkv={qkv}", *overrides])
    return build_model(config).blocks[0].attn.proj


@pytest.mark.parametrize("rows", [1, 3, 200])  # the per-row form and the dense-weight form
def test_multiplicative_layer_computes_its_definition(rows):
    layer = MultiplicativeDense(D, 2 * D, 4, bias=True)
    layer.init_weights(0.02, 0.01)
    nn.init.normal_(layer.bias)
    x = torch.randn(rows, D)
    # y[s, m] = sum_i x_i D[s, i] E[i, m] + b, module-major
    expected = torch.einsum("ri,si,mi->rsm", x, layer.multiplier, layer.weight).flatten(1) + layer.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-5)
    assert sum(p.numel() for p in layer.parameters()) == 4 * D + D * 2 * D // 4 + 2 * D


def test_multiplicative_qkv_has_a_fraction_of_the_dense_parameters():
    dense = sum(p.numel() for p in projections("dense").parameters())
    sparse = sum(p.numel() for p in projections("multiplicative").parameters())
    assert dense == 4 * D * D and sparse == 4 * (H * D + D * D // H)


def test_flops_count_the_multiply_adds_a_token_makes():
    def model(qkv):
        return build_model(Config.load("configs/tiny.yaml", [f"model.d_model={D}", f"model.n_heads={H}",
                                                             f"model.attention.qkv={qkv}"]))

    dense, mult, conv = model("dense"), model("multiplicative"), model("multiplicative_conv")
    # a multiplicative layer makes a dense layer's D x D multiply-adds per token, however few its weights
    assert mult.flops_per_token(64) == dense.flops_per_token(64)
    # sparse QKV: one shared D x D layer and per module the q/k kernel (2M x M x 3 x 3) and the v
    # kernel (M x M x 3 x 1), where dense has four D x D projections
    m, layers = D // H, dense.config.n_layers
    per_token = D * D + H * (2 * m * m * 3 * 3 + m * m * 3)
    assert dense.flops_per_token(64) - conv.flops_per_token(64) == 6 * layers * (4 * D * D - per_token)


def test_conv_reaches_length_kernel_positions_back_and_3_modules_across():
    """With the shared layer made the identity: a change at (position t, module j) moves q and k in
    positions t .. t+2 and modules j-1 .. j+1, v in positions t .. t+2 of module j only."""
    proj = projections("multiplicative_conv").eval()
    proj.shared = nn.Identity()
    x = torch.randn(1, 12, D)
    y = x.clone()
    t, j, m = 5, 2, D // H
    y[0, t, j * m : (j + 1) * m] += 1.0
    with torch.no_grad():
        before, after = proj(x), proj(y)
    for name, old, new, modules in zip("qkv", before, after, ([1, 2, 3], [1, 2, 3], [2]), strict=True):
        changed = (old - new).abs().view(12, H, m).amax(-1) > 0  # (positions, modules)
        expect = torch.zeros(12, H, dtype=torch.bool)
        expect[t : t + 3, modules] = True
        assert torch.equal(changed, expect), name


@pytest.mark.parametrize("batch", [1, 2])  # one sequence: the fused kernel's case
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("overrides", [(), ("model.attention.bias=true", "model.attention.length_kernel=4"),
                                       ("model.attention.length_kernel=1",)])
def test_conv_decode_state_keeps_the_last_inputs(batch, dtype, overrides, kernels):
    """One token at a time with the decode state gives the whole sequence's q, k, v."""
    check_decode_state(projections("multiplicative_conv", *overrides), batch, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("d", "h"), [(512, 8), (96, 4), (105, 5), (512, 16), (640, 20)])
def test_conv_decode_state_with_wider_modules(d, h, dtype, kernels):
    """64, 24 and 21 units a module in 8, 4 and 5 modules: the fused kernel's panels of 16 output
    units whole and ragged, its modules 8, 4 and 1 at a time, and an odd width (bfloat16 pairs
    padded). On CPUs with AMX tiles, bfloat16 layers whose module width is a multiple of 32 run on
    them: 8 modules (a tile's rows padded), 16 (one whole tile) and 20 (16 + 4)."""
    config = Config.load("configs/tiny.yaml", [f"model.d_model={d}", f"model.n_heads={h}", "model.attention.bias=true",
                                               "model.attention.qkv=multiplicative_conv", "model.position.kind=none"])
    check_decode_state(build_model(config).blocks[0].attn.proj, 1, dtype, d)


def check_decode_state(proj, batch, dtype, d=D):
    for p in proj.parameters():
        if p.dim() == 1:
            torch.nn.init.normal_(p)  # the biases
    proj.eval().to(dtype)
    x = torch.randn(batch, 9, d, dtype=dtype)
    state = proj.new_state(batch, dtype, "cpu")
    with torch.no_grad():
        full = proj(x)
        steps = [proj(x[:, :4], state)] + [proj(x[:, i : i + 1], state) for i in range(4, 9)]
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for whole, parts in zip(full, zip(*steps, strict=True), strict=True):
        torch.testing.assert_close(torch.cat(parts, dim=1), whole, **tol)
    assert state.frames.shape == (batch, proj.length_kernel - 1, d)


def test_sparse_qkv_needs_a_kv_head_per_head():
    with pytest.raises(UserError, match="n_kv_heads"):
        projections("multiplicative_conv", "model.n_kv_heads=2")


def test_unknown_qkv_kind_names_the_valid_ones():
    with pytest.raises(UserError, match="model.attention.qkv.*multiplicative_conv"):
        projections("multiplicative_cnv")

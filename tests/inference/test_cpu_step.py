"""The batch-1 CPU decode step in one C++ call (stacklm.inference.cpu_step) against the modules' steps."""

import copy

import pytest
import torch

from stacklm.config import Config
from stacklm.inference import cpu_step, generate
from stacklm.model import cpu_kernels
from stacklm.model.transformer import build_model
from tests.conftest import require_cpu_kernels
from tests.model.test_cpu_kernels import kernel_calls

SPARSE = ("model.ffn.kind=sparse", "model.ffn.block_size=8", "model.attention.qkv=multiplicative_conv")
SUPPORTED = {
    "dense": (),
    "sparse FFN + QKV": SPARSE,
    "sparse FFN": ("model.ffn.kind=sparse", "model.ffn.block_size=8"),
    "biases, grouped-query heads": ("model.n_kv_heads=2", "model.attention.bias=true", "model.ffn.bias=true"),
    "sparse, biases": (*SPARSE, "model.ffn.bias=true", "model.attention.bias=true"),
    "sparse, length kernel 1": (*SPARSE, "model.attention.length_kernel=1"),
    # the q/k/v kernel's modules 16 at a time, then 8, of 9 units each
    "sparse, 24 modules": (*SPARSE, "model.d_model=216", "model.n_heads=24", "model.position.kind=none"),
    # modules of 32 units: the fused step's q/k/v on AMX tiles in bfloat16, where the CPU has them (the
    # tile kernel itself is checked against PyTorch in tests/model/test_qkv_sparse.py)
    "sparse, 32-unit modules": (*SPARSE, "model.d_model=128", "model.n_heads=4"),
    "xpos": ("model.position.kind=xpos",),
    "learned positions": ("model.position.kind=learned",),
    "no positions": ("model.position.kind=none",),
    "mup": ("model.parametrization=mup", "model.base_width=32"),
    "tied embeddings, 3 layers": ("model.tie_embeddings=true", "model.n_layers=3"),
    # attention's value sums in registers take 64 columns at a time, then 16, then one by one
    "heads of 88": ("model.d_model=176", "model.n_heads=2"),
}


def perturbed(*overrides, dtype=torch.float32):
    """A model whose every parameter (norm gains and biases too) is moved off its initial value."""
    model = build_model(Config.load("configs/tiny.yaml", list(overrides))).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("overrides", SUPPORTED.values(), ids=SUPPORTED.keys())
def test_fused_step_gives_the_modules_logits_and_state(overrides):
    require_cpu_kernels()
    model = perturbed(*overrides)
    assert cpu_step.why_not(model) is None
    step, ids = cpu_step.fused_step(model), torch.randint(0, 512, (1, 20))
    fused_state, module_state = model.new_state(1, 24), model.new_state(1, 24)
    with torch.no_grad():
        full = model(ids)
        model(ids[:, :5], fused_state), model(ids[:, :5], module_state)
        for t in range(5, 20):  # every cache length from 5 to 19
            got = step(ids[:, t : t + 1], fused_state)
            torch.testing.assert_close(got, model(ids[:, t : t + 1], module_state), atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(got[:, 0], full[:, t], atol=2e-5, rtol=1e-5)
    assert fused_state.length == module_state.length == 20
    for fused, module in zip(fused_state.layers, module_state.layers, strict=True):
        torch.testing.assert_close(fused.k, module.k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fused.v, module.v, atol=1e-5, rtol=1e-5)
        if module.qkv_state is not None:  # the convolutions' last inputs
            torch.testing.assert_close(fused.qkv_state.frames, module.qkv_state.frames, atol=1e-5, rtol=1e-5)


BF16 = {"dense": (), "sparse": SPARSE, "sparse, 24 modules": SUPPORTED["sparse, 24 modules"],
        "sparse, 32-unit modules": SUPPORTED["sparse, 32-unit modules"],
        "xpos, biases, grouped-query heads": (
    "model.position.kind=xpos", "model.n_kv_heads=2", "model.attention.bias=true", "model.ffn.bias=true")}


@pytest.mark.parametrize("overrides", BF16.values(), ids=BF16.keys())
def test_fused_step_in_bfloat16_is_as_close_to_float32_as_the_modules(overrides):
    """In bfloat16 the C++ step rounds where the modules round but for attention's scores and
    RMSNorm: against the same weights in float32, its logits are off by no more than the modules'
    (twice their error at most). The sparse FFN's controller is made decisive, so that rounding
    does not flip its choice between near-tied units."""
    require_cpu_kernels()
    model = perturbed(*overrides)
    with torch.no_grad():
        for block in model.blocks:
            if hasattr(block.ffn, "controller_up"):
                block.ffn.controller_up.bias.copy_(10 * torch.randn_like(block.ffn.controller_up.bias))
    model.to(torch.bfloat16)
    reference = copy.deepcopy(model).float()  # the bfloat16 weights, computed in float32
    step, ids = cpu_step.fused_step(model), torch.randint(0, 512, (1, 12))
    states = model.new_state(1), model.new_state(1), reference.new_state(1)
    with torch.no_grad():
        model(ids[:, :4], states[0]), model(ids[:, :4], states[1]), reference(ids[:, :4], states[2])
        for t in range(4, 12):
            token = ids[:, t : t + 1]
            got, modules, want = step(token, states[0]), model(token, states[1]), reference(token, states[2])
            assert got.dtype == torch.bfloat16
            fused_error = (got.float() - want).abs().max().item()
            assert fused_error <= 2 * (modules.float() - want).abs().max().item() + 0.01


def test_generate_runs_each_token_in_one_call_and_keeps_the_tokens():
    require_cpu_kernels()
    model = perturbed(*SPARSE)
    layers = len(model.blocks)  # the step repacks the sparse q/k/v's weights once, when it is built
    assert kernel_calls(model, fused=True) == {"stacklm::decode_blocks": 2, "stacklm::matvec": 2,
                                               "stacklm::multiplicative_conv_pack": layers}
    prompt = torch.randint(0, 512, (1, 5))
    assert generate(model, prompt, 30, temperature=0).equal(generate(model, prompt, 30, temperature=0, fused=False))
    with cpu_kernels.disabled():
        assert cpu_step.fused_step(model) is None
        assert kernel_calls(model, fused=True) == {}


def test_calls_the_step_cannot_take_go_through_the_model():
    require_cpu_kernels()
    model = perturbed(*SPARSE)
    step, prompt, new = cpu_step.fused_step(model), torch.randint(0, 512, (2, 3)), torch.tensor([[7], [9]])
    states = model.new_state(2), model.new_state(2)
    with torch.no_grad():
        model(prompt, states[0]), model(prompt, states[1])
        got = step(new, states[0])  # two sequences: the modules' step
        torch.testing.assert_close(got, model(new, states[1]), atol=0, rtol=0)
    assert states[0].length == 4
    one = model.new_state(1)
    with torch.no_grad():
        model(torch.tensor([[3, 4]]), one)
    step(torch.tensor([[5]]), one).sum().backward()  # gradients on: the modules, so that they reach the weights
    assert model.lm_head.weight.grad is not None and model.blocks[0].ffn.in_proj.grad is not None


@pytest.mark.parametrize(("overrides", "reason"), [
    (("model.ffn.kind=moe",), "FFN"),
    (("model.attention.kind=local",), "attention"),
    (("model.norm.kind=layernorm",), "norm"),
    (("model.attention.qkv=multiplicative",), "q/k/v"),
    (("model.position.kind=alibi",), "position"),
    (("model.arch=encoder_decoder", "train.objective.kind=prefix_lm"), "decoder-only"),
])
def test_models_it_does_not_cover_keep_the_module_step(overrides, reason):
    require_cpu_kernels()
    model = perturbed(*overrides)
    assert reason in cpu_step.why_not(model)
    assert cpu_step.fused_step(model) is None


def test_what_else_keeps_the_module_step(monkeypatch):
    require_cpu_kernels()
    model = perturbed()
    model.blocks[1].ffn_norm.eps = 1e-3  # the C++ step takes one eps for all
    assert "differ in their options" in cpu_step.why_not(model)
    model = perturbed()
    model.blocks[0].register_forward_hook(lambda *args: None)
    assert "hooks" in cpu_step.why_not(model)

    def no_build():
        raise AssertionError("a model the step cannot take must not build the kernels")

    monkeypatch.setattr(cpu_kernels, "available", no_build)
    assert cpu_step.why_not(perturbed(dtype=torch.float64)).startswith("parameters in")
    assert cpu_step.fused_step(perturbed(dtype=torch.float64)) is None


def test_a_full_cache_and_bad_weights_are_refused_before_anything_is_written():
    require_cpu_kernels()
    model = perturbed(*SPARSE)
    step, state = cpu_step.fused_step(model), model.new_state(1, 6)
    with torch.no_grad():
        model(torch.randint(0, 512, (1, 5)), state)
        step(torch.tensor([[3]]), state)  # the last position
        with pytest.raises(ValueError, match="KV cache holds 6 positions"):
            step(torch.tensor([[3]]), state)
        state = model.new_state(1, 6)
        model(torch.randint(0, 512, (1, 2)), state)
        before = [(c.k.clone(), c.qkv_state.frames.clone()) for c in state.layers]
        step.weights[-1] = torch.zeros(3)  # the last block's output bias, misshapen
        with pytest.raises(RuntimeError, match="block 1's weights"):
            step(torch.tensor([[3]]), state)
    for (k, frames), cache in zip(before, state.layers, strict=True):
        assert torch.equal(k, cache.k) and torch.equal(frames, cache.qkv_state.frames)

import pytest
import torch
from torch.profiler import profile

from stacklm.config import Config
from stacklm.inference import generate
from stacklm.inference.generate import compiled_decode_step
from stacklm.model import cpu_kernels
from stacklm.model.transformer import build_model
from tests.conftest import require_cpu_kernels

SPARSE = ["model.ffn.kind=sparse", "model.ffn.block_size=8", "model.attention.qkv=multiplicative_conv"]


def kernel_calls(model, compile: bool = False, batch: int = 1, fused: bool = False) -> dict[str, int]:
    """The kernels that two decode steps call, with their counts (the profiler sees inside a
    compiled graph too; a first run compiles it). The modules' own steps unless `fused`."""
    prompt = torch.randint(0, 512, (batch, 4))
    generate(model, prompt, 3, temperature=0, compile=compile, fused=fused)
    with profile() as prof:
        generate(model, prompt, 3, temperature=0, compile=compile, fused=fused)
    return {event.key: event.count for event in prof.key_averages() if event.key.startswith("stacklm::")}


def test_one_token_steps_run_the_kernels_unless_disabled():
    require_cpu_kernels()
    model = build_model(Config.load("configs/tiny.yaml", SPARSE))
    layers = len(model.blocks)  # the sparse q/k/v's weights are repacked once per sequence, not once per step
    assert kernel_calls(model) == {"stacklm::sparse_ffn_decode": 2 * layers,
                                   "stacklm::multiplicative_conv_pack": layers,
                                   "stacklm::multiplicative_conv_decode": 2 * layers}
    with cpu_kernels.disabled():
        assert set(kernel_calls(model)) == set()
    assert set(kernel_calls(model.to(torch.float64))) == set()  # their float32 sums are too coarse for it
    dense = build_model(Config.load("configs/tiny.yaml"))
    assert set(kernel_calls(dense)) == set()


def test_compiled_steps_take_matvec_for_one_row_matmuls_unless_disabled():
    require_cpu_kernels()
    dense = build_model(Config.load("configs/tiny.yaml")).eval()
    linears = sum(isinstance(m, torch.nn.Linear) for m in dense.modules())  # each used once a token
    assert kernel_calls(dense, compile=True) == {"stacklm::matvec": 2 * linears}
    with cpu_kernels.disabled():  # recompiles, without it
        assert kernel_calls(dense, compile=True) == {}
    assert kernel_calls(dense, compile=True, batch=2) == {}  # two rows: a matmul as before
    assert kernel_calls(dense.to(torch.float64), compile=True) == {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_step_with_matvec_gives_the_eager_logits(dtype):
    require_cpu_kernels()
    model = build_model(Config.load("configs/tiny.yaml")).to(dtype).eval()
    step, ids = compiled_decode_step(model), torch.randint(0, 512, (1, 12))
    eager_state, compiled_state = model.new_state(1), model.new_state(1)
    tolerance = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.02}
    with torch.no_grad():
        model(ids[:, :4], eager_state), model(ids[:, :4], compiled_state)
        for t in range(4, 12):
            torch.testing.assert_close(step(ids[:, t : t + 1], compiled_state).float(),
                                       model(ids[:, t : t + 1], eager_state).float(), **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "k"), [(5, 3), (37, 19), (1000, 64)])
def test_matvec_equals_the_matmul(dtype, n, k):
    """Every row (shares of whole groups of 8, a ragged end, fewer rows than 8), float32 sums."""
    require_cpu_kernels()
    x, weight = torch.randn(1, k).to(dtype), torch.randn(n, k).to(dtype)
    got = torch.ops.stacklm.matvec(x, weight)
    assert got.shape == (1, n) and got.dtype == dtype
    torch.testing.assert_close(got.float(), (x.double() @ weight.double().t()).to(dtype).float(),
                               atol=1e-5, rtol=1e-5 if dtype == torch.float32 else 1e-2)
    strided = torch.randn(k, n).to(dtype).t()  # (n, k) with rows not contiguous: copied first
    torch.testing.assert_close(torch.ops.stacklm.matvec(x, strided).float(), (x @ strided.t()).float(),
                               atol=1e-4, rtol=1e-4 if dtype == torch.float32 else 1e-2)


def test_kernels_apply_only_to_cpu_inference_in_their_dtypes():
    require_cpu_kernels()
    w, x = torch.zeros(4, 4), torch.zeros(1, 4)
    with torch.no_grad():
        assert cpu_kernels.applies(x, w, training=False)
        assert not cpu_kernels.applies(x, w, training=True)
        assert not cpu_kernels.applies(x.half(), w.half(), training=False)
        assert not cpu_kernels.applies(x.bfloat16(), w, training=False)  # x and the weights differ
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not cpu_kernels.applies(x, w, training=False)
        with cpu_kernels.disabled():
            assert not cpu_kernels.applies(x, w, training=False)
    assert not cpu_kernels.applies(x, w, training=False)  # gradients wanted: the kernels have no backward


@pytest.mark.parametrize("bad", ["shape", "dtype"])
def test_kernels_check_their_inputs(bad):
    require_cpu_kernels()
    d, d_ff, rank = 8, 32, 2
    args = [torch.randn(d), torch.randn(rank, d), torch.randn(d_ff, rank), torch.randn(d_ff), torch.randn(d_ff, d),
            None, torch.randn(d_ff, d), 8]
    torch.ops.stacklm.sparse_ffn_decode(*args)
    args[4] = torch.randn(d_ff, d + 1) if bad == "shape" else args[4].bfloat16()
    with pytest.raises(RuntimeError, match="sparse_ffn_decode"):
        torch.ops.stacklm.sparse_ffn_decode(*args)
    x, weight = torch.randn(1, d), torch.randn(d_ff, d)
    bad_args = (torch.randn(2, d), weight) if bad == "shape" else (x, weight.bfloat16())
    with pytest.raises(RuntimeError, match="matvec"):
        torch.ops.stacklm.matvec(*bad_args)
    s, m, lk = 2, 4, 3  # the sparse q/k/v: its packing, then its step on the packed weights
    weights = [torch.randn(s, s * m), torch.randn(m, s * m), torch.randn(2 * m, m, lk, 3), torch.randn(m, m, lk, 1)]
    packed = list(torch.ops.stacklm.multiplicative_conv_pack(*weights))
    step = [torch.randn(s * m), *packed[:2], None, torch.zeros(lk - 1, s * m), packed[2], torch.zeros(2 * m),
            packed[3], torch.zeros(m)]
    torch.ops.stacklm.multiplicative_conv_decode(*step)
    if bad == "shape":
        weights[1], step[2] = torch.randn(m + 1, s * m), torch.randn(m, s * m)  # E unpacked is not E packed
    else:
        weights[1], step[2] = weights[1].bfloat16(), step[2].bfloat16()
    with pytest.raises(RuntimeError, match="multiplicative_conv_pack"):
        torch.ops.stacklm.multiplicative_conv_pack(*weights)
    with pytest.raises(RuntimeError, match="multiplicative_conv_decode"):
        torch.ops.stacklm.multiplicative_conv_decode(*step)

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from stacklm.config import Config
from stacklm.inference import generate
from stacklm.model import cpu_kernels
from stacklm.model.transformer import build_model
from tests.conftest import require_cpu_kernels

SPARSE = ["model.ffn.kind=sparse", "model.ffn.block_size=8", "model.attention.qkv=multiplicative_conv"]


class OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


def kernel_calls(model, **kwargs) -> set[str]:
    with OpNames() as mode:
        generate(model, torch.randint(0, 512, (1, 4)), 3, temperature=0, **kwargs)
    return {name for name in mode.names if name.startswith("stacklm::")}


def test_one_token_steps_run_the_kernels_unless_disabled():
    require_cpu_kernels()
    model = build_model(Config.load("configs/tiny.yaml", SPARSE))
    assert kernel_calls(model) == {"stacklm::sparse_ffn_decode", "stacklm::multiplicative_conv_decode"}
    with cpu_kernels.disabled():
        assert kernel_calls(model) == set()
    assert kernel_calls(model.to(torch.float64)) == set()  # their float32 sums are too coarse for it
    dense = build_model(Config.load("configs/tiny.yaml"))
    assert kernel_calls(dense) == set()


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

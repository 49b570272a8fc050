import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from stacklm.config import Config
from stacklm.errors import UserError
from stacklm.model import cpu_kernels
from stacklm.model.ffn_sparse import SparseFFN
from stacklm.model.transformer import build_model
from tests.conftest import require_cpu_kernels

D, D_FF, N = 48, 384, 16  # 24 blocks of 16 units


def sparse_ffn(*overrides) -> SparseFFN:
    config = Config.load("configs/tiny.yaml", [f"model.d_model={D}", f"model.d_ff={D_FF}", "model.ffn.kind=sparse",
                                               f"model.ffn.block_size={N}", *overrides])
    return build_model(config).blocks[0].ffn


def reference(ffn: SparseFFN, x: torch.Tensor) -> torch.Tensor:
    """The layer's equations in eval mode, every unit computed and masked to the argmax."""
    n = ffn.block_size
    mask = F.one_hot(ffn.controller(x).argmax(-1), n).flatten(-2).to(x.dtype)
    h = F.relu(x @ ffn.in_proj.T + (ffn.in_bias if ffn.in_bias is not None else 0)) * mask
    return (h @ ffn.out_proj) * n + (ffn.out_bias if ffn.out_bias is not None else 0)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (4, 1), (2, 5), (8, 64)])
def test_eval_paths_equal_the_masked_dense_layer(bias, shape, kernels):
    """One token (gather or fused kernel), a few (union gather), many (masked dense): all compute
    the same."""
    ffn = sparse_ffn(f"model.ffn.bias={str(bias).lower()}").eval()
    if bias:
        torch.nn.init.normal_(ffn.in_bias)
        torch.nn.init.normal_(ffn.out_bias)
        torch.nn.init.normal_(ffn.controller_up.bias)
    x = torch.randn(*shape, D)
    with torch.no_grad():
        torch.testing.assert_close(ffn(x), reference(ffn, x), atol=1e-5, rtol=1e-4)


class WeightReads(TorchDispatchMode):
    """Records each op that takes one of `weights` as an input: (weight, op, its other arguments, output)."""

    def __init__(self, weights):
        super().__init__()
        self.ptrs = {w.data_ptr(): name for name, w in weights.items()}
        self.reads: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for a in args:
            if isinstance(a, torch.Tensor) and a.data_ptr() in self.ptrs:
                self.reads.append((self.ptrs[a.data_ptr()], func.__name__, args, out))
        return out


@pytest.mark.parametrize("rows", [1, 3])
def test_decoding_reads_only_the_chosen_units(rows):
    """W1: gathered rows of the chosen units (for a batch, the union); W2: each token's own rows."""
    ffn = sparse_ffn().eval()
    x = torch.randn(rows, 1, D)
    with cpu_kernels.disabled(), torch.no_grad(), WeightReads({"W1": ffn.in_proj, "W2": ffn.out_proj}) as mode:
        ffn(x)
        units = ffn.controller(x).argmax(-1) + ffn.block_start  # (rows, 1, d_ff / N)
    assert sorted(name for name, *_ in mode.reads) == ["W1", "W2"]
    for name, op, args, out in mode.reads:
        if name == "W1":
            assert op.startswith("index_select"), f"W1 read whole by {op}"
            assert out.shape == (units.unique().numel(), D)
            assert torch.equal(args[2], units.unique())
        else:
            assert "embedding_bag" in op, f"W2 read whole by {op}"
            assert torch.equal(args[1].reshape(rows, -1), units.reshape(rows, -1))
    assert units.unique().numel() <= rows * D_FF // N


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_token_step_reads_no_other_rows(dtype, kernels):
    """Every row of W1 and W2 but the chosen units' set to NaN: the output does not change."""
    ffn = sparse_ffn("model.ffn.bias=true").eval().to(dtype)
    torch.nn.init.normal_(ffn.in_bias)
    x = torch.randn(1, 1, D, dtype=dtype)
    with torch.no_grad():
        clean = ffn(x)
        unchosen = torch.ones(D_FF, dtype=torch.bool)
        unchosen[(ffn.controller(x).argmax(-1) + ffn.block_start).flatten()] = False
        for weight in (ffn.in_proj, ffn.out_proj, ffn.in_bias):
            weight[unchosen] = float("nan")
        torch.testing.assert_close(ffn(x), clean, atol=0, rtol=0)
    assert clean.isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size, rank, d_ff, threads", [(64, 16, 768, None), (24, 32, 768, None),
                                                             (12, 3, 768, None), (48, 16, 720, 1), (48, 16, 720, 3)])
def test_fused_kernel_equals_the_pytorch_path(dtype, block_size, rank, d_ff, threads):
    """The fused one-token kernel against the gather path: same units chosen, same output up to the
    order of float32 sums. Ranks that are multiples of 16 take its vectorised controller (in
    groups of 16 units, the rest of a block one by one), others its plain loop. 15 blocks on 1 or
    3 threads leave shares whose gathers end in a group of fewer than eight rows."""
    require_cpu_kernels()
    ffn = sparse_ffn(f"model.ffn.block_size={block_size}", f"model.ffn.d_lowrank={rank}",
                     f"model.d_ff={d_ff}").eval()
    torch.nn.init.normal_(ffn.controller_up.weight)  # the choice depends on z as much as on the bias
    torch.nn.init.normal_(ffn.controller_up.bias)
    ffn.to(dtype)
    x = torch.randn(20, 1, 1, D, dtype=dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        with torch.no_grad():
            fused = torch.cat([ffn(row) for row in x])
            with cpu_kernels.disabled():
                plain = torch.cat([ffn(row) for row in x])
    finally:
        torch.set_num_threads(before)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(fused, plain, atol=tol * plain.abs().max().item(), rtol=0)


@pytest.mark.parametrize("block_size, unit", [(16, 5), (32, 21)])
def test_a_nan_logit_is_chosen_as_torch_argmax_chooses_it(block_size, unit, kernels):
    """A NaN logit in block 1, in its first group of sixteen units or its second."""
    ffn = sparse_ffn(f"model.ffn.block_size={block_size}").eval()
    with torch.no_grad():
        ffn.controller_up.bias[block_size + unit] = float("nan")
        x = torch.randn(1, 1, D)
        torch.testing.assert_close(ffn(x), reference(ffn, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("block_size", [16, 32])
def test_tied_logits_choose_the_first_unit_as_torch_argmax_does(block_size, kernels):
    """Each block's top logit twice: within one group of sixteen units and, at 32, in two groups
    (the kernel compares sixteen at a time). The chosen unit must be the first of the pair."""
    ffn = sparse_ffn(f"model.ffn.block_size={block_size}").eval()
    pairs = [(2, 9), (0, 15), (5, block_size - 1), (block_size - 2, block_size - 1)]
    with torch.no_grad():
        ffn.controller_up.weight.zero_()
        ffn.controller_up.bias.copy_(torch.rand(D_FF) - 1.0)  # below the ties
        for block in range(D_FF // block_size):
            for unit in pairs[block % len(pairs)]:
                ffn.controller_up.bias[block * block_size + unit] = 2.0
        # the units are told apart by their rows: a different choice changes the output
        torch.nn.init.normal_(ffn.in_proj)
        x = torch.randn(1, 1, D)
        first = F.one_hot(torch.tensor([p[0] for p in pairs]).repeat(D_FF // block_size // len(pairs)),
                          block_size).flatten().to(x.dtype)
        h = F.relu(x @ ffn.in_proj.T) * first
        torch.testing.assert_close(ffn(x), (h @ ffn.out_proj) * block_size, atol=1e-5, rtol=1e-4)


def test_large_batches_compute_every_unit():
    """Past the gather threshold the masked dense matmul is used (and reads W1 whole)."""
    ffn = sparse_ffn().eval()
    with torch.no_grad(), WeightReads({"W1": ffn.in_proj}) as mode:
        ffn(torch.randn(4, 16, D))
    ops = [op for _, op, *_ in mode.reads]
    assert ops and not any(op.startswith("index") for op in ops)


@pytest.mark.parametrize("quant_prob", [0.0, 1.0])
def test_gradients_reach_the_controller(quant_prob):
    ffn = sparse_ffn(f"model.ffn.quant_prob={quant_prob}").train()
    ffn(torch.randn(2, 8, D)).square().sum().backward()
    for p in (ffn.controller_down.weight, ffn.controller_up.weight, ffn.controller_up.bias,
              ffn.in_proj, ffn.out_proj):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_training_masks():
    """quant_prob=1: a one-hot per block (the argmax when there is no noise); 0: the softmax."""
    x = torch.randn(3, 7, D)
    ffn = sparse_ffn("model.ffn.quant_prob=1.0", "model.ffn.temperature=0.0").train()
    logits = ffn.controller(x)
    hard = ffn.training_mask(logits)
    torch.testing.assert_close(hard, F.one_hot(logits.argmax(-1), N).float())
    ffn.quant_prob = 0.0
    torch.testing.assert_close(ffn.training_mask(logits), logits.softmax(-1))


def test_gumbel_noise_explores_other_units():
    ffn = sparse_ffn("model.ffn.quant_prob=1.0", "model.ffn.temperature=1.0").train()
    logits = torch.zeros(1000, D_FF // N, N)  # a uniform controller: noise alone decides
    counts = ffn.training_mask(logits).detach().sum(dim=(0, 1))  # picks per position in the block
    expected = 1000 * (D_FF // N) / N
    assert counts.min() > 0.8 * expected and counts.max() < 1.2 * expected


def test_block_size_must_divide_d_ff():
    with pytest.raises(UserError, match="block_size"):
        sparse_ffn("model.ffn.block_size=50")


def test_default_rank_is_d_model_over_block_size():
    ffn = sparse_ffn()
    assert ffn.controller_down.weight.shape == (D // N, D)
    assert ffn.controller_up.weight.shape == (D_FF, D // N)

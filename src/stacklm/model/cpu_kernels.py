"""Hand-written CPU kernels (csrc/), compiled with the machine's C++ compiler on first use.

Only what no PyTorch op does well is here, and each has a plain-PyTorch path beside it that gives
the same result: if the build fails (no compiler, no ninja) stacklm warns once and uses that path.
`STACKLM_CPU_KERNELS=0` in the environment, or `with cpu_kernels.disabled():`, turns them off
(for A/B comparisons and for debugging).

- `stacklm::sparse_ffn_decode`: one token through the sparse FFN (model/ffn_sparse.py).
- `stacklm::multiplicative_conv_decode`: one token through the sparse q/k/v
  (model/qkv_sparse.py, `multiplicative_conv`), on its weights as `multiplicative_conv_pack`
  repacks them (once per sequence).
- `stacklm::matvec`: a one-row matmul at the memory's bandwidth, which the compiled decode step
  (inference/generate.py) uses for the one-row matmuls of float32 and bfloat16 models (the
  output projection the largest).
- `stacklm::decode_blocks`: every block of a batch-1 decode step in one call, on the kernels
  above (inference/cpu_step.py); it has no PyTorch twin of its own: the modules' step is its
  fallback.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import sys
import warnings
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"
SOURCES = sorted(CSRC.glob("*.cpp"))
HEADERS = sorted(CSRC.glob("*.h"))  # which the sources include
DTYPES = (torch.float32, torch.bfloat16)  # those the kernels are built for (they accumulate in float32)
# Module state read by the models' forward (Dynamo guards on it): whether the library is loaded,
# and whether it may be used now.
loaded = False
enabled = os.environ.get("STACKLM_CPU_KERNELS", "1") != "0"
_tried = False


def active() -> bool:
    """Whether the kernels are loaded and not turned off (never builds them)."""
    return loaded and enabled


def available() -> bool:
    """Whether the kernels may be used; outside torch.compile, builds and loads them on first call.
    A compiled function sees them only if they were loaded before it was traced."""
    if torch.compiler.is_compiling():
        return active()
    return enabled and load()


def fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a kernel can take x with weight: on the CPU, both in one of the kernels' dtypes."""
    return x.device.type == "cpu" and x.dtype == weight.dtype and x.dtype in DTYPES


def applies(x: torch.Tensor, weight: torch.Tensor, training: bool) -> bool:
    """Whether a one-token step with input x may take a kernel: inference only (they have no
    backward), where it fits, and without autocast (they compute in the weights' dtype)."""
    return (not training and not torch.is_grad_enabled() and fits(x, weight)
            and not torch.is_autocast_enabled("cpu") and available())


def load() -> bool:
    """Build (once per machine and source: PyTorch caches the library) and load the kernels; True
    if they are loaded."""
    global loaded, _tried
    if _tried or not enabled:
        return loaded
    _tried = True
    from torch.utils import cpp_extension

    name = _build_name()
    if not _built(name):  # the first use on this machine (or of these sources) waits for the compiler
        print("stacklm: compiling its CPU kernels for this machine (once; about 20 s)", file=sys.stderr, flush=True)
    try:
        cpp_extension.load(name, [str(s) for s in SOURCES], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                           extra_ldflags=["-fopenmp"], is_python_module=False)
    except Exception as e:  # noqa: BLE001 - any failure to build means the PyTorch path
        warnings.warn(f"stacklm's CPU kernels did not build ({type(e).__name__}: {e}); using the "
                      "slower PyTorch ops instead", stacklevel=2)
        return False
    torch.library.register_fake("stacklm::sparse_ffn_decode")(_sparse_ffn_decode_shape)
    torch.library.register_fake("stacklm::multiplicative_conv_pack")(_multiplicative_conv_pack_shape)
    torch.library.register_fake("stacklm::multiplicative_conv_decode")(_multiplicative_conv_decode_shape)
    torch.library.register_fake("stacklm::matvec")(_matvec_shape)
    loaded = True
    return True


def _built(name: str) -> bool:
    """Whether PyTorch's cache already holds the library `name` (False where it cannot tell)."""
    from torch.utils import cpp_extension

    try:  # a private helper: the directory cpp_extension.load builds in
        return (Path(cpp_extension._get_build_directory(name, False)) / f"{name}.so").exists()
    except Exception:  # noqa: BLE001 - unknown: say nothing rather than fail
        return True


def _build_name() -> str:
    """The build's name in PyTorch's cache: it is compiled with -march=native, so the name holds a
    hash of this CPU's model and instruction-set flags (a home directory shared by different
    machines keeps one build for each), and of the sources with their header (PyTorch's own check
    reads only the .cpp files)."""
    cpu = b""
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_bytes().splitlines()
        cpu = b"".join(sorted({line for line in lines if line.startswith((b"flags", b"model name"))}))
    sources = b"".join(f.read_bytes() for f in [*SOURCES, *HEADERS])
    digest = hashlib.sha256(cpu + platform.machine().encode() + sources).hexdigest()[:16]
    return f"stacklm_cpu_kernels_{digest}"


@contextlib.contextmanager
def disabled():
    """Inside the block, the PyTorch paths only (already compiled functions recompile)."""
    global enabled
    before, enabled = enabled, False
    try:
        yield
    finally:
        enabled = before


def _sparse_ffn_decode_shape(x, c1, c2, c, w1, b1, w2, block_size):
    return x.new_empty(x.shape)


def _multiplicative_conv_pack_shape(multiplier, weight, qk_weight, v_weight):
    (s, d), m, lk = multiplier.shape, weight.size(0), qk_weight.size(2)
    d2, m2, panels = d + d % 2, m + m % 2, lambda n: -(-n // 16)
    return (multiplier.new_empty(d2, s), weight.new_empty(panels(m), d2, 16),
            qk_weight.new_empty(panels(2 * m), lk * 3 * m2, 16), v_weight.new_empty(panels(m), lk * m2, 16))


def _multiplicative_conv_decode_shape(x, multiplier_t, weight, bias, frames, qk_weight, qk_bias, v_weight, v_bias):
    s = multiplier_t.size(1)
    m = x.size(-1) // s
    return x.new_empty(s * m), x.new_empty(s, 2 * m), x.new_empty(s, m)


def _matvec_shape(x, weight):
    return x.new_empty(1, weight.size(0))

"""Where and in which precision to compute: `train.device` and `train.dtype` resolved for this machine."""

from __future__ import annotations

import torch

from stacklm.errors import UserError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device {name!r} is not valid; valid: auto, cpu, cuda, cuda:N, mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was asked for but no CUDA device is available")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively: CUDA with bf16, or a CPU with AVX512-BF16 / AMX.
    Elsewhere bf16 is emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a build without oneDNN
            return False
    return False


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype x's matmuls run in: autocast's when it is on for x's device, else x's own. For the
    fused ops that run as one autograd Function with autocast off inside, so that their backward
    pass (which runs without autocast) meets the forward's dtypes."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 where it is fast (see fast_bf16), else float32."""
    if name == "auto":
        return torch.bfloat16 if fast_bf16(device) else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def keep_freed_memory_on_cpu() -> bool:
    """Make glibc malloc serve large tensors from its heap and keep freed memory for reuse.

    By default glibc maps every allocation over 32 MB afresh and unmaps it on free, so each
    training step page-faults its logits, activations and gradients in again: on a 2-core CPU
    that was 30% of a step's time as system time. PyTorch's advice is to preload jemalloc or
    tcmalloc, which a running process cannot do; mallopt gets the same reuse from glibc. The
    cost is that the process keeps its peak memory until it exits. Returns whether it applied.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))

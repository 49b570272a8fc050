"""Inference: sampling with a KV cache."""

from stacklm.inference.generate import generate, sample_next

__all__ = ["generate", "sample_next"]

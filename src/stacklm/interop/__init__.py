"""Conversions between stacklm runs and other model formats (Hugging Face Llama)."""

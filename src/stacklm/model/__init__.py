"""Model components. Importing this package registers the built-in attention, FFN, position and
norm kinds; `stacklm.model.transformer` composes them."""

from stacklm.model import attention, attention_local, ffn, ffn_sparse, moe, norm, position, qkv_sparse  # noqa: F401

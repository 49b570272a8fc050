"""Model components. Importing this package registers the built-in attention, FFN, position and
norm kinds; `stacklm.model.transformer` composes them."""

from stacklm.model import (  # noqa: F401
    attention,
    attention_local,
    attention_lsh,
    ffn,
    ffn_sparse,
    moe,
    norm,
    position,
    qkv_sparse,
)

"""Text -> documents -> BPE tokenizer -> memory-mapped token shards -> packed batches."""

from stacklm.data.loader import PackedLoader
from stacklm.data.pipeline import PreparedData, prepare_data
from stacklm.data.sources import read_documents
from stacklm.data.tokenizer import Tokenizer

__all__ = ["PackedLoader", "PreparedData", "Tokenizer", "prepare_data", "read_documents"]

"""Memory-mapped token shards: `shard_NNNNN.bin` (uint16, or uint32 for vocabularies over 65535),
`shard_NNNNN.idx.npy` (the end offset of each document) and `meta.json`.

Each document is followed by <eos>, so consecutive documents pack into one token stream.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

SHARD_TOKENS = 1 << 28  # 512 MiB of uint16 per shard file


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


class TokenStore:
    """A read-only split of tokenised text, possibly spread over several shard files."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        meta = json.loads((self.directory / "meta.json").read_text())
        self.n_tokens, self.n_bytes, self.n_docs = meta["n_tokens"], meta["n_bytes"], meta["n_docs"]
        dtype = np.dtype(meta["dtype"])
        self.shards = [np.memmap(self.directory / f"shard_{i:05d}.bin", dtype=dtype, mode="r")
                       for i in range(meta["n_shards"])]

    @property
    def bytes_per_token(self) -> float:
        return self.n_bytes / max(self.n_tokens, 1)

    @staticmethod
    def write(directory: str | Path, documents: Iterable[tuple[list[int], int]], eos_id: int,
              vocab_size: int, shard_tokens: int = SHARD_TOKENS) -> TokenStore:
        """Write (token ids, byte count) documents; atomically: a temp dir renamed into place."""
        directory = Path(directory)
        tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        dtype = token_dtype(vocab_size)
        totals = {"n_tokens": 0, "n_bytes": 0, "n_docs": 0, "n_shards": 0, "dtype": dtype.name}
        pending: list[np.ndarray] = []
        ends: list[int] = []
        size = 0

        def flush():
            nonlocal pending, ends, size
            if not pending:
                return
            i = totals["n_shards"]
            np.concatenate(pending).astype(dtype).tofile(tmp / f"shard_{i:05d}.bin")
            np.save(tmp / f"shard_{i:05d}.idx.npy", np.asarray(ends, dtype=np.int64))
            totals["n_shards"] += 1
            pending, ends, size = [], [], 0

        for ids, n_bytes in documents:
            arr = np.asarray(ids + [eos_id], dtype=np.int64)
            if size and size + len(arr) > shard_tokens:
                flush()
            pending.append(arr)
            size += len(arr)
            ends.append(size)
            totals["n_tokens"] += len(arr)
            totals["n_bytes"] += n_bytes
            totals["n_docs"] += 1
        flush()
        (tmp / "meta.json").write_text(json.dumps(totals))
        if directory.exists():  # another process finished the same shards first
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, directory)
        return TokenStore(directory)

    def chunk_table(self, seq_len: int) -> np.ndarray:
        """Cumulative count of (seq_len + 1)-token windows, stepping by seq_len, per shard."""
        counts = [max(len(s) - 1, 0) // seq_len for s in self.shards]
        return np.cumsum([0, *counts])

    def window(self, chunk: int, seq_len: int, table: np.ndarray) -> np.ndarray:
        shard = int(np.searchsorted(table, chunk, side="right")) - 1
        start = (chunk - int(table[shard])) * seq_len
        return self.shards[shard][start : start + seq_len + 1]

"""Packed batches of contiguous token windows, in a shuffled order that is part of a checkpoint."""

from __future__ import annotations

import numpy as np
import torch

from stacklm.data.store import TokenStore
from stacklm.errors import UserError


class PackedLoader:
    """Yields (batch_size, seq_len + 1) int64 windows; inputs are [:, :-1] and targets [:, 1:].

    Each epoch visits every window of the split once in a permutation seeded by (seed, epoch).
    Under data parallelism every rank draws the same global batch and keeps its own rows, so
    `world` processes with batch b see the same data as one process with batch b * world.
    Its whole state is (epoch, cursor): a resumed loader continues exactly where it stopped.
    """

    def __init__(self, store: TokenStore, seq_len: int, batch_size: int, seed: int = 0,
                 shuffle: bool = True, rank: int = 0, world: int = 1):
        self.store, self.seq_len, self.batch_size = store, seq_len, batch_size
        self.seed, self.shuffle, self.rank, self.world = seed, shuffle, rank, world
        self.table = store.chunk_table(seq_len)
        self.n_windows = int(self.table[-1])
        if self.n_windows < batch_size * world:
            raise UserError(f"{store.directory.name} split has {store.n_tokens} tokens: fewer than one "
                            f"batch of {batch_size * world} x {seq_len + 1}; use more data or lower "
                            f"train.batch_size / data.seq_len")
        self.epoch, self.cursor = 0, 0
        self._order_epoch, self._order = -1, None

    def order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.epoch])
                self._order = rng.permutation(self.n_windows)
            else:
                self._order = np.arange(self.n_windows)
            self._order_epoch = self.epoch
        return self._order

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        global_batch = self.batch_size * self.world
        if self.cursor + global_batch > self.n_windows:
            self.epoch, self.cursor = self.epoch + 1, 0
        ids = self.order()[self.cursor : self.cursor + global_batch]
        self.cursor += global_batch
        mine = ids[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        rows = [self.store.window(int(i), self.seq_len, self.table) for i in mine]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor, self.seed = state["epoch"], state["cursor"], state["seed"]

"""Causal-LM batches: windows of `seq_len + 1` tokens from a token shard; inputs are the first
`seq_len`, labels the last `seq_len` (the next token at every position).

Training windows start at uniformly random offsets (as nanoGPT), drawn from a generator seeded by
(seed, step, micro, rank): a batch is a pure function of those numbers, so resuming and sharding
across processes need no data-loader state. Validation covers the whole validation split in
consecutive non-overlapping windows (or its first `limit` batches), the same windows every time."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from lmforge.errors import DataError


class CLMBatcher:
    def __init__(self, train, val, *, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.train = train
        self.val = val
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.tokens_per_batch = seq_len * batch_size
        self._offsets = np.arange(seq_len + 1, dtype=np.int64)
        if len(train.tokens) < seq_len + 2:
            raise DataError(f"training split has {len(train.tokens)} tokens, fewer than seq_len + 2 = {seq_len + 2}")

    def _windows(self, tokens: np.ndarray, starts: np.ndarray) -> dict[str, torch.Tensor]:
        chunk = torch.from_numpy(tokens[starts[:, None] + self._offsets].astype(np.int64))  # (B, T+1)
        return {"input_ids": chunk[:, :-1], "labels": chunk[:, 1:]}

    def train_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step, micro, self.rank])
        starts = rng.integers(0, len(self.train.tokens) - self.seq_len - 1, size=self.batch_size)
        return self._windows(self.train.tokens, starts)

    def val_batches(self, limit: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        if self.val is None or len(self.val.tokens) < self.seq_len + 1:
            return
        n_windows = (len(self.val.tokens) - 1) // self.seq_len
        starts = np.arange(n_windows, dtype=np.int64) * self.seq_len
        starts = starts[self.rank :: self.world_size]  # each process evaluates its share
        for i, b in enumerate(range(0, len(starts), self.batch_size)):
            if limit is not None and i >= limit:
                return
            yield self._windows(self.val.tokens, starts[b : b + self.batch_size])

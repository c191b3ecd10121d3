"""Causal-LM batches: windows of `seq_len + 1` tokens from a token shard; inputs are the first
`seq_len`, labels the last `seq_len` (the next token at every position).

Training windows start at uniformly random offsets (as nanoGPT). A step's global batch (batch_size x
world_size windows) is drawn from a generator seeded by (seed, step, micro) alone, and process `rank`
takes rows rank * batch_size ... (rank + 1) * batch_size - 1 of it: a batch is a pure function of those
numbers, so resuming needs no data-loader state, and N processes with batch_size B train on exactly the
batches one process with N * B does. Validation covers the whole validation split in consecutive
non-overlapping windows (or its first `limit` batches per process), the same windows every time; process
`rank` takes windows rank, rank + world_size, ... (the union is the same for any number of processes)."""
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
        self.data_id = data_id(train, val, seq_len=seq_len)  # recorded in checkpoints, checked on resume

    def _windows(self, tokens: np.ndarray, starts: np.ndarray) -> dict[str, torch.Tensor]:
        chunk = torch.from_numpy(tokens[starts[:, None] + self._offsets].astype(np.int64))  # (B, T+1)
        return {"input_ids": chunk[:, :-1], "labels": chunk[:, 1:]}

    def train_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        """This process's slice of the global micro-batch `micro` of `step`."""
        rng = np.random.default_rng([self.seed, step, micro, 0])  # the same global batch on every process
        starts = rng.integers(0, len(self.train.tokens) - self.seq_len - 1, size=self.batch_size * self.world_size)
        return self._windows(self.train.tokens, starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size])

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


def data_id(train, val, **fields) -> dict:
    """What identifies a batcher's data, for checking a resumed run against its checkpoint: the token and
    document counts of the splits, the tokenizer's hash, and the batcher's own settings (`fields`)."""
    out = {}
    for name, split in (("train", train), ("val", val)):
        if split is not None:
            out[f"{name}_tokens"] = int(len(split.tokens))
            offsets = getattr(split, "doc_offsets", None)
            if offsets is not None:
                out[f"{name}_docs"] = int(len(offsets) - 1)
    index = getattr(train, "index", None)
    if isinstance(index, dict) and index.get("tokenizer_hash"):
        out["tokenizer"] = str(index["tokenizer_hash"])[:16]
    return {**out, **fields}

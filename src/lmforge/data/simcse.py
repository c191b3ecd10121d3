"""Sentence batches for unsupervised SimCSE (Gao et al. 2021) from prepared token shards.

A span is a sentence when the data was prepared with `--sentences true`, else a window of up to
`seq_len - 2` tokens inside one document (documents are cut into consecutive windows). Spans shorter than
`min_tokens` are skipped; longer ones are cut to `seq_len - 2`. Each becomes `[CLS] span [SEP]`, padded
with [PAD] to the longest row of its batch (sentences are short: padding to seq_len would waste most of
the compute) with an `attention_mask`.

Training batches are random spans: a step's global batch (batch_size x world_size spans) is drawn from a
generator seeded by (seed, step, micro), and process `rank` takes rows rank * batch_size ... (rank + 1) *
batch_size - 1, so the rows do not depend on the number of processes (the in-batch negatives of the
loss are then a process's own rows). The objective encodes each twice (dropout makes the two views differ). Validation runs in eval mode, where
dropout is off and two encodings would be identical, so each validation batch also carries a second view
of every sentence (`pair_input_ids`, `pair_attention_mask`) with each token deleted with probability
`val_delete_prob` (default 0.5; at least one kept), fixed by the batch index: the validation loss then
measures how well a sentence retrieves a heavily perturbed copy of itself among the batch, comparably at
every evaluation. (With 10% deletion a tiny model reaches loss ~0.000 and acc 1.0 within 100 steps on
imdb_unsup, which says nothing; at 50% it goes from 2.5 / acc 0.69 at initialisation to 0.19 / 0.96
after 300 steps.)

Framing and padding are done here with numpy, not by the tokenizer (`Tokenizer.encode_for_model`): the
spans are token ids from the shards, and the `tokenizers` library frames and pads only encodings it made
from text (see `lmforge.data.mlm`).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from lmforge.data.clm import data_id
from lmforge.errors import ConfigError, DataError

_VAL = 0x5EED  # in validation seeds, keeps them apart from any (seed, step, micro, rank) of training


def _spans(shards, max_len: int, min_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of the usable spans of a split."""
    if getattr(shards, "sent_offsets", None) is not None:
        starts, ends = shards.sent_offsets[:-1], shards.sent_offsets[1:]
    else:  # consecutive windows of max_len tokens inside each document
        docs = shards.doc_offsets
        sizes = np.diff(docs)
        n_win = -(-sizes // max_len)  # windows per document (0 for an empty one)
        doc_start = np.repeat(docs[:-1], n_win)
        k = np.arange(n_win.sum()) - np.repeat(np.cumsum(n_win) - n_win, n_win)  # window index in its doc
        starts = doc_start + k * max_len
        ends = np.minimum(starts + max_len, np.repeat(docs[1:], n_win))
    lengths = np.minimum(ends - starts, max_len)
    keep = lengths >= min_tokens
    return starts[keep].astype(np.int64), lengths[keep].astype(np.int64)


class SentenceBatcher:
    """Batches of single sentences as `[CLS] sentence [SEP]` (see the module docstring).

    Args:
        tokenizer: a tokenizer with [CLS] [SEP] [PAD].
        train, val: `TokenShards` of the two splits (val may be None).
        seq_len: longest row, [CLS] and [SEP] included.
        batch_size: sentences per batch (each is encoded twice by the objective).
        min_tokens: shorter spans are skipped.
        val_delete_prob: token deletion rate of the validation batches' second view.
    """

    def __init__(self, tokenizer, train, val, *, seq_len: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, min_tokens: int = 3, val_delete_prob: float = 0.5):
        ids = {name: getattr(tokenizer, f"{name}_id") for name in ("cls", "sep", "pad")}
        missing = [k for k, v in ids.items() if v is None]
        if missing:
            raise ConfigError(f"simcse needs a tokenizer with [CLS] [SEP] [PAD]; this {tokenizer.kind} tokenizer has no "
                              f"{', '.join(missing)} (train one with `lmforge tokenizer --kind wordpiece`)")
        if seq_len < 3:
            raise ConfigError(f"data.seq_len must be at least 3 for [CLS] x [SEP], got {seq_len}")
        if batch_size < 2:
            raise ConfigError(f"train.batch_size must be at least 2 for in-batch negatives, got {batch_size}")
        if min_tokens < 1:
            raise ConfigError(f"objective_args.min_tokens must be at least 1, got {min_tokens}")
        if not 0.0 <= val_delete_prob < 1.0:
            raise ConfigError(f"objective_args.val_delete_prob must be in [0, 1), got {val_delete_prob}")
        self.cls, self.sep, self.pad = ids["cls"], ids["sep"], ids["pad"]
        # Structural tokens are dropped from the text (e.g. the [SEP] that `prepare --append_eos` ends documents with).
        self.structural = np.array([i for i in (ids["cls"], ids["sep"], ids["pad"], tokenizer.mask_id) if i is not None])
        self.train, self.val = train, val
        self.seq_len, self.batch_size, self.seed, self.rank, self.world_size = seq_len, batch_size, seed, rank, world_size
        self.val_delete_prob = val_delete_prob
        self.train_spans = _spans(train, seq_len - 2, min_tokens)
        if len(self.train_spans[0]) == 0:
            raise DataError(f"the training split has no sentence of at least {min_tokens} tokens")
        self.val_spans = _spans(val, seq_len - 2, min_tokens) if val is not None else None
        mean_len = float(self.train_spans[1].mean()) + 2
        self.tokens_per_batch = int(round(batch_size * mean_len))
        self.data_id = data_id(train, val, seq_len=seq_len, min_tokens=min_tokens, spans=int(len(self.train_spans[0])))

    def row(self, shards, start: int, length: int) -> np.ndarray:
        toks = np.asarray(shards.tokens[start : start + length], dtype=np.int64)
        toks = toks[~np.isin(toks, self.structural)]
        return np.concatenate([[self.cls], toks, [self.sep]])

    def _pad(self, rows: list[np.ndarray], width: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = np.full((len(rows), width), self.pad, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = row
            mask[r, : len(row)] = 1
        return torch.from_numpy(ids), torch.from_numpy(mask)

    def train_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        """This process's slice of the global micro-batch `micro` of `step`."""
        rng = np.random.default_rng([self.seed, step, micro, 0])  # the same global batch on every process
        starts, lengths = self.train_spans
        pick = rng.integers(len(starts), size=self.batch_size * self.world_size)
        pick = pick[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        rows = [self.row(self.train, starts[i], lengths[i]) for i in pick]
        ids, mask = self._pad(rows, max(map(len, rows)))
        return {"input_ids": ids, "attention_mask": mask}

    def _delete(self, row: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The row with each content token dropped with probability val_delete_prob (one always stays)."""
        body = row[1:-1]
        keep = rng.random(len(body)) >= self.val_delete_prob
        if len(body) and not keep.any():
            keep[rng.integers(len(body))] = True
        return np.concatenate([[self.cls], body[keep], [self.sep]])

    def val_batches(self, limit: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Every validation span once, in a fixed shuffled order (so that a batch mixes documents), in
        global batches of batch_size x world_size spans (the first `limit`), each process taking its slice;
        the deletions of global batch i are drawn with seed (seed, i) in row order."""
        if self.val_spans is None or len(self.val_spans[0]) < 2:
            return
        starts, lengths = self.val_spans
        order = np.random.default_rng([self.seed, _VAL]).permutation(len(starts))
        size = self.batch_size * self.world_size
        n_batches = len(order) // size or 1  # a last partial batch is dropped (fewer negatives)
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for i in range(n_batches):
            if limit is not None and i >= limit:
                return
            rng = np.random.default_rng([self.seed, _VAL, i])
            rows = [self.row(self.val, starts[j], lengths[j]) for j in order[i * size : (i + 1) * size]]
            pairs = [self._delete(r, rng) for r in rows][mine]
            rows = rows[mine]
            if len(rows) < 2:  # a short single batch: fewer than two rows left for this process
                continue
            width = max(map(len, rows))
            ids, mask = self._pad(rows, width)
            pair_ids, pair_mask = self._pad(pairs, width)
            yield {"input_ids": ids, "attention_mask": mask, "pair_input_ids": pair_ids, "pair_attention_mask": pair_mask}

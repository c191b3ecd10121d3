"""Batches of task examples: length-grouped, dynamically padded, deterministic in (seed, step).

A feature is a dict of python lists/ints made by a task's `featurize` (`input_ids`, `token_type_ids`,
and task fields such as `label`, `word_starts` or `tags`). Each epoch the examples are shuffled by
(seed, epoch), cut into mega-batches of `group` global batches, sorted by length inside each (so a
batch pads to nearly its own length: short sentences cost what they are, not `max_length`), and the
batches are shuffled again. Step s, micro-batch m is global batch `s * grad_accum + m` of that order;
a process takes its slice of the global batch, so the data of a step does not depend on the number of
processes and resume is exact.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

Feature = dict
Collate = Callable[[Sequence[Feature]], dict[str, torch.Tensor]]


def pad_to(rows: Sequence[Sequence[int]], value: int, width: int | None = None) -> torch.Tensor:
    """(B, width) long tensor of right-padded rows (width: the longest row)."""
    width = max((len(r) for r in rows), default=0) if width is None else width
    out = torch.full((len(rows), max(width, 1)), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


def collate_tokens(features: Sequence[Feature], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, token_type_ids and attention_mask of a list of features, right-padded."""
    ids = [f["input_ids"] for f in features]
    batch = {"input_ids": pad_to(ids, pad_id)}
    batch["attention_mask"] = pad_to([[1] * len(r) for r in ids], 0, batch["input_ids"].shape[1])
    if "token_type_ids" in features[0]:
        batch["token_type_ids"] = pad_to([f["token_type_ids"] for f in features], 0, batch["input_ids"].shape[1])
    return batch


class TaskBatcher:
    """The trainer's Batcher for task features (see the module docstring).

    Args:
        features: the training features.
        collate: features -> batch of tensors.
        batch_size: examples per micro-batch per process.
        seed: shuffling seed.
        grad_accum: micro-batches per optimizer step.
        rank, world_size: this process's slice of each global batch.
        group: global batches per length-sorted mega-batch (1: no length grouping).
    """

    def __init__(self, features: Sequence[Feature], collate: Collate, *, batch_size: int, seed: int,
                 grad_accum: int = 1, rank: int = 0, world_size: int = 1, group: int = 50):
        if not features:
            raise ValueError("no training features")
        self.features = features
        self.collate = collate
        self.batch_size = batch_size
        self.seed = seed
        self.grad_accum = grad_accum
        self.rank = rank
        self.world_size = world_size
        self.group = max(1, group)
        self.global_batch = batch_size * world_size
        self.lengths = np.fromiter((len(f["input_ids"]) for f in features), dtype=np.int64, count=len(features))
        self.batches_per_epoch = math.ceil(len(features) / self.global_batch)
        self.tokens_per_batch = int(self.lengths.mean() * batch_size)
        # recorded in checkpoints and checked on resume (with the global batch and the seed)
        self.data_id = {"examples": len(features), "tokens": int(self.lengths.sum()), "group": self.group}
        self._epoch: int | None = None
        self._order: list[np.ndarray] = []

    def steps_per_epoch(self) -> int:
        return math.ceil(self.batches_per_epoch / self.grad_accum)

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The global batches (arrays of feature indices) of one epoch, in training order."""
        if self._epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch, 0x7A5C])
            perm = rng.permutation(len(self.features))
            span = self.global_batch * self.group
            batches: list[np.ndarray] = []
            for lo in range(0, len(perm), span):
                chunk = perm[lo : lo + span]
                chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
                batches += [chunk[i : i + self.global_batch] for i in range(0, len(chunk), self.global_batch)]
            order = rng.permutation(len(batches))
            self._epoch, self._order = epoch, [batches[i] for i in order]
        return self._order

    def train_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        index = step * self.grad_accum + micro
        epoch, within = divmod(index, self.batches_per_epoch)
        global_batch = self.epoch_batches(epoch)[within]
        mine = np.array_split(global_batch, self.world_size)[self.rank]
        if len(mine) == 0:  # a last, short global batch with fewer examples than processes
            mine = global_batch[-1:]
        return self.collate([self.features[i] for i in mine])

    def val_batches(self, limit: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Task dev sets are scored by the trainer's evaluator (loss and metrics in one pass)."""
        return iter(())


def eval_batches(features: Sequence[Feature], collate: Collate, batch_size: int) -> Iterator[tuple[list[int], dict]]:
    """(indices, batch) over `features` in length order (less padding), every feature exactly once."""
    lengths = [len(f["input_ids"]) for f in features]
    order = sorted(range(len(features)), key=lambda i: -lengths[i])
    for lo in range(0, len(order), batch_size):
        idx = order[lo : lo + batch_size]
        yield idx, collate([features[i] for i in idx])

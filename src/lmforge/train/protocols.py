"""The two seams of the trainer. The loop knows nothing about models, objectives or tasks beyond these.

A batch is a `dict[str, torch.Tensor]` of CPU tensors; the trainer moves it to the device.
Conventional keys: `input_ids` (B, T) long, `labels` (B, T) long with -100 = ignored,
`attention_mask` (B, T) long/bool with 1 = real token, `token_type_ids` (B, T), `nsp_labels` (B,).
"""
from __future__ import annotations

from typing import Iterable, Protocol

import torch
from torch import nn

Batch = dict[str, torch.Tensor]


class Objective(Protocol):
    """Turns a batch into a loss. `metrics` holds 0-dim tensors (means over the batch, e.g. 'acc');
    do not call .item() (that would sync the device). The trainer averages metrics over
    micro-batches and validation batches with equal weight and reports `loss` and, where
    `reports_perplexity` is true, `ppl = exp(loss)`.

    A loss that is a mean over items whose number varies between batches (tokens, masked positions,
    labelled examples) names that number as `metrics["loss_items"]` (a 0-dim tensor; the trainer takes it
    out of the metrics). Processes of a torchrun job then weigh their losses by their share of the global
    batch's items, so N processes train on the mean over all the global batch's items, as one process
    does; without it each process's mean counts equally."""

    reports_perplexity: bool

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


class Batcher(Protocol):
    """Produces batches deterministically: `train_batch(step, micro)` is process `rank`'s slice of a
    global micro-batch (batch_size x world_size rows) that depends only on (seed, step, micro), so resume
    is exact and N processes with batch_size B see the rows one process with N x B sees.
    `val_batches()` yields the same fixed batches every call (all of the validation split, or the
    first `limit` batches), each process its share. A batcher may name its data in `data_id` (a dict of
    JSON values: token counts, sequence length, ...): checkpoints record it and a resume checks it."""

    tokens_per_batch: int  # tokens in one train micro-batch (for tokens/s)

    def train_batch(self, step: int, micro: int) -> Batch: ...

    def val_batches(self, limit: int | None = None) -> Iterable[Batch]: ...


class ObjectiveContext:
    """What an objective builder gets from the pretrain recipe. A builder is a function
    `build(ctx: ObjectiveContext) -> tuple[Batcher, Objective]`, registered by name in
    `lmforge.recipes.pretrain.OBJECTIVES`; it validates its own `options` (from `--objective_args.*`)
    with `lmforge.config.from_dict(SomeOptionsDataclass, ctx.options, "objective_args")`."""

    def __init__(self, *, tokenizer, train, val, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, options: dict | None = None):
        self.tokenizer = tokenizer  # lmforge.text.tokenizer.Tokenizer
        self.train = train  # lmforge.data.shards.TokenShards of the train split
        self.val = val  # TokenShards of the validation split, or None
        self.seq_len = seq_len  # tokens per sequence (model context)
        self.batch_size = batch_size  # sequences per micro-batch per process
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.options = dict(options or {})

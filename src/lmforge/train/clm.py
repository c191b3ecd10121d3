"""Causal language modelling: next-token cross-entropy. Works for any model whose
`model(input_ids)` returns (B, T, vocab) logits (GPT, LSTM)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import from_dict
from lmforge.data.clm import CLMBatcher


@dataclass
class CLMOptions:
    """(no options yet; the section exists so that unknown keys are reported)"""


class CLMObjective:
    reports_perplexity = True
    heads = ("lm",)  # the head this objective trains (GPT.use_heads)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(batch["input_ids"])  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100)
        return loss, {"loss_items": (batch["labels"] >= 0).sum()}


def build(ctx) -> tuple[CLMBatcher, CLMObjective]:
    from_dict(CLMOptions, ctx.options, "objective_args")
    batcher = CLMBatcher(ctx.train, ctx.val, seq_len=ctx.seq_len, batch_size=ctx.batch_size, seed=ctx.seed,
                         rank=ctx.rank, world_size=ctx.world_size)
    return batcher, CLMObjective()

"""Unsupervised SimCSE (`--objective simcse`): contrastive sentence embeddings from dropout noise.

Gao, Yao & Chen 2021, "SimCSE: Simple Contrastive Learning of Sentence Embeddings". Each sentence of a
batch is encoded twice in one forward pass (the batch is duplicated; dropout makes the views differ).
With z1_i, z2_i the pooled vectors of sentence i's two views and sim(a, b) the cosine similarity,

    loss = mean_i  -log( exp(sim(z1_i, z2_i) / tau) / sum_j exp(sim(z1_i, z2_j) / tau) )

i.e. cross-entropy over the (B, B) similarity matrix with the diagonal as the target (the other
sentences of the batch are the negatives). Metrics: `acc` (share of sentences whose own second view is
the most similar), `alignment` (mean squared distance of the normalised positive pairs) and `uniformity`
(log mean exp(-2 * squared distance) over all pairs of different sentences), Wang & Isola 2020.
Validation batches carry their own second view (a token-deleted copy, see `lmforge.data.simcse`), since
eval mode has no dropout noise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import from_dict
from lmforge.data.simcse import SentenceBatcher
from lmforge.errors import ConfigError
from lmforge.models.heads import pool


@dataclass
class SimCSEOptions:
    """`--objective_args.*` of the simcse objective.

    Args:
        temperature: tau, the softmax temperature of the similarities.
        pooling: sentence vector: 'cls' (the final hidden state of [CLS]) or 'mean' (mean over real tokens).
        min_tokens: skip sentences shorter than this many tokens.
        val_delete_prob: token deletion rate that makes the validation batches' second view.
    """

    temperature: float = 0.05
    pooling: Literal["cls", "mean"] = "cls"
    min_tokens: int = 3
    val_delete_prob: float = 0.5

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"objective_args.temperature must be positive, got {self.temperature}")


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, acc) of the SimCSE objective for views z1, z2 (B, d): row i's positive is z2[i]."""
    sim = F.normalize(z1.float(), dim=-1) @ F.normalize(z2.float(), dim=-1).T / temperature  # (B, B) cosines / tau
    target = torch.arange(sim.size(0), device=sim.device)
    return F.cross_entropy(sim, target), (sim.argmax(-1) == target).float().mean()


@torch.no_grad()
def alignment_uniformity(z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Wang & Isola's alignment (E ||f(x) - f(x+)||^2) and uniformity (log E exp(-2 ||f(x) - f(y)||^2))."""
    n1, n2 = F.normalize(z1.float(), dim=-1), F.normalize(z2.float(), dim=-1)
    align = (n1 - n2).pow(2).sum(-1).mean()
    d2 = torch.cdist(n1, n1).pow(2)  # (B, B)
    off = ~torch.eye(len(n1), dtype=torch.bool, device=n1.device)
    return align, d2[off].mul(-2).exp().mean().log()


class SimCSEObjective:
    reports_perplexity = False
    heads = ()  # the encoder alone: BERT's pretraining heads are frozen (Bert.use_heads)

    def __init__(self, temperature: float = 0.05, pooling: str = "cls"):
        self.temperature, self.pooling = temperature, pooling

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        ids2, mask2 = batch.get("pair_input_ids", ids), batch.get("pair_attention_mask", mask)
        both_mask = torch.cat([mask, mask2])
        out = model(torch.cat([ids, ids2]), attention_mask=both_mask)  # one forward over both views
        if not hasattr(out, "last_hidden_state"):
            raise ConfigError("objective simcse needs an encoder that returns hidden states (--arch bert)")
        z1, z2 = pool(out.last_hidden_state, both_mask, self.pooling).chunk(2)
        loss, acc = info_nce(z1, z2, self.temperature)
        align, unif = alignment_uniformity(z1, z2)
        return loss, {"acc": acc.detach(), "alignment": align, "uniformity": unif}


def build(ctx) -> tuple[SentenceBatcher, SimCSEObjective]:
    """The simcse objective for the pretrain recipe (ctx: `lmforge.train.protocols.ObjectiveContext`)."""
    opts = from_dict(SimCSEOptions, ctx.options, "objective_args")
    batcher = SentenceBatcher(ctx.tokenizer, ctx.train, ctx.val, seq_len=ctx.seq_len, batch_size=ctx.batch_size,
                              seed=ctx.seed, rank=ctx.rank, world_size=ctx.world_size, min_tokens=opts.min_tokens,
                              val_delete_prob=opts.val_delete_prob)
    return batcher, SimCSEObjective(opts.temperature, opts.pooling)

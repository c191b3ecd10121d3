"""Masked language modelling (`--objective mlm`) and MLM + next-sentence prediction (`mlm+nsp`).

The loss is cross-entropy at the chosen positions only: the batch carries their flat indices
(`mlm_positions`) and the model runs its MLM head there alone (`Bert.forward(mlm_positions=...)`), which
keeps the big vocabulary projection off the ~85% of positions that are not predicted. `mlm` runs and
trains the MLM head only, `mlm+nsp` also the pooler and the NSP head (`heads`, see `Bert.use_heads`). Metrics:
`mlm_acc` (share of chosen tokens predicted exactly) and, with NSP, `nsp_acc`, `mlm_loss`, `nsp_loss`.
Batches come from `lmforge.data.mlm` (masking, packing and pair building are documented there).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import from_dict
from lmforge.data.mlm import Masker, MLMBatcher, NSPBatcher
from lmforge.errors import ConfigError
from lmforge.train.checkpoint import unwrap


@dataclass
class MLMOptions:
    """`--objective_args.*` of the mlm objective.

    Args:
        mask_prob: share of (non-special) tokens to predict per sequence.
        whole_word: mask whole words (WordPiece '##' pieces together; Chinese words found by jieba).
        mask_token_prob: share of predicted tokens replaced by [MASK].
        random_token_prob: share of predicted tokens replaced by a random token (the rest stay as they are).
        max_predictions: cap on predicted tokens per sequence (None: no cap).
    """

    mask_prob: float = 0.15
    whole_word: bool = False
    mask_token_prob: float = 0.8
    random_token_prob: float = 0.1
    max_predictions: Optional[int] = None

    def masker(self, tokenizer) -> Masker:
        return Masker(tokenizer, mask_prob=self.mask_prob, whole_word=self.whole_word,
                      mask_token_prob=self.mask_token_prob, random_token_prob=self.random_token_prob,
                      max_predictions=self.max_predictions)


@dataclass
class NSPOptions(MLMOptions):
    """`--objective_args.*` of the mlm+nsp objective: the mlm options, plus

    Args:
        short_seq_prob: share of pairs built to a random shorter length (as BERT, so that the model
            also sees short inputs).
    """

    short_seq_prob: float = 0.1


def _encode(model: nn.Module, batch: dict[str, torch.Tensor], objective: str, nsp: bool = False):
    if not hasattr(unwrap(model), "mlm_logits"):
        raise ConfigError(f"objective {objective} needs an encoder with an MLM head (--arch bert), "
                          f"not {type(unwrap(model)).__name__}")
    # Through forward (not a method of the model), so that DDP sees the whole computation.
    return model(batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"],
                 mlm_positions=batch["mlm_positions"], nsp=nsp)


def _mlm_loss(out, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, accuracy) over the predicted positions."""
    targets = batch["labels"].flatten().index_select(0, batch["mlm_positions"])  # (N,)
    logits = out.mlm_logits.float()  # (N, vocab)
    loss = F.cross_entropy(logits, targets)
    acc = (logits.argmax(-1) == targets).float().mean()
    return loss, acc


class MLMObjective:
    """Masked-LM cross-entropy at the chosen positions; `ppl` = exp(loss) is the masked-token perplexity."""

    reports_perplexity = True
    heads = ("mlm",)  # the pretraining heads this objective trains (Bert.use_heads); pooler and NSP are frozen

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, acc = _mlm_loss(_encode(model, batch, "mlm"), batch)
        return loss, {"mlm_acc": acc.detach(), "loss_items": batch["mlm_positions"].new_tensor(batch["mlm_positions"].numel())}


class MLMNSPObjective:
    """BERT's pretraining loss: masked-LM cross-entropy + next-sentence cross-entropy."""

    reports_perplexity = False  # the loss is a sum of two; see mlm_loss for the masked-LM part
    heads = ("mlm", "nsp")

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = _encode(model, batch, "mlm+nsp", nsp=True)
        mlm_loss, mlm_acc = _mlm_loss(out, batch)
        nsp_logits = out.nsp_logits.float()  # (B, 2)
        nsp_loss = F.cross_entropy(nsp_logits, batch["nsp_labels"])
        nsp_acc = (nsp_logits.argmax(-1) == batch["nsp_labels"]).float().mean()
        metrics = {"mlm_loss": mlm_loss, "nsp_loss": nsp_loss, "mlm_acc": mlm_acc, "nsp_acc": nsp_acc}
        return mlm_loss + nsp_loss, {k: v.detach() for k, v in metrics.items()}


def build_mlm(ctx) -> tuple[MLMBatcher, MLMObjective]:
    """The mlm objective for the pretrain recipe (ctx: `lmforge.train.protocols.ObjectiveContext`)."""
    opts = from_dict(MLMOptions, ctx.options, "objective_args")
    batcher = MLMBatcher(opts.masker(ctx.tokenizer), ctx.train, ctx.val, seq_len=ctx.seq_len,
                         batch_size=ctx.batch_size, seed=ctx.seed, rank=ctx.rank, world_size=ctx.world_size)
    return batcher, MLMObjective()


def build_mlm_nsp(ctx) -> tuple[NSPBatcher, MLMNSPObjective]:
    """The mlm+nsp objective; the data must have been prepared with `--sentences true`."""
    opts = from_dict(NSPOptions, ctx.options, "objective_args")
    batcher = NSPBatcher(opts.masker(ctx.tokenizer), ctx.train, ctx.val, seq_len=ctx.seq_len,
                         batch_size=ctx.batch_size, seed=ctx.seed, rank=ctx.rank, world_size=ctx.world_size,
                         short_seq_prob=opts.short_seq_prob)
    return batcher, MLMNSPObjective()

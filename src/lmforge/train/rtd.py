"""Masked LM + replaced-token detection (`--objective rtd`): an ELECTRA-style objective that learns from
every token, not only from the 15% that are masked.

Clark et al. 2020, "ELECTRA: Pre-training Text Encoders as Discriminators Rather Than Generators". A
generator (an MLM) fills the masked positions with tokens sampled from its predictions; a discriminator
reads the corrupted sequence and says, for every token, whether it is the original or a replacement.
Here the generator and the discriminator are one model ("tying all weights", ELECTRA section 3.2), so the
objective trains a plain BERT and needs no second network in the checkpoint:

    1. the model reads the masked batch (the MLM batch, 80/10/10 as `mlm`): masked-LM cross-entropy
       at the chosen positions (`mlm_loss`, `mlm_acc`: the same metric on the same validation masks as
       the mlm objective, so runs of both compare directly);
    2. at every chosen position a token is sampled from those MLM logits (detached: no gradient flows
       through the sampling; temperature `temperature`); a sample equal to the original counts as original;
    3. the model reads the corrupted batch; the discriminator's logit for position i is the MLM head's
       score of the token that is there, transform(h_i) . E[x_i] + b[x_i] (the head ranks tokens for a
       context; here it judges the one present), so no new parameters are added;
    4. loss = mlm_loss + rtd_weight * rtd_loss, rtd_loss the binary cross-entropy over every real,
       non-special token (ELECTRA's lambda is 50).

Each step runs the model twice (two forward passes, one backward), about twice an mlm step. Sampling uses
torch's global generator, which the trainer seeds from (seed, step), so resuming stays exact; in eval
mode it uses a generator of its own with a fixed seed, so every validation sees the same replacements.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import from_dict
from lmforge.data.mlm import MLMBatcher
from lmforge.errors import ConfigError
from lmforge.train.checkpoint import unwrap
from lmforge.train.mlm import MLMOptions, _encode, _mlm_loss

_EVAL_SEED = 0x5EED


@dataclass
class RTDOptions(MLMOptions):
    """`--objective_args.*` of the rtd objective: the mlm options (masking), plus

    Args:
        rtd_weight: weight of the replaced-token-detection loss against the masked-LM loss.
        temperature: sampling temperature of the replacements (1: the generator's own distribution).
    """

    rtd_weight: float = 50.0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not self.rtd_weight >= 0:
            raise ConfigError(f"objective_args.rtd_weight must be >= 0, got {self.rtd_weight}")
        if not self.temperature > 0:
            raise ConfigError(f"objective_args.temperature must be > 0, got {self.temperature}")


class RTDObjective:
    """Masked LM on the masked batch + replaced-token detection on the batch the model corrupted itself."""

    reports_perplexity = False  # the loss is a weighted sum; mlm_loss is the masked-LM part
    heads = ("mlm",)

    def __init__(self, rtd_weight: float, temperature: float, special_ids: list[int]):
        self.rtd_weight, self.temperature = rtd_weight, temperature
        self.special = torch.tensor(sorted(special_ids), dtype=torch.long)

    def sample(self, logits: torch.Tensor, training: bool) -> torch.Tensor:
        """(N,) tokens drawn from softmax(logits / temperature), without gradient."""
        probs = torch.softmax(logits.detach().float() / self.temperature, dim=-1)
        generator = None
        if not training:  # the same replacements at every validation
            generator = torch.Generator(device=probs.device).manual_seed(_EVAL_SEED)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = _encode(model, batch, "rtd")
        mlm_loss, mlm_acc = _mlm_loss(out, batch)

        # the corrupted batch: the original tokens, with a sample at every chosen position
        positions = batch["mlm_positions"]
        original = torch.where(batch["labels"] >= 0, batch["labels"], batch["input_ids"])  # (B, T)
        corrupted = original.flatten().index_copy(0, positions, self.sample(out.mlm_logits, model.training))
        corrupted = corrupted.view_as(original)
        replaced = corrupted != original  # (B, T)

        hidden = model(corrupted, attention_mask=batch["attention_mask"],
                       token_type_ids=batch["token_type_ids"]).last_hidden_state  # (B, T, d)
        head = unwrap(model).cls.predictions
        words = unwrap(model).embeddings.word_embeddings.weight  # tied to the MLM decoder
        scores = (head.transform(hidden) * words[corrupted]).sum(-1) + head.bias[corrupted]  # (B, T)
        judged = batch["attention_mask"].bool() & ~torch.isin(corrupted, self.special.to(corrupted.device))
        logits = scores[judged].float()  # (M,) logit of "this token is the original"
        is_original = (~replaced[judged]).float()
        rtd_loss = F.binary_cross_entropy_with_logits(logits, is_original)
        rtd_acc = ((logits > 0).float() == is_original).float().mean()
        metrics = {"mlm_loss": mlm_loss, "mlm_acc": mlm_acc, "rtd_loss": rtd_loss, "rtd_acc": rtd_acc,
                   "replaced": replaced[judged].float().mean()}
        return mlm_loss + self.rtd_weight * rtd_loss, {k: v.detach() for k, v in metrics.items()}


def build(ctx) -> tuple[MLMBatcher, RTDObjective]:
    """The rtd objective for the pretrain recipe (ctx: `lmforge.train.protocols.ObjectiveContext`)."""
    opts = from_dict(RTDOptions, ctx.options, "objective_args")
    masker = opts.masker(ctx.tokenizer)
    batcher = MLMBatcher(masker, ctx.train, ctx.val, seq_len=ctx.seq_len, batch_size=ctx.batch_size,
                         seed=ctx.seed, rank=ctx.rank, world_size=ctx.world_size)
    special = [int(i) for i in masker.special.nonzero()[0]]
    return batcher, RTDObjective(opts.rtd_weight, opts.temperature, special)

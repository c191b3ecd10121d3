"""Sentence and sentence-pair classification: `[CLS] a [SEP] (b [SEP])` -> pooled vector -> label.

Files: tsv/csv/jsonl with a text column (and a second text for pairs) and a label column, mapped by
`--data.text / --data.text_pair / --data.label` (header names, or 0-based indices without a header).
Scored with accuracy, macro/micro F1 and per-class precision/recall/F1 (`lmforge.metrics`); for two
labels also the F1 of the second label (MRPC's published F1 with labels 0/1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import from_dict
from lmforge.data.task_batches import collate_tokens
from lmforge.errors import ConfigError, DataError
from lmforge.tasks.base import FeatureStats, TaskData, head_of


@dataclass
class ClassifyOptions:
    """The classification head (`--task_args.*`).

    Args:
        pooling: sentence vector: 'cls' (the first token's hidden state: BERT's [CLS]), 'mean' (over real
            tokens), or 'auto' (cls for a bidirectional encoder, mean for a causal model, whose first
            token sees nothing else).
        dropout: dropout on the sentence vector before the classifier.
        rdrop: R-Drop's weight (Liang et al. 2021, "R-Drop: Regularized Dropout for Neural Networks"): each
            training batch runs twice, with different dropout masks, and the loss is
            (CE_1 + CE_2 + rdrop * (KL(p_1 || p_2) + KL(p_2 || p_1)) / 2) / 2, means over examples: the
            paper's loss halved, so `rdrop` is the paper's alpha (0.1-1 for GLUE) at the usual scale of
            one cross-entropy. A step costs 1.75x as much (SST-2, measured). 0 (default): off.
    """

    pooling: Literal["auto", "cls", "mean"] = "auto"
    dropout: float = 0.1
    rdrop: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"task_args.dropout must be in [0, 1), got {self.dropout}")
        if not self.rdrop >= 0.0:
            raise ConfigError(f"task_args.rdrop must be >= 0, got {self.rdrop}")
        if self.pooling not in ("auto", "cls", "mean"):
            raise ConfigError(f"task_args.pooling must be 'auto', 'cls' or 'mean', got {self.pooling!r}")

    def resolved(self, arch: str) -> "ClassifyOptions":
        from dataclasses import replace

        if self.pooling != "auto":
            return self
        return replace(self, pooling="cls" if arch == "bert" else "mean")


def rdrop_loss(first: torch.Tensor, second: torch.Tensor, labels: torch.Tensor,
               alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(R-Drop's loss, the symmetric KL) for two passes' logits (B, C) of one batch (see
    ClassifyOptions.rdrop); rows labelled -100 count in neither."""
    ce = (F.cross_entropy(first, labels) + F.cross_entropy(second, labels)) / 2
    keep = labels >= 0
    log_p, log_q = first[keep].log_softmax(-1), second[keep].log_softmax(-1)
    # F.kl_div(log q, log p, log_target=True) = KL(p || q); batchmean: the mean over examples
    kl = (F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
          + F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")) / 2
    return ce + alpha * kl / 2, kl


class ClassifyHead(nn.Module):
    def __init__(self, d_model: int, n_labels: int, options: ClassifyOptions):
        super().__init__()
        from lmforge.models.heads import SequenceClassifier

        self.classifier = SequenceClassifier(d_model, n_labels, dropout=options.dropout, pooling=options.pooling)
        self.rdrop = options.rdrop  # read by ClassifyTask.loss

    def forward(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.classifier(hidden, batch["attention_mask"])  # (B, n_labels)


class ClassifyTask:
    """The task record for `classify` (one text) and `pair` (two texts)."""

    default_metric = "accuracy"
    reports_perplexity = False

    def __init__(self, name: str, pair: bool):
        self.name = name
        self.pair = pair

    # -- reading -------------------------------------------------------------------------------
    def options(self, values: dict[str, Any] | None) -> ClassifyOptions:
        return from_dict(ClassifyOptions, values, "task_args")

    def check_data(self, data: TaskData) -> None:
        if self.pair and data.text_pair is None:
            raise ConfigError("task pair needs data.text_pair: the column of the second sentence")
        if not self.pair and data.text_pair is not None:
            raise ConfigError("data.text_pair is given: use --task pair for sentence pairs")

    def check_model(self, arch: str, backbone: nn.Module, options: ClassifyOptions) -> None:
        if options.rdrop > 0 and not (options.dropout > 0 or any(
                getattr(backbone.config, k, 0) for k in ("dropout", "attn_dropout"))):
            raise ConfigError("task_args.rdrop compares two dropout passes, but every dropout rate is 0 (model.dropout, "
                              "model.attn_dropout, task_args.dropout): set one of them above 0, or task_args.rdrop 0")

    def read(self, path: str, data: TaskData, labelled: bool = True) -> list:
        from lmforge.data.readers import read_table

        return read_table(path, text=data.text, text_pair=data.text_pair if self.pair else None,
                          label=data.label if labelled else None, header=data.header)

    def label_names(self, examples: Sequence, path: str = "training split") -> list[str]:
        from lmforge.data.readers import LabelSet

        return list(LabelSet.from_examples(examples, path).names)

    def check_labels(self, examples: Sequence, labels: list[str], path: str) -> None:
        from lmforge.data.readers import LabelSet

        LabelSet(list(labels)).check(examples, path)

    def examples_from(self, inputs: Sequence[dict[str, Any]], data: TaskData) -> list:
        from lmforge.data.readers import Example

        out = []
        for i, item in enumerate(inputs):
            text = item.get("text") if isinstance(item, dict) else None
            pair = item.get("text_pair") if isinstance(item, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"input {i}: 'text' must be a non-empty string")
            if self.pair and (not isinstance(pair, str) or not pair.strip()):
                raise DataError(f"input {i}: this model classifies sentence pairs; give 'text_pair' too")
            out.append(Example(text=text, text_pair=pair if self.pair else None, label=None, where=f"input {i}"))
        return out

    # -- features and batches ------------------------------------------------------------------
    def featurize(self, examples: Sequence, tokenizer, labels: list[str] | None, data: TaskData):
        enc = tokenizer.encode_for_model([ex.text for ex in examples],
                                         [ex.text_pair for ex in examples] if self.pair else None,
                                         max_length=data.max_length, padding=False)
        index = {name: i for i, name in enumerate(labels or [])}
        stats = FeatureStats(examples=len(examples), truncated=sum(enc["truncated"]))
        features = [{"input_ids": ids, "token_type_ids": types,
                     "label": index.get(ex.label, -100) if ex.label is not None else -100}
                    for ex, ids, types in zip(examples, enc["input_ids"], enc["token_type_ids"])]
        return features, stats

    def collate(self, features: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
        batch = collate_tokens(features, pad_id)
        batch["labels"] = torch.tensor([f["label"] for f in features], dtype=torch.long)
        return batch

    # -- model ---------------------------------------------------------------------------------
    def head(self, d_model: int, n_labels: int, options: ClassifyOptions, labels: Sequence[str] | None = None) -> nn.Module:
        return ClassifyHead(d_model, n_labels, options)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        labels = batch["labels"]
        alpha = getattr(head_of(model), "rdrop", 0.0)
        if alpha and model.training:  # R-Drop: both passes in one forward over the batch twice
            logits, second = model({k: torch.cat([v, v]) for k, v in batch.items()}).float().chunk(2)
            loss, kl = rdrop_loss(logits, second, labels, alpha)
            metrics = {"rdrop_kl": kl.detach()}
        else:
            logits = model(batch).float()
            loss, metrics = F.cross_entropy(logits, labels), {}
        acc = (logits.argmax(-1) == labels).float().mean()
        return loss, {"acc": acc.detach(), **metrics, "loss_items": (labels >= 0).sum()}

    def decode(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        """([(label id, probabilities), ...], summed loss over labelled examples or None)."""
        logits = model(batch).float()
        probs = logits.softmax(-1)
        labels = batch.get("labels")
        loss = None
        if labels is not None and bool((labels >= 0).any()):
            loss = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
        pred = probs.argmax(-1)
        return [(int(p), row) for p, row in zip(pred.tolist(), probs.tolist())], loss

    # -- scoring and output --------------------------------------------------------------------
    def metric(self, labels: list[str]):
        from lmforge.metrics import ClassificationMetrics

        return ClassificationMetrics(list(labels))

    def update(self, metric, predictions: Sequence, examples: Sequence, labels: list[str]) -> None:
        index = {name: i for i, name in enumerate(labels)}
        metric.update([p[0] for p in predictions], [index[ex.label] for ex in examples])

    def output(self, prediction, example, labels: list[str]) -> dict[str, Any]:
        label_id, probs = prediction
        return {"label": labels[label_id], "score": probs[label_id],
                "probs": {name: p for name, p in zip(labels, probs)}}


CLASSIFY = ClassifyTask("classify", pair=False)
PAIR = ClassifyTask("pair", pair=True)

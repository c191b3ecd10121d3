"""What every task shares: the task record's shape, tokenizing with truncation, the evaluation pass
(loss and metrics in one streaming pass) and the `Predictor` that serves a fine-tuned model.

A task record (`classify.CLASSIFY`, `tag.TAG`, ...) provides:

    name, default_metric           'classify', 'accuracy'
    read(path, data)               file -> examples (lmforge.data.readers), checked against the data config
    label_names(examples)          the label set, from the training split only
    check_labels(examples, labels, path)   a dev/test label never seen in training is an error
    featurize(examples, tok, labels, data) -> (features, stats)   python lists, no tensors
    collate(features, pad_id)      -> batch of tensors
    head(d_model, n_labels, options)  -> nn.Module taking (hidden, batch)
    loss(model, batch)             -> (loss, metrics): the trainer's Objective
    decode(model, batch)           -> (predictions per example, summed loss or None)
    metric(labels)                 -> a streaming metric (lmforge.metrics)
    update(metric, predictions, examples, labels)
    output(prediction, example, labels) -> a JSON-able dict (predict, serve)

and optionally:

    default_max_length             data.max_length when not given (default 128; capped by the model)
    backbone_heads                 pretraining heads the task trains (seq2seq: ('lm',))
    resolve_options(options, train_examples)  fill 'auto' options from the training split
    gather(predictions, examples)  per-feature predictions -> per-example ones (qa: windows -> answer)
    bind(model, tokenizer)         give the head what it needs from the tokenizer (seq2seq)
    check_model(arch, backbone, options)
                                   refuse a backbone the task cannot use with these options (seq2seq:
                                   needs a causal LM; classify: R-Drop needs a dropout above 0)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from lmforge.checkpoints import unwrap
from lmforge.errors import CheckpointError, ConfigError

Column = Union[str, int]


@dataclass
class TaskData:
    """Where a task's data is and how to read it.

    Args:
        train: training file (tsv/csv/jsonl for classify/pair, CoNLL/BMES for tag).
        dev: development file, evaluated every `train.eval_every` steps (best checkpoint, early stopping).
        test: an optional labelled test file, evaluated once at the end with the best checkpoint.
        text: column of the text: a header name, or a 0-based index for files without a header.
        text_pair: column of the second text (pair task).
        label: column of the label.
        header: whether the table files start with a header row (None: detect).
        word_col: tag task: column of the word in CoNLL lines (0-based; -1 is the last).
        tag_col: tag task: column of the tag.
        scheme: tag task: tagging scheme of the files (auto, IOB1, IOB2, BIOES, BMES); tags are converted to IOB2.
        max_length: tokens per example including special tokens; longer inputs are truncated (and counted)
            (default: the model's context length, at most 128; qa: at most 384).
        doc_stride: qa task: tokens between the starts of a long context's windows (default: half a
            window); longer than a window would skip text and is an error.
        max_query_length: qa task: questions are cut to this many tokens.
        source: seq2seq task: the prompt column/key of a table (default 0, or "prompt" in jsonl), or the
            suffix of the prompt file of two line-aligned files PATH.SOURCE / PATH.TARGET (e.g. en).
        target: seq2seq task: the response column/key (default 1, or "response"), or the suffix of the
            response file (e.g. de).
        separator: seq2seq task: text put between prompt and response ('auto': the tokenizer's [SEP],
            else its end-of-text token).
    """

    train: str = ""
    dev: Optional[str] = None
    test: Optional[str] = None
    text: Column = "text"
    # typed without Optional: jsonargparse reads an Optional value starting with '#' (MRPC's "#2 String") as
    # a YAML comment, i.e. None; "" means no second text
    text_pair: Column = ""
    label: Column = "label"
    header: Optional[bool] = None
    word_col: int = 0
    tag_col: int = -1
    scheme: str = "auto"
    max_length: Optional[int] = None
    doc_stride: Optional[int] = None
    max_query_length: int = 64
    source: Optional[Column] = None
    target: Optional[Column] = None
    separator: str = "auto"

    def __post_init__(self) -> None:
        if self.text_pair == "":
            self.text_pair = None
        if self.max_length is not None and self.max_length < 3:
            raise ConfigError(f"data.max_length must be at least 3 (room for special tokens), got {self.max_length}")
        if self.doc_stride is not None and self.doc_stride < 1:
            raise ConfigError(f"data.doc_stride must be at least 1 token, got {self.doc_stride}")
        if self.max_query_length < 1:
            raise ConfigError(f"data.max_query_length must be at least 1 token, got {self.max_query_length}")
        for name in ("text", "text_pair", "label", "source", "target"):
            value = getattr(self, name)
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                setattr(self, name, int(value))


@dataclass
class FeatureStats:
    """What featurizing did to the examples (reported, never silent)."""

    examples: int = 0
    truncated: int = 0  # examples cut to max_length
    words_dropped: int = 0  # tag task: words past max_length (predicted 'O'; still scored)
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"examples": self.examples, "truncated": self.truncated, "words_dropped": self.words_dropped,
                **self.extra}


def pad_id_of(tokenizer) -> int:
    pad = tokenizer.pad_id
    return 0 if pad is None else pad


def hidden_size(backbone: nn.Module) -> int:
    """The width of `backbone.encode`'s output: the model's own `hidden_size` when it has one (a recurrent
    model), else its config's d_model."""
    own = getattr(backbone, "hidden_size", None)
    if isinstance(own, int):
        return own
    cfg = backbone.config
    for name in ("d_model", "d_hidden", "hidden_size"):
        if hasattr(cfg, name):
            return int(getattr(cfg, name))
    raise ConfigError(f"{type(backbone).__name__}: cannot tell its hidden size")


def backbone_of(model: nn.Module) -> nn.Module:
    """The backbone of a task model (or the model itself), under any DDP / torch.compile wrapper."""
    model = unwrap(model)
    return getattr(model, "backbone", model)


def head_of(model: nn.Module) -> nn.Module | None:
    """The head of a task model under any DDP / torch.compile wrapper (a task's loss reaches its head's
    parts, such as the CRF, through this: under torchrun `model` is the DDP wrapper), or None."""
    return getattr(unwrap(model), "head", None)


@torch.no_grad()
def evaluate_features(task, model: nn.Module, examples: Sequence, features: Sequence[dict], labels: list[str],
                      collate, batch_size: int, device: torch.device, autocast=None) -> tuple[dict[str, Any], list]:
    """Loss and the task's metric over `features` in one streaming pass (nothing keeps logits).

    Returns (metrics, predictions in example order). Examples without features (none today) are scored
    as wrong by the task's `update`."""
    from contextlib import nullcontext

    from lmforge.data.task_batches import eval_batches
    from lmforge.train.trainer import to_device

    was_training = model.training
    model.eval()
    metric = task.metric(labels)
    predictions: list = [None] * len(features)
    loss_sum, n = 0.0, 0
    for idx, batch in eval_batches(features, collate, batch_size):
        batch = to_device(batch, device)
        with autocast or nullcontext():
            preds, loss = task.decode(model, batch)
        if loss is not None:
            loss_sum += float(loss)
            n += len(idx)
        for i, p in zip(idx, preds):
            predictions[i] = p
    task.update(metric, predictions, examples, labels)
    model.train(was_training)
    out = metric.compute()
    if n:
        out["loss"] = loss_sum / n
    return out, predictions


def scalar_metrics(values: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metric dict that belong on one log line (no per-class tables)."""
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class Predictor:
    """A fine-tuned task model ready to predict: `predict([{"text": ...}, ...]) -> [dict, ...]`.

    Attributes:
        task: the task's name ('classify', 'pair', 'tag').
        labels: the label names, in the head's order.
        config: the run config saved with the checkpoint.
    """

    def __init__(self, record, model: nn.Module, tokenizer, config: dict[str, Any], checkpoint: Path,
                 device: torch.device):
        self.record = record
        self.task = record.name
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.checkpoint = checkpoint
        self.device = device
        self.labels: list[str] = list(config["task"]["labels"])
        self.data = TaskData(**{k: v for k, v in (config.get("data") or {}).items() if k in TaskData.__dataclass_fields__})
        self.pad_id = pad_id_of(tokenizer)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "Predictor":
        ckpt = task_checkpoint(path)
        model, tokenizer, config = load_task_checkpoint(ckpt, device)
        from lmforge.tasks import get_task

        return cls(get_task(config["task"]["name"]), model, tokenizer, config, ckpt, torch.device(device))

    @torch.no_grad()
    def predict(self, inputs: Sequence[dict[str, Any]], batch_size: int = 32) -> list[dict[str, Any]]:
        """One output dict per input dict (see the task's `output`)."""
        examples = self.record.examples_from(inputs, self.data)
        features, _ = self.record.featurize(examples, self.tokenizer, None, self.data)
        from lmforge.data.task_batches import eval_batches
        from lmforge.train.trainer import to_device

        self.model.eval()
        preds: list = [None] * len(features)
        collate = lambda fs: self.record.collate(fs, self.pad_id)  # noqa: E731
        for idx, batch in eval_batches(features, collate, batch_size):
            out, _ = self.record.decode(self.model, to_device(batch, self.device))
            for i, p in zip(idx, out):
                preds[i] = p
        if hasattr(self.record, "gather"):  # several features per example (qa: context windows)
            preds = self.record.gather(preds, examples)
        return [self.record.output(p, ex, self.labels) for p, ex in zip(preds, examples)]


def task_checkpoint(path: str | Path) -> Path:
    """The checkpoint a task verb reads: the path itself, else a run's `best/` (when it kept one), else
    its newest step checkpoint."""
    from lmforge.train.checkpoint import find_checkpoint

    path = Path(path)
    if not (path / "model.safetensors").is_file() and (path / "best" / "model.safetensors").is_file():
        return find_checkpoint(path / "best")
    return find_checkpoint(path)


def load_task_checkpoint(ckpt: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Any, dict[str, Any]]:
    """(TaskModel in eval mode, tokenizer, run config) of a fine-tuned checkpoint."""
    from lmforge.config import load_yaml
    from lmforge.models import build_model
    from lmforge.models.task_model import TaskModel
    from lmforge.tasks import get_task
    from lmforge.text.tokenizer import Tokenizer
    from lmforge.train.checkpoint import load_model_state

    config = load_yaml(ckpt / "config.yaml")
    task_cfg = config.get("task")
    if not task_cfg:
        raise CheckpointError(f"{ckpt}: not a fine-tuned task model (its config.yaml has no 'task' section); "
                              f"fine-tune it first with `lmforge finetune --init_from {ckpt}`")
    record = get_task(task_cfg["name"])
    backbone = build_model(config["arch"], config["model"])
    head = record.head(hidden_size(backbone), len(task_cfg["labels"]), record.options(task_cfg.get("options")),
                       task_cfg["labels"])
    model = TaskModel(backbone, head)
    load_model_state(model, ckpt)
    tokenizer = Tokenizer.load(ckpt / "tokenizer.json")
    if hasattr(record, "bind"):  # a head that needs the tokenizer (seq2seq: end token, decoding text)
        record.bind(model, tokenizer)
    return model.to(device).eval(), tokenizer, config

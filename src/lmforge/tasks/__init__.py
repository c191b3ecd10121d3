"""Fine-tuning tasks. A task is one file holding one record (see `lmforge.tasks.base.Task`): how to read
its files, featurize examples with the tokenizer, the head, the loss (the trainer's Objective), how to
decode predictions and which metric scores them.

    classify  sentence classification            (tsv/csv/jsonl: text, label)
    pair      sentence-pair classification       (tsv/csv/jsonl: text, text_pair, label)
    tag       token classification, linear/CRF   (CoNLL BIO/IOB1/BIOES, Chinese BMES)
    qa        extractive question answering      (SQuAD json, CMRC 2018 json; EM/F1 by the official rules)
    seq2seq   generation fine-tuning of a GPT    (prompt/response tsv/jsonl or two line-aligned files; BLEU)

`load_task_model(path)` reads a fine-tuned run or checkpoint for prediction and serving.
"""
from __future__ import annotations

import importlib

from lmforge.config import closest
from lmforge.errors import ConfigError

# task name -> "module:record"
TASKS: dict[str, str] = {
    "classify": "lmforge.tasks.classify:CLASSIFY",
    "pair": "lmforge.tasks.classify:PAIR",
    "tag": "lmforge.tasks.tag:TAG",
    "qa": "lmforge.tasks.qa:QA",
    "seq2seq": "lmforge.tasks.seq2seq:SEQ2SEQ",
}


def get_task(name: str):
    """The task record registered under `name`."""
    if name not in TASKS:
        raise ConfigError(f"unknown task '{name}'{closest(name, TASKS)}; tasks: {', '.join(TASKS)}")
    module, attr = TASKS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def load_task_model(path, device="cpu"):
    """A `Predictor` for a fine-tuned run (its best checkpoint when it kept one) or checkpoint directory."""
    from lmforge.tasks.base import Predictor

    return Predictor.load(path, device)

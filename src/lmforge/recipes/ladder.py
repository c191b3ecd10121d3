"""`lmforge ladder`: the history of language modelling on one dataset, in one report.

n-gram (Kneser-Ney, the best order) -> plain RNN -> GRU -> LSTM -> Transformer (GPT), every rung trained
on the same prepared token shards and scored on the same validation windows (those `pretrain` validates
on: consecutive `seq_len`-token windows of the validation split, each token predicted from the tokens
before it in its window), in nats per token. The neural rungs have about the same number of parameters
(the GPT's; the recurrent hidden size is solved for it) and the same wall-time budget: a short probe
measures each rung's steps per second, and its run gets as many steps as fit in `budget_s` (with its
own cosine schedule). The n-gram rung is counted, once per order, and the best order is kept.

Writes OUT/report.md, OUT/report.json and OUT/val_loss_vs_time.png, and one ordinary run directory per
rung (OUT/ngram, OUT/rnn, ...) that every verb reads (`lmforge generate OUT/gru`).

This module also holds the n-gram model's `pretrain` (`lmforge pretrain --arch ngram`): count the train
split, score the validation split, write a run directory with one checkpoint.
"""
from __future__ import annotations

import io
import json
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from lmforge.config import from_dict, load_yaml, preset_path, save_yaml, to_dict
from lmforge.errors import ConfigError
from lmforge.recipes.pretrain import DataConfig, resolve_model_config
from lmforge.storage import atomic_write_bytes, atomic_write_json, atomic_write_text
from lmforge.train.config import TrainConfig

RUNGS = ("ngram", "rnn", "gru", "lstm", "gpt")
EVAL_WINDOWS = 256  # validation windows scored per forward pass


# ---- scoring: the validation windows of `pretrain`, for every kind of model ---------------------------------
def val_windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """(n, seq_len + 1) int64: the windows `CLMBatcher.val_batches` yields (consecutive, non-overlapping
    targets; inputs are [:, :-1], targets [:, 1:])."""
    n = (len(tokens) - 1) // seq_len
    starts = np.arange(n, dtype=np.int64) * seq_len
    return np.asarray(tokens)[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64)


@torch.no_grad()
def val_nats(model: torch.nn.Module, windows: np.ndarray, device: str | torch.device = "cpu") -> float:
    """Mean negative log-likelihood per target token (nats) of `model` over `windows`."""
    from lmforge.models.ngram import NGramLM

    model.eval()
    total, count = 0.0, 0
    for b in range(0, len(windows), EVAL_WINDOWS):
        chunk = torch.from_numpy(windows[b:b + EVAL_WINDOWS]).to(device)
        x, y = chunk[:, :-1], chunk[:, 1:]
        if isinstance(model, NGramLM):
            logp = model.token_logprobs(x, y)
        else:
            logp = model(x).float().log_softmax(-1).gather(-1, y[..., None])[..., 0]
        total -= float(logp.double().sum())
        count += y.numel()
    return total / max(count, 1)


# ---- the n-gram rung, also `lmforge pretrain --arch ngram` ----------------------------------------------------
def pretrain_ngram(
    data: DataConfig,
    model: Optional[dict[str, Any]] = None,
    objective: str = "clm",
    objective_args: Optional[dict[str, Any]] = None,
    train: Optional[TrainConfig] = None,
    name: Optional[str] = None,
    runs_dir: str = "runs",
    resume: Optional[str] = None,
    init_from: Optional[str] = None,
) -> dict[str, Any]:
    """Count an n-gram model from prepared shards into RUNS_DIR/NAME (what `pretrain --arch ngram` runs).

    The arguments are `pretrain`'s; an n-gram model is a causal LM counted in one pass, so the objective
    must be clm, and --resume, --init_from and --objective_args do not apply. Of `train` only `threads`
    is used. The validation split is scored on pretrain's windows of `data.seq_len` tokens (default 128).
    """
    from lmforge.data.shards import open_prepared

    if objective != "clm":
        raise ConfigError(f"an n-gram model is a causal language model: objective must be clm, got {objective!r}")
    if init_from is not None:
        raise ConfigError("--init_from: an n-gram model is counted from the data, not trained from a base; drop --init_from")
    if resume is not None:
        raise ConfigError("--resume: an n-gram model is counted in one pass (seconds); there is nothing to resume")
    if objective_args:
        raise ConfigError(f"objective_args: an n-gram model takes none, got {sorted(objective_args)}")
    data = data or DataConfig()
    if not data.path:
        raise ConfigError("data.path is required: a directory written by `lmforge prepare` (--data.path DIR)")
    train = train or TrainConfig()
    if train.threads:
        torch.set_num_threads(train.threads)
    train_split, val_split, tokenizer = open_prepared(data.path)
    cfg, seq_len = resolve_model_config("ngram", model, tokenizer.vocab_size, data.seq_len)
    name = name or f"ngram-{cfg.order}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(runs_dir) / name
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        raise ConfigError(f"{run_dir} already holds checkpoints; choose another --name")
    net, count_s = _count(train_split.tokens, cfg)
    val = {}
    if val_split is not None and len(val_split.tokens) > seq_len:
        loss = val_nats(net, val_windows(val_split.tokens, seq_len))
        val = {"loss": loss, "ppl": math.exp(min(loss, 50.0))}
    checkpoint = _write_ngram_run(run_dir, net, tokenizer, data.path, seq_len, train, count_s, len(train_split.tokens), val)
    print(f"{net.describe()}; counted {len(train_split.tokens):,} tokens in {count_s:.1f} s; run dir {run_dir}")
    if val:
        print(f"done: val loss {val['loss']:.4f}  ppl {val['ppl']:.4f}")
    print(f"checkpoint {checkpoint}")
    return {"run_dir": str(run_dir), "checkpoint": str(checkpoint), "step": 0, "val": val,
            "train_tokens_per_s": len(train_split.tokens) / max(count_s, 1e-9), "count_s": count_s}


def _count(tokens: np.ndarray, cfg) -> tuple[Any, float]:
    from lmforge.models.ngram import NGramLM

    start = time.perf_counter()
    net = NGramLM.count(np.asarray(tokens), cfg)
    return net, time.perf_counter() - start


def _write_ngram_run(run_dir: Path, net, tokenizer, data_path: str, seq_len: int, train: TrainConfig,
                     count_s: float, n_tokens: int, val: dict[str, float]) -> Path:
    """config.yaml, metrics.jsonl and checkpoints/step-0 (no gradient steps: counted once)."""
    from lmforge.train.checkpoint import save_checkpoint

    run_config = {"name": run_dir.name, "arch": "ngram", "model": to_dict(net.config), "objective": "clm",
                  "objective_args": {}, "data": {"path": str(data_path), "seq_len": seq_len}, "train": to_dict(train)}
    run_dir.mkdir(parents=True, exist_ok=True)
    save_yaml(run_config, run_dir / "config.yaml")
    lines = [{"step": 0, "split": "train", "count_s": count_s, "tokens": n_tokens}]
    if val:
        lines.append({"step": 0, "split": "val", **val})
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(ln) + "\n" for ln in lines))
    return save_checkpoint(run_dir / "checkpoints" / "step-0", model=net, config=run_config, tokenizer=tokenizer)

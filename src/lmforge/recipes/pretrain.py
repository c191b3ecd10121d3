"""`lmforge pretrain`: prepared token shards -> a trained base model in `runs/<name>/`.

Reads top to bottom: resolve the config, open the data, build the model and the objective, train,
report. The objective (clm, mlm, mlm+nsp, simcse, rtd) is looked up by name; the trainer is the same.
"""
from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch

from lmforge.config import closest, to_dict
from lmforge.errors import ConfigError
from lmforge.train.config import TrainConfig

# objective name -> "module:builder"; builder(ctx: ObjectiveContext) -> (Batcher, Objective)
OBJECTIVES: dict[str, str] = {
    "clm": "lmforge.train.clm:build",
    "mlm": "lmforge.train.mlm:build_mlm",
    "mlm+nsp": "lmforge.train.mlm:build_mlm_nsp",
    "simcse": "lmforge.train.simcse:build",
    "rtd": "lmforge.train.rtd:build",
}


@dataclass
class DataConfig:
    """Where the training data is.

    Args:
        path: a directory written by `lmforge prepare` (token shards + index.json + tokenizer.json).
        seq_len: tokens per training sequence (default: the model's context length, else 128).
    """

    path: str = ""
    seq_len: Optional[int] = None

    def __post_init__(self) -> None:
        if self.seq_len is not None and self.seq_len < 1:
            raise ConfigError(f"data.seq_len must be at least 1, got {self.seq_len}")


# what a run writes in its folder (and --overwrite removes); anything else there is left alone
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "checkpoints", "tensorboard", "loss.png", "best")


def run_directory(runs_dir: str, name: str, *, resume: Optional[str], overwrite: bool,
                  rank: int = 0) -> tuple[Path, Optional[str]]:
    """RUNS_DIR/NAME and the checkpoint to resume from, checked before any work starts.

    NAME must stay inside RUNS_DIR. `resume` 'latest' continues the run's newest complete checkpoint, or
    starts it from step 0 when there is none yet (a run killed before its first save); a path must be a
    complete checkpoint. Without `resume`, a run that already holds checkpoints is refused unless
    `overwrite` (then the old run's outputs, RUN_OUTPUTS, are removed once the new run starts; other
    files in the folder are never touched). The temporary folders a killed run left behind are removed
    first (rank 0).
    """
    from lmforge.train.checkpoint import clean_stale_checkpoints, find_checkpoint, step_checkpoints

    runs = Path(runs_dir)
    run_dir = runs / name
    inside = run_dir.resolve()
    if not name or Path(name).is_absolute() or inside == runs.resolve() or not inside.is_relative_to(runs.resolve()):
        raise ConfigError(f"name: {name!r} must be a folder name inside --runs_dir {runs_dir} (no '..', not absolute)")
    if resume is not None and overwrite:
        raise ConfigError("--resume continues a run and --overwrite replaces it: give one of them")
    if rank == 0 and run_dir.is_dir():
        from lmforge.storage import clean_temporaries

        for note in clean_stale_checkpoints(run_dir) + clean_temporaries(run_dir):
            print(f"note: {note} (left by a run that was stopped)", flush=True)
    if resume in ("latest", "true", "True"):
        if not step_checkpoints(run_dir):
            print(f"note: {run_dir} holds no complete checkpoint yet; starting it from step 0", flush=True)
            return run_dir, None
        return run_dir, str(run_dir)
    if resume is not None:
        find_checkpoint(resume)  # a clear error now rather than after the run folder exists
        return run_dir, resume
    if rank == 0 and run_dir.exists():
        if not run_dir.is_dir():
            raise ConfigError(f"{run_dir}: exists and is a file; a run is a folder (choose another --name)")
        found = step_checkpoints(run_dir)
        if found and not overwrite:
            raise ConfigError(f"{run_dir} already holds checkpoints (newest {found[-1].name}); pass --resume latest "
                              f"to continue it, --overwrite to start it again, or another --name")
        if not found and not overwrite and (run_dir / "config.yaml").is_file():
            print(f"note: {run_dir} holds a run that stopped before its first checkpoint; starting it again", flush=True)
    return run_dir, None


def _objective_builder(name: str):
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective '{name}'{closest(name, OBJECTIVES)}; supported: {', '.join(OBJECTIVES)}")
    module, func = OBJECTIVES[name].split(":")
    return getattr(importlib.import_module(module), func)


def resolve_model_config(arch: str, model: dict[str, Any] | None, vocab_size: int, seq_len: int | None):
    """The arch's config with the vocabulary size and context length filled in from the data."""
    from lmforge.models import model_config

    values = dict(model or {})
    values.setdefault("vocab_size", vocab_size)
    if values["vocab_size"] < vocab_size:
        raise ConfigError(f"model.vocab_size={values['vocab_size']} is smaller than the tokenizer's {vocab_size}")
    cfg = model_config(arch, values)
    ctx_len = getattr(cfg, "context_length", None)  # None: no fixed context (LSTM)
    if ctx_len is not None:
        ctx_field = type(cfg).context_field
        if seq_len is None:
            seq_len = ctx_len if ctx_field in values else min(ctx_len, 128)
        if ctx_field not in values:
            cfg = replace(cfg, **{ctx_field: seq_len})
        elif seq_len > ctx_len:
            raise ConfigError(f"data.seq_len={seq_len} exceeds model.{ctx_field}={ctx_len}")
    return cfg, seq_len or 128


def _load_base(init_from: str, tokenizer, model: dict[str, Any] | None):
    """(pretrained model, its arch, its model config) for `init_from`, checked against the data's tokenizer."""
    from lmforge.checkpoints import load_model

    if model:
        raise ConfigError("--init_from takes the model config from the checkpoint; do not also give --model.*")
    base, base_tok, base_cfg = load_model(init_from)
    if base_cfg["arch"] == "ngram":
        raise ConfigError(f"--init_from {init_from}: an n-gram model is a table of counts, not weights to train "
                          f"further; start from a gpt, bert or lstm run")
    if base_tok.hash != tokenizer.hash:
        raise ConfigError(f"--init_from {init_from}: its tokenizer differs from the one the data was prepared with; "
                          f"prepare the data with {init_from}'s tokenizer.json")
    return base, base_cfg["arch"], dict(base_cfg["model"])


def pretrain(
    data: DataConfig = DataConfig(),
    arch: str = "gpt",
    model: Optional[dict[str, Any]] = None,
    objective: str = "clm",
    objective_args: Optional[dict[str, Any]] = None,
    train: TrainConfig = TrainConfig(),
    name: Optional[str] = None,
    runs_dir: str = "runs",
    resume: Optional[str] = None,
    init_from: Optional[str] = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Pretrain a model on prepared token shards.

    Args:
        data: the prepared data (`--data.path DIR`, `--data.seq_len N`).
        arch: model architecture: gpt, bert, lstm (recurrent: --model.cell rnn|gru|lstm) or ngram
            (Kneser-Ney n-gram, --model.order N: counted, not trained; see lmforge.recipes.ladder).
        model: the architecture's config fields (`--model.n_layer 4 --model.d_model 128 ...`).
        objective: clm (causal LM), mlm, mlm+nsp, simcse or rtd (masked LM + replaced-token detection).
        objective_args: the objective's options (`--objective_args.whole_word true`).
        train: the training loop's config (`--train.lr 3e-4 --train.max_steps 2000 ...`).
        name: run name; outputs go to RUNS_DIR/NAME (default: ARCH-OBJECTIVE-TIMESTAMP).
        runs_dir: where run directories are created.
        resume: continue a stopped run exactly: 'latest' (this run's newest complete checkpoint; a run
            with none yet starts from step 0) or a checkpoint path.
        init_from: start from pretrained weights instead of a random init: an lmforge run or checkpoint
            directory, a transformers directory or a named source (`minilm-l6`). Its arch and model
            config are used (`--arch`/`--model.*` must not be given), and the data must have been
            prepared with its tokenizer.
        overwrite: start again in a run directory that already holds a run (the old run is deleted when
            the new one starts).
    """
    from lmforge.data.shards import open_prepared
    from lmforge.models import build_model
    from lmforge.train.distributed import apply_activation_checkpointing, apply_parallel, end_distributed, setup_distributed
    from lmforge.train.protocols import ObjectiveContext
    from lmforge.train.config import check_device
    from lmforge.train.trainer import Trainer, resolve_device

    if arch == "ngram":  # counted from the shards, not trained by gradient steps
        from lmforge.recipes.ladder import pretrain_ngram

        return pretrain_ngram(data, model, objective, objective_args, train, name, runs_dir, resume, init_from)
    train_cfg = train or TrainConfig()
    data = data or DataConfig()
    if not data.path:
        raise ConfigError("data.path is required: a directory written by `lmforge prepare` (--data.path DIR)")
    builder = _objective_builder(objective)
    check_device(train_cfg.device, "train.device")
    if train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)

    rank, world_size, local_rank = setup_distributed()
    if world_size > 1 and train_cfg.device in ("auto", "cuda") and torch.cuda.is_available():
        train_cfg = replace(train_cfg, device=f"cuda:{local_rank}")

    train_split, val_split, tokenizer = open_prepared(data.path)
    base = None
    if init_from is not None:
        base, arch, model = _load_base(init_from, tokenizer, model)
    model_cfg, seq_len = resolve_model_config(arch, model, tokenizer.vocab_size, data.seq_len)
    name = name or f"{arch}-{objective.replace('+', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir, resume = run_directory(runs_dir, name, resume=resume, overwrite=overwrite, rank=rank)

    run_config = {
        "name": name,
        "arch": arch,
        "model": to_dict(model_cfg),
        "objective": objective,
        "objective_args": dict(objective_args or {}),
        "data": {"path": str(data.path), "seq_len": seq_len},
        "train": to_dict(train_cfg),
    }
    ctx = ObjectiveContext(tokenizer=tokenizer, train=train_split, val=val_split, seq_len=seq_len,
                           batch_size=train_cfg.batch_size, seed=train_cfg.seed, rank=rank,
                           world_size=world_size, options=objective_args)
    batcher, obj = builder(ctx)

    torch.manual_seed(train_cfg.seed)
    net = build_model(arch, model_cfg) if base is None else base  # base: already built and loaded
    if base is not None:
        run_config["init_from"] = str(init_from)
    if getattr(obj, "heads", None) is not None and hasattr(net, "use_heads"):
        net.use_heads(*obj.heads)  # heads the objective does not run are frozen: DDP needs no static graph
    if train_cfg.activation_checkpointing:
        try:
            apply_activation_checkpointing(net, every=train_cfg.activation_checkpointing)
        except ValueError:
            raise ConfigError(f"train.activation_checkpointing: arch {arch} has no Transformer blocks to checkpoint") from None
    def parallelize(m):  # DDP or FSDP2 (train.parallel); torch.compile is applied by the trainer, to the whole loss
        return apply_parallel(m, train_cfg.parallel, resolve_device(train_cfg.device), world_size)

    trainer = Trainer(net, obj, batcher, train_cfg, run_dir, run_config=run_config, tokenizer=tokenizer,
                      rank=rank, world_size=world_size, parallelize=parallelize)
    if resume is not None:  # a changed global batch or data is refused before the run folder is touched
        trainer.check_resume(resume)
    if rank == 0:  # everything is checked: only now is the run folder written
        import shutil

        from lmforge.config import save_yaml

        for old in (run_dir / n for n in RUN_OUTPUTS if overwrite):
            shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(run_config, run_dir / "config.yaml")
        describe = net.describe() if hasattr(net, "describe") else type(net).__name__
        print(f"{describe}; objective {objective}; {train_cfg.max_steps} steps of "
              f"{batcher.tokens_per_batch * train_cfg.grad_accum * world_size:,} tokens; "
              f"device {resolve_device(train_cfg.device)}; run dir {run_dir}", flush=True)
    result = trainer.fit(resume=resume)
    summary = {
        "run_dir": str(run_dir),
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "step": result.step,
        "val": result.val,
        "train_tokens_per_s": result.train_tokens_per_s,
    }
    if rank == 0:
        val = "  ".join(f"{k} {v:.4f}" for k, v in result.val.items())
        print(f"done: step {result.step}; val {val}; {result.train_tokens_per_s:,.0f} train tokens/s", flush=True)
        print(f"checkpoint {summary['checkpoint']}\nmetrics {run_dir / 'metrics.jsonl'}  curves {run_dir / 'loss.png'}"
              f"  tensorboard --logdir {run_dir / 'tensorboard'}", flush=True)
    end_distributed(world_size)
    return summary

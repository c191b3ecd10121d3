"""`lmforge finetune`: a base model + labelled data -> a task model in `runs/<name>/`.

Reads top to bottom: check the config, read the splits (labels from training only), load the base (or
build a fresh model), featurize, train with the task's loss while the evaluator scores the dev set,
keep the best checkpoint (`runs/<name>/best`), score the test file with it.
"""
from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any, Optional

import torch

from lmforge.config import to_dict
from lmforge.errors import ConfigError
from lmforge.tasks.base import TaskData
from lmforge.train.config import TrainConfig

# Fine-tuning defaults (BERT's recipe: AdamW, linear decay to 0, small weight decay).
FINETUNE_TRAIN = TrainConfig(max_steps=1000, batch_size=32, lr=5e-5, min_lr=0.0, warmup_steps=0, schedule="linear",
                             weight_decay=0.01, beta2=0.999, eval_every=200, log_every=20, keep_checkpoints=1)


# `--model.*` fields that may differ from an --init_from base's: fine-tuning often wants dropout where
# pretraining had none (a base pretrained without dropout, fine-tuned on a small labelled set).
BASE_OVERRIDABLE = ("dropout", "attn_dropout")


def _check_base_overrides(model: dict[str, Any], fields: tuple[str, ...] = BASE_OVERRIDABLE) -> None:
    """`--model.*` with `--init_from`: only `fields` (BASE_OVERRIDABLE, or those of them a loaded base has),
    each a rate in [0, 1)."""
    for k, v in model.items():
        if k not in fields:
            raise ConfigError(f"--model.{k}: with --init_from the architecture comes from the base; only "
                              f"{', '.join('--model.' + f for f in fields) or 'nothing'} may be changed")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
            raise ConfigError(f"--model.{k} must be a rate in [0, 1), got {v!r}")


def _base(init_from: Optional[str], arch: Optional[str], model: Optional[dict], tokenizer: Optional[str],
          random_init: bool, seed: int):
    """(backbone, tokenizer, arch, model config dict, what it started from)."""
    from lmforge.models import build_model, model_config
    from lmforge.text.tokenizer import Tokenizer

    if init_from is not None:
        if arch is not None:
            raise ConfigError("--init_from takes the architecture from the base; do not also give --arch")
        if tokenizer is not None:
            raise ConfigError("--init_from brings its own tokenizer; do not also give --tokenizer")
        from lmforge.interop.hf import load

        base, tok, cfg = load(init_from)
        arch, values = cfg["arch"], dict(cfg["model"])
        if model:  # only the dropout rates: they regularise fine-tuning and change no weight
            _check_base_overrides(model, tuple(k for k in BASE_OVERRIDABLE if k in values))
            values = to_dict(model_config(arch, {**values, **model}))  # checks the values
            if not random_init:  # the base's weights in a model built with the new rates
                tuned = build_model(arch, values)
                tuned.load_state_dict(base.state_dict())
                base = tuned
        if random_init:  # the same architecture and tokenizer, fresh weights (the ablation's control)
            torch.manual_seed(seed)
            base = build_model(arch, values)
            return base, tok, arch, values, f"random init ({init_from}'s architecture)"
        return base, tok, arch, values, str(init_from)
    if random_init:
        raise ConfigError("--random_init needs --init_from (whose architecture and tokenizer to use)")
    if arch is None or tokenizer is None:
        raise ConfigError("give --init_from (a base model), or --arch, --model.* and --tokenizer to train from scratch")
    tok = Tokenizer.load(tokenizer)
    values = dict(model or {})
    values.setdefault("vocab_size", tok.vocab_size)
    cfg = model_config(arch, values)
    torch.manual_seed(seed)
    return build_model(arch, cfg), tok, arch, to_dict(cfg), "random init"


def finetune(
    task: str,
    data: TaskData = TaskData(),
    task_args: Optional[dict[str, Any]] = None,
    init_from: Optional[str] = None,
    random_init: bool = False,
    arch: Optional[str] = None,
    model: Optional[dict[str, Any]] = None,
    tokenizer: Optional[str] = None,
    epochs: Optional[float] = None,
    warmup_ratio: Optional[float] = None,
    train: TrainConfig = FINETUNE_TRAIN,
    name: Optional[str] = None,
    runs_dir: str = "runs",
    resume: Optional[str] = None,
    overwrite: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Fine-tune a model for a task: classify (one text), pair (two texts) or tag (tokens, linear or CRF).

    Args:
        task: classify, pair, tag, qa (extractive QA) or seq2seq (generation on a GPT).
        data: the splits and how to read them (`--data.train F --data.dev F --data.text sentence ...`).
        task_args: the task head's options (`--task_args.crf true`, `--task_args.pooling mean`).
        init_from: the base: an lmforge run or checkpoint, a transformers directory, or `minilm-l6`.
        random_init: use init_from's architecture and tokenizer but fresh random weights (the control of
            the pretraining ablation).
        arch: from scratch: the architecture (bert, gpt, lstm), with `--model.*` and `--tokenizer`.
        model: from scratch: the architecture's config fields; with `init_from`, only the base's dropout
            rates (`--model.dropout 0.1 --model.attn_dropout 0.1`), for both arms of an ablation.
        tokenizer: from scratch: a tokenizer.json.
        epochs: passes over the training data (sets train.max_steps); default: train.max_steps.
        warmup_ratio: warm-up as a fraction of the steps (sets train.warmup_steps).
        train: the training loop (`--train.lr 5e-5 --train.batch_size 32 --train.eval_every 200 ...`);
            the best dev checkpoint is kept by `train.best_metric` (default: the task's main metric).
        name: run name; outputs go to RUNS_DIR/NAME (default: TASK-TIMESTAMP).
        runs_dir: where run directories are created.
        resume: continue a stopped fine-tuning exactly: 'latest' or a checkpoint path.
        overwrite: start the run NAME again, replacing its old outputs (other files in its folder stay).
        quiet: no progress bar and no opening or closing lines (the per-evaluation lines stay).
    """
    from lmforge.data.task_batches import TaskBatcher
    from lmforge.models.task_model import TaskModel
    from lmforge.tasks import get_task
    from lmforge.tasks.base import evaluate_features, hidden_size, pad_id_of, scalar_metrics
    from lmforge.train.distributed import apply_parallel, end_distributed, setup_distributed
    from lmforge.train.trainer import Trainer, resolve_device

    record = get_task(task)
    data = data or TaskData()
    train_cfg = train or FINETUNE_TRAIN
    if not data.train:
        raise ConfigError("data.train is required: the labelled training file (--data.train FILE)")
    record.check_data(data)
    options = record.options(task_args)
    if epochs is not None and epochs <= 0:
        raise ConfigError(f"epochs must be > 0, got {epochs}")
    if warmup_ratio is not None and not 0 <= warmup_ratio < 1:
        raise ConfigError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    if init_from is not None:  # before any output exists; the base's own fields are checked once it is loaded
        if arch is not None:
            raise ConfigError("--init_from takes the architecture from the base; do not also give --arch")
        _check_base_overrides(model or {})
    if train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)
    from lmforge.recipes.pretrain import RUN_OUTPUTS, run_directory

    name = name or f"{task}-{time.strftime('%Y%m%d-%H%M%S')}"
    resolve_device(train_cfg.device)  # a device this machine lacks is refused before any work
    rank, world_size, local_rank = setup_distributed()  # under torchrun: each process trains its slice
    if world_size > 1 and train_cfg.device in ("auto", "cuda") and torch.cuda.is_available():
        train_cfg = replace(train_cfg, device=f"cuda:{local_rank}")
    quiet = quiet or rank != 0
    run_dir, resume = run_directory(runs_dir, name, resume=resume, overwrite=overwrite, rank=rank)
    device = resolve_device(train_cfg.device)

    # -- data: labels come from the training split only ---------------------------------------------
    train_ex = record.read(data.train, data)
    labels = record.label_names(train_ex, data.train)
    dev_ex = record.read(data.dev, data) if data.dev else None
    test_ex = record.read(data.test, data) if data.test else None
    for path, ex in ((data.dev, dev_ex), (data.test, test_ex)):
        if ex is not None:
            record.check_labels(ex, labels, path)
    if getattr(options, "words", None) == "auto":
        options = replace(options, words=record.word_mode(train_ex))
    if hasattr(record, "resolve_options"):  # e.g. qa: scoring 'auto' -> squad / cmrc2018 from the contexts
        options = record.resolve_options(options, train_ex)

    # -- model --------------------------------------------------------------------------------------
    backbone, tok, arch, model_values, started_from = _base(init_from, arch, model, tokenizer, random_init, train_cfg.seed)
    context = getattr(backbone.config, "context_length", None)
    if data.max_length is None:
        default_length = getattr(record, "default_max_length", 128)
        data = replace(data, max_length=min(context or default_length, default_length))
    elif context is not None and data.max_length > context:
        raise ConfigError(f"data.max_length={data.max_length} exceeds the model's context length ({context})")
    if not hasattr(backbone, "encode"):
        raise ConfigError(f"arch {arch} cannot be fine-tuned (no encode())")
    if hasattr(options, "resolved"):  # options that depend on the architecture (classify: pooling)
        options = options.resolved(arch)
    if hasattr(record, "check_model"):  # e.g. seq2seq generates: it needs a causal LM
        record.check_model(arch, backbone, options)
    if hasattr(backbone, "use_heads"):
        # pretraining heads stay in the checkpoint, frozen: the task head replaces them (seq2seq trains the LM head)
        backbone.use_heads(*getattr(record, "backbone_heads", ()))
    torch.manual_seed(train_cfg.seed)
    net = TaskModel(backbone, record.head(hidden_size(backbone), len(labels), options, labels))
    if hasattr(record, "bind"):
        record.bind(net, tok)

    features, stats = record.featurize(train_ex, tok, labels, data)
    dev_feats, dev_stats = record.featurize(dev_ex, tok, labels, data) if dev_ex else (None, None)
    pad = pad_id_of(tok)
    collate = lambda fs: record.collate(fs, pad)  # noqa: E731
    batcher = TaskBatcher(features, collate, batch_size=train_cfg.batch_size, seed=train_cfg.seed,
                          grad_accum=train_cfg.grad_accum, rank=rank, world_size=world_size)
    if epochs is not None:
        train_cfg = replace(train_cfg, max_steps=max(1, math.ceil(epochs * batcher.steps_per_epoch())))
    if warmup_ratio is not None:
        train_cfg = replace(train_cfg, warmup_steps=int(warmup_ratio * train_cfg.max_steps))
    if dev_ex is not None and not train_cfg.best_metric:
        train_cfg = replace(train_cfg, best_metric=record.default_metric)
    if quiet:
        train_cfg = replace(train_cfg, progress=False)

    def evaluator(m):
        values, _ = evaluate_features(record, m, dev_ex, dev_feats, labels, collate, 2 * train_cfg.batch_size, device)
        return scalar_metrics(values)

    run_config = {
        "name": name,
        "arch": arch,
        "model": model_values,
        "task": {"name": task, "options": to_dict(options), "labels": labels},
        "data": to_dict(data),
        "train": to_dict(train_cfg),
        "init_from": started_from,
        "epochs": epochs,
    }
    import shutil

    from lmforge.config import save_yaml

    trainer = Trainer(net, record, batcher, train_cfg, run_dir, run_config=run_config, tokenizer=tok,
                      rank=rank, world_size=world_size, evaluator=evaluator if dev_ex is not None else None,
                      parallelize=lambda m: apply_parallel(m, train_cfg.parallel, device, world_size))
    if resume is not None:  # a changed global batch or data is refused before the run folder is touched
        trainer.check_resume(resume)
    if rank == 0:
        for old in (run_dir / n for n in RUN_OUTPUTS if overwrite):  # everything is checked: replace the old run
            shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(run_config, run_dir / "config.yaml")
    if not quiet:
        print(f"{task}: {len(train_ex):,} training examples ({stats.truncated} truncated to {data.max_length} tokens), "
              f"{len(labels)} labels; {'dev ' + str(len(dev_ex)) + ' examples; ' if dev_ex else ''}"
              f"from {started_from}; {train_cfg.max_steps} steps of {train_cfg.batch_size * train_cfg.grad_accum * world_size}; "
              f"device {device}; run dir {run_dir}", flush=True)
        if stats.extra:  # what featurizing counted (qa: windows, unlocated answers, ...)
            print("  training features: " + ", ".join(f"{k} {v}" for k, v in stats.extra.items()), flush=True)
    start = time.perf_counter()
    result = trainer.fit(resume=resume)
    wall = time.perf_counter() - start
    summary: dict[str, Any] = {
        "run_dir": str(run_dir), "step": result.step, "wall_s": wall, "dev": result.val,
        "best": dict(trainer.best), "history": result.history, "labels": labels,
        "train_stats": stats.as_dict(), "dev_stats": dev_stats.as_dict() if dev_stats else None,
        "checkpoint": str(result.best_checkpoint or result.checkpoint),
    }
    if test_ex is not None and rank == 0:
        from lmforge.tasks.base import load_task_checkpoint, task_checkpoint

        best_model, _, _ = load_task_checkpoint(task_checkpoint(run_dir), device)
        test_feats, _ = record.featurize(test_ex, tok, labels, data)
        values, _ = evaluate_features(record, best_model, test_ex, test_feats, labels, collate,
                                      2 * train_cfg.batch_size, device)
        summary["test"] = scalar_metrics(values)
    if not quiet:
        best = trainer.best
        if best["value"] is not None:
            print(f"done in {wall:.0f} s: best dev {train_cfg.best_metric} {best['value']:.4f} at step {best['step']} "
                  f"({run_dir / 'best'})", flush=True)
        if "test" in summary:
            print("test: " + "  ".join(f"{k} {v:.4f}" for k, v in summary["test"].items()), flush=True)
    end_distributed(world_size)
    return summary

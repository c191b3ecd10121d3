"""What a served model is and what it can do: a base model through `lmforge.load` (GPT and recurrent LMs:
completions; BERT: embeddings, fill-mask when its MLM head was trained; GPT and BERT: attention), or a
fine-tuned task model through `lmforge.tasks.load_task_model` (classify, tag, qa)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmforge.errors import ConfigError

TASK_CAPABILITY = {"classify": "classify", "pair": "classify", "tag": "tag", "qa": "qa"}


def _task_name(source: str) -> str | None:
    """The fine-tuned task of an lmforge run or checkpoint directory, or None for a base model."""
    from lmforge.interop.hf import is_hf_dir
    from lmforge.interop.minilm import SOURCES

    if source in SOURCES or not Path(source).exists() or is_hf_dir(source):
        return None
    from lmforge.train.checkpoint import load_config

    task = load_config(source).get("task")
    return task.get("name") if isinstance(task, dict) else None


def load_model(source: str, device: str | torch.device) -> dict[str, Any]:
    """What an engine serves from `source`: {model, tokenizer, config, predictor, capabilities, kind}."""
    import lmforge

    task = _task_name(source)
    if task is not None:
        try:
            from lmforge.tasks import load_task_model
        except ImportError:
            raise ConfigError(f"{source}: a fine-tuned '{task}' model, but this lmforge cannot load task models") from None
        predictor = load_task_model(source, device=device)
        cap = TASK_CAPABILITY.get(predictor.task)
        if cap is None:
            raise ConfigError(f"{source}: task '{predictor.task}' cannot be served (served: {', '.join(TASK_CAPABILITY)})")
        return {"model": None, "tokenizer": None, "config": getattr(predictor, "config", {}), "predictor": predictor,
                "capabilities": [cap], "kind": f"{predictor.task} task model"}
    model, tokenizer, config = lmforge.load(source, device)
    arch = config.get("arch")
    caps: list[str] = []
    if arch == "gpt":
        caps = ["completions", "attention"]
    elif arch == "lstm":
        caps = ["completions"]
    elif arch == "bert":
        caps = ["embeddings", "attention"]
        no_mlm = "MLM head" in (config.get("interop") or {}).get("random_init", [])
        simcse_only = config.get("objective") == "simcse" and not config.get("init_from")
        if not (no_mlm or simcse_only) and tokenizer.mask_id is not None:
            caps.insert(1, "fill-mask")
    if not caps:
        raise ConfigError(f"{source}: an {arch} model has nothing to serve")
    return {"model": model, "tokenizer": tokenizer, "config": config, "predictor": None, "capabilities": caps,
            "kind": f"{arch} model"}

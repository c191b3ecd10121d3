"""Reading models: lmforge checkpoints, and through `load_model` every kind of model a verb accepts.

    load_model(path)     -> (model in eval mode, tokenizer, run config) from
                            an lmforge run directory (its newest complete checkpoint),
                            an lmforge checkpoint directory (a fine-tuned one gives its backbone),
                            a transformers directory (BERT family, GPT-2), or
                            a named source (`minilm-l6`)

A checkpoint directory holds `config.yaml` (the resolved run config: `arch`, `model`, ...),
`model.safetensors`, `tokenizer.json`, and `complete.json`, written last, listing every file's size.
The write side (saving, pruning, resuming) is `lmforge.train.checkpoint`; this module is what readers
need, so that interop and the verbs do not import the training package.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.config import load_yaml
from lmforge.errors import CheckpointError, LmforgeError
from lmforge.storage import load_tensors, read_json

_STEP_DIR = re.compile(r"^step-(\d+)$")
MARKER = "complete.json"  # written last into a checkpoint: {"format": 1, "files": {name: size in bytes}}
TASK_HEAD = "head."  # a fine-tuned checkpoint keeps its task head beside the backbone, under this prefix


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under torch.compile / DDP wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


def is_complete(ckpt: str | Path) -> bool:
    """Whether a checkpoint directory is whole: its marker lists every file with its size. One written
    before markers existed counts when it has its weights and config (it was renamed into place whole)."""
    ckpt = Path(ckpt)
    marker = ckpt / MARKER
    if not marker.is_file():
        return (ckpt / "model.safetensors").is_file() and (ckpt / "config.yaml").is_file()
    try:
        files = read_json(marker)["files"]
        return all((ckpt / name).is_file() and (ckpt / name).stat().st_size == size for name, size in files.items())
    except (LmforgeError, KeyError, TypeError, AttributeError):
        return False


def step_checkpoints(run_dir: str | Path) -> list[Path]:
    """A run's complete `checkpoints/step-N` directories, oldest first."""
    ckpts = Path(run_dir) / "checkpoints"
    if not ckpts.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpts.iterdir()
             if (m := _STEP_DIR.match(p.name)) and p.is_dir() and is_complete(p)]
    return [p for _, p in sorted(found)]


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory itself, or the newest checkpoint of a run directory."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        if not is_complete(path):
            raise CheckpointError(f"{path}: incomplete checkpoint (a file is missing or has another size than "
                                  f"{MARKER} records); use an earlier checkpoint")
        return path
    if not path.exists():
        raise CheckpointError(f"{path}: no such run or checkpoint directory")
    found = step_checkpoints(path)
    if not found:
        raise CheckpointError(f"{path}: not a checkpoint (no model.safetensors) and holds no complete checkpoints/step-N")
    return found[-1]


def load_model_state(model: nn.Module, ckpt: Path, *, skip_prefix: str | None = None) -> None:
    """Load `model.safetensors` into `model`, strictly; mismatches are CheckpointErrors.
    Keys starting with `skip_prefix` (e.g. a task head when only the backbone is wanted) are left out."""
    state = load_tensors(ckpt / "model.safetensors")
    if skip_prefix:
        state = {k: v for k, v in state.items() if not k.startswith(skip_prefix)}
    target = unwrap(model)
    own = target.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise CheckpointError(f"{ckpt}: weight '{k}' has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}")
    target.load_state_dict(state, strict=True)


def read_config(ckpt: Path) -> dict[str, Any]:
    """A checkpoint directory's `config.yaml`, checked for the `arch` and `model` sections."""
    cfg = load_yaml(ckpt / "config.yaml")
    if "arch" not in cfg or "model" not in cfg:
        raise CheckpointError(f"{ckpt / 'config.yaml'}: missing 'arch' or 'model' section")
    return cfg


def load_config(path: str | Path) -> dict[str, Any]:
    """The run config saved with a checkpoint (a checkpoint directory, or a run's newest checkpoint)."""
    return read_config(find_checkpoint(path))


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Any, dict[str, Any]]:
    """(model in eval mode, tokenizer, resolved run config) from an lmforge run or checkpoint directory.
    A fine-tuned checkpoint (config with a `task` section) gives its backbone; the head is left out."""
    from lmforge.models import build_model
    from lmforge.text.tokenizer import Tokenizer

    ckpt = find_checkpoint(path)
    cfg = read_config(ckpt)
    model = build_model(cfg["arch"], cfg["model"])
    load_model_state(model, ckpt, skip_prefix=TASK_HEAD if cfg.get("task") else None)
    if not (ckpt / "tokenizer.json").is_file():
        raise CheckpointError(f"{ckpt}: tokenizer.json missing")
    tokenizer = Tokenizer.load(ckpt / "tokenizer.json")
    return model.to(device).eval(), tokenizer, cfg


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Any, dict[str, Any]]:
    """The one loader every verb uses: (model in eval mode, tokenizer, run config) from an lmforge run or
    checkpoint directory, a transformers directory, or a named source (`minilm-l6`).

    Args:
        path: the directory or the source's name.
        device: where to put the model.
    """
    from lmforge.interop.hf import is_hf_dir, load_hf
    from lmforge.interop.minilm import SOURCES

    if str(path) in SOURCES:
        return load_hf(SOURCES[str(path)](), device)
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such directory (expected an lmforge run or checkpoint directory, a "
                              f"transformers directory, or a named source: {', '.join(SOURCES)})")
    if is_hf_dir(p):
        return load_hf(p, device)
    return load_pretrained(p, device)

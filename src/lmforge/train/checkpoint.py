"""Checkpoints are directories: `config.yaml` (the resolved run config), `model.safetensors`,
`tokenizer.json`, and for resuming `optimizer.pt` (tensors only, read with weights_only=True) and
`trainer_state.json`, then `complete.json` written last (every file's size: the marker that the
checkpoint is whole). The directory is written as a temporary sibling and renamed into place, so a
crash never leaves half a checkpoint under its name; the temporaries a killed run leaves are removed
by `clean_stale_checkpoints` when the run starts again. Every verb that reads a model accepts a run
directory (its newest complete checkpoint is used) or a checkpoint directory."""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.config import load_yaml, save_yaml
from lmforge.errors import CheckpointError, LmforgeError
from lmforge.storage import (
    atomic_dir,
    atomic_write_json,
    clean_temporaries,
    load_tensors,
    read_json,
    save_tensors,
    torch_load,
    torch_save,
)

_STEP_DIR = re.compile(r"^step-(\d+)$")
MARKER = "complete.json"  # written last into a checkpoint: {"format": 1, "files": {name: size in bytes}}


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under torch.compile / DDP wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    config: dict[str, Any],
    tokenizer: Any = None,
    optimizer: torch.optim.Optimizer | None = None,
    trainer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory atomically (see the module docstring for its contents)."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        save_yaml(config, tmp / "config.yaml")
        save_tensors(unwrap(model).state_dict(), tmp / "model.safetensors", metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer.json")
        if optimizer is not None:
            torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
        if trainer_state is not None:
            atomic_write_json(tmp / "trainer_state.json", trainer_state)
        sizes = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}
        atomic_write_json(tmp / MARKER, {"format": 1, "files": sizes})
    return path


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


def clean_stale_checkpoints(run_dir: str | Path) -> list[str]:
    """Remove the temporary checkpoint folders a killed run left in `run_dir/checkpoints` (and put
    back a checkpoint that a kill left renamed aside while it was being replaced). Call it when a run
    starts, before anything writes there. Returns what it did."""
    return clean_temporaries(Path(run_dir) / "checkpoints")


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


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` step checkpoints."""
    for old in step_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_model_state(model: nn.Module, ckpt: Path) -> None:
    """Load `model.safetensors` into `model`, strictly; mismatches are CheckpointErrors."""
    state = load_tensors(ckpt / "model.safetensors")
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


def load_config(path: str | Path) -> dict[str, Any]:
    """The run config saved with a checkpoint (a checkpoint directory, or a run's newest checkpoint)."""
    return _read_config(find_checkpoint(path))


def _read_config(ckpt: Path) -> dict[str, Any]:
    cfg = load_yaml(ckpt / "config.yaml")
    if "arch" not in cfg or "model" not in cfg:
        raise CheckpointError(f"{ckpt / 'config.yaml'}: missing 'arch' or 'model' section")
    return cfg


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Any, dict[str, Any]]:
    """(model in eval mode, tokenizer, resolved run config) from a run or checkpoint directory."""
    from lmforge.models import build_model
    from lmforge.text.tokenizer import Tokenizer

    ckpt = find_checkpoint(path)
    cfg = _read_config(ckpt)
    model = build_model(cfg["arch"], cfg["model"])
    load_model_state(model, ckpt)
    if not (ckpt / "tokenizer.json").is_file():
        raise CheckpointError(f"{ckpt}: tokenizer.json missing")
    tokenizer = Tokenizer.load(ckpt / "tokenizer.json")
    return model.to(device).eval(), tokenizer, cfg


def load_training_state(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights and optimizer state for `--resume`; returns trainer_state.json."""
    for name in ("optimizer.pt", "trainer_state.json"):
        if not (ckpt / name).is_file():
            raise CheckpointError(f"{ckpt}: {name} missing; this checkpoint cannot be resumed (weights only)")
    load_model_state(model, ckpt)
    optimizer.load_state_dict(torch_load(ckpt / "optimizer.pt"))
    return read_json(ckpt / "trainer_state.json")

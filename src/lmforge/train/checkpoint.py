"""Checkpoints are directories: `config.yaml` (the resolved run config), `model.safetensors`,
`tokenizer.json`, and for resuming `optimizer.pt` (tensors only, read with weights_only=True) and
`trainer_state.json`, then `complete.json` written last (every file's size: the marker that the
checkpoint is whole). The directory is written as a temporary sibling and renamed into place, so a
crash never leaves half a checkpoint under its name; the temporaries a killed run leaves are removed
by `clean_stale_checkpoints` when the run starts again. Every verb that reads a model accepts a run
directory (its newest complete checkpoint is used) or a checkpoint directory."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

# The read side lives in lmforge.checkpoints (readers such as interop need no training package);
# re-exported here for the training code.
from lmforge.checkpoints import (  # noqa: F401
    MARKER,
    find_checkpoint,
    is_complete,
    load_config,
    load_model,
    load_model_state,
    load_pretrained,
    read_config,
    step_checkpoints,
    unwrap,
)
from lmforge.config import save_yaml
from lmforge.errors import CheckpointError
from lmforge.storage import atomic_dir, atomic_write_json, clean_temporaries, read_json, save_tensors, torch_load, torch_save


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    config: dict[str, Any],
    tokenizer: Any = None,
    optimizer: torch.optim.Optimizer | None = None,
    trainer_state: dict[str, Any] | None = None,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory atomically (see the module docstring for its contents).

    `model_state` / `optimizer_state`, when given, are written instead of `model.state_dict()` /
    `optimizer.state_dict()`: the trainer passes full state dicts gathered from a sharded or wrapped
    model (`lmforge.train.distributed.model_state`), the optimizer's keyed by parameter name."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        save_yaml(config, tmp / "config.yaml")
        weights = model_state if model_state is not None else unwrap(model).state_dict()
        save_tensors(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer.json")
        if optimizer_state is not None or optimizer is not None:
            torch_save(optimizer_state if optimizer_state is not None else optimizer.state_dict(), tmp / "optimizer.pt")
        if trainer_state is not None:
            atomic_write_json(tmp / "trainer_state.json", trainer_state)
        sizes = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}
        atomic_write_json(tmp / MARKER, {"format": 1, "files": sizes})
    return path


def clean_stale_checkpoints(run_dir: str | Path) -> list[str]:
    """Remove the temporary checkpoint folders a killed run left in `run_dir/checkpoints` (and put
    back a checkpoint that a kill left renamed aside while it was being replaced). Call it when a run
    starts, before anything writes there. Returns what it did."""
    return clean_temporaries(Path(run_dir) / "checkpoints")


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` step checkpoints."""
    for old in step_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_training_state(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights and optimizer state of a plain model in one process; returns trainer_state.json.
    (The trainer's own resume, on any number of processes, is `Trainer.fit(resume=...)`.)"""
    for name in ("optimizer.pt", "trainer_state.json"):
        if not (ckpt / name).is_file():
            raise CheckpointError(f"{ckpt}: {name} missing; this checkpoint cannot be resumed (weights only)")
    from lmforge.train.distributed import load_state, name_optimizer_state

    load_model_state(model, ckpt)  # names and shapes checked
    model = unwrap(model)
    optim = name_optimizer_state(model, optimizer, torch_load(ckpt / "optimizer.pt"))  # keyed by name
    load_state(model, optimizer, model.state_dict(), optim, world_size=1)
    return read_json(ckpt / "trainer_state.json")

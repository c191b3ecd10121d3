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
    """Restore weights and optimizer state for `--resume`; returns trainer_state.json."""
    for name in ("optimizer.pt", "trainer_state.json"):
        if not (ckpt / name).is_file():
            raise CheckpointError(f"{ckpt}: {name} missing; this checkpoint cannot be resumed (weights only)")
    load_model_state(model, ckpt)
    optimizer.load_state_dict(torch_load(ckpt / "optimizer.pt"))
    return read_json(ckpt / "trainer_state.json")

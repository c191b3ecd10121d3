"""The trainer's own config section (`train:` in a run's YAML)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional

from lmforge.errors import ConfigError

if TYPE_CHECKING:
    import torch


@dataclass
class TrainConfig:
    """How to optimise: steps, batch, schedule, precision, logging and checkpoints.

    Args:
        max_steps: optimizer steps to run.
        batch_size: sequences per micro-batch per process; under torchrun the global batch is
            batch_size x processes (each process trains its slice of it), so N processes with B give
            the same run as one process with N x B.
        grad_accum: micro-batches accumulated per optimizer step.
        lr: peak learning rate.
        min_lr: learning rate at the end of the decay.
        warmup_steps: linear warm-up steps from 0 to `lr`.
        decay_steps: steps over which the schedule decays to `min_lr` (default: max_steps).
        schedule: 'cosine', 'linear' or 'constant' after warm-up.
        weight_decay: AdamW decay on matrices (biases, norms and 1-D params are never decayed).
        beta1: AdamW beta1.
        beta2: AdamW beta2.
        eps: AdamW epsilon.
        grad_clip: max global grad norm (0 disables clipping).
        eval_every: run validation every N steps (and at the end); 0 only at the end.
        eval_batches: validation batches per evaluation (None: the whole validation split).
        log_every: write a metrics line every N steps.
        save_every: write a checkpoint every N steps (0: only at the end).
        keep_checkpoints: how many step checkpoints to keep (the newest).
        seed: seeds model init, data order and dropout; a run is reproducible from it.
        device: 'auto' (CUDA if present, else CPU), 'cpu', 'cuda', 'cuda:1', ...
        precision: 'auto' (bf16 autocast on CUDA, fp32 on CPU), 'fp32' or 'bf16'.
        compile: compile the whole loss (model forward + objective) with torch.compile.
        activation_checkpointing: recompute the activations of Transformer blocks during backward instead
            of keeping them (less memory, about a third more compute): 0 off, 1 every block, N every
            N-th block.
        threads: CPU threads for torch (None: torch's default).
        tensorboard: also write TensorBoard event files.
        progress: show a progress bar.
        best_metric: keep the checkpoint with the best value of this evaluator metric (e.g. 'accuracy',
            'f1', or 'loss'); None keeps only the newest checkpoints. Needs an evaluator (fine-tuning).
        best_mode: 'max' (higher is better) or 'min'; 'auto' is 'min' for names containing 'loss' or
            'ppl', else 'max'.
        patience: stop after this many evaluations without an improvement of `best_metric` by more
            than `min_delta` (0: never stop early). Independent of `keep_checkpoints`.
        min_delta: the smallest change of `best_metric` that counts as an improvement.
        layer_decay: layer-wise learning-rate decay: layer l of L gets lr * layer_decay**(L - l), the
            embeddings lr * layer_decay**(L + 1), heads the full lr (1.0: off).
        max_nonfinite_steps: a step whose loss (or gradient norm) is NaN or infinite is skipped (no
            update) with a warning; the run stops with an error when more than this many steps in a
            row were skipped.
        progress_every: when the output is not a terminal (a pipe, a log file), print one progress line
            every this many seconds instead of a live bar.
        parallel: how the processes of a torchrun job share the model: 'ddp' (each holds a full copy,
            gradients are averaged) or 'fsdp' (FSDP2: parameters, gradients and optimizer state sharded
            across the processes, for models that do not fit one device). One process: the plain model.
        allow_resume_mismatch: resume a checkpoint even though its global batch (batch_size x
            processes), grad_accum, data or seed differ from this run's (refused otherwise: the run would
            no longer continue the same one).
    """

    max_steps: int = 1000
    batch_size: int = 12
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    decay_steps: Optional[int] = None
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_batches: Optional[int] = None
    log_every: int = 10
    save_every: int = 0
    keep_checkpoints: int = 2
    seed: int = 1337
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    activation_checkpointing: int = 0
    threads: Optional[int] = None
    tensorboard: bool = True
    progress: bool = True
    best_metric: Optional[str] = None
    best_mode: Literal["auto", "max", "min"] = "auto"
    patience: int = 0
    min_delta: float = 0.0
    layer_decay: float = 1.0
    max_nonfinite_steps: int = 5
    progress_every: float = 30.0
    parallel: Literal["ddp", "fsdp"] = "ddp"
    allow_resume_mismatch: bool = False

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"train.lr must be > 0 and 0 <= train.min_lr <= train.lr (got {self.lr}, {self.min_lr})")
        if self.activation_checkpointing < 0:
            raise ConfigError(f"train.activation_checkpointing must be 0 (off) or N >= 1 (every N-th block), "
                              f"got {self.activation_checkpointing}")
        if self.patience < 0 or self.min_delta < 0:
            raise ConfigError(f"train.patience and train.min_delta must be >= 0, got {self.patience}, {self.min_delta}")
        if self.patience and not self.best_metric:
            raise ConfigError("train.patience needs train.best_metric (the dev metric early stopping watches)")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"train.layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        self._check_ranges()

    def _check_ranges(self) -> None:
        """Every other field's range, named with its value (so nothing fails later inside PyTorch)."""
        for name in ("lr", "min_lr", "weight_decay", "beta1", "beta2", "eps", "grad_clip", "min_delta",
                     "layer_decay", "progress_every"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"train.{name} must be a finite number, got {getattr(self, name)}")
        for name in ("log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every", "max_nonfinite_steps", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("decay_steps", "eval_batches", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1 (or null), got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"train.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.eps <= 0:
            raise ConfigError(f"train.eps must be > 0, got {self.eps}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError(f"train.weight_decay and train.grad_clip must be >= 0 (grad_clip 0: off), "
                              f"got {self.weight_decay}, {self.grad_clip}")
        if self.progress_every <= 0:
            raise ConfigError(f"train.progress_every must be > 0 seconds, got {self.progress_every}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ConfigError(f"train.parallel must be 'ddp' or 'fsdp', got {self.parallel!r}")
        if self.seed >= 2**63:
            raise ConfigError(f"train.seed must be below 2**63, got {self.seed}")
        parse_device(self.device, "train.device")


def parse_device(name: str, field: str = "device") -> torch.device | None:
    """The torch.device a device name means ('auto' -> None); a name that is no device is a ConfigError."""
    import torch

    if name == "auto":
        return None
    try:
        return torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{field}: '{name}' is not a device (use 'auto', 'cpu', 'cuda' or 'cuda:N')") from None


def check_device(name: str, field: str = "device") -> None:
    """Raise a ConfigError naming `field` when device `name` is not present on this machine (a CUDA
    device without CUDA, or an index beyond the device count). Call it before any work starts."""
    import torch

    device = parse_device(name, field)
    if device is None or device.type == "cpu":
        return
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{field}: '{name}' but this machine has no CUDA device (torch {torch.__version__}"
                              f"{'' if torch.version.cuda else ', a CPU-only build'}); use 'auto' or 'cpu'")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"{field}: '{name}' but this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{field}: '{name}' but MPS is not available here; use 'auto' or 'cpu'")

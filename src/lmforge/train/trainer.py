"""The one training loop. It knows a model, an Objective (batch -> loss, metrics) and a Batcher
(step -> batch), and nothing else about what is being trained.

    for step in range(start, max_steps):
        set lr(step); seed dropout from (seed, step)
        for micro in range(grad_accum): loss = objective(model, batcher.train_batch(step, micro)); backward
        clip; optimizer step
        log / validate / checkpoint on their schedules

Everything the next step depends on (weights, optimizer moments, the step number) is in the
checkpoint, and the data and dropout noise are functions of (seed, step): resuming reproduces the
uninterrupted run exactly.

Under torchrun every process runs this loop on its slice of each global batch (the batcher draws the
global batch from (seed, step) alone and hands each rank its share), gradients are averaged by DDP or
FSDP2 (the `parallelize` step), and the logged loss is the mean over all processes: N processes with
train.batch_size B train and log the same run as one process with N * B. Checkpoints hold full tensors
(gathered through torch.distributed.checkpoint's state-dict helpers), record the global batch and the
data, and resume on any number of processes that keeps them.
"""
from __future__ import annotations

import json
import math
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.errors import CheckpointError, ConfigError, LmforgeError
from lmforge.storage import atomic_write_text, json_safe, load_tensors, read_json, torch_load
from lmforge.train.checkpoint import find_checkpoint, prune_checkpoints, save_checkpoint, unwrap
from lmforge.train.distributed import (
    broadcast_object,
    global_mean,
    is_sharded,
    load_state,
    local_tensor,
    model_state,
    name_optimizer_state,
    optimizer_state,
)
from lmforge.train.config import TrainConfig, check_device
from lmforge.train.protocols import Batcher, Objective


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; a device this machine lacks is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(name, "train.device")
    return torch.device(name)


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast on CUDA by default ('auto'); fp32 on CPU unless bf16 is asked for."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def cpu_has_native_bf16(caps: dict | None = None) -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX). Without it, oneDNN emulates bf16
    matmuls by converting to fp32 and back, and bf16 autocast is slower than plain fp32: 2.6x on a 2-core
    Intel Xeon with AVX-512 but no AVX512-BF16 (bench/RESULTS.md, 2026-12-01)."""
    caps = torch.cpu.get_capabilities() if caps is None else caps
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def bf16_cpu_warning(device: torch.device, precision: str) -> str | None:
    """One warning line when bf16 is asked for on a CPU that would only emulate it, else None."""
    if device.type != "cpu" or precision != "bf16":
        return None
    caps = torch.cpu.get_capabilities()  # read once: the flags and the CPU's name
    if cpu_has_native_bf16(caps):
        return None
    name = caps.get("cpu_name") or "this CPU"
    return (f"warning: train.precision bf16: {name} has no native bf16 (AVX512-BF16 or AMX), so bf16 "
            f"autocast is emulated and runs slower than fp32 (2.6x measured on such a CPU); "
            f"--train.precision fp32 trains faster here")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to `lr` (as nanoGPT: lr * (step+1) / (warmup+1)), then decay to `min_lr`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return cfg.lr
    decay = cfg.decay_steps or cfg.max_steps
    if step >= decay:
        return cfg.min_lr
    frac = (step - cfg.warmup_steps) / max(1, decay - cfg.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * frac)) if cfg.schedule == "cosine" else 1.0 - frac
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)


_BLOCK_INDEX = re.compile(r"(?:^|\.)(?:layer|h|layers)\.(\d+)\.")


def layer_depths(model: nn.Module) -> dict[str, int]:
    """Parameter name -> depth for layer-wise learning-rate decay: 0 for embeddings (and anything else
    below the first block), i + 1 for block i, L + 1 for what sits above the blocks (final norms,
    pretraining and task heads). Blocks are found by name (`encoder.layer.i`, `transformer.h.i`)."""
    names = [n for n, _ in model.named_parameters()]
    blocks = [int(m.group(1)) for n in names if (m := _BLOCK_INDEX.search(n))]
    n_layer = max(blocks) + 1 if blocks else 0
    depths = {}
    for n in names:
        m = _BLOCK_INDEX.search(n)
        if m:
            depths[n] = int(m.group(1)) + 1
        elif "embed" in n or ".wte." in n or ".wpe." in n or n.startswith(("wte.", "wpe.")):
            depths[n] = 0
        else:
            depths[n] = n_layer + 1
    return depths


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (biases, norms and other 1-D parameters are not
    decayed). The fused kernel (one pass over each parameter) where PyTorch has one for the device, CUDA
    and CPU included: on CPU it measured 6.5x faster than the multi-tensor (foreach) path for the
    shakespeare_char model and 6x for GPT-2 124M (1.6 s -> 0.26 s a step); foreach elsewhere.

    With `cfg.layer_decay < 1` each depth (see `layer_depths`) gets its own pair of groups whose
    `lr_scale` is layer_decay ** (top - depth): heads train at the full rate, lower blocks slower."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    depths = layer_depths(model) if cfg.layer_decay < 1.0 else {n: 0 for n, _ in named}
    top = max(depths.values(), default=0)
    buckets: dict[tuple[int, bool], list] = {}
    for n, p in named:
        buckets.setdefault((depths[n], p.dim() >= 2), []).append(p)
    groups = [{"params": ps, "weight_decay": cfg.weight_decay if decayed else 0.0,
               "lr_scale": cfg.layer_decay ** (top - depth)}
              for (depth, decayed), ps in sorted(buckets.items(), key=lambda kv: (kv[0][0], not kv[0][1]))]
    extra = {"fused": True} if device.type in _fused_adamw_devices() else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **extra)


def _fused_adamw_devices() -> tuple[str, ...]:
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        return tuple(_get_fused_kernels_supported_devices())
    except ImportError:  # older torch: CUDA only
        return ("cuda",)


def step_seed(seed: int, step: int) -> int:
    """The torch seed for one step's dropout noise: a function of (seed, step) only."""
    return (seed * 1_000_003 + step * 7919 + 17) % (2**63 - 1)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cpu":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def _kept(row: dict, until: int) -> bool:
    return row["step"] < until or (row["step"] == until and row.get("split") != "val")


def read_metrics(path: Path, warn: bool = False) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl. A line that is not a JSON object (the torn last line of a killed
    run) is skipped, with a note on stderr when `warn`."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        elif warn:
            print(f"note: {path}: line {n} is not a whole metrics record (a run killed while writing it?); "
                  f"dropped", file=sys.stderr)
    return rows


class MetricsLog:
    """metrics.jsonl (one JSON object per line; NaN and infinities written as null, so every line is
    valid JSON) and, optionally, TensorBoard events."""

    def __init__(self, run_dir: Path, tensorboard: bool, keep_until: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        if keep_until is not None and self.path.exists():
            # Resuming: forget lines a crashed run wrote after the checkpoint we resume from (and a torn
            # last line). A checkpoint at step N is written before the validation at step N, which the
            # resumed run repeats.
            kept = [row for row in read_metrics(self.path, warn=True) if _kept(row, keep_until)]
            atomic_write_text(self.path, "".join(self._line(row) for row in kept))
        elif keep_until is None and self.path.exists():
            self.path.unlink()
        self.file = open(self.path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    @staticmethod
    def _line(row: dict[str, Any]) -> str:
        return json.dumps(json_safe(row), allow_nan=False) + "\n"

    def write(self, step: int, split: str, values: dict[str, float]) -> None:
        self.file.write(self._line({"step": step, "split": split, **values}))
        self.file.flush()
        if self.tb is not None:
            for k, v in values.items():
                if v is not None:
                    self.tb.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def plot_curves(metrics_path: Path, out: Path) -> Path | None:
    """Train and validation loss against step, as a PNG (written atomically)."""
    from lmforge.plots import new_figure, save_png

    rows = read_metrics(metrics_path) if metrics_path.is_file() else []
    # a skipped (non-finite) loss is null: a gap in the curve
    train = [(r["step"], r["loss"]) for r in rows if r.get("split") == "train" and isinstance(r.get("loss"), (int, float))]
    val = [(r["step"], r["loss"]) for r in rows if r.get("split") == "val" and isinstance(r.get("loss"), (int, float))]
    if not train and not val:
        return None
    fig, ax = new_figure()
    if train:
        ax.plot(*zip(*train), label="train", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    return save_png(fig, out)


class DivergedError(LmforgeError):
    """The loss stayed NaN or infinite for more steps in a row than train.max_nonfinite_steps allows."""


class Progress:
    """The training progress display. On a terminal: tqdm's live bar. Under a pipe or a file: one
    plain line every `every` seconds (and a last one at the end) instead of thousands of carriage-return
    updates. Offers the bar methods the loop uses: update, set_postfix, write, close."""

    def __init__(self, total: int, initial: int = 0, every: float = 30.0, stream=None, clock=time.monotonic):
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.n, self.every, self.clock = total, initial, every, clock
        self.postfix: dict[str, Any] = {}
        self.bar = None
        if self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, file=self.stream)
        self.start = self.last = clock()
        self.start_n = self.printed_n = initial

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        self.postfix = values
        if self.bar is not None:
            self.bar.set_postfix(refresh=refresh, **values)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.clock() - self.last >= self.every:
            self._line()

    def _line(self) -> None:
        now = self.clock()
        elapsed = now - self.start
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        eta = f"  eta {_hms((self.total - self.n) / rate)}" if rate > 0 and self.n < self.total else ""
        extra = "".join(f"  {k} {v}" for k, v in self.postfix.items())
        print(f"train step {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.0f}%){extra}  "
              f"{rate:.2f} step/s  elapsed {_hms(elapsed)}{eta}", file=self.stream, flush=True)
        self.last, self.printed_n = now, self.n

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.n != self.printed_n:
            self._line()


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@dataclass
class FitResult:
    step: int
    val: dict[str, float] = field(default_factory=dict)
    train_tokens_per_s: float = 0.0
    run_dir: Path | None = None
    checkpoint: Path | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    best_checkpoint: Path | None = None


class Trainer:
    """Runs an Objective over a Batcher's batches. `run_config` (the resolved run config as a dict)
    is stored in every checkpoint so that the model can be rebuilt from it."""

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        batcher: Batcher,
        cfg: TrainConfig,
        run_dir: str | Path,
        *,
        run_config: dict[str, Any],
        tokenizer: Any = None,
        rank: int = 0,
        world_size: int = 1,
        parallelize=None,
        evaluator=None,
    ):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        # The parallelize step (DDP, FSDP2) is applied to the plain model before the optimizer is built, so
        # the optimizer holds the parameters the wrapped model trains (FSDP2's sharded ones).
        model = model.to(self.device)
        self.raw_model = unwrap(model)
        self.model = parallelize(model) if parallelize is not None else model
        # Sharded (FSDP2): every process takes part in each forward pass and in gathering the state to save.
        self.sharded = world_size > 1 and is_sharded(self.raw_model)
        self.objective = objective
        self.batcher = batcher
        self.run_dir = Path(run_dir)
        self.run_config = run_config
        self.tokenizer = tokenizer
        self.rank = rank
        self.world_size = world_size
        self.is_main = rank == 0
        self.optimizer = build_optimizer(self.raw_model, cfg, self.device)
        # evaluator(model) -> {metric: value}: task metrics on the dev set (accuracy, F1, ...), run with
        # every validation; `cfg.best_metric` names the one that picks the best checkpoint.
        self.evaluator = evaluator
        mode = cfg.best_mode
        if mode == "auto":
            mode = "min" if cfg.best_metric and ("loss" in cfg.best_metric or "ppl" in cfg.best_metric) else "max"
        self.best_mode = mode
        self.best: dict[str, Any] = {"value": None, "step": None, "bad_evals": 0}
        # torch.compile takes the whole loss (model forward + objective), so the loss math (for CLM the
        # log-softmax over a large vocabulary) fuses with the model instead of running eagerly.
        self.loss_fn = torch.compile(objective.loss) if cfg.compile else objective.loss
        self.autocast = autocast_for(self.device, cfg.precision)
        warning = bf16_cpu_warning(self.device, cfg.precision)
        if warning and self.is_main:
            print(warning, flush=True)

    # -- validation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss and metrics over the validation batches (weighted by sequences per batch)."""
        self.model.eval()
        # DDP evaluates the plain model (no collectives, so processes may hold different numbers of
        # batches); a sharded model runs as one, see _val_batches
        model = self.model if self.sharded else self.raw_model
        sums: dict[str, torch.Tensor] = {}
        total = 0
        for batch, counts in self._val_batches():
            n = next(iter(batch.values())).shape[0] if counts else 0
            batch = to_device(batch, self.device)
            with self.autocast:
                loss, metrics = self.loss_fn(model, batch)
            metrics.pop("loss_items", None)
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0) + v.detach().float() * n
            total += n
        self.model.train()
        if self.world_size > 1:  # each process evaluated its share of the windows: add them up
            import torch.distributed as dist

            keys = sorted(sums)
            packed = torch.stack([sums[k] for k in keys] + [torch.tensor(float(total), device=self.device)])
            dist.all_reduce(packed)
            sums, total = dict(zip(keys, packed[:-1])), int(packed[-1].item())
        if total == 0:
            return {}
        out = {k: (v / total).item() for k, v in sums.items()}
        if getattr(self.objective, "reports_perplexity", False):
            out["ppl"] = math.exp(min(out["loss"], 50.0))
        return out

    def _val_batches(self):
        """(batch, counts) over the validation batches. A sharded model gathers its weights in every
        forward pass, so all processes must run as many: one that has fewer batches runs its first one
        again (or a training batch when it has none) with `counts` false."""
        batches = self.batcher.val_batches(self.cfg.eval_batches)
        if not self.sharded:
            yield from ((b, True) for b in batches)
            return
        import torch.distributed as dist

        batches = list(batches)
        most = torch.tensor(len(batches), device=self.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        filler = batches[0] if batches else self.batcher.train_batch(0, 0)
        for i in range(int(most.item())):
            yield (batches[i], True) if i < len(batches) else (filler, False)

    # -- checkpoints ----------------------------------------------------------------------------
    def save(self, step: int) -> Path:
        """Write `checkpoints/step-N` (rank 0 writes; with a sharded model every process must call this)."""
        path = self.run_dir / "checkpoints" / f"step-{step}"
        weights, optim = self._full_state(with_optimizer=True)
        if self.is_main:
            save_checkpoint(path, model=self.raw_model, model_state=weights, optimizer_state=optim,
                            config=self.run_config, tokenizer=self.tokenizer, trainer_state=self._state(step))
            prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints)
        return path

    def _full_state(self, with_optimizer: bool) -> tuple[dict | None, dict | None]:
        """Full (unsharded) model and optimizer state dicts, the optimizer's keyed by parameter name, so
        that plain, DDP and FSDP2 runs on any number of processes read them. Rank 0 gets them (a
        sharded model is gathered with every process's help); other processes get (None, None)."""
        if not (self.is_main or self.sharded):
            return None, None
        weights = model_state(self.raw_model)
        optim = optimizer_state(self.raw_model, self.optimizer) if with_optimizer else None
        return (weights, optim) if self.is_main else (None, None)

    def _layout(self) -> dict[str, Any]:
        """What makes a step's data: the global batch (sequences per micro-batch over all processes), the
        micro-batches per step, the data and the seed."""
        return {"global_batch": self.cfg.batch_size * self.world_size, "grad_accum": self.cfg.grad_accum,
                "seed": self.cfg.seed, "data": getattr(self.batcher, "data_id", None)}

    def _state(self, step: int) -> dict[str, Any]:
        return {"step": step, "data_cursor": {"step": step, "micro": 0},
                "rng": "data and dropout are functions of (seed, step); nothing else to restore",
                **self._layout(), "world_size": self.world_size, "batch_size": self.cfg.batch_size,
                "parallel": self.cfg.parallel if self.world_size > 1 else "none", "best": dict(self.best)}

    def _save_best(self, step: int) -> Path:
        """`run_dir/best`: the weights with the best dev metric so far (no optimizer: not for resuming)."""
        path = self.run_dir / "best"
        weights, _ = self._full_state(with_optimizer=False)
        if self.is_main:
            save_checkpoint(path, model=self.raw_model, model_state=weights, config=self.run_config,
                            tokenizer=self.tokenizer, trainer_state=self._state(step))
        return path

    def check_resume(self, resume: str | Path) -> tuple[Path, dict[str, Any]]:
        """(checkpoint, its trainer_state) for `--resume`, checked before any work: it must hold the
        optimizer and trainer state, and its global batch, micro-batches per step, data and seed must be
        this run's (any number of processes may continue it), unless train.allow_resume_mismatch.
        Every process reads trainer_state.json (the runs directory is on a file system all nodes see)."""
        if getattr(self, "_checked", (None,))[0] == str(resume):  # the recipe checked it already
            return self._checked[1]
        ckpt = find_checkpoint(resume)
        for name in ("optimizer.pt", "trainer_state.json"):
            if not (ckpt / name).is_file():
                raise CheckpointError(f"{ckpt}: {name} missing; this checkpoint cannot be resumed (weights only)")
        state = read_json(ckpt / "trainer_state.json")
        ours = self._layout()
        changed = [k for k in ours if k in state and state[k] != ours[k]]
        if changed and not self.cfg.allow_resume_mismatch:
            raise ConfigError(f"--resume {ckpt}: {self._describe_changes(state, ours, changed)}, so this would not "
                              f"continue the same run; pass --train.allow_resume_mismatch true to continue anyway")
        if changed and self.is_main:
            print(f"warning: --resume {ckpt}: {self._describe_changes(state, ours, changed)}; continuing "
                  f"(train.allow_resume_mismatch): this is no longer the same run", file=sys.stderr, flush=True)
        self._checked = (str(resume), (ckpt, state))
        return ckpt, state

    def _describe_changes(self, state: dict[str, Any], ours: dict[str, Any], changed: list[str]) -> str:
        parts = []
        if "global_batch" in changed:
            was, now = state["global_batch"], ours["global_batch"]
            hint = (f"; with {self.world_size} process(es) use train.batch_size {was // self.world_size}"
                    if was % self.world_size == 0 else "")
            parts.append(f"the checkpoint's global batch is {was} sequences ({state.get('world_size', '?')} process(es) "
                         f"x train.batch_size {state.get('batch_size', '?')}), this run's {now} ({self.world_size} x "
                         f"{self.cfg.batch_size}){hint}")
        if "grad_accum" in changed:
            parts.append(f"train.grad_accum was {state['grad_accum']}, is {ours['grad_accum']}")
        if "seed" in changed:
            parts.append(f"train.seed was {state['seed']}, is {ours['seed']}")
        if "data" in changed:
            was, now = state["data"] or {}, ours["data"] or {}
            diff = ", ".join(f"{k} {was.get(k)} -> {now.get(k)}" for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k))
            parts.append(f"the data differs from the checkpoint's ({diff})")
        return "; ".join(parts)

    def _load(self, resume: str | Path) -> dict[str, Any]:
        """Restore weights and optimizer state for `--resume` (rank 0 reads the files and broadcasts
        them; each process keeps what its layout holds); returns the trainer state."""
        ckpt, state = self.check_resume(resume)
        weights, optim, error = {}, {}, None
        if self.is_main:
            try:
                weights = load_tensors(ckpt / "model.safetensors")
                self._check_weights(ckpt, weights)
                optim = name_optimizer_state(self.raw_model, self.optimizer, torch_load(ckpt / "optimizer.pt"))
            except LmforgeError as e:
                error = e
        error = broadcast_object(None if error is None else str(error), self.world_size)  # all stop, or none
        if error is not None:
            raise CheckpointError(error)
        try:
            load_state(self.raw_model, self.optimizer, weights, optim, self.world_size)
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{ckpt}: its state does not fit this model and optimizer ({str(e).splitlines()[0]})") from None
        return state

    def _check_weights(self, ckpt: Path, weights: dict[str, torch.Tensor]) -> None:
        """The checkpoint's tensors have this model's names and (full, unsharded) shapes."""
        own = {k: tuple(v.shape) for k, v in self.raw_model.state_dict().items()}  # DTensors report full shapes
        missing, unexpected = [k for k in own if k not in weights], [k for k in weights if k not in own]
        if missing or unexpected:
            raise CheckpointError(f"{ckpt}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        for k, v in weights.items():
            if tuple(v.shape) != own[k]:
                raise CheckpointError(f"{ckpt}: weight '{k}' has shape {tuple(v.shape)}, model expects {own[k]}")

    def _improved(self, value: float) -> bool:
        best = self.best["value"]
        if best is None:
            return True
        delta = value - best if self.best_mode == "max" else best - value
        return delta > self.cfg.min_delta

    # -- the loop -------------------------------------------------------------------------------
    def fit(self, resume: str | Path | None = None) -> FitResult:
        cfg = self.cfg
        start = 0
        if resume is not None:
            state = self._load(resume)
            start = int(state["step"])
            self.best.update(state.get("best") or {})
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(self.run_dir, cfg.tensorboard and self.is_main, keep_until=start if resume else None) if self.is_main else None
        result = FitResult(step=start, run_dir=self.run_dir)
        bar = None
        if cfg.progress and self.is_main:
            bar = Progress(total=cfg.max_steps, initial=start, every=cfg.progress_every)
        tokens_per_step = self.batcher.tokens_per_batch * cfg.grad_accum * self.world_size
        self._clock = [time.perf_counter(), 0.0]  # (start of fit, seconds spent validating)
        self.model.train()
        window_start, window_steps, window_loss = time.perf_counter(), 0, None
        stop = self._should_stop()
        end = start if stop else cfg.max_steps  # the step the run ends at (earlier when it stops early)
        try:
            for step in range(start, cfg.max_steps):
                if stop:
                    break
                # also at the step a resumed run starts from: its checkpoint was written before that validation
                if cfg.eval_every and step % cfg.eval_every == 0 and step > 0:
                    self._validate(step, log, bar, result)
                    if self._should_stop():  # early stopping: patience used up; this step is the end
                        end = step
                        break
                lr = lr_at(step, cfg)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                torch.manual_seed(step_seed(cfg.seed, step))
                step_metrics = self._train_step(step)
                window_loss = step_metrics if window_loss is None else {k: window_loss[k] + v for k, v in step_metrics.items()}
                window_steps += 1
                done = step + 1
                if done % cfg.log_every == 0 or done == cfg.max_steps:
                    window_loss = global_mean(window_loss, self.world_size)  # the whole global batch's loss
                    values = {k: (v / window_steps).item() for k, v in window_loss.items()}  # one sync per log line
                    elapsed = time.perf_counter() - window_start
                    values.update(lr=lr, tokens_per_s=tokens_per_step * window_steps / max(elapsed, 1e-9))
                    result.train_tokens_per_s = values["tokens_per_s"]
                    if log is not None:
                        log.write(done, "train", values)
                    if bar is not None:
                        bar.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{values['tokens_per_s']:,.0f}", refresh=False)
                    window_start, window_steps, window_loss = time.perf_counter(), 0, None
                if bar is not None:
                    bar.update(1)
                if cfg.save_every and done % cfg.save_every == 0 and done < cfg.max_steps:
                    result.checkpoint = self.save(done)
                result.step = done
            result.step = end
            validated_at_end = bool(result.history) and result.history[-1]["step"] == end  # stopped early
            if not validated_at_end and (start < end or not result.val):
                self._validate(end, log, bar, result)
            result.checkpoint = self.save(end)
        finally:
            if bar is not None:
                bar.close()
            if log is not None:
                log.close()
        if self.is_main:
            plot_curves(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
        return result

    def _train_step(self, step: int) -> dict[str, torch.Tensor]:
        """One optimizer step over grad_accum micro-batches; returns detached metric sums (no sync)."""
        cfg = self.cfg
        sums: dict[str, torch.Tensor] = {}
        for micro in range(cfg.grad_accum):
            batch = to_device(self.batcher.train_batch(step, micro), self.device)
            sync = micro == cfg.grad_accum - 1
            if self.sharded:  # FSDP2: reduce-scatter the gradients after the last micro-batch only
                self.model.set_requires_gradient_sync(sync)
            ctx = self.model.no_sync() if (not sync and hasattr(self.model, "no_sync")) else nullcontext()
            with ctx:
                with self.autocast:
                    loss, metrics = self.loss_fn(self.model, batch)
                loss = loss * self._share(metrics.pop("loss_items", None))
                (loss / cfg.grad_accum).backward()
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0) + v.detach().float() / cfg.grad_accum
        if cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip, foreach=True)
            sums["grad_norm"] = local_tensor(norm).detach()  # sharded gradients: the norm of the whole
        bad = self._nonfinite(sums)
        if self._fused_optimizer():
            # the fused AdamW kernel skips the whole update (weights, moments, step count) where found_inf
            # is set, as under a GradScaler: the skip needs no host sync
            self.optimizer.found_inf = bad.float()
            self.optimizer.step()
        elif not bad.item():
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._count_nonfinite(step, bad)
        return sums

    def _share(self, items: torch.Tensor | None) -> torch.Tensor | float:
        """The weight of this process's micro-batch loss, a mean over its `items` (see Objective): its share
        of the global micro-batch's items times the number of processes. DDP averages the processes'
        gradients, so the weighted losses give the gradient of the mean over all the global micro-batch's
        items, which is what one process computes; 1 in one process or for a loss without items."""
        if items is None or self.world_size <= 1:
            return 1.0
        import torch.distributed as dist

        mine = items.detach().to(device=self.device, dtype=torch.float32)
        total = mine.clone()
        dist.all_reduce(total)
        return mine * self.world_size / total.clamp(min=1)

    _nonfinite_counts: dict[str, torch.Tensor] | None = None  # on the device: see _count_nonfinite

    def _fused_optimizer(self) -> bool:
        return all(group.get("fused") for group in self.optimizer.param_groups)

    def _nonfinite(self, sums: dict[str, torch.Tensor]) -> torch.Tensor:
        """A 0-dim bool tensor on the device: the step's loss (or gradient norm, when clipping computes
        it) is NaN or infinite in any process."""
        bad = ~torch.isfinite(sums["loss"])
        if "grad_norm" in sums:
            bad = bad | ~torch.isfinite(sums["grad_norm"])
        if self.world_size > 1:
            import torch.distributed as dist

            flag = bad.to(torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad = flag.bool()
        return bad

    def _count_nonfinite(self, step: int, bad: torch.Tensor) -> None:
        """Count skipped steps on the device; read the counts when a metrics line is written (the loop
        syncs then anyway): warn about skipped steps, and stop when more than train.max_nonfinite_steps
        came in a row."""
        if self._nonfinite_counts is None:
            zero = torch.zeros((), dtype=torch.int64, device=bad.device)
            self._nonfinite_counts = {"run": zero, "worst": zero, "skipped": zero, "last": zero}
        c, b = self._nonfinite_counts, bad.to(torch.int64)
        c["run"] = (c["run"] + 1) * b  # the current streak of skipped steps
        c["worst"] = torch.maximum(c["worst"], c["run"])
        c["skipped"] = c["skipped"] + b
        c["last"] = torch.where(bad, step + 1, c["last"])
        done, limit = step + 1, self.cfg.max_nonfinite_steps
        if done % self.cfg.log_every and done != self.cfg.max_steps:
            return
        worst, skipped, last = torch.stack([c["worst"], c["skipped"], c["last"]]).tolist()
        c["worst"], c["skipped"] = c["run"], torch.zeros_like(c["skipped"])
        if worst > limit:
            raise DivergedError(
                f"training diverged: {worst} steps in a row had a non-finite loss or gradient (the last: step "
                f"{last}; train.max_nonfinite_steps={limit}); lower train.lr, lengthen train.warmup_steps or set "
                f"train.grad_clip, and --resume from an earlier checkpoint")
        if skipped and self.is_main:
            from tqdm import tqdm

            tqdm.write(f"warning: {skipped} step(s) up to step {done} had a non-finite loss or gradient and were "
                       f"skipped (no update; the last: step {last}); the run stops after more than {limit} in a row",
                       file=sys.stderr)

    def _should_stop(self) -> bool:
        return bool(self.cfg.patience) and self.best["bad_evals"] >= self.cfg.patience

    def _validate(self, step: int, log: MetricsLog | None, bar, result: FitResult) -> None:
        t0 = time.perf_counter()
        values = self.evaluate()
        if self.evaluator is not None:
            values.update(self.evaluator(self.raw_model))
        if not values:
            return
        name = self.cfg.best_metric
        if name:
            if name not in values:
                from lmforge.errors import ConfigError

                raise ConfigError(f"train.best_metric '{name}' is not a dev metric; dev metrics: {', '.join(values)}")
            if self._improved(values[name]):
                self.best.update(value=values[name], step=step, bad_evals=0)
                result.best_checkpoint = self._save_best(step)
            else:
                self.best["bad_evals"] += 1
            values = {**values, f"best_{name}": self.best["value"]}
        result.val = values
        timing = {}
        clock = getattr(self, "_clock", None)
        if clock is not None:  # training seconds so far in this process, validation time excluded (logged only)
            timing["train_s"] = t0 - clock[0] - clock[1]
            clock[1] += time.perf_counter() - t0
        result.history.append({"step": step, **values, **timing})
        if log is not None:
            log.write(step, "val", {**values, **timing})
        if self.is_main:
            text = "  ".join(f"{k} {v:.4f}" for k, v in values.items())
            msg = f"step {step}: val {text}"
            if bar is not None:
                bar.write(msg)
            else:
                print(msg, flush=True)

"""`lmforge ladder`: the history of language modelling on one dataset, in one report.

n-gram (Kneser-Ney, the best order) -> plain RNN -> GRU -> LSTM -> Transformer (GPT), every rung trained
on the same prepared token shards and scored on the same validation windows (those `pretrain` validates
on: consecutive `seq_len`-token windows of the validation split, each token predicted from the tokens
before it in its window), in nats per token. The neural rungs have about the same number of parameters
(the GPT's; the recurrent hidden size is solved for it) and the same time budget: short probes measure
each rung's time per training step (on CPU by CPU time, so that other jobs on a shared machine do not
hand one rung fewer steps; on a GPU by wall time), and its run gets as many steps as fit in `budget_s`
(with its own cosine schedule). The n-gram rung is counted, once per order, and the best order is kept.

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
EVAL_FLOATS = 1 << 24  # logits per forward pass when scoring (64 MB of float32)


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
    per_pass = min(512, max(1, EVAL_FLOATS // (windows.shape[1] * model.config.vocab_size)))
    for b in range(0, len(windows), per_pass):
        chunk = torch.from_numpy(windows[b:b + per_pass]).to(device)
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
    net, count_s, _ = _count(train_split.tokens, cfg)
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


def _count(tokens: np.ndarray, cfg) -> tuple[Any, float, float]:
    """(counted model, wall seconds, CPU seconds)."""
    from lmforge.models.ngram import NGramLM

    wall, cpu = time.perf_counter(), time.process_time()
    net = NGramLM.count(np.asarray(tokens), cfg)
    return net, time.perf_counter() - wall, time.process_time() - cpu


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


# ---- the ladder -------------------------------------------------------------------------------------------------
def ladder(
    data: DataConfig = DataConfig(),
    gpt: str = "shakespeare_char",
    model: Optional[dict[str, Any]] = None,
    train: Optional[dict[str, Any]] = None,
    out: Optional[str] = None,
    rungs: Optional[list[str]] = None,
    budget_s: float = 180.0,
    max_order: int = 8,
    smoothing: str = "modified_kn",
    recurrent_layers: int = 2,
    curve_points: int = 10,
    curve_batches: int = 20,
    probe_steps: int = 30,
    probe_rounds: int = 1,
    resume: bool = False,
) -> dict[str, Any]:
    """Train every rung of the language-model ladder on one prepared dataset and report them side by side.

    Args:
        data: the prepared data (`--data.path DIR`; default: the preset's) and the window length
            (`--data.seq_len N`; default: the preset's) every rung is trained and scored on.
        gpt: a pretrain preset or YAML file: its (gpt) model is the Transformer rung and sets the
            parameter count the recurrent rungs match; its train section is every neural rung's
            (batch, learning rate, schedule shape, ...).
        model: overrides of the GPT's model fields (`--model.d_model 192`).
        train: overrides of the shared train fields (`--train.threads 1 --train.lr 2e-3`); max_steps,
            decay_steps, eval and checkpoint cadence are set by the ladder.
        out: the report directory (default runs/ladder-<data directory name>); one run directory per rung
            goes inside it.
        rungs: which rungs, in order (default all: ngram, rnn, gru, lstm, gpt).
        budget_s: training wall time of each neural rung, in seconds (its steps are set from speed probes).
        max_order: the n-gram rung counts orders 1..max_order (those the vocabulary allows) and keeps the best.
        smoothing: the n-gram smoothing: modified_kn or kn.
        recurrent_layers: layers of the RNN, GRU and LSTM (their embedding width is the GPT's d_model;
            the hidden size is solved so that the parameter count matches the GPT's).
        curve_points: validation points on each neural rung's curve.
        curve_batches: validation batches per curve point (the table scores the whole validation split).
        probe_steps: steps of each speed probe (the probes set each neural rung's step count; on CPU they
            are timed by CPU time, so other jobs on the machine do not change a rung's share).
        probe_rounds: speed probes per neural rung, interleaved across the rungs; the fastest counts.
        resume: reuse the rungs OUT already finished (a rung is finished when OUT/RUNG/ladder.json exists).

    Returns:
        The report: settings and one row per rung (also OUT/report.json).
    """
    from lmforge.data.shards import open_prepared
    from lmforge.train.trainer import resolve_device

    rungs = list(rungs or RUNGS)
    _check_args(rungs, budget_s, max_order, smoothing, recurrent_layers, curve_points, curve_batches, probe_steps,
                probe_rounds)
    preset = load_yaml(preset_path(gpt))
    if preset.get("arch", "gpt") != "gpt":
        raise ConfigError(f"--gpt {gpt}: the Transformer rung needs a gpt preset, this one is arch {preset['arch']!r}")
    data = data or DataConfig()
    path = data.path or (preset.get("data") or {}).get("path")
    if not path:
        raise ConfigError("data.path is required: a directory written by `lmforge prepare` (--data.path DIR)")
    seq_len = data.seq_len or (preset.get("data") or {}).get("seq_len") or (preset.get("model") or {}).get("block_size") or 128
    train_split, val_split, tokenizer = open_prepared(path)
    if val_split is None or len(val_split.tokens) <= seq_len:
        raise ConfigError(f"{path}: the ladder needs a validation split longer than seq_len {seq_len}; "
                          f"prepare the data with a val_fraction")
    out_dir = Path(out or f"runs/ladder-{Path(path).name}")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not resume:
        raise ConfigError(f"{out_dir} already exists and is not empty; pass --resume true to reuse its finished "
                          f"rungs, or choose another --out")

    configs, target = _rung_configs({**(preset.get("model") or {}), **(model or {})}, tokenizer.vocab_size, seq_len,
                                    recurrent_layers)
    shared = {**(preset.get("train") or {}), **(train or {})}
    base_train = from_dict(TrainConfig, shared, "train")  # checks the user's train fields once, up front
    if base_train.threads:
        torch.set_num_threads(base_train.threads)

    windows = val_windows(val_split.tokens, seq_len)
    curve_windows = windows[:curve_batches * base_train.batch_size]
    settings = {"data": str(path), "seq_len": seq_len, "train_tokens": len(train_split.tokens),
                "val_tokens": len(val_split.tokens), "val_windows": len(windows), "scored_tokens": int(windows.shape[0] * seq_len),
                "vocab_size": tokenizer.vocab_size, "gpt": str(gpt), "budget_s": budget_s, "target_params": target,
                "threads": torch.get_num_threads(), "device": str(resolve_device(base_train.device)), "train": to_dict(base_train),
                "curve_windows": len(curve_windows), "rungs": rungs}
    out_dir.mkdir(parents=True, exist_ok=True)
    done = _finished_rungs(out_dir, rungs) if resume else {}
    for rung in rungs:
        if rung not in done and (out_dir / rung).exists():
            shutil.rmtree(out_dir / rung)  # an unfinished rung of an earlier ladder: start it again
    data_cfg = DataConfig(path=str(path), seq_len=seq_len)
    neural = [r for r in rungs if r != "ngram" and r not in done]
    speeds = _probe_speeds(out_dir, neural, configs, shared, data_cfg, probe_steps, probe_rounds)
    rows = []
    for rung in rungs:
        if rung in done:
            rows.append(done[rung])
            continue
        if rung == "ngram":
            row = _ngram_rung(out_dir, train_split.tokens, windows, curve_windows, tokenizer, path, seq_len,
                              max_order, smoothing, base_train)
        else:
            arch, values = configs[rung]
            row = _neural_rung(out_dir, rung, arch, values, shared, data_cfg, budget_s, speeds[rung], curve_points,
                               curve_batches, windows)
        atomic_write_json(out_dir / rung / "ladder.json", row)  # written last: the rung is finished
        rows.append(row)
    report = {"settings": settings, "rows": rows}
    atomic_write_json(out_dir / "report.json", report)
    _plot(rows, out_dir / "val_loss_vs_time.png", f"{Path(path).name}: validation loss against training time",
          len(curve_windows) * seq_len)
    atomic_write_text(out_dir / "report.md", report_markdown(report))
    print(report_table(rows), flush=True)
    print(f"report {out_dir / 'report.md'}  plot {out_dir / 'val_loss_vs_time.png'}", flush=True)
    return report


def _check_args(rungs, budget_s, max_order, smoothing, recurrent_layers, curve_points, curve_batches, probe_steps,
                probe_rounds):
    from lmforge.config import closest

    for r in rungs:
        if r not in RUNGS:
            raise ConfigError(f"rungs: unknown rung '{r}'{closest(r, RUNGS)}; rungs are {', '.join(RUNGS)}")
    if len(set(rungs)) != len(rungs):
        raise ConfigError(f"rungs: each rung once, got {rungs}")
    if not budget_s > 0:
        raise ConfigError(f"budget_s must be > 0 seconds, got {budget_s}")
    if max_order < 1:
        raise ConfigError(f"max_order must be at least 1 (1 = unigram), got {max_order}")
    if smoothing not in ("modified_kn", "kn"):
        raise ConfigError(f"smoothing must be 'modified_kn' or 'kn', got {smoothing!r}")
    for name, value, low in (("recurrent_layers", recurrent_layers, 1), ("curve_points", curve_points, 1),
                             ("curve_batches", curve_batches, 1), ("probe_steps", probe_steps, 6),
                             ("probe_rounds", probe_rounds, 1)):
        if value < low:
            raise ConfigError(f"{name} must be at least {low}, got {value}")


def _rung_configs(gpt_values: dict[str, Any], vocab_size: int, seq_len: int, recurrent_layers: int):
    """({rung: (arch, model config)} for the neural rungs, the GPT's parameter count)."""
    from lmforge.models import build_model

    gpt_cfg, _ = resolve_model_config("gpt", {**gpt_values, "block_size": seq_len}, vocab_size, seq_len)
    target = _count_params(build_model("gpt", gpt_cfg))
    configs = {cell: ("lstm", _matched_recurrent(cell, gpt_cfg, recurrent_layers, target, vocab_size))
               for cell in ("rnn", "gru", "lstm")}
    configs["gpt"] = ("gpt", to_dict(gpt_cfg))
    return configs, target


def _finished_rungs(out_dir: Path, rungs: list[str]) -> dict[str, dict]:
    """The rows of the rungs an earlier ladder in `out_dir` finished (their ladder.json exists)."""
    from lmforge.storage import read_json

    done = {}
    for rung in rungs:
        if (out_dir / rung / "ladder.json").is_file():
            done[rung] = read_json(out_dir / rung / "ladder.json")
            print(f"[{rung}] reused {out_dir / rung / 'ladder.json'}", flush=True)
    return done


def _count_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())  # tied weights once


def _matched_recurrent(cell: str, gpt_cfg, n_layer: int, target: int, vocab_size: int) -> dict[str, Any]:
    """The recurrent model's config whose parameter count is closest to `target`: the GPT's embedding
    width and dropout, tied embeddings, and the hidden size found by bisection."""
    from lmforge.models import build_model

    values = {"vocab_size": vocab_size, "d_model": gpt_cfg.d_model, "n_layer": n_layer, "dropout": gpt_cfg.dropout,
              "tie_embeddings": True, "cell": cell}

    def params(h: int) -> int:
        with torch.device("meta"):
            return _count_params(build_model("lstm", {**values, "d_hidden": h}))

    lo, hi = 1, 16384
    while lo < hi:  # the smallest hidden size reaching the target
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if params(mid) < target else (lo, mid)
    best = min((h for h in (lo - 1, lo) if h >= 1), key=lambda h: abs(params(h) - target))
    return {**values, "d_hidden": best}


def _ngram_rung(out_dir, train_tokens, windows, curve_windows, tokenizer, path, seq_len, max_order, smoothing,
                base_train) -> dict[str, Any]:
    from lmforge.models import model_config

    V = tokenizer.vocab_size
    orders = [k for k in range(1, max_order + 1) if V**k < 2**63]
    tried, best = [], None
    for k in orders:
        cfg = model_config("ngram", {"vocab_size": V, "order": k, "smoothing": smoothing})
        net, count_s, count_cpu_s = _count(train_tokens, cfg)
        loss = val_nats(net, windows)
        row = {"order": k, "ngrams": sum(net.config.ngrams), "params": net.num_params(), "count_s": count_s,
               "count_cpu_s": count_cpu_s, "val_nats": loss}
        tried.append(row)
        print(f"[ngram] order {k}: val {loss:.4f} nats/token, {net.num_params():,} numbers, counted in {count_s:.1f} s",
              flush=True)
        if best is None or loss < best[0]["val_nats"]:
            best = (row, net)
        del net
    row, net = best
    val = {"loss": row["val_nats"], "ppl": math.exp(min(row["val_nats"], 50.0))}
    _write_ngram_run(out_dir / "ngram", net, tokenizer, path, seq_len, base_train, row["count_s"], len(train_tokens), val)
    curve = val_nats(net, curve_windows)
    return {"rung": "ngram", "model": f"order {row['order']} ({smoothing.replace('_', ' ')})", "params": row["params"],
            "steps": 0, "train_tokens": len(train_tokens), "train_s": row["count_cpu_s"], "wall_s": row["count_s"],
            "val_nats": row["val_nats"], "ppl": val["ppl"], "curve": [[0, row["count_s"], curve]], "orders": tried,
            "run_dir": str(out_dir / "ngram")}


def _probe_speeds(out_dir: Path, rungs: list[str], configs, shared, data: DataConfig, probe_steps: int,
                  rounds: int) -> dict[str, float]:
    """Training tokens per second of each rung: two short runs per round (probe_steps // 3 and probe_steps
    steps; their difference cancels start-up, the validation batch and the checkpoint), rounds interleaved
    across the rungs, the fastest round counting. On CPU the steps are timed by this process's CPU time per
    torch thread, so that other jobs on a shared machine do not hand one rung fewer steps than another (on a
    quiet machine with one thread that is the wall time); on a GPU by wall time."""
    from lmforge.recipes.pretrain import pretrain
    from lmforge.train.trainer import resolve_device

    probe_dir = out_dir / ".probe"
    short = max(1, probe_steps // 3)
    cfg = from_dict(TrainConfig, {**shared, "tensorboard": False, "progress": False, "save_every": 0,
                                  "keep_checkpoints": 1, "decay_steps": None, "warmup_steps": 0, "eval_every": 0,
                                  "eval_batches": 1, "log_every": probe_steps}, "train")
    on_cpu = resolve_device(cfg.device).type == "cpu"
    tokens_per_step = cfg.batch_size * cfg.grad_accum * data.seq_len
    step_s: dict[str, float] = {r: math.inf for r in rungs}
    for i in range(rounds):
        for rung in rungs:
            arch, values = configs[rung]
            print(f"[{rung}] speed probe {i + 1}/{rounds} ({short} and {probe_steps} steps)", flush=True)
            spent = []
            for steps in (short, probe_steps):
                shutil.rmtree(probe_dir, ignore_errors=True)
                wall, cpu = time.perf_counter(), time.process_time()
                pretrain(data, arch=arch, model=values, train=replace(cfg, max_steps=steps), name=rung,
                         runs_dir=str(probe_dir))
                spent.append((time.process_time() - cpu) / torch.get_num_threads() if on_cpu
                             else time.perf_counter() - wall)
            per_step = (spent[1] - spent[0]) / (probe_steps - short)
            if per_step < 0.5 * spent[1] / probe_steps:  # timer noise swamped a tiny model: count it all
                per_step = spent[1] / probe_steps
            step_s[rung] = min(step_s[rung], per_step)
    shutil.rmtree(probe_dir, ignore_errors=True)
    return {r: tokens_per_step / t for r, t in step_s.items()}


def _neural_rung(out_dir, rung, arch, values, shared, data: DataConfig, budget_s, tokens_per_s, curve_points,
                 curve_batches, windows) -> dict[str, Any]:
    from lmforge.recipes.pretrain import pretrain
    from lmforge.train.checkpoint import load_pretrained
    from lmforge.train.trainer import resolve_device

    # 1. as many steps as fit the budget at the probed speed, the preset's schedule shape stretched over them
    batch = from_dict(TrainConfig, shared, "train")
    tokens_per_step = batch.batch_size * batch.grad_accum * data.seq_len
    steps = max(1, int(budget_s * tokens_per_s / tokens_per_step))
    eval_every = max(1, steps // curve_points)
    run_cfg = from_dict(TrainConfig, {**shared, "tensorboard": False, "progress": False, "save_every": 0,
                                      "keep_checkpoints": 1, "max_steps": steps, "decay_steps": steps,
                                      "warmup_steps": min(batch.warmup_steps, steps // 10), "eval_every": eval_every,
                                      "eval_batches": curve_batches, "log_every": eval_every}, "train")
    print(f"[{rung}] {steps} steps for a budget of {budget_s:g} s ({tokens_per_s:,.0f} tokens/s probed)", flush=True)
    wall = time.perf_counter()
    summary = pretrain(data, arch=arch, model=values, train=run_cfg, name=rung, runs_dir=str(out_dir))
    wall = time.perf_counter() - wall
    curve = _curve(Path(summary["run_dir"]) / "metrics.jsonl")
    # 2. the score: the whole validation split
    device = resolve_device(run_cfg.device)
    net, _, cfg = load_pretrained(summary["run_dir"], device=device)
    loss = val_nats(net, windows, device)
    return {"rung": rung, "model": _describe(rung, cfg["model"]), "params": _count_params(net), "steps": steps,
            "train_tokens": steps * tokens_per_step, "train_s": steps * tokens_per_step / tokens_per_s,
            "wall_s": curve[-1][1] if curve else wall, "probe_tokens_per_s": tokens_per_s, "val_nats": loss,
            "ppl": math.exp(min(loss, 50.0)), "curve": curve, "run_dir": summary["run_dir"]}


def _describe(rung: str, m: dict[str, Any]) -> str:
    if rung == "gpt":
        return f"{m['n_layer']} layers x {m['d_model']}, {m['n_head']} heads"
    return f"{m['n_layer']} layers, embedding {m['d_model']}, hidden {m['d_hidden']}"


def _curve(metrics: Path) -> list[list[float]]:
    """[step, wall seconds of training so far, val loss] at each validation of a run, from its metrics.jsonl
    (the trainer logs `train_s`, validation time excluded, with each validation)."""
    rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    return [[r["step"], r["train_s"], r["loss"]] for r in rows if r["split"] == "val" and "loss" in r and "train_s" in r]


def _plot(rows: list[dict], out: Path, title: str, curve_tokens: int) -> None:
    """Validation loss against training time: steps x the probed time per step (the budget's clock, the
    same for every rung whatever else ran on the machine); the n-gram at its counting time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5), dpi=110)
    points = {r["rung"]: [(r["train_s"] * step / max(r["steps"], 1) if r["steps"] else r["train_s"], loss)
                          for step, _, loss in r["curve"]] for r in rows}
    t_max = max([t for pts in points.values() for t, _ in pts] + [1.0])
    for r in rows:
        if not points[r["rung"]]:
            continue
        t, y = zip(*points[r["rung"]])
        if r["rung"] == "ngram":
            line, = ax.plot(t, y, "*", ms=12, label=f"n-gram, {r['model']}")
            ax.hlines(y[0], t[0], t_max, colors=line.get_color(), linestyles="dashed", lw=1)
        else:
            ax.plot(t, y, "o-", ms=3, lw=1.5, label=f"{r['rung'].upper()} ({r['params'] / 1e6:.2f}M)")
    ax.set_xlabel("training time (s): steps x probed time per step; counting time for the n-gram")
    ax.set_ylabel(f"validation loss (nats/token, first {curve_tokens:,} tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: no curve hidden
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())


def report_table(rows: list[dict]) -> str:
    """The markdown table: one row per rung."""
    lines = ["| rung | model | parameters | steps | train tokens | train time (s) | wall time (s) | val nats/token "
             "| perplexity |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = {"ngram": "n-gram (KN)"}.get(r["rung"], r["rung"].upper())
        steps = "counted" if r["rung"] == "ngram" else f"{r['steps']:,}"
        lines.append(f"| {name} | {r['model']} | {r['params']:,} | {steps} | {r['train_tokens']:,} | "
                     f"{r['train_s']:.0f} | {r['wall_s']:.0f} | {r['val_nats']:.4f} | {r['ppl']:.2f} |")
    return "\n".join(lines)


def report_markdown(report: dict) -> str:
    s, rows = report["settings"], report["rows"]
    parts = [f"# Language-model ladder: {s['data']}", "",
             f"{s['train_tokens']:,} training tokens; validation: {s['scored_tokens']:,} tokens scored in {s['val_windows']:,} "
             f"windows of {s['seq_len']} (each token predicted from the tokens before it in its window), vocabulary "
             f"{s['vocab_size']:,}. Neural rungs: about {s['target_params']:,} parameters (the GPT's, preset "
             f"`{s['gpt']}`), {s['budget_s']:.0f} s of training each (steps set by speed probes), batch "
             f"{s['train']['batch_size']}, lr {s['train']['lr']}, {s['threads']} torch thread(s), device "
             f"{s['device']}. Parameters of the n-gram: the numbers it stores (one probability per n-gram, one "
             f"back-off weight per context). Train time: steps x the probed time per step (on CPU, CPU time per "
             f"thread), i.e. the budget; for the n-gram its counting CPU time. Wall time: what training took here "
             f"without validation (longer when other jobs shared the machine).", "", report_table(rows), ""]
    ngram = next((r for r in rows if r["rung"] == "ngram"), None)
    if ngram:
        parts += ["n-gram orders (the best is the rung above):", "", "| order | n-grams | count time (s) | val nats/token |",
                  "|---:|---:|---:|---:|"]
        parts += [f"| {o['order']} | {o['ngrams']:,} | {o['count_s']:.1f} | {o['val_nats']:.4f} |" for o in ngram["orders"]]
        parts.append("")
    parts += ["![validation loss against training time](val_loss_vs_time.png)", "",
              "Run directories: " + ", ".join(f"`{r['run_dir']}`" for r in rows), ""]
    return "\n".join(parts)

"""Issue 12: short proxy runs of pretraining recipes at equal compute, against the shipped preset.

Each variant is the `bert_en_small` preset (today's: rotary positions, batch 16, lr 1e-3, bf16; `old-preset`
is the recipe before issue 12) with some fields overridden (model shape, objective and its
options, batch size, sequence length, learning rate and schedule). Every variant gets the same budget of
CPU seconds on ONE torch thread (process CPU time, which is what wall time would be on a core of its own;
on the shared machine wall time depends on the other jobs). Its step count comes from a speed probe of
its own first steps, so its learning-rate schedule (warm-up, cosine decay) fits the budget, as a real run
of that length would. The training step is the trainer's (lmforge's objective and batcher from the
objective registry, `build_optimizer`, `lr_at`, per-step dropout seeding, clipping); validation is
always the preset's, in fp32: MLM cross-entropy and masked-token accuracy on the same fixed whole-word 15% masks
of the first `--eval_batches` validation batches, whatever the variant trains with (for `rtd` the same
model is the MLM, so the probe is the same).

    python bench/bench_pretrain_levers.py --budget 600 --variants preset,lr2e-3 --out bench/levers
    python bench/bench_pretrain_levers.py --list
    python bench/bench_pretrain_levers.py --probe runs/bert_en_small --data data/imdb_unsup --out bench/levers

`--probe RUN` scores every complete checkpoint of a full pretraining run (its last step included) on the same
reference masks, in fp32, and writes OUT/<run>.json in the variants' format (x = tokens seen), so a full
run and the recorded curve of the old preset share one plot (`--plot --x tokens`). `--trainer_curve RUN ...`
writes a run's own validation records instead (the trainer's masks, every `eval_every` steps), for runs
whose step checkpoints were pruned:

    python bench/bench_pretrain_levers.py --trainer_curve runs/bert_en_small runs/bert_en_2t --out bench/levers/trainer_runs --plot --x tokens

Writes OUT/<variant>.json (curve: step, tokens seen, CPU seconds, val loss, val accuracy) and prints
a summary table; `--plot` draws every variant in OUT into OUT/levers.png.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table  # noqa: E402

from lmforge.config import load_yaml  # noqa: E402
from lmforge.data.mlm import MLMBatcher  # noqa: E402
from lmforge.data.shards import open_prepared  # noqa: E402
from lmforge.models import build_model  # noqa: E402
from lmforge.recipes.pretrain import _objective_builder, resolve_model_config  # noqa: E402
from lmforge.train.config import TrainConfig  # noqa: E402
from lmforge.train.mlm import MLMObjective, MLMOptions  # noqa: E402
from lmforge.train.protocols import ObjectiveContext  # noqa: E402
from lmforge.train.trainer import autocast_for, build_optimizer, lr_at, read_metrics, step_seed  # noqa: E402

PRESETS = Path(__file__).resolve().parents[1] / "src" / "lmforge" / "presets"
NO_DROPOUT = {"dropout": 0.0, "attn_dropout": 0.0}

# name -> overrides of the preset: {"model": {...}, "objective": str, "objective_args": {...}, "train": {...},
# "seq_len": int}. Warm-up is given as a share of the steps ("warmup_frac"), since steps follow the budget.
VARIANTS: dict[str, dict] = {
    "preset": {},
    # the recipe the presets had before issue 12 (learned positions, batch 32, lr 5e-4, fp32); the sweep's
    # first rows were measured against it: `--variants old-preset+batch16` reproduces "batch16" of then
    "old-preset": {"model": {"position": "learned"},
                   "train": {"batch_size": 32, "lr": 5e-4, "min_lr": 5e-5, "warmup_steps": 150, "max_steps": 2500,
                             "precision": "fp32"}},
    "lr1e-3": {"train": {"lr": 1e-3, "min_lr": 1e-4}},
    "lr2e-3": {"train": {"lr": 2e-3, "min_lr": 2e-4}},
    "nodrop": {"model": NO_DROPOUT},
    "nodrop-lr2e-3": {"model": NO_DROPOUT, "train": {"lr": 2e-3, "min_lr": 2e-4}},
    "batch16": {"train": {"batch_size": 16}},
    "batch64": {"train": {"batch_size": 64, "lr": 1e-3, "min_lr": 1e-4}},
    "seq64": {"seq_len": 64, "train": {"batch_size": 64}},
    "token-mask": {"objective_args": {"whole_word": False}},
    "mask30": {"objective_args": {"mask_prob": 0.3}},
    "mask40": {"objective_args": {"mask_prob": 0.4}},
    "deep-narrow": {"model": {"n_layer": 8, "n_head": 4, "d_model": 192, "d_ff": 768}},
    "shallow-wide": {"model": {"n_layer": 2, "n_head": 8, "d_model": 384, "d_ff": 1536}},
    "small": {"model": {"n_layer": 4, "n_head": 4, "d_model": 128, "d_ff": 512}},
    "rtd": {"objective": "rtd"},
    "bf16": {"train": {"precision": "bf16"}},
    "batch8": {"train": {"batch_size": 8}},
    "rope": {"model": {"position": "rope"}},
    "lr1e-3x": {"train": {"lr": 1e-3, "min_lr": 1e-4}},
}


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def resolve(name: str, spec: str | None, preset: dict) -> dict:
    """The variant's full recipe: preset + named overrides (+ extra JSON overrides after ':')."""
    over = copy.deepcopy(VARIANTS.get(name.split("+")[0], {}))
    for extra in name.split("+")[1:]:  # "a+b": a's overrides, then b's
        over = merge(over, VARIANTS[extra])
    if spec:
        over = merge(over, json.loads(spec))
    recipe = {"model": dict(preset["model"]), "objective": preset["objective"],
              "objective_args": dict(preset.get("objective_args") or {}), "train": dict(preset["train"]),
              "seq_len": preset["data"]["seq_len"], "warmup_frac": None}
    return merge(recipe, over)


def cpu() -> float:
    return time.process_time()


def reference_probe(prepared: tuple, eval_batches: int):
    """validate(model) -> (loss, accuracy) on the preset's fixed validation masks (whole-word 15%, seed 1337,
    batch 32 x 128: the batches the old preset's trainer validated on), fp32, in eval mode (the model's mode is restored)."""
    train_split, val_split, tok = prepared  # open_prepared(data)
    ref = MLMBatcher(MLMOptions(whole_word=True).masker(tok), train_split, val_split, seq_len=128, batch_size=32,
                     seed=1337)
    ref_obj = MLMObjective()

    @torch.no_grad()
    def validate(model) -> tuple[float, float]:
        training = model.training
        model.eval()
        tot = acc = n = 0.0
        for batch in ref.val_batches(eval_batches):
            b = batch["input_ids"].shape[0]
            loss, metrics = ref_obj.loss(model, batch)
            tot, acc, n = tot + loss.item() * b, acc + metrics["mlm_acc"].item() * b, n + b
        model.train(training)
        return tot / n, acc / n

    return validate


def run_variant(name: str, recipe: dict, data: str, budget: float, eval_points: int, eval_batches: int,
                probe_steps: int, save: Path | None = None) -> dict:
    train_split, val_split, tok = open_prepared(data)
    preset_train = TrainConfig(**{k: v for k, v in recipe["train"].items()})
    seq_len = recipe["seq_len"]
    model_values = dict(recipe["model"], max_position=max(recipe["model"].get("max_position", 128), seq_len))
    cfg, seq_len = resolve_model_config("bert", model_values, tok.vocab_size, seq_len)
    ctx = ObjectiveContext(tokenizer=tok, train=train_split, val=val_split, seq_len=seq_len,
                           batch_size=preset_train.batch_size, seed=preset_train.seed, options=recipe["objective_args"])
    batcher, objective = _objective_builder(recipe["objective"])(ctx)
    validate = reference_probe((train_split, val_split, tok), eval_batches)  # the preset's masks (whole-word 15%, seed, batch 32 x 128)

    def build():
        torch.manual_seed(preset_train.seed)
        m = build_model("bert", cfg)
        if getattr(objective, "heads", None) is not None:
            m.use_heads(*objective.heads)
        m.train()
        return m

    def step_fn(model, optim, train_cfg, step):
        lr = lr_at(step, train_cfg)
        for g in optim.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        torch.manual_seed(step_seed(train_cfg.seed, step))
        with autocast_for(torch.device("cpu"), train_cfg.precision):  # the trainer's: bf16 only when asked on CPU
            loss, _ = objective.loss(model, batcher.train_batch(step, 0))
        loss.backward()
        if train_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip, foreach=True)
        optim.step()
        optim.zero_grad(set_to_none=True)
        return loss.item()

    # speed probe: the first steps of a throwaway copy (fastest half counts: the first steps warm caches)
    model = build()
    optim = build_optimizer(model, preset_train, torch.device("cpu"))
    times = []
    for s in range(probe_steps):
        t0 = cpu()
        step_fn(model, optim, preset_train, s)
        times.append(cpu() - t0)
    per_step = sorted(times)[len(times) // 2] if len(times) > 2 else max(times)
    steps = max(10, int(budget / per_step))
    over = {"max_steps": steps}
    if recipe.get("warmup_frac") is not None:
        over["warmup_steps"] = int(recipe["warmup_frac"] * steps)
    else:  # the preset's warm-up share of its steps (150 of 2500 = 6%)
        over["warmup_steps"] = int(round(steps * preset_train.warmup_steps / preset_train.max_steps))
    train_cfg = TrainConfig(**{**recipe["train"], **over})
    print(f"[{name}] {per_step:.3f} CPU s/step -> {steps} steps in {budget:.0f} s (warm-up {train_cfg.warmup_steps}); "
          f"{batcher.tokens_per_batch} tokens/step; {model.describe()}", flush=True)

    model = build()
    optim = build_optimizer(model, train_cfg, torch.device("cpu"))
    marks = sorted({round(steps * i / eval_points) for i in range(1, eval_points + 1)})
    curve, train_cpu, t_wall = [], 0.0, time.time()
    vl, va = validate(model)
    curve.append({"step": 0, "tokens": 0, "cpu_s": 0.0, "val_loss": vl, "val_acc": va})
    losses = []
    for step in range(steps):
        t0 = cpu()
        losses.append(step_fn(model, optim, train_cfg, step))
        train_cpu += cpu() - t0
        if step + 1 in marks:
            vl, va = validate(model)
            window = losses[-min(len(losses), 25):]
            curve.append({"step": step + 1, "tokens": (step + 1) * batcher.tokens_per_batch, "cpu_s": train_cpu,
                          "train_loss": sum(window) / len(window), "val_loss": vl, "val_acc": va})
            print(f"[{name}] step {step + 1}/{steps}: cpu {train_cpu:.0f}s  train {curve[-1]['train_loss']:.4f}  "
                  f"val {vl:.4f} / {100 * va:.2f}%", flush=True)
    if save is not None:  # a checkpoint every verb reads (fill_mask, ablation --init_from)
        from lmforge.config import to_dict
        from lmforge.train.checkpoint import save_checkpoint

        save_checkpoint(save / name, model=model, tokenizer=tok, config={
            "name": name, "arch": "bert", "model": to_dict(cfg), "objective": recipe["objective"],
            "objective_args": recipe["objective_args"], "data": {"path": data, "seq_len": seq_len},
            "train": to_dict(train_cfg)})
    return {"name": name, "recipe": recipe, "steps": steps, "probe_cpu_s_per_step": per_step,
            "tokens_per_step": batcher.tokens_per_batch, "budget_cpu_s": budget, "train_cpu_s": train_cpu,
            "wall_s": time.time() - t_wall, "eval_batches": eval_batches, "curve": curve,
            "params": model.num_params(), "loadavg": Path("/proc/loadavg").read_text().split()[:3]}


def trainer_curve(run: Path) -> dict:
    """A pretraining run's own validation records (metrics.jsonl: the trainer's masks and precision, every
    `eval_every` steps) in the variants' format, for runs whose step checkpoints were pruned. Runs of one
    preset share their validation masks (seeded by the run's seed and batch index), so their curves compare;
    they are not the reference masks of `--probe`."""
    from lmforge.checkpoints import read_config

    cfg = read_config(run)
    tokens_per_step = cfg["train"]["batch_size"] * cfg["data"]["seq_len"]
    curve = [{"step": row["step"], "tokens": row["step"] * tokens_per_step, "wall_s": row.get("train_s", float("nan")),
              "val_loss": row["loss"], "val_acc": row["mlm_acc"]}
             for row in read_metrics(run / "metrics.jsonl") if row.get("split") == "val" and "mlm_acc" in row]
    if not curve:
        raise SystemExit(f"{run}: no validation records with mlm_acc in metrics.jsonl")
    threads = cfg["train"].get("threads")
    threads = "torch's default threads" if threads is None else f"{threads} thread{'s' if threads != 1 else ''}"
    return {"name": f"{run.name} ({curve[-1]['step']} steps, {threads}; trainer masks)",
            "recipe": cfg, "steps": curve[-1]["step"], "tokens_per_step": tokens_per_step,
            "train_cpu_s": float("nan"), "wall_s": curve[-1]["wall_s"], "eval_batches": cfg["train"]["eval_batches"],
            "curve": curve, "params": None, "probe": True}


def probe_run(run: Path, data: str, eval_batches: int) -> dict:
    """A finished (or running) pretraining run's checkpoints scored on the reference masks."""
    from lmforge.checkpoints import load_pretrained, read_config, step_checkpoints

    validate = reference_probe(open_prepared(data), eval_batches)
    ckpts = step_checkpoints(run)  # the trainer saves the last step as step-N too
    if not ckpts:
        raise SystemExit(f"{run}: no complete checkpoint to probe")
    cfg = read_config(ckpts[-1])
    tokens_per_step = cfg["train"]["batch_size"] * cfg["data"]["seq_len"]
    metrics = run / "metrics.jsonl"  # step -> seconds of training since the start, from the run's metrics
    wall = {row["step"]: row["train_s"] for row in (read_metrics(metrics) if metrics.is_file() else []) if "train_s" in row}
    curve = []
    for ckpt in ckpts:
        step = int(ckpt.name.split("-")[1])
        model, _, _ = load_pretrained(ckpt)
        vl, va = validate(model.float())
        curve.append({"step": step, "tokens": step * tokens_per_step, "wall_s": wall.get(step, float("nan")),
                      "val_loss": vl, "val_acc": va})
        print(f"[{run.name}] {ckpt.name}: val {vl:.4f} / {100 * va:.2f}%", flush=True)
    return {"name": run.name, "recipe": cfg, "steps": curve[-1]["step"], "tokens_per_step": tokens_per_step,
            "train_cpu_s": float("nan"), "wall_s": curve[-1]["wall_s"], "eval_batches": eval_batches, "curve": curve,
            "params": model.num_params(), "probe": True}


def plot(out: Path, x_axis: str = "cpu", names: list[str] | None = None, path: Path | None = None) -> Path:
    """Validation loss and accuracy of the variants in OUT (all, or `names`) against training CPU minutes
    (`x_axis` 'cpu') or tokens seen ('tokens'), one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110)
    files = sorted(out.glob("*.json")) if not names else [out / f"{n}.json" for n in names]
    for f in files:
        r = json.loads(f.read_text())
        c = r["curve"]
        if x_axis == "cpu" and r.get("probe"):  # a probed run recorded wall time, not CPU time
            print(f"{r['name']}: a probed run has no CPU times; plot it with --x tokens", flush=True)
            continue
        x = [p["cpu_s"] / 60 for p in c] if x_axis == "cpu" else [p["tokens"] / 1e6 for p in c]
        a.plot(x, [p["val_loss"] for p in c], "o-", label=r["name"], ms=3)
        b.plot(x, [100 * p["val_acc"] for p in c], "o-", label=r["name"], ms=3)
    xlabel = "training CPU minutes (one thread)" if x_axis == "cpu" else "tokens seen (millions)"
    a.set_xlabel(xlabel)
    a.set_ylabel("validation MLM loss (fixed masks)")
    b.set_xlabel(xlabel)
    b.set_ylabel("validation masked-token accuracy, %")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    b.legend(fontsize=7)
    fig.tight_layout()
    path = path or out / f"levers_{x_axis}.png"
    fig.savefig(path)
    return path


def summary(out: Path) -> str:
    rows = []
    for f in sorted(out.glob("*.json")):
        r = json.loads(f.read_text())
        end = r["curve"][-1]
        rows.append([r["name"], f"{r['params'] / 1e6:.2f}M" if r.get("params") else "-", r["steps"], r["tokens_per_step"],
                     f"{end['tokens'] / 1e6:.2f}M", f"{r['train_cpu_s'] / 60:.1f}", f"{r['wall_s'] / 60:.1f}",
                     f"{end['val_loss']:.3f}", f"{100 * end['val_acc']:.1f}%"])
    return "\n".join(markdown_table(["variant", "params", "steps", "tokens/step", "tokens", "train CPU min",
                                     "wall min", "val loss", "val acc"], rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/imdb_unsup")
    p.add_argument("--preset", default="bert_en_small")
    p.add_argument("--variants", default=None,
                   help="comma-separated names (a+b combines overrides); without it, only the summary (and --plot) of OUT")
    p.add_argument("--spec", default=None, help="extra JSON overrides applied to every variant named here")
    p.add_argument("--tag", default=None, help="file name for a --spec variant")
    p.add_argument("--budget", type=float, default=600.0, help="training CPU seconds per variant")
    p.add_argument("--eval_points", type=int, default=5)
    p.add_argument("--eval_batches", type=int, default=10)
    p.add_argument("--probe_steps", type=int, default=8)
    p.add_argument("--out", default="bench/levers")
    p.add_argument("--save", default=None, help="also save each variant's final model here (SAVE/<variant>)")
    p.add_argument("--probe", nargs="*", default=None, help="score these runs' checkpoints on the reference masks")
    p.add_argument("--trainer_curve", nargs="*", default=None,
                   help="write these runs' own validation records (trainer masks) to OUT, for --plot")
    p.add_argument("--list", action="store_true")
    p.add_argument("--plot", action="store_true")
    p.add_argument("--x", choices=["cpu", "tokens"], default="cpu", help="x axis of the plot")
    args = p.parse_args()
    if args.list:
        for k, v in VARIANTS.items():
            print(f"{k:16s} {json.dumps(v)}")
        return
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    preset = load_yaml(PRESETS / f"{args.preset}.yaml")
    if args.probe is not None:
        for run in args.probe:
            r = probe_run(Path(run), args.data, args.eval_batches)
            (out / f"{r['name']}.json").write_text(json.dumps(r, indent=1))
        return
    if args.trainer_curve is not None:
        for run in args.trainer_curve:
            (out / f"{Path(run).name}.json").write_text(json.dumps(trainer_curve(Path(run)), indent=1))
        print(summary(out))
        if args.plot:
            print(f"plot: {plot(out, args.x)}")
        return
    if args.variants:
        for name in args.variants.split(","):
            recipe = resolve(name, args.spec, preset)
            r = run_variant(name if not args.tag else args.tag, recipe, args.data, args.budget, args.eval_points,
                            args.eval_batches, args.probe_steps, Path(args.save) if args.save else None)
            (out / f"{r['name']}.json").write_text(json.dumps(r, indent=1))
    print(summary(out))
    if args.plot:
        print(f"plot: {plot(out, args.x)}")


if __name__ == "__main__":
    main()

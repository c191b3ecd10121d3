"""Streaming evaluation metrics: `update(predictions, references)` batch by batch, `compute() -> dict`.

State is counts only (a confusion matrix; per-type entity counts), never logits or sequences, so memory
does not grow with the evaluation set, and two metrics sum with `merge` (or their `state_dict`s across
processes).

- `ClassificationMetrics`: accuracy, macro / micro / weighted F1, per-class precision/recall/F1/support,
  the confusion matrix; with two labels also `f1` of label 1 (MRPC's published F1). Equal to
  scikit-learn's `precision_recall_fscore_support` / `f1_score` (default `zero_division`: an undefined
  ratio counts 0; averages run over the labels that occur in the references or the predictions).
- `EntityF1`: entity-level precision/recall/F1, overall (micro) and per type, from IOB2 tags, exactly as
  seqeval computes them in its default (conlleval-compatible) mode.
- `confusion_png`: a confusion-matrix picture (matplotlib, Agg), written atomically.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lmforge.storage import atomic_write_bytes


def _ints(values) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, possibly on an accelerator
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.int64).reshape(-1)


def _div(a: float, b: float) -> float:
    return float(a) / float(b) if b else 0.0


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r else 0.0


class ClassificationMetrics:
    """Single-label classification metrics over a fixed label list (index i = `labels[i]`).

    Args:
        labels: the label names; predictions and references are indices into it.
    """

    def __init__(self, labels: Sequence[str]):
        self.labels = list(labels)
        n = len(self.labels)
        if n < 1:
            raise ValueError("ClassificationMetrics needs at least one label")
        self.confusion = np.zeros((n, n), dtype=np.int64)  # [reference, prediction]

    def describe(self) -> str:
        """The settings behind the numbers, for a report."""
        return ("single-label classification; precision/recall/F1 as scikit-learn computes them (an undefined "
                "ratio counts 0; macro and weighted averages over the labels present in references or predictions)"
                + ("; f1 = F1 of the positive class, label index 1" if len(self.labels) == 2 else ""))

    def update(self, pred: Sequence[int], ref: Sequence[int]) -> None:
        p, r = _ints(pred), _ints(ref)
        n = len(self.labels)
        if p.shape != r.shape:
            raise ValueError(f"{len(p)} predictions but {len(r)} references")
        if p.size and (min(p.min(), r.min()) < 0 or max(p.max(), r.max()) >= n):
            raise ValueError(f"label index out of range [0, {n}): predictions {p.min()}..{p.max()}, "
                             f"references {r.min()}..{r.max()}")
        self.confusion += np.bincount(r * n + p, minlength=n * n).reshape(n, n)

    def merge(self, other: ClassificationMetrics) -> ClassificationMetrics:
        if other.labels != self.labels:
            raise ValueError("cannot merge metrics over different label lists")
        self.confusion += other.confusion
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"confusion": self.confusion.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        c = np.asarray(state["confusion"], dtype=np.int64)
        if c.shape != self.confusion.shape:
            raise ValueError(f"confusion of shape {c.shape}, expected {self.confusion.shape}")
        self.confusion = c

    def compute(self) -> dict[str, Any]:
        c = self.confusion
        n = int(c.sum())
        tp = np.diag(c)
        support, predicted = c.sum(1), c.sum(0)  # per label: in the references / in the predictions
        per_class, f1s = {}, []
        for i, name in enumerate(self.labels):
            p, r = _div(tp[i], predicted[i]), _div(tp[i], support[i])
            f1s.append(_f1(p, r))
            per_class[name] = {"precision": p, "recall": r, "f1": f1s[-1], "support": int(support[i])}
        seen = [i for i in range(len(self.labels)) if support[i] or predicted[i]]
        macro = {k: float(np.mean([per_class[self.labels[i]][k] for i in seen])) if seen else 0.0
                 for k in ("precision", "recall", "f1")}
        micro_p, micro_r = _div(tp.sum(), predicted.sum()), _div(tp.sum(), support.sum())
        out = {
            "accuracy": _div(tp.sum(), n),
            "macro_precision": macro["precision"],
            "macro_recall": macro["recall"],
            "macro_f1": macro["f1"],
            "micro_f1": _f1(micro_p, micro_r),
            "weighted_f1": _div(sum(f * s for f, s in zip(f1s, support.tolist())), support.sum()),
            "per_class": per_class,
            "confusion": c.tolist(),
            "n": n,
        }
        if len(self.labels) == 2:
            out["f1"] = f1s[1]  # the positive class (label index 1), as GLUE reports MRPC
        return out


# ---- entities --------------------------------------------------------------------------------------
def _split(tag: str) -> tuple[str, str]:
    if tag == "O":
        return "O", "_"
    prefix, dash, kind = tag.partition("-")
    if not dash or len(prefix) != 1 or prefix not in "BIES" or not kind:
        raise ValueError(f"tag {tag!r} is not O or B-/I-/E-/S- + type")
    return prefix, kind


def chunks(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """The entities (type, first, last) of one sentence, inclusive ends, read as conlleval reads them:
    B/S open a chunk, I/E continue a chunk of the same type (else open one), E/S close it."""
    out: list[tuple[str, int, int]] = []
    prev_tag, prev_kind, begin = "O", "_", 0
    for i, tag in enumerate(list(tags) + ["O"]):
        t, kind = _split(tag)
        # a chunk ends before i when the previous one was closed, or this tag does not continue it
        if prev_tag != "O" and (prev_tag in "ES" or t in "BSO" or kind != prev_kind):
            out.append((prev_kind, begin, i - 1))
        # a chunk starts at i when this tag opens one, or continues nothing open of its type
        if t in "BS" or (t in "IE" and (prev_tag in "ESO" or kind != prev_kind)):
            begin = i
        prev_tag, prev_kind = t, kind
    return out


class EntityF1:
    """Entity-level precision / recall / F1 of IOB2 (or BIOES) tag sequences: an entity counts when its
    type, first and last word all match. Micro-averaged overall, and per type; seqeval's default mode."""

    def __init__(self):
        self.tp: dict[str, int] = {}
        self.n_pred: dict[str, int] = {}
        self.n_true: dict[str, int] = {}
        self.n_sentences = 0

    def describe(self) -> str:
        """The settings behind the numbers, for a report."""
        return ("entity-level micro precision/recall/F1 over exact (type, start, end) matches, chunks read as "
                "conlleval reads them: equal to seqeval's default mode (not its strict mode)")

    def update(self, pred_tags: Sequence[Sequence[str]], ref_tags: Sequence[Sequence[str]]) -> None:
        if len(pred_tags) != len(ref_tags):
            raise ValueError(f"{len(pred_tags)} predicted sentences but {len(ref_tags)} references")
        for pred, ref in zip(pred_tags, ref_tags):
            if len(pred) != len(ref):
                raise ValueError(f"a sentence with {len(pred)} predicted tags but {len(ref)} reference tags")
            p, r = set(chunks(pred)), set(chunks(ref))
            for kind, *_ in p:
                self.n_pred[kind] = self.n_pred.get(kind, 0) + 1
            for kind, *_ in r:
                self.n_true[kind] = self.n_true.get(kind, 0) + 1
            for kind, *_ in p & r:
                self.tp[kind] = self.tp.get(kind, 0) + 1
            self.n_sentences += 1

    def merge(self, other: EntityF1) -> EntityF1:
        for mine, theirs in ((self.tp, other.tp), (self.n_pred, other.n_pred), (self.n_true, other.n_true)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
        self.n_sentences += other.n_sentences
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"tp": dict(self.tp), "n_pred": dict(self.n_pred), "n_true": dict(self.n_true),
                "n_sentences": self.n_sentences}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tp, self.n_pred, self.n_true = dict(state["tp"]), dict(state["n_pred"]), dict(state["n_true"])
        self.n_sentences = int(state["n_sentences"])

    def compute(self) -> dict[str, Any]:
        per_type = {}
        for kind in sorted(set(self.n_pred) | set(self.n_true)):
            tp = self.tp.get(kind, 0)
            p, r = _div(tp, self.n_pred.get(kind, 0)), _div(tp, self.n_true.get(kind, 0))
            per_type[kind] = {"precision": p, "recall": r, "f1": _f1(p, r), "support": self.n_true.get(kind, 0)}
        tp = sum(self.tp.values())
        p, r = _div(tp, sum(self.n_pred.values())), _div(tp, sum(self.n_true.values()))
        return {"precision": p, "recall": r, "f1": _f1(p, r), "per_type": per_type,
                "n_sentences": self.n_sentences}


# ---- pictures --------------------------------------------------------------------------------------
def confusion_png(confusion: Sequence[Sequence[int]], labels: Sequence[str], path: str | Path,
                  title: str = "confusion matrix") -> Path:
    """Draw a confusion matrix (rows = reference, columns = prediction; colour = share of the row,
    text = count) into a PNG at `path`, written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    c = np.asarray(confusion, dtype=np.int64)
    n = len(labels)
    if c.shape != (n, n):
        raise ValueError(f"confusion of shape {c.shape} for {n} labels")
    share = c / np.maximum(c.sum(1, keepdims=True), 1)
    size = min(3 + 0.55 * n, 16)
    fig = Figure(figsize=(size, size * 0.9))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the reference row")
    ax.set_xticks(range(n), [str(x) for x in labels], rotation=45 if n > 3 else 0, ha="right" if n > 3 else "center")
    ax.set_yticks(range(n), [str(x) for x in labels])
    ax.set_xlabel("prediction")
    ax.set_ylabel("reference")
    ax.set_title(title)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(c[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if share[i, j] > 0.5 else "black")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return atomic_write_bytes(path, buf.getvalue())


# ---- generation ------------------------------------------------------------------------------------
class CorpusBLEU:
    """Corpus BLEU exactly as `sacrebleu.corpus_bleu` computes it, streamed: each update adds sacrebleu's
    own per-sentence statistics (hypothesis and reference lengths, n-gram matches and totals) to running
    sums, and `compute` turns the sums into the score, so memory does not grow with the corpus.

    Args:
        tokenize: sacrebleu's tokenizer ('13a' default, 'intl', 'zh', 'char', 'none', ...).
        lowercase: case-insensitive BLEU.

    `compute()` -> `bleu` (0-100), the n-gram `precisions`, `brevity_penalty`, `sys_len`, `ref_len`,
    `sentences` and `signature` (sacrebleu's reproducibility signature, to print with the score).
    """

    def __init__(self, tokenize: str = "13a", lowercase: bool = False):
        from sacrebleu.metrics import BLEU

        self.tokenize, self.lowercase = tokenize, lowercase
        self._bleu = BLEU(tokenize=tokenize, lowercase=lowercase)
        self.stats = np.zeros(2 + 2 * self._bleu.max_ngram_order, dtype=np.int64)
        self.sentences = 0

    def describe(self) -> str:
        return f"corpus BLEU by sacrebleu {self.signature()}"

    def signature(self) -> str:
        from sacrebleu.metrics import BLEU

        ref = BLEU(tokenize=self.tokenize, lowercase=self.lowercase)
        ref._cache_references([["x"]])  # one reference per sentence: sets the signature's nrefs
        return str(ref.get_signature())

    def update(self, hypotheses: Sequence[str], references: Sequence[str]) -> None:
        if len(hypotheses) != len(references):
            raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
        if not hypotheses:
            return
        rows = self._bleu._extract_corpus_statistics(list(hypotheses), [list(references)])
        self.stats += np.asarray(rows, dtype=np.int64).sum(0)
        self.sentences += len(hypotheses)

    def merge(self, other: CorpusBLEU) -> CorpusBLEU:
        self.stats += other.stats
        self.sentences += other.sentences
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"stats": self.stats.tolist(), "sentences": self.sentences}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats = np.asarray(state["stats"], dtype=np.int64)
        self.sentences = int(state["sentences"])

    def compute(self) -> dict[str, Any]:
        score = self._bleu._compute_score_from_stats(self.stats.tolist())
        return {"bleu": float(score.score), "precisions": [float(p) for p in score.precisions],
                "brevity_penalty": float(score.bp), "sys_len": int(score.sys_len), "ref_len": int(score.ref_len),
                "sentences": self.sentences, "signature": self.signature()}

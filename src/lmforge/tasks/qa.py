"""Extractive question answering (SQuAD, CMRC 2018): `[CLS] question [SEP] context-window [SEP]` ->
start/end logits per token -> the best valid answer span, mapped back to the context's characters.

Long contexts are cut into windows by the tokenizer's own overflow machinery: each window holds up to
`max_length - |question| - specials` context tokens and starts `data.doc_stride` tokens after the
previous one (BERT's doc_stride; default: half a window). A stride longer than a window would skip
text, so it is a config error; every context token (so every character that belongs to a token) lies
in at least one window, and this is checked for every example.

Training labels the first located reference: its start/end tokens in the windows that hold it whole,
the [CLS] position in the others (BERT's recipe for SQuAD v1.1). A question whose references cannot
be located in the context is counted and trains nothing; it is still scored on dev/test, against its
reference texts, as the official scripts score it.

Decoding scores every span (start <= end < start + max_answer_length, both inside the context) of every
window by start logit + end logit, keeps the best over all windows of a question, and maps it back to
the original text through the tokens' character offsets (Chinese and English alike). Scored with the
SQuAD v1.1 rule (English) or the CMRC 2018 rule (Chinese) of `lmforge.metrics_qa`; `scoring: auto`
picks CMRC 2018 when most training contexts contain CJK characters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import from_dict
from lmforge.data.task_batches import collate_tokens, pad_to
from lmforge.errors import ConfigError, DataError
from lmforge.tasks.base import FeatureStats, TaskData


@dataclass
class QAOptions:
    """The span head and its decoding (`--task_args.*`).

    Args:
        max_answer_length: the longest answer predicted, in tokens (BERT's SQuAD default: 30).
        n_best: candidate answers listed per question by predict/serve (with their probabilities).
        scoring: 'squad' (SQuAD v1.1 rule), 'cmrc2018' (CMRC 2018 rule) or 'auto' (chosen from the
            training contexts: CMRC 2018 when most contain CJK characters).
    """

    max_answer_length: int = 30
    n_best: int = 5
    scoring: Literal["auto", "squad", "cmrc2018"] = "auto"

    def __post_init__(self) -> None:
        if self.max_answer_length < 1:
            raise ConfigError(f"task_args.max_answer_length must be at least 1, got {self.max_answer_length}")
        if self.n_best < 1:
            raise ConfigError(f"task_args.n_best must be at least 1, got {self.n_best}")
        if self.scoring not in ("auto", "squad", "cmrc2018"):
            raise ConfigError(f"task_args.scoring must be auto, squad or cmrc2018, got {self.scoring!r}")


class QAHead(nn.Module):
    """Start and end logits per token (BERT's span head: one Linear(d_model, 2)); keeps the decoding options."""

    def __init__(self, d_model: int, options: QAOptions):
        super().__init__()
        from lmforge.models.heads import SpanHead

        self.span = SpanHead(d_model)
        self.options = options

    def forward(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.span(hidden)  # (B, T) start logits, (B, T) end logits


def pair_backend(tokenizer):
    """The tokenizer's backend with its pair template ([CLS] a [SEP] b [SEP]), no truncation or padding."""
    return tokenizer.backend_for_model(pair=True)


def windows(backend, question, context, room: int, step: int) -> list:
    """The context Encoding cut into windows of at most `room` tokens starting every `step` tokens (the
    tokenizer's own overflow with an overlap of room - step), checked to cover every token."""
    n = len(context.ids)
    full = list(context.ids)
    if n > room:
        context.truncate(room, stride=room - step)
        parts = [context] + list(context.overflowing)
    else:
        parts = [context]
    # Every token in some window: window k is full[k * step : k * step + room], the last one reaches the end.
    for k, w in enumerate(parts):
        if list(w.ids) != full[k * step : k * step + len(w.ids)]:
            raise RuntimeError(f"window {k} is not the expected slice of the context (a tokenizers change?)")
    last = parts[-1]
    if (len(parts) - 1) * step + len(last.ids) != n or (len(parts) > 1 and step > room):
        raise RuntimeError(f"the windows do not cover the context's {n} tokens")
    return [backend.post_process(question, w, add_special_tokens=True) for w in parts]


def _token_span(offsets: Sequence[tuple[int, int]], positions: Sequence[int], a: int, b: int) -> tuple[int, int] | None:
    """(first, last) of `positions` whose tokens overlap the characters [a, b), or None."""
    inside = [i for i in positions if offsets[i][1] > a and offsets[i][0] < b]
    return (inside[0], inside[-1]) if inside else None


class QAMetric:
    """The QA score (`lmforge.metrics_qa.QAScore`, its rule set by the model's options at the first
    update) plus what the report counts: references that could not be located in their context, and
    questions whose every located reference is longer than max_answer_length tokens (unreachable)."""

    def __init__(self):
        from lmforge.metrics_qa import QAScore

        self.score = QAScore("squad")
        self.rule_set = False
        self.references_unlocated = 0
        self.questions_unlocated = 0
        self.answers_too_long = 0
        self.max_answer_length = None

    def describe(self) -> str:
        return self.score.describe()

    def update(self, answers, examples, rule: str, too_long: int, max_answer_length: int) -> None:
        if not self.rule_set:
            if rule == "auto":  # a model whose options were never resolved: decide from these contexts
                rule = QA.resolve_options(QAOptions(), examples).scoring
            self.score.rule, self.rule_set = rule, True
        self.score.update(answers, [ex.answers for ex in examples])
        self.references_unlocated += sum(s is None for ex in examples for s in ex.spans)
        self.questions_unlocated += sum(1 for ex in examples if ex.answers and ex.located is None)
        self.answers_too_long += too_long
        self.max_answer_length = max_answer_length

    def compute(self) -> dict[str, Any]:
        out = self.score.compute()
        out.update(references_unlocated=self.references_unlocated, questions_unlocated=self.questions_unlocated,
                   answers_longer_than_max=self.answers_too_long)
        return out


class QATask:
    name = "qa"
    default_metric = "f1"
    default_max_length = 384  # BERT's SQuAD setting (capped by the model's context length)
    reports_perplexity = False

    # -- reading -------------------------------------------------------------------------------
    def options(self, values: dict[str, Any] | None) -> QAOptions:
        return from_dict(QAOptions, values, "task_args")

    def check_data(self, data: TaskData) -> None:
        if data.text_pair is not None:
            raise ConfigError("data.text_pair does not apply to the qa task (questions and contexts come from the json)")

    def read(self, path: str, data: TaskData, labelled: bool = True) -> list:
        from lmforge.data.readers import read_qa

        return read_qa(path, labelled=labelled)

    def label_names(self, examples: Sequence, path: str = "training split") -> list[str]:
        if not any(ex.located is not None for ex in examples):
            raise DataError(f"{path}: no answer of any question could be located in its context; nothing to train on")
        return []

    def check_labels(self, examples: Sequence, labels: list[str], path: str) -> None:
        if not examples:
            raise DataError(f"{path}: no questions (empty split)")

    def resolve_options(self, options: QAOptions, train_examples: Sequence) -> QAOptions:
        """'auto' scoring -> cmrc2018 when most training contexts hold CJK characters, else squad."""
        if options.scoring != "auto":
            return options
        from lmforge.metrics_qa import has_cjk

        contexts = {ex.context for ex in train_examples}
        cjk = sum(has_cjk(c) for c in contexts)
        return replace(options, scoring="cmrc2018" if cjk * 2 > len(contexts) else "squad")

    def examples_from(self, inputs: Sequence[dict[str, Any]], data: TaskData) -> list:
        from lmforge.data.readers import QAExample

        out = []
        for i, item in enumerate(inputs):
            q = item.get("question") if isinstance(item, dict) else None
            c = item.get("context") if isinstance(item, dict) else None
            if not isinstance(q, str) or not q.strip() or not isinstance(c, str) or not c.strip():
                raise DataError(f"input {i}: give 'question' and 'context' (non-empty strings)")
            qid = str(item.get("id", i))
            out.append(QAExample(qid, q, c, [], [], f"input {i}"))
        return out

    # -- features and batches ------------------------------------------------------------------
    def featurize(self, examples: Sequence, tokenizer, labels: list[str] | None, data: TaskData):
        """One feature per window: token ids, each token's context characters (-1 outside the context),
        the gold start/end token (the [CLS] position when the answer is not wholly in the window; -100
        when unlabelled or unlocated), and the question's index in `examples`."""
        backend = pair_backend(tokenizer)
        specials = backend.num_special_tokens_to_add(True)
        questions = backend.encode_batch([ex.question for ex in examples], add_special_tokens=False)
        contexts = backend.encode_batch([ex.context for ex in examples], add_special_tokens=False)
        stats = FeatureStats(examples=len(examples))
        extra = {"windows": 0, "questions_truncated": 0, "questions_unlocated": 0, "answers_misaligned": 0,
                 "answer_tokens_max": 0}
        features = []
        for idx, (ex, q, c) in enumerate(zip(examples, questions, contexts)):
            if len(q.ids) > data.max_query_length:
                q.truncate(data.max_query_length)
                extra["questions_truncated"] += 1
            room = data.max_length - len(q.ids) - specials
            if room < 1:
                raise ConfigError(f"data.max_length={data.max_length} leaves no room for context after the "
                                  f"{len(q.ids)}-token question and {specials} special tokens ({ex.where}); raise "
                                  "max_length or lower data.max_query_length")
            step = data.doc_stride if data.doc_stride is not None else max(1, room // 2)
            if step > room:
                raise ConfigError(f"data.doc_stride={step} skips text: a window holds only {room} context tokens "
                                  f"after the {len(q.ids)}-token question of {ex.where} (max_length "
                                  f"{data.max_length}); use a doc_stride of at most {room}")
            full_offsets = list(c.offsets)
            refs = [_token_span(full_offsets, range(len(full_offsets)), a, b) for a, b in
                    (s for s in ex.spans if s is not None)]
            refs = [r for r in refs if r is not None]
            if refs:
                extra["answer_tokens_max"] = max(extra["answer_tokens_max"], max(e - s + 1 for s, e in refs))
            ref_tokens = min((e - s + 1 for s, e in refs), default=0)
            gold = ex.located
            if ex.answers and gold is None:
                extra["questions_unlocated"] += 1
            if gold is not None:
                span = _token_span(full_offsets, range(len(full_offsets)), *gold)
                if span is None or full_offsets[span[0]][0] != gold[0] or full_offsets[span[1]][1] != gold[1]:
                    extra["answers_misaligned"] += 1  # an answer boundary inside a token: the span is wider
            parts = windows(backend, q, c, room, step)
            extra["windows"] += len(parts)
            for enc in parts:
                seq = enc.sequence_ids
                ctx = [i for i, s in enumerate(seq) if s == 1]
                starts = [enc.offsets[i][0] if s == 1 else -1 for i, s in enumerate(seq)]
                ends = [enc.offsets[i][1] if s == 1 else -1 for i, s in enumerate(seq)]
                cls = next((i for i, s in enumerate(seq) if s is None), 0)
                if gold is None or not ctx:
                    sp = ep = -100
                else:
                    a, b = gold
                    inside = enc.offsets[ctx[0]][0] <= a and b <= enc.offsets[ctx[-1]][1]
                    hit = _token_span(enc.offsets, ctx, a, b) if inside else None
                    sp, ep = hit if hit is not None else (cls, cls)
                features.append({"input_ids": enc.ids, "token_type_ids": enc.type_ids, "ctx_start": starts,
                                 "ctx_end": ends, "start_position": sp, "end_position": ep, "example": idx,
                                 "ref_tokens": ref_tokens})
        stats.truncated = extra["questions_truncated"]
        stats.extra = extra
        return features, stats

    def collate(self, features: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
        batch = collate_tokens(features, pad_id)
        width = batch["input_ids"].shape[1]
        batch["ctx_start"] = pad_to([f["ctx_start"] for f in features], -1, width)
        batch["ctx_end"] = pad_to([f["ctx_end"] for f in features], -1, width)
        for key in ("start_position", "end_position", "example", "ref_tokens"):
            batch[key] = torch.tensor([f[key] for f in features], dtype=torch.long)
        return batch

    # -- model ---------------------------------------------------------------------------------
    def head(self, d_model: int, n_labels: int, options: QAOptions, labels: Sequence[str] | None = None) -> nn.Module:
        return QAHead(d_model, options)

    @staticmethod
    def _span_loss(start: torch.Tensor, end: torch.Tensor, batch, reduction: str) -> torch.Tensor:
        """(CE(start) + CE(end)) / 2 over the labelled windows (BERT's span loss)."""
        sp, ep = batch["start_position"], batch["end_position"]
        loss = (F.cross_entropy(start.float(), sp, ignore_index=-100, reduction="sum")
                + F.cross_entropy(end.float(), ep, ignore_index=-100, reduction="sum")) / 2
        if reduction == "sum":
            return loss
        return loss / (sp >= 0).sum().clamp(min=1)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        start, end = model(batch)
        loss = self._span_loss(start, end, batch, "mean")
        with torch.no_grad():
            labelled = batch["start_position"] >= 0
            hit = (start.argmax(-1) == batch["start_position"]) & (end.argmax(-1) == batch["end_position"]) & labelled
            acc = hit.sum() / labelled.sum().clamp(min=1)
        return loss, {"span_acc": acc, "loss_items": labelled.sum()}

    def decode(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        """Per window: the question's index, its best spans [(start + end logit, first char, end char)],
        best first, and the decoding settings; with the summed span loss of the labelled windows."""
        start, end = model(batch)
        start, end = start.float(), end.float()
        options: QAOptions = model.head.options
        ctx = batch["ctx_start"] >= 0  # (B, T)
        neg = torch.finfo(torch.float32).min
        T = start.shape[1]
        pos = torch.arange(T, device=start.device)
        length = pos[None, :] - pos[:, None]  # (T, T): end - start
        band = (length >= 0) & (length < options.max_answer_length)
        scores = start.masked_fill(~ctx, neg)[:, :, None] + end.masked_fill(~ctx, neg)[:, None, :]  # (B, T, T)
        valid = band[None] & ctx[:, :, None] & ctx[:, None, :]
        scores = scores.masked_fill(~valid, -math.inf)
        k = min(options.n_best, T * T)
        top, index = scores.flatten(1).topk(k, dim=-1)  # (B, k)
        cs, ce = batch["ctx_start"].tolist(), batch["ctx_end"].tolist()
        out = []
        for b, (vals, idx) in enumerate(zip(top.tolist(), index.tolist())):
            cands = [(v, cs[b][i // T], ce[b][i % T]) for v, i in zip(vals, idx) if v != -math.inf]
            out.append({"example": int(batch["example"][b]), "candidates": cands, "rule": options.scoring,
                        "n_best": options.n_best, "max_answer_length": options.max_answer_length,
                        "ref_tokens": int(batch["ref_tokens"][b])})
        loss = None
        if bool((batch["start_position"] >= 0).any()):
            loss = self._span_loss(start, end, batch, "sum")
        return out, loss

    def gather(self, predictions: Sequence[dict], examples: Sequence) -> list[dict | None]:
        """Per question (in `examples` order): the best answer over all its windows and the n best
        distinct spans with their probabilities (softmax over the n best scores), or None without any span."""
        by_example: dict[int, dict[tuple[int, int], float]] = {}
        meta: dict[int, dict] = {}
        for p in predictions:
            if p is None:
                continue
            best = by_example.setdefault(p["example"], {})
            meta[p["example"]] = p
            for score, a, b in p["candidates"]:
                if (a, b) not in best or score > best[(a, b)]:
                    best[(a, b)] = score
        out: list[dict | None] = []
        for i, ex in enumerate(examples):
            spans = sorted(by_example.get(i, {}).items(), key=lambda kv: -kv[1])
            if not spans:
                out.append(None)
                continue
            spans = spans[: meta[i]["n_best"]]
            top = spans[0][1]
            weights = [math.exp(s - top) for _, s in spans]
            total = sum(weights)
            n_best = [{"text": ex.context[a:b], "start": a, "end": b, "score": w / total, "logit": s}
                      for ((a, b), s), w in zip(spans, weights)]
            out.append({"answer": n_best[0]["text"], "start": n_best[0]["start"], "end": n_best[0]["end"],
                        "score": n_best[0]["score"], "n_best": n_best, "meta": meta[i]})
        return out

    # -- scoring and output --------------------------------------------------------------------
    def metric(self, labels: list[str]):
        return QAMetric()

    def update(self, metric, predictions: Sequence, examples: Sequence, labels: list[str]) -> None:
        answers = self.gather(predictions, examples)
        metas = [a["meta"] for a in answers if a is not None]
        if not metas:
            metric.update([None] * len(examples), examples, "squad", 0, None)
            return
        limit, rule = metas[0]["max_answer_length"], metas[0]["rule"]
        too_long = sum(1 for a in answers if a is not None and a["meta"]["ref_tokens"] > limit)
        metric.update([a["answer"] if a else None for a in answers], examples, rule, too_long, limit)

    def output(self, prediction, example, labels: list[str]) -> dict[str, Any]:
        if prediction is None:
            return {"id": example.id, "question": example.question, "answer": None, "start": None, "end": None,
                    "score": 0.0, "n_best": []}
        return {"id": example.id, "question": example.question,
                **{k: prediction[k] for k in ("answer", "start", "end", "score", "n_best")}}


QA = QATask()

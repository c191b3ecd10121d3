"""Token classification (NER and the like) with a linear or a CRF head, scored at the word level.

Words are tokenized with the tokenizer's own word alignment (`is_pretokenized`, `word_ids`); each word
is represented by its first sub-token, so the head tags words, not sub-tokens, and the CRF's
transitions are between words. Files are CoNLL (BIO/IOB1/IOB2/BIOES) or Chinese BMES; every scheme is
converted to IOB2 when read, and entity-level precision/recall/F1 are computed as conlleval/seqeval do
(`lmforge.metrics.EntityF1`). Words past `max_length` (rare; counted in the stats) are predicted 'O'.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import from_dict
from lmforge.data.task_batches import collate_tokens, pad_to
from lmforge.errors import ConfigError, DataError
from lmforge.tasks.base import FeatureStats, TaskData, head_of


@dataclass
class TagOptions:
    """The tagging head (`--task_args.*`).

    Args:
        crf: a linear-chain CRF over the word emissions (Viterbi decoding, IOB2 constraints) instead of
            an independent softmax per word.
        dropout: dropout on the hidden states before the emission layer.
        words: how `predict`/`serve` split raw text into words: 'whitespace', 'char' (Chinese: one
            character per word), or 'auto' (chosen at fine-tuning from the training words).
    """

    crf: bool = False
    dropout: float = 0.1
    words: Literal["auto", "whitespace", "char"] = "auto"

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"task_args.dropout must be in [0, 1), got {self.dropout}")
        if self.words not in ("auto", "whitespace", "char"):
            raise ConfigError(f"task_args.words must be auto, whitespace or char, got {self.words!r}")


class TagHead(nn.Module):
    """Emissions at each word's first sub-token, and optionally a CRF over them."""

    def __init__(self, d_model: int, n_labels: int, options: TagOptions, labels: Sequence[str] | None = None):
        super().__init__()
        from lmforge.models.heads import CRF, TokenClassifier, iob2_constraints

        self.classifier = TokenClassifier(d_model, n_labels, dropout=options.dropout)
        self.crf = None
        if options.crf:
            self.crf = CRF(n_labels, constraints=iob2_constraints(list(labels)) if labels else None)

    def forward(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        emissions = self.classifier(hidden)  # (B, T, C)
        starts = batch["word_starts"]  # (B, W) token index of each word's first sub-token
        picked = emissions.gather(1, starts.unsqueeze(-1).expand(-1, -1, emissions.shape[-1]))  # (B, W, C)
        return picked, batch["word_mask"]


def split_words(text: str, mode: str) -> list[tuple[str, int, int]]:
    """(word, start, end) character spans: whitespace-separated words, or one per non-space character."""
    import re

    pattern = r"\S" if mode == "char" else r"\S+"
    return [(m.group(), m.start(), m.end()) for m in re.finditer(pattern, text)]


def entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """(type, first word, last word + 1) of the entities in a tag sequence, read as conlleval reads them."""
    from lmforge.metrics import chunks

    return [(kind, first, last + 1) for kind, first, last in chunks(tags)]


class TagTask:
    name = "tag"
    default_metric = "f1"
    reports_perplexity = False

    # -- reading -------------------------------------------------------------------------------
    def options(self, values: dict[str, Any] | None) -> TagOptions:
        return from_dict(TagOptions, values, "task_args")

    def check_data(self, data: TaskData) -> None:
        if data.text_pair is not None:
            raise ConfigError("data.text_pair does not apply to the tag task")

    def read(self, path: str, data: TaskData, labelled: bool = True) -> list:
        from lmforge.data.readers import read_conll

        return read_conll(path, word_col=data.word_col, tag_col=data.tag_col, scheme=data.scheme)

    def label_names(self, examples: Sequence, path: str = "training split") -> list[str]:
        from lmforge.data.readers import LabelSet

        return list(LabelSet.from_examples(examples, path).names)

    def check_labels(self, examples: Sequence, labels: list[str], path: str) -> None:
        from lmforge.data.readers import LabelSet

        LabelSet(list(labels)).check(examples, path)

    def word_mode(self, examples: Sequence) -> str:
        words = [w for ex in examples for w in ex.words]
        single = sum(len(w) == 1 for w in words)
        return "char" if words and single / len(words) > 0.95 else "whitespace"

    def examples_from(self, inputs: Sequence[dict[str, Any]], data: TaskData, mode: str = "whitespace") -> list:
        from lmforge.data.readers import TaggedSentence

        out = []
        for i, item in enumerate(inputs):
            text = item.get("text") if isinstance(item, dict) else None
            words = item.get("words") if isinstance(item, dict) else None
            if words is not None:
                if not isinstance(words, list) or not words or not all(isinstance(w, str) and w.strip() for w in words):
                    raise DataError(f"input {i}: 'words' must be a non-empty list of non-empty strings")
                spans, text = [], None
            elif isinstance(text, str) and text.strip():
                spans = split_words(text, mode)
                words = [w for w, _, _ in spans]
            else:
                raise DataError(f"input {i}: give 'text' (a non-empty string) or 'words' (a list of strings)")
            sent = TaggedSentence(words=words, tags=["O"] * len(words), where=f"input {i}")
            sent.text, sent.spans = text, spans  # for character offsets in the output
            out.append(sent)
        return out

    # -- features and batches ------------------------------------------------------------------
    def featurize(self, examples: Sequence, tokenizer, labels: list[str] | None, data: TaskData):
        enc = tokenizer.encode_for_model([list(ex.words) for ex in examples], max_length=data.max_length,
                                         padding=False, pretokenized=True)
        index = {name: i for i, name in enumerate(labels or [])}
        stats = FeatureStats(examples=len(examples), truncated=sum(enc["truncated"]))
        features = []
        for ex, ids, types, word_ids in zip(examples, enc["input_ids"], enc["token_type_ids"], enc["word_ids"]):
            first: dict[int, int] = {}
            for pos, w in enumerate(word_ids):
                if w is not None and w not in first:
                    first[w] = pos
            present = sorted(first)  # words with at least one token inside max_length
            stats.words_dropped += len(ex.words) - len(present)
            if not present:
                raise DataError(f"{ex.where}: no word of this sentence survives tokenization")
            tags = [index.get(ex.tags[w], -100) for w in present] if labels else [-100] * len(present)
            features.append({"input_ids": ids, "token_type_ids": types,
                             "word_starts": [first[w] for w in present], "word_index": present,
                             "n_words": len(ex.words), "tags": tags})
        return features, stats

    def collate(self, features: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
        batch = collate_tokens(features, pad_id)
        starts = [f["word_starts"] for f in features]
        batch["word_starts"] = pad_to(starts, 0)
        batch["word_mask"] = pad_to([[1] * len(s) for s in starts], 0, batch["word_starts"].shape[1]).bool()
        batch["tags"] = pad_to([f["tags"] for f in features], -100, batch["word_starts"].shape[1])
        batch["word_index"] = pad_to([f["word_index"] for f in features], -1, batch["word_starts"].shape[1])
        return batch

    # -- model ---------------------------------------------------------------------------------
    def head(self, d_model: int, n_labels: int, options: TagOptions, labels: Sequence[str] | None = None) -> nn.Module:
        return TagHead(d_model, n_labels, options, labels)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        emissions, mask = model(batch)
        tags = batch["tags"]
        crf = getattr(head_of(model), "crf", None)
        if crf is not None:  # the mean over sentences
            loss, items = crf.nll(emissions.float(), tags.clamp(min=0), mask), tags.new_tensor(tags.shape[0])
        else:  # the mean over labelled words
            loss = F.cross_entropy(emissions.flatten(0, 1).float(), tags.flatten(), ignore_index=-100)
            items = (tags >= 0).sum()
        with torch.no_grad():
            acc = ((emissions.argmax(-1) == tags) & mask).sum() / mask.sum().clamp(min=1)
        return loss, {"word_acc": acc, "loss_items": items}

    def decode(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        """([(tag ids of the present words, their probabilities, their word indices), ...], summed loss
        or None). Probabilities are the per-word softmax of the emissions (with a CRF: of its inputs)."""
        emissions, mask = model(batch)
        emissions = emissions.float()
        crf = getattr(head_of(model), "crf", None)
        tags = batch.get("tags")
        labelled = tags is not None and bool((tags >= 0).any())
        loss = None
        if crf is not None:
            paths = crf.decode(emissions, mask)
            if labelled:
                loss = crf.nll(emissions, tags.clamp(min=0), mask, reduction="sum")
        else:
            best = emissions.argmax(-1)
            paths = [row[: int(m.sum())] for row, m in zip(best.tolist(), mask)]
            if labelled:
                loss = F.cross_entropy(emissions.flatten(0, 1), tags.flatten(), ignore_index=-100, reduction="sum")
                loss = loss / mask.sum() * mask.shape[0]  # per sentence, like the CRF's
        probs = emissions.softmax(-1)
        index = batch["word_index"].tolist()
        out = []
        for i, path in enumerate(paths):
            p = [float(probs[i, j, t]) for j, t in enumerate(path)]
            out.append((list(path), p, index[i][: len(path)]))
        return out, loss

    # -- scoring and output --------------------------------------------------------------------
    def metric(self, labels: list[str]):
        from lmforge.metrics import EntityF1

        return EntityF1()

    def update(self, metric, predictions: Sequence, examples: Sequence, labels: list[str]) -> None:
        pred_tags = [self._tags_of(p, ex, labels) for p, ex in zip(predictions, examples)]
        metric.update(pred_tags, [list(ex.tags) for ex in examples])

    def _tags_of(self, prediction, example, labels: list[str]) -> list[str]:
        path, _, index = prediction
        tags = ["O"] * len(example.words)
        for w, t in zip(index, path):
            tags[w] = labels[t]
        return tags

    def output(self, prediction, example, labels: list[str]) -> dict[str, Any]:
        tags = self._tags_of(prediction, example, labels)
        probs = dict(zip(prediction[2], prediction[1]))
        spans = getattr(example, "spans", None) or []
        text = getattr(example, "text", None)
        found = []
        for typ, a, b in entities(tags):
            score = sum(probs.get(w, 0.0) for w in range(a, b)) / (b - a)
            item = {"type": typ, "word_start": a, "word_end": b, "score": score}
            if spans:
                item.update(start=spans[a][1], end=spans[b - 1][2], text=text[spans[a][1]:spans[b - 1][2]])
            else:
                item["text"] = " ".join(example.words[a:b])
            found.append(item)
        return {"words": list(example.words), "tags": tags, "entities": found}


TAG = TagTask()

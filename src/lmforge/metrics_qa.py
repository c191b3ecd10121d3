"""Extractive QA scoring exactly as the published evaluation scripts score it (streaming: sums only).

Two rules, each the field's own:

- **SQuAD** (v1.1 `evaluate-v1.1.py`), for English. Both strings are normalised: lower-cased, ASCII
  punctuation (`string.punctuation`) removed, the articles a/an/the removed as whole words, whitespace
  collapsed. EM = the normalised strings are equal; F1 = the harmonic mean of token precision and
  recall over whitespace tokens, counted as multisets (Counter intersection); 0 when nothing is shared.
- **CMRC 2018** (`cmrc2018_evaluate.py`, v4/v5), for Chinese. Strings are lower-cased and stripped;
  F1 segments them "mixed": each CJK character (U+4E00-U+9FA5) and each punctuation mark of the
  script's list is one segment, runs of other characters are split into words as NLTK's `word_tokenize`
  splits them; the punctuation marks of the list are removed first. F1 is computed from the longest
  common *contiguous* run of segments (not a bag of tokens): precision = run / prediction segments,
  recall = run / reference segments. EM = the strings are equal after lower-casing, stripping and
  removing the listed punctuation (nothing else: full-width letters and digits are not folded, spaces
  inside are kept).

For both, a question's score is the maximum over its reference answers, and the corpus score is 100 x
the mean over questions. Non-string references (CMRC 2018's dev file has a few numbers) are read with
`str()`, as the script's `str(...)` does.

One documented deviation: the CMRC script calls `nltk.word_tokenize(run)`, which first splits the run into
sentences with NLTK's Punkt model (a download); we call it with `preserve_line=True` (no sentence split).
The two differ only on a run holding several English sentences (a period inside the run, followed by a
space and more text, stays attached to its word here).
"""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any, Iterable, Sequence

RULES = ("squad", "cmrc2018")

# ---- SQuAD v1.1 ---------------------------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCT = set(string.punctuation)


def squad_normalize(text: str) -> str:
    """SQuAD's normalize_answer: lower, drop ASCII punctuation, drop articles, collapse whitespace."""
    text = "".join(ch for ch in str(text).lower() if ch not in _ASCII_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def squad_exact(prediction: str, reference: str) -> float:
    return float(squad_normalize(prediction) == squad_normalize(reference))


def squad_f1(prediction: str, reference: str) -> float:
    pred, ref = squad_normalize(prediction).split(), squad_normalize(reference).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


# ---- CMRC 2018 ----------------------------------------------------------------------------------------
# The script's list. Its '……' is two characters, so (compared character by character) it never matches.
CMRC_PUNCT = frozenset(['-', ':', '_', '*', '^', '/', '\\', '~', '`', '+', '=',
                        '，', '。', '：', '？', '！', '“', '”', '；', '’', '《', '》', '……', '·', '、',
                        '「', '」', '（', '）', '－', '～', '『', '』'])
_CJK = re.compile("[\u4e00-\u9fa5]")


def _words(run: str) -> list[str]:
    from nltk.tokenize import word_tokenize

    return word_tokenize(run, preserve_line=True)


def cmrc_segments(text: Any, remove_punct: bool = False) -> list[str]:
    """The script's mixed segmentation: one segment per CJK character or listed punctuation mark, NLTK
    words for the runs in between (see the module docstring)."""
    text = str(text).lower().strip()
    out: list[str] = []
    run = ""
    for ch in text:
        if remove_punct and ch in CMRC_PUNCT:
            continue
        if _CJK.match(ch) or ch in CMRC_PUNCT:
            if run:
                out += _words(run)
                run = ""
            out.append(ch)
        else:
            run += ch
    if run:
        out += _words(run)
    return out


def cmrc_strip(text: Any) -> str:
    """The script's remove_punctuation: lower, strip, drop the listed punctuation marks."""
    return "".join(ch for ch in str(text).lower().strip() if ch not in CMRC_PUNCT)


def longest_common_run(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common contiguous subsequence of a and b (dynamic programming)."""
    best = 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b):
            if x == y:
                cur[j + 1] = prev[j] + 1
                best = max(best, cur[j + 1])
        prev = cur
    return best


def cmrc_exact(prediction: Any, reference: Any) -> float:
    return float(cmrc_strip(prediction) == cmrc_strip(reference))


def cmrc_f1(prediction: Any, reference: Any) -> float:
    ref, pred = cmrc_segments(reference, True), cmrc_segments(prediction, True)
    run = longest_common_run(ref, pred)
    if run == 0:
        return 0.0
    precision, recall = run / len(pred), run / len(ref)
    return 2 * precision * recall / (precision + recall)


_SCORERS = {"squad": (squad_exact, squad_f1), "cmrc2018": (cmrc_exact, cmrc_f1)}


def score_answer(prediction: str, references: Sequence[Any], rule: str) -> tuple[float, float]:
    """(EM, F1) of one prediction: the maximum over its references, each in [0, 1]."""
    if rule not in _SCORERS:
        raise ValueError(f"QA scoring rule {rule!r} is not one of {', '.join(RULES)}")
    if not references:
        raise ValueError("a question without reference answers cannot be scored")
    exact, f1 = _SCORERS[rule]
    return max(exact(prediction, r) for r in references), max(f1(prediction, r) for r in references)


def has_cjk(text: str) -> bool:
    return bool(_CJK.search(text))


class QAScore:
    """Streaming EM / F1 over questions under one scoring rule ('squad' or 'cmrc2018').

    `update(predictions, references)` takes the predicted answer strings and, per question, its list of
    reference answers. `compute()` gives `exact_match` and `f1` in percent (100 x the mean over
    questions, as both official scripts print them), `questions`, and the counts of the report:
    `unanswered` (questions given no prediction, scored 0 as the scripts do).
    """

    def __init__(self, rule: str = "squad"):
        if rule not in RULES:
            raise ValueError(f"QA scoring rule {rule!r} is not one of {', '.join(RULES)}")
        self.rule = rule
        self.em = 0.0
        self.f1 = 0.0
        self.n = 0
        self.unanswered = 0

    def describe(self) -> str:
        if self.rule == "squad":
            return ("SQuAD v1.1 official rule: lower-case, ASCII punctuation and articles removed, whitespace "
                    "tokens; EM and bag-of-tokens F1, max over references, 100 x mean over questions")
        return ("CMRC 2018 official rule: lower-case, listed punctuation removed; F1 over the longest common "
                "run of mixed segments (one per CJK character, NLTK words for other runs), EM on the "
                "punctuation-stripped strings; max over references, 100 x mean over questions")

    def update(self, predictions: Sequence[str | None], references: Sequence[Sequence[Any]]) -> None:
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
        for pred, refs in zip(predictions, references):
            self.n += 1
            if pred is None:
                self.unanswered += 1
                continue
            em, f1 = score_answer(pred, refs, self.rule)
            self.em += em
            self.f1 += f1

    def merge(self, other: "QAScore") -> "QAScore":
        if other.rule != self.rule:
            raise ValueError(f"cannot merge QA scores of rules {self.rule} and {other.rule}")
        self.em += other.em
        self.f1 += other.f1
        self.n += other.n
        self.unanswered += other.unanswered
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "em": self.em, "f1": self.f1, "n": self.n, "unanswered": self.unanswered}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rule, self.em, self.f1 = state["rule"], float(state["em"]), float(state["f1"])
        self.n, self.unanswered = int(state["n"]), int(state["unanswered"])

    def compute(self) -> dict[str, Any]:
        n = max(self.n, 1)
        return {"exact_match": 100.0 * self.em / n, "f1": 100.0 * self.f1 / n, "questions": self.n,
                "unanswered": self.unanswered, "rule": self.rule}


def score_corpus(predictions: Iterable[str | None], references: Iterable[Sequence[Any]], rule: str) -> dict[str, Any]:
    """EM / F1 of a whole set at once (QAScore in one call)."""
    metric = QAScore(rule)
    metric.update(list(predictions), list(references))
    return metric.compute()

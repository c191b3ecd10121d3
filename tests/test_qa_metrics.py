"""QA EM/F1 against the published SQuAD v1.1 and CMRC 2018 rules (hand-worked cases written from the
rules: case, punctuation, articles, full-width characters, multiple references, non-string references),
against straightforward re-derivations on random strings, and corpus BLEU against sacrebleu called
directly."""
from __future__ import annotations

import random
import string
from collections import Counter

import pytest
import sacrebleu

from lmforge.metrics import CorpusBLEU
from lmforge.metrics_qa import (
    QAScore,
    cmrc_exact,
    cmrc_f1,
    cmrc_segments,
    longest_common_run,
    score_answer,
    score_corpus,
    squad_exact,
    squad_f1,
    squad_normalize,
)


# ---- SQuAD v1.1: lower-case, ASCII punctuation and articles out, whitespace tokens, bag-of-tokens F1 ----
@pytest.mark.parametrize("pred, ref, em, f1", [
    ("The Eiffel Tower!", "eiffel tower", 1, 1),  # case, article, punctuation
    ("  new   york ", "New York", 1, 1),  # whitespace collapsed
    ("U.S.", "US", 1, 1),  # ASCII punctuation removed inside words
    ("an apple a day", "apple day", 1, 1),  # all three articles, as whole words only
    ("theatre", "atre", 0, 0),  # 'the' inside a word stays
    ("the cat sat", "cat sat on mat", 0, 2 / 3),  # P = 2/2, R = 2/4
    ("x x y", "x y y", 0, 2 / 3),  # multisets: common = {x: 1, y: 1}
    ("Paris，", "Paris", 0, 0),  # a full-width comma is not ASCII punctuation: it stays
    ("state-of-the-art", "state of the art", 0, 0),  # hyphens removed without a space: one token
    ("", "anything", 0, 0),
    ("Denver Broncos", "Broncos", 0, 2 / 3),
])
def test_squad_rule_hand_cases(pred, ref, em, f1):
    assert squad_exact(pred, ref) == em
    assert squad_f1(pred, ref) == pytest.approx(f1)


def test_squad_max_over_references_and_corpus_mean():
    em, f1 = score_answer("Denver Broncos", ["Broncos", "the Denver Broncos", "Denver"], "squad")
    assert (em, f1) == (1.0, 1.0)
    em, f1 = score_answer("Broncos team", ["Denver Broncos", "Broncos"], "squad")
    assert em == 0 and f1 == pytest.approx(2 / 3)  # max(1/2, 2/3)
    out = score_corpus(["Broncos", "x", None], [["Broncos"], ["y", "x z"], ["w"]], "squad")
    # questions: EM 1, 0, 0 (unanswered counts 0); F1 1, 2/3, 0
    assert out["exact_match"] == pytest.approx(100 / 3)
    assert out["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)
    assert out["questions"] == 3 and out["unanswered"] == 1 and out["rule"] == "squad"


# ---- CMRC 2018: mixed segmentation, listed punctuation out, longest common contiguous run ------------
@pytest.mark.parametrize("pred, ref, em, f1", [
    ("北京天安门", "北京", 0, 2 * (2 / 5) / (1 + 2 / 5)),  # LCS 2 of 5 predicted, 2 of 2 reference
    ("北京。", "北京", 1, 1),  # full-width full stop is in the list
    ("《红楼梦》", "红楼梦", 1, 1),  # book-title marks are in the list
    ("1，000", "1000", 1, 1),  # full-width comma removed, the digits join into one run
    ("10:30", "1030", 1, 1),  # ASCII colon is in the list too
    ("ＡＢＣ", "abc", 0, 0),  # full-width letters are not folded to ASCII (lower-cased only)
    ("NBA球员", "nba球员", 1, 1),  # lower-cased
    ("New York", "NewYork", 0, 0),  # spaces inside are kept: EM differs, words differ
    ("2008年北京奥运会", "2008年", 0, 2 * (2 / 7) / (1 + 2 / 7)),  # '2008' is one segment
    ("甲乙丙丁", "甲丙", 0, 2 * (1 / 4) * (1 / 2) / (1 / 4 + 1 / 2)),  # contiguous run 1, not the bag's 2
    ("好……", "好", 0, None),  # '……' in the list is two characters: never removed
    ("", "北京", 0, 0),
])
def test_cmrc_rule_hand_cases(pred, ref, em, f1):
    assert cmrc_exact(pred, ref) == em
    if f1 is None:
        assert 0 < cmrc_f1(pred, ref) < 1
    else:
        assert cmrc_f1(pred, ref) == pytest.approx(f1)


def test_cmrc_segmentation():
    assert cmrc_segments("2008年北京Nexon开发") == ["2008", "年", "北", "京", "nexon", "开", "发"]
    assert cmrc_segments("《红楼梦》，曹雪芹", remove_punct=True) == list("红楼梦曹雪芹")
    assert cmrc_segments("《红楼梦》，曹", remove_punct=False) == list("《红楼梦》，曹")
    assert cmrc_segments("  他说hello world  ") == ["他", "说", "hello", "world"]


def test_cmrc_multiple_and_non_string_references():
    assert score_answer("北京市", ["北京", "北京市", "首都"], "cmrc2018") == (1.0, 1.0)
    # CMRC 2018's dev file holds a few numbers; the script reads them with str(): 39764.0 -> '39764.0'
    em, f1 = score_answer("39764", [39764.0], "cmrc2018")
    assert (em, f1) == (0.0, 0.0)
    assert score_answer("4.9", [4.9], "cmrc2018") == (1.0, 1.0)


# ---- the same rules re-derived differently, on random strings ----------------------------------------
def _brute_lcs(a, b):
    best = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a) + 1):
            sub = a[i:j]
            if any(b[k:k + len(sub)] == sub for k in range(len(b) - len(sub) + 1)):
                best = max(best, len(sub))
    return best


def test_longest_common_run_equals_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abc") for _ in range(rng.randint(0, 8))]
        b = [rng.choice("abc") for _ in range(rng.randint(0, 8))]
        assert longest_common_run(a, b) == _brute_lcs(a, b)


def _squad_ref(pred, ref):
    """SQuAD's F1 written out another way: normalise by regex, count shared tokens by removal."""
    import re

    def norm(s):
        s = s.lower()
        s = "".join(c for c in s if c not in set(string.punctuation))
        s = re.sub(r"\b(a|an|the)\b", " ", s)
        return s.split()

    p, r = norm(pred), norm(ref)
    rest, same = list(r), 0
    for tok in p:
        if tok in rest:
            rest.remove(tok)
            same += 1
    return (2 * same / (len(p) + len(r))) if same else 0.0  # = 2PR/(P+R)


def test_squad_f1_equals_rederivation_on_random_strings():
    rng = random.Random(1)
    alphabet = ["the", "a", "an", "cat", "Cat", "dog!", "x", "y.", "(z)", "théâtre", "an-d", "ok,"]
    for _ in range(500):
        pred = " ".join(rng.choices(alphabet, k=rng.randint(0, 6)))
        ref = " ".join(rng.choices(alphabet, k=rng.randint(1, 6)))
        assert squad_f1(pred, ref) == pytest.approx(_squad_ref(pred, ref))
        assert squad_exact(pred, ref) == float(squad_normalize(pred).split() == squad_normalize(ref).split())


def test_cmrc_f1_on_chinese_only_strings_is_char_lcs():
    """Chinese-only strings segment into characters: F1 = 2 * LCS / (|pred| + |ref|) over the characters
    left after removing the listed punctuation (derived from the rule, no segmentation code involved)."""
    rng = random.Random(2)
    chars = "北京天安门广场，。《》、"
    punct = set("，。《》、")
    for _ in range(300):
        pred = "".join(rng.choices(chars, k=rng.randint(0, 8)))
        ref = "".join(rng.choices(chars, k=rng.randint(1, 8)))
        p, r = [c for c in pred if c not in punct], [c for c in ref if c not in punct]
        lcs = _brute_lcs(p, r)
        want = 2 * lcs / (len(p) + len(r)) if lcs else 0.0
        assert cmrc_f1(pred, ref) == pytest.approx(want)
        assert cmrc_exact(pred, ref) == float(p == r)


def test_qascore_streams_and_merges():
    rng = random.Random(3)
    preds = ["北京", "上海", None, "广州市", "深圳"] * 7
    refs = [[rng.choice(["北京", "北京市", "上海", "广州"])] for _ in preds]
    whole = score_corpus(preds, refs, "cmrc2018")
    a, b = QAScore("cmrc2018"), QAScore("cmrc2018")
    a.update(preds[:10], refs[:10])
    b.update(preds[10:], refs[10:])
    c = QAScore("cmrc2018")
    c.load_state_dict(a.merge(b).state_dict())
    assert c.compute() == pytest.approx(whole)
    with pytest.raises(ValueError, match="rule"):
        QAScore("squad2")


# ---- corpus BLEU: sacrebleu's own numbers ------------------------------------------------------------
def _corpus(rng, n):
    words = "a man in a blue shirt is riding the bike . ein Mann fährt Fahrrad , ! 2 dogs".split()
    hyp = [" ".join(rng.choices(words, k=rng.randint(0, 14))) for _ in range(n)]
    ref = [" ".join(rng.choices(words, k=rng.randint(1, 14))) for _ in range(n)]
    return hyp, ref


@pytest.mark.parametrize("tokenize, lowercase", [("13a", False), ("intl", False), ("13a", True), ("char", False)])
def test_corpus_bleu_equals_sacrebleu(tokenize, lowercase):
    rng = random.Random(4)
    hyp, ref = _corpus(rng, 120)
    metric = CorpusBLEU(tokenize=tokenize, lowercase=lowercase)
    for lo in range(0, len(hyp), 17):  # streamed in uneven chunks
        metric.update(hyp[lo:lo + 17], ref[lo:lo + 17])
    got = metric.compute()
    bleu = sacrebleu.BLEU(tokenize=tokenize, lowercase=lowercase)
    want = bleu.corpus_score(hyp, [ref])
    assert got["bleu"] == pytest.approx(want.score, abs=1e-12)
    assert got["precisions"] == pytest.approx(want.precisions)
    assert got["brevity_penalty"] == pytest.approx(want.bp)
    assert (got["sys_len"], got["ref_len"], got["sentences"]) == (want.sys_len, want.ref_len, 120)
    assert got["signature"] == str(bleu.get_signature())


def test_corpus_bleu_merge_and_perfect_score():
    rng = random.Random(5)
    hyp, ref = _corpus(rng, 40)
    a, b = CorpusBLEU(), CorpusBLEU()
    a.update(hyp[:25], ref[:25])
    b.update(hyp[25:], ref[25:])
    c = CorpusBLEU()
    c.load_state_dict(a.merge(b).state_dict())
    assert c.compute()["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyp, [ref]).score)
    same = CorpusBLEU()
    same.update(ref, ref)
    assert same.compute()["bleu"] == pytest.approx(100.0)


def test_corpus_bleu_on_multi30k_references():
    from helpers import need_shared

    import gzip

    path = need_shared("multi30k/test_2016_flickr.de.gz")
    refs = gzip.decompress(path.read_bytes()).decode("utf-8").splitlines()
    rng = random.Random(6)
    hyps = []
    for r in refs:  # a perturbed copy: drop and swap words
        words = r.split()
        words = [w for w in words if rng.random() > 0.2] or words[:1]
        if len(words) > 2 and rng.random() < 0.5:
            i = rng.randrange(len(words) - 1)
            words[i], words[i + 1] = words[i + 1], words[i]
        hyps.append(" ".join(words))
    metric = CorpusBLEU()
    for lo in range(0, len(refs), 64):
        metric.update(hyps[lo:lo + 64], refs[lo:lo + 64])
    assert metric.compute()["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-12)
    assert Counter(len(h.split()) > 0 for h in hyps)[True] == len(refs)

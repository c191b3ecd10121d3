"""Streaming metrics against the field's references: classification metrics equal scikit-learn's on random
cases (incl. labels never predicted or never present), entity F1 equals seqeval's default mode on
hand-checked fixtures, random tag sequences and the real CoNLL-2003 dev file against a perturbed copy of
itself; streaming in pieces and merging equal one pass; the confusion PNG is written atomically."""
from __future__ import annotations

import json
import random
import warnings

import numpy as np
import pytest
from helpers import need_shared

from lmforge.metrics import ClassificationMetrics, EntityF1, chunks, confusion_png

sklearn_metrics = pytest.importorskip("sklearn.metrics")
seqeval_metrics = pytest.importorskip("seqeval.metrics")


# ---- classification --------------------------------------------------------------------------------
def sklearn_reference(ref, pred, n):
    m = sklearn_metrics
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p, r, f, s = m.precision_recall_fscore_support(ref, pred, labels=list(range(n)), average=None)
        out = {
            "accuracy": m.accuracy_score(ref, pred),
            "macro_precision": m.precision_score(ref, pred, average="macro"),
            "macro_recall": m.recall_score(ref, pred, average="macro"),
            "macro_f1": m.f1_score(ref, pred, average="macro"),
            "micro_f1": m.f1_score(ref, pred, average="micro"),
            "weighted_f1": m.f1_score(ref, pred, average="weighted"),
            "confusion": m.confusion_matrix(ref, pred, labels=list(range(n))).tolist(),
            "per_class": [p, r, f, s],
        }
        if n == 2:
            out["f1"] = m.f1_score(ref, pred)
    return out


def assert_matches_sklearn(got, ref, pred, labels):
    want = sklearn_reference(ref, pred, len(labels))
    for key in ("accuracy", "macro_precision", "macro_recall", "macro_f1", "micro_f1", "weighted_f1") + (
            ("f1",) if len(labels) == 2 else ()):
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert got["confusion"] == want["confusion"]
    assert got["n"] == len(ref)
    p, r, f, s = want["per_class"]
    for i, name in enumerate(labels):
        row = got["per_class"][name]
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((p[i], r[i], f[i]), abs=1e-12)
        assert row["support"] == s[i]


@pytest.mark.parametrize("seed", range(40))
def test_classification_equals_sklearn_on_random_cases(seed):
    rng = random.Random(seed)
    n = rng.choice([2, 2, 3, 5, 7])
    labels = [f"c{i}" for i in range(n)]
    size = rng.choice([1, 3, 10, 60])
    # skewed: some labels absent from the references, some never predicted
    ref_pool = rng.sample(range(n), rng.randint(1, n))
    pred_pool = rng.sample(range(n), rng.randint(1, n))
    ref = [rng.choice(ref_pool) for _ in range(size)]
    pred = [r if rng.random() < 0.5 and r in pred_pool else rng.choice(pred_pool) for r in ref]
    m = ClassificationMetrics(labels)
    cut = rng.randint(0, size)
    m.update(pred[:cut], ref[:cut])
    m.update(np.array(pred[cut:]), ref[cut:])
    assert_matches_sklearn(m.compute(), ref, pred, labels)


def test_classification_hand_checked_binary():
    m = ClassificationMetrics(["0", "1"])
    m.update([1, 1, 0, 0, 1], [1, 0, 0, 1, 1])  # tp(1)=2, fp(1)=1, fn(1)=1
    out = m.compute()
    assert out["accuracy"] == pytest.approx(0.6)
    assert out["f1"] == pytest.approx(2 / 3)
    assert out["confusion"] == [[1, 1], [1, 2]]
    assert out["per_class"]["0"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}


def test_classification_torch_input_merge_and_state_dict():
    import torch

    labels = ["a", "b", "c"]
    whole, left, right = ClassificationMetrics(labels), ClassificationMetrics(labels), ClassificationMetrics(labels)
    pred, ref = [0, 2, 1, 1, 0, 2], [0, 1, 1, 2, 0, 2]
    whole.update(torch.tensor(pred), torch.tensor(ref))
    left.update(pred[:2], ref[:2])
    right.update(pred[2:], ref[2:])
    assert left.merge(right).compute() == whole.compute()
    state = json.loads(json.dumps(whole.state_dict()))  # plain numbers
    again = ClassificationMetrics(labels)
    again.load_state_dict(state)
    assert again.compute() == whole.compute()


def test_classification_bad_updates():
    m = ClassificationMetrics(["a", "b"])
    with pytest.raises(ValueError, match="2 predictions but 3"):
        m.update([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="out of range"):
        m.update([0, 2], [0, 1])
    with pytest.raises(ValueError, match="different label"):
        m.merge(ClassificationMetrics(["a", "c"]))


# ---- entities --------------------------------------------------------------------------------------
def seqeval_reference(ref, pred):
    m = seqeval_metrics
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = m.classification_report(ref, pred, output_dict=True)
        return {"precision": m.precision_score(ref, pred), "recall": m.recall_score(ref, pred),
                "f1": m.f1_score(ref, pred),
                "per_type": {k: v for k, v in report.items() if not k.endswith(" avg")}}


def assert_matches_seqeval(metric, ref, pred):
    got, want = metric.compute(), seqeval_reference(ref, pred)
    for key in ("precision", "recall", "f1"):
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert sorted(got["per_type"]) == sorted(want["per_type"])
    for kind, row in got["per_type"].items():
        w = want["per_type"][kind]
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx(
            (w["precision"], w["recall"], w["f1-score"]), abs=1e-12), kind
        assert row["support"] == w["support"]
    assert got["n_sentences"] == len(ref)


FIXTURES = [
    # seqeval's docstring example
    ([["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]],
     [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]),
    # predictions with I- starts, type switches inside a chunk, and an entity at the very end
    ([["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG", "I-ORG"]],
     [["I-PER", "I-PER", "O", "I-LOC"], ["O", "B-ORG", "I-LOC", "I-ORG"]]),
    # nothing predicted; and a type only in the predictions
    ([["B-PER", "O"], ["O", "O"]], [["O", "O"], ["O", "B-MISC"]]),
    # BIOES
    ([["B-PER", "E-PER", "S-LOC", "O"], ["B-ORG", "I-ORG", "E-ORG"]],
     [["B-PER", "E-PER", "B-LOC", "O"], ["S-ORG", "I-ORG", "E-ORG"]]),
]


@pytest.mark.parametrize("ref, pred", FIXTURES)
def test_entity_f1_equals_seqeval_on_fixtures(ref, pred):
    m = EntityF1()
    m.update(pred, ref)
    assert_matches_seqeval(m, ref, pred)


def test_entity_f1_hand_checked():
    m = EntityF1()
    m.update([["B-PER", "I-PER", "O", "B-LOC", "B-LOC"]], [["B-PER", "I-PER", "O", "B-LOC", "I-LOC"]])
    out = m.compute()  # predicted PER(0-1) LOC(3) LOC(4); true PER(0-1) LOC(3-4): 1 of 3, 1 of 2
    assert (out["precision"], out["recall"]) == pytest.approx((1 / 3, 1 / 2))
    assert out["per_type"]["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert out["per_type"]["PER"]["f1"] == 1.0


def test_chunks_equal_seqeval_get_entities_on_random_sequences():
    from seqeval.metrics.sequence_labeling import get_entities

    rng = random.Random(0)
    tags = ["O", "B-A", "I-A", "E-A", "S-A", "B-B", "I-B", "E-B", "S-B"]
    for _ in range(2000):
        seq = [rng.choice(tags) for _ in range(rng.randint(0, 8))]
        assert chunks(seq) == get_entities(seq), seq


@pytest.mark.parametrize("seed", range(10))
def test_entity_f1_equals_seqeval_on_random_sequences(seed):
    rng = random.Random(seed)
    tags = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
    ref, pred = [], []
    for _ in range(rng.randint(1, 30)):
        n = rng.randint(1, 12)
        r = [rng.choice(tags) for _ in range(n)]
        ref.append(r)
        pred.append([t if rng.random() < 0.6 else rng.choice(tags) for t in r])
    m, parts = EntityF1(), [EntityF1(), EntityF1()]
    m.update(pred, ref)
    cut = rng.randint(0, len(ref))
    parts[0].update(pred[:cut], ref[:cut])
    parts[1].update(pred[cut:], ref[cut:])
    assert_matches_seqeval(m, ref, pred)
    assert parts[0].merge(parts[1]).compute() == m.compute()


def test_entity_f1_on_conll2003_dev_against_a_perturbed_copy():
    from lmforge.data.readers import read_conll

    dev = read_conll(need_shared("conll2003/dev.txt"))
    labels = sorted({t for s in dev for t in s.tags})
    rng = random.Random(0)
    ref = [s.tags for s in dev]
    pred = [[t if rng.random() < 0.9 else rng.choice(labels) for t in tags] for tags in ref]
    m = EntityF1()
    for i in range(0, len(ref), 64):  # streamed in batches
        m.update(pred[i:i + 64], ref[i:i + 64])
    assert_matches_seqeval(m, ref, pred)
    assert 0.3 < m.compute()["f1"] < 0.95
    state = json.loads(json.dumps(m.state_dict()))
    again = EntityF1()
    again.load_state_dict(state)
    assert again.compute() == m.compute()


def test_entity_f1_bad_updates():
    m = EntityF1()
    with pytest.raises(ValueError, match="1 predicted sentences but 2"):
        m.update([["O"]], [["O"], ["O"]])
    with pytest.raises(ValueError, match="2 predicted tags but 1"):
        m.update([["O", "O"]], [["O"]])
    with pytest.raises(ValueError, match="'PER'"):
        m.update([["PER"]], [["O"]])


# ---- pictures --------------------------------------------------------------------------------------
def test_confusion_png(tmp_path):
    out = confusion_png([[5, 1], [2, 7]], ["negative", "positive"], tmp_path / "plots" / "confusion.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    big = [[i * j % 7 for j in range(15)] for i in range(15)]
    confusion_png(big, [f"news_{i}" for i in range(15)], tmp_path / "plots" / "c15.png")
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["c15.png", "confusion.png"]  # no temp files
    with pytest.raises(ValueError, match="3 labels"):
        confusion_png([[1, 2], [3, 4]], ["a", "b", "c"], tmp_path / "x.png")

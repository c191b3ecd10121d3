"""Extractive QA: SQuAD / CMRC 2018 reading, context windows (coverage on random contexts and strides),
gold spans that map back to exactly the answer text, the best span over all windows equal to brute
force, end to end (finetune -> evaluate -> predict) with the official scoring, and every bad input."""
from __future__ import annotations

import gzip
import json
import random
import re

import pytest
import torch
from torch import nn

from lmforge.cli import main, run_verb
from lmforge.data.readers import read_qa
from lmforge.errors import ConfigError, DataError
from lmforge.metrics_qa import score_corpus
from lmforge.tasks.base import TaskData
from lmforge.tasks.qa import QA, QAOptions
from lmforge.text.tokenizer import train_tokenizer

FILL = "we walked to the river and saw some old boats near a small town at noon".split()
CODES = "alpha beta gamma delta omega sigma kappa zeta".split()
TINY_BERT = ["--arch", "bert", "--model.n_layer", "2", "--model.n_head", "2", "--model.d_model", "32",
             "--model.d_ff", "64", "--model.max_position", "64", "--model.dropout", "0.0"]


def squad(n, seed, key="code"):
    """SQuAD v1.1 json: contexts of filler sentences with one 'the KEY is X .' fact; 'what is the KEY ?'."""
    rng = random.Random(seed)
    data = []
    for a in range(n):
        sents = [" ".join(rng.sample(FILL, rng.randint(3, 6))) + " ." for _ in range(rng.randint(2, 7))]
        value = rng.choice(CODES)
        sents.insert(rng.randint(0, len(sents)), f"the {key} is {value} .")
        ctx = " ".join(sents)
        start = ctx.index(f"the {key} is {value} .") + len(f"the {key} is ")
        qas = [{"id": f"{seed}-{a}", "question": f"what is the {key} ?",
                "answers": [{"text": value, "answer_start": start}]}]
        data.append({"title": str(a), "paragraphs": [{"context": ctx, "qas": qas}]})
    return {"version": "1.1", "data": data}


@pytest.fixture(scope="module")
def qa_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("qa")
    (d / "train.json").write_text(json.dumps(squad(160, 1)))
    (d / "dev.json").write_text(json.dumps(squad(40, 2)))
    texts = [p["context"] for a in squad(160, 1)["data"] for p in a["paragraphs"]] + ["what is the code ?"]
    train_tokenizer(texts, kind="wordpiece", vocab_size=150, min_frequency=1).save(d / "tok.json")
    return d


def tok_of(d):
    from lmforge.text.tokenizer import Tokenizer

    return Tokenizer.load(d / "tok.json")


def qa_args(d, tmp_path, name="run", steps=150, extra=()):
    return ["--task", "qa", "--data.train", str(d / "train.json"), "--data.dev", str(d / "dev.json"),
            "--data.max_length", "32", "--data.doc_stride", "8", "--tokenizer", str(d / "tok.json"), *TINY_BERT,
            "--train.max_steps", str(steps), "--train.batch_size", "16", "--train.lr", "3e-3",
            "--train.warmup_steps", "10", "--train.eval_every", "50", "--train.log_every", "1",
            "--train.device", "cpu", "--train.progress", "false", "--train.tensorboard", "false",
            "--name", name, "--runs_dir", str(tmp_path / "runs"), *extra]


def cli_error(args, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ---- reading -----------------------------------------------------------------------------------------
def test_read_squad_locates_answers(tmp_path):
    ctx = "Denver beat Carolina. Denver won again."
    doc = {"data": [{"title": "t", "paragraphs": [{"context": ctx, "qas": [
        {"id": "q1", "question": "Who won?", "answers": [{"text": "Denver", "answer_start": 22}]},
        {"id": "q2", "question": "Who lost?", "answers": [{"text": "Carolina", "answer_start": 3}]},  # wrong start
        {"id": "q3", "question": "Who?", "answers": [{"text": "Seattle", "answer_start": 0},
                                                     {"text": " Denver ", "answer_start": 0}]},
    ]}]}]}
    path = tmp_path / "s.json.gz"
    path.write_bytes(gzip.compress(json.dumps(doc).encode()))
    exs = read_qa(path)
    assert exs.format == "squad" and [e.id for e in exs] == ["q1", "q2", "q3"]
    assert exs[0].spans == [(22, 28)]
    assert exs[1].spans == [(12, 20)] and exs.relocated == 1  # found at the nearest occurrence
    assert exs[2].spans == [None, (0, 6)] and exs[2].located == (0, 6)  # whitespace is not part of the span
    assert exs.counts()["references_unlocated"] == 1 and exs.questions_unlocated == 0
    assert exs[2].answers == ["Seattle", " Denver "]  # scoring uses the texts as given


def test_read_cmrc2018_format_matches_find(tmp_path):
    from helpers import need_shared

    path = need_shared("cmrc2018/cmrc2018_dev.json")
    raw = json.loads(path.read_text(encoding="utf-8"))
    exs = read_qa(path)
    assert exs.format == "cmrc2018" and len(exs) == 3219
    n_unlocated = n_non_string = 0
    for art in raw:  # an independent count with str.find on the raw file
        for q in art["qas"]:
            for a in q["answers"]:
                n_non_string += not isinstance(a, str)
                n_unlocated += art["context_text"].find(str(a).strip()) < 0
    assert exs.unlocated == n_unlocated and exs.non_string == n_non_string == 29
    by_id = {e.id: e for e in exs}
    assert by_id["DEV_72_QUERY_1"].answers == ["147位", "147位", "147.0"]
    for e in exs:
        for text, span in zip(e.answers, e.spans):
            if span is not None:
                assert e.context[span[0]:span[1]] == text.strip()
                assert span[0] == e.context.find(text.strip())


def test_read_jsonl_datasets_layout(tmp_path):
    rows = [{"id": "a", "question": "q?", "context": "x y z", "answers": {"text": ["y"], "answer_start": [2]}},
            {"question": "q2?", "context": "北京是首都", "answers": ["首都"]}]
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    exs = read_qa(path)
    assert exs[0].spans == [(2, 3)] and exs[1].spans == [(3, 5)] and exs[1].id == "line 2"


@pytest.mark.parametrize("doc, message", [
    ('{"data": [', ":1: not valid JSON"),
    ({"data": [{"paragraphs": [{"context": "x", "qas": [{"id": "1", "answers": [{"text": "x"}]}]}]}]},
     "data[0].paragraphs[0].qas[0]: no 'question'"),
    ({"data": [{"paragraphs": [{"context": "  ", "qas": []}]}]}, "data[0].paragraphs[0]: empty 'context'"),
    ({"data": [{"paragraphs": [{"context": "x", "qas": [{"id": "1", "question": "q", "answers": []}]}]}]},
     "no reference answers"),
    ({"data": [{"paragraphs": [{"context": "x", "qas": [{"id": "1", "question": "q", "answers": [],
                                                           "is_impossible": True}]}]}]}, "SQuAD 2.0 is not supported"),
    ({"data": [{"paragraphs": [{"context": "x", "qas": [{"id": "1", "question": "q", "answers": [{"text": ""}]}]}]}]},
     "answers[0] is empty"),
    ({"data": [{"paragraphs": [{"context": "x", "qas": [{"id": "1", "question": "q", "answers": ["x"]},
                                                        {"id": "1", "question": "r", "answers": ["x"]}]}]}]},
     "question id '1' occurs twice"),
    ({"data": []}, "no questions (empty split)"),
    ([1, 2], "data[0]: expected a JSON object"),
])
def test_read_qa_errors(tmp_path, doc, message):
    path = tmp_path / "bad.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(DataError, match=re.escape(message)):
        read_qa(path)


# ---- windows: every context token in some window, for random contexts and strides ------------------------
def test_windows_cover_every_token_on_random_contexts(qa_data):
    tok = tok_of(qa_data)
    rng = random.Random(0)
    words = FILL + CODES + ["what", "is", "the", "code", "?", "zzqx"]
    for trial in range(60):
        ctx = " ".join(rng.choice(words) for _ in range(rng.randint(1, 80)))
        question = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        from lmforge.data.readers import QAExample

        ex = QAExample("x", question, ctx, [], [], "random")
        max_length = rng.randint(12, 48)
        q_len = min(len(tok.encode(question)), 64)
        room = max_length - q_len - 3
        if room < 1:
            continue
        stride = rng.randint(1, room)
        data = TaskData(max_length=max_length, doc_stride=stride)
        feats, stats = QA.featurize([ex], tok, [], data)
        full = tok.encode_for_model([ctx], add_special_tokens=False, padding=False)["offsets"][0]
        covered = set()
        firsts = []
        for f in feats:
            spans = [(a, b) for a, b in zip(f["ctx_start"], f["ctx_end"]) if a >= 0]
            assert 1 <= len(spans) <= room and len(f["input_ids"]) <= max_length
            covered.update(spans)
            firsts.append(spans[0])
        assert set(map(tuple, full)) == covered  # every token of the context lies in some window
        chars = {i for a, b in covered for i in range(a, b)}
        assert all(c.isspace() or i in chars for i, c in enumerate(ctx))  # so does every non-space character
        # windows start `stride` tokens apart
        full = [tuple(o) for o in full]
        assert [full.index(s) for s in firsts] == [k * stride for k in range(len(feats))]
        assert stats.extra["windows"] == len(feats)


def test_stride_that_would_skip_text_is_refused(qa_data):
    ex = read_qa(qa_data / "train.json")[:3]
    with pytest.raises(ConfigError, match=r"data.doc_stride=40 skips text: a window holds only \d+ context tokens"):
        QA.featurize(ex, tok_of(qa_data), [], TaskData(max_length=32, doc_stride=40))
    with pytest.raises(ConfigError, match="leaves no room for context"):
        QA.featurize(ex, tok_of(qa_data), [], TaskData(max_length=8))


# ---- gold spans map back to exactly the answer text ------------------------------------------------------
def _check_gold_maps_back(examples, feats):
    labelled = 0
    for f in feats:
        ex = examples[f["example"]]
        s, e = f["start_position"], f["end_position"]
        if ex.located is None:
            assert s == e == -100
            continue
        if f["ctx_start"][s] < 0:  # the [CLS] position: the answer is not wholly in this window
            continue
        a, b = f["ctx_start"][s], f["ctx_end"][e]
        assert (a, b) == ex.located
        assert ex.context[a:b] == ex.answers[ex.spans.index(ex.located)].strip()
        labelled += 1
    return labelled


def test_gold_spans_map_back_to_the_answer_text(qa_data):
    exs = read_qa(qa_data / "train.json")
    feats, stats = QA.featurize(exs, tok_of(qa_data), [], TaskData(max_length=32, doc_stride=8))
    assert stats.extra["answers_misaligned"] == 0
    labelled = _check_gold_maps_back(exs, feats)
    # every located answer is wholly inside at least one window
    assert {f["example"] for f in feats if f["start_position"] >= 0 and f["ctx_start"][f["start_position"]] >= 0} \
        == set(range(len(exs)))
    assert labelled >= len(exs)


def test_gold_spans_map_back_on_cmrc2018_trial():
    """Every located CMRC 2018 trial answer whose boundaries fall between tokens maps back exactly; the
    others (a boundary inside a token) are counted, and the count equals an independent one."""
    from helpers import need_shared

    exs = read_qa(need_shared("cmrc2018/cmrc2018_trial.json"))
    tok = train_tokenizer([e.context for e in exs] + [e.question for e in exs], kind="wordpiece", vocab_size=3000,
                          min_frequency=1)
    feats, stats = QA.featurize(exs, tok, [], TaskData(max_length=128, doc_stride=48))
    misaligned = 0
    for e in exs:
        offsets = tok.encode_for_model([e.context], add_special_tokens=False, padding=False)["offsets"][0]
        a, b = e.located
        misaligned += a not in {s for s, _ in offsets} or b not in {t for _, t in offsets}
    assert stats.extra["answers_misaligned"] == misaligned
    bad = set()
    for f in feats:
        ex = exs[f["example"]]
        s, e = f["start_position"], f["end_position"]
        if f["ctx_start"][s] >= 0 and (f["ctx_start"][s], f["ctx_end"][e]) != ex.located:
            bad.add(f["example"])
    assert len(bad) == misaligned
    assert stats.extra["questions_unlocated"] == 0 and len(exs) == 1002


# ---- decoding: the best valid span over all windows equals brute force -----------------------------------
class FixedLogits(nn.Module):
    def __init__(self, start, end, options):
        super().__init__()
        self.start, self.end = start, end
        self.head = nn.Module()
        self.head.options = options

    def forward(self, batch):
        return self.start, self.end


def test_best_span_over_windows_equals_brute_force(qa_data):
    tok = tok_of(qa_data)
    exs = read_qa(qa_data / "dev.json")[:12]
    feats, _ = QA.featurize(exs, tok, [], TaskData(max_length=24, doc_stride=5))
    batch = QA.collate(feats, 0)
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(batch["input_ids"].shape, generator=gen)
    end = torch.randn(batch["input_ids"].shape, generator=gen)
    for max_len in (1, 3, 30):
        opts = QAOptions(max_answer_length=max_len, n_best=4, scoring="squad")
        preds, _ = QA.decode(FixedLogits(start, end, opts), batch)
        answers = QA.gather(preds, exs)
        for i, ex in enumerate(exs):
            best = {}
            for b, f in enumerate(feats):  # brute force: every pair of context tokens of every window
                if f["example"] != i:
                    continue
                ctx = [t for t, a in enumerate(f["ctx_start"]) if a >= 0]
                for s in ctx:
                    for e in ctx:
                        if s <= e < s + max_len:
                            span = (f["ctx_start"][s], f["ctx_end"][e])
                            best[span] = max(best.get(span, -1e9), float(start[b, s] + end[b, e]))
            ranked = sorted(best.items(), key=lambda kv: -kv[1])[:4]
            got = answers[i]
            assert (got["start"], got["end"]) == ranked[0][0]
            assert got["answer"] == ex.context[ranked[0][0][0]:ranked[0][0][1]]
            assert [(c["start"], c["end"]) for c in got["n_best"]] == [s for s, _ in ranked]
            assert [c["logit"] for c in got["n_best"]] == pytest.approx([v for _, v in ranked], abs=1e-5)
            assert sum(c["score"] for c in got["n_best"]) == pytest.approx(1.0)


def test_gold_logits_decode_to_the_answer(qa_data):
    """Logits that peak at the gold tokens decode (through windows, gather, offsets) to the reference text."""
    exs = read_qa(qa_data / "dev.json")
    feats, _ = QA.featurize(exs, tok_of(qa_data), [], TaskData(max_length=32, doc_stride=8))
    batch = QA.collate(feats, 0)
    start = torch.zeros(batch["input_ids"].shape)
    end = torch.zeros(batch["input_ids"].shape)
    for b, f in enumerate(feats):
        if f["ctx_start"][f["start_position"]] >= 0:
            start[b, f["start_position"]] = 10.0
            end[b, f["end_position"]] = 10.0
    preds, _ = QA.decode(FixedLogits(start, end, QAOptions(scoring="squad")), batch)
    answers = QA.gather(preds, exs)
    assert [a["answer"] for a in answers] == [e.answers[0] for e in exs]
    out = score_corpus([a["answer"] for a in answers], [e.answers for e in exs], "squad")
    assert out["exact_match"] == out["f1"] == 100.0


# ---- end to end --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qa_run(qa_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qarun")
    summary = run_verb("finetune", qa_args(qa_data, tmp, steps=150))
    return tmp / "runs" / "run", summary


def test_qa_learns_evaluates_and_predicts(qa_data, qa_run, tmp_path):
    run, summary = qa_run
    assert summary["best"]["value"] >= 80  # the answer follows 'the code is'
    assert summary["train_stats"]["windows"] > len(read_qa(qa_data / "train.json"))  # contexts were split
    report = run_verb("evaluate", [str(run), "--data", str(qa_data / "dev.json"), "--out", str(tmp_path / "rep")])
    m = report["metrics"]
    assert m["rule"] == "squad" and m["questions"] == 40 and "SQuAD v1.1" in report["settings"]["metric"]
    assert m["f1"] == pytest.approx(summary["best"]["value"])
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "rule: `squad`" in md and "windows" in md
    run_verb("predict", [str(run), "--data", str(qa_data / "dev.json"), "--out", str(tmp_path / "p.jsonl")])
    preds = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    exs = read_qa(qa_data / "dev.json")
    assert [p["id"] for p in preds] == [e.id for e in exs]
    for p, e in zip(preds, exs):
        assert e.context[p["start"]:p["end"]] == p["answer"]
        assert 0 < p["score"] <= 1 and len(p["n_best"]) <= 5
    again = score_corpus([p["answer"] for p in preds], [e.answers for e in exs], "squad")
    assert again["exact_match"] == pytest.approx(m["exact_match"]) and again["f1"] == pytest.approx(m["f1"])
    # jsonl input and the Predictor (serve) give the same answers
    from lmforge.tasks import load_task_model

    model = load_task_model(run)
    outs = model.predict([{"question": e.question, "context": e.context} for e in exs[:5]])
    assert [o["answer"] for o in outs] == [p["answer"] for p in preds[:5]]


def test_answers_longer_than_max_answer_length_are_counted(qa_data, qa_run, tmp_path):
    run, _ = qa_run
    doc = squad(20, 5)
    for k, art in enumerate(doc["data"]):  # half the references become 'is X' (two tokens)
        for q in art["paragraphs"][0]["qas"]:
            if k % 2:
                a = q["answers"][0]
                q["answers"] = [{"text": "is " + a["text"], "answer_start": a["answer_start"] - 3}]
    (tmp_path / "d.json").write_text(json.dumps(doc))
    report = run_verb("evaluate", [str(run), "--data", str(tmp_path / "d.json"), "--out", str(tmp_path / "r1"),
                                   "--task_args.max_answer_length", "1"])
    exs = read_qa(tmp_path / "d.json")
    tok = tok_of(qa_data)
    longer = sum(1 for e in exs if len(tok.encode(e.answers[0])) > 1)
    assert longer >= 10 and report["metrics"]["answers_longer_than_max"] == longer
    assert report["settings"]["task_args"]["max_answer_length"] == 1
    assert "answers_longer_than_max" in (tmp_path / "r1" / "report.md").read_text()


def test_unlocated_answers_are_counted_not_dropped(qa_data, tmp_path):
    doc = squad(30, 3)
    doc["data"][0]["paragraphs"][0]["qas"][0]["answers"] = [{"text": "nowhere to be found", "answer_start": 0}]
    (tmp_path / "t.json").write_text(json.dumps(doc))
    args = qa_args(qa_data, tmp_path, steps=2)
    args[args.index("--data.train") + 1] = str(tmp_path / "t.json")
    args[args.index("--data.dev") + 1] = str(tmp_path / "t.json")
    summary = run_verb("finetune", args)
    assert summary["train_stats"]["questions_unlocated"] == 1
    assert summary["dev"]["questions_unlocated"] == 1 and summary["dev"]["references_unlocated"] == 1
    assert summary["dev"]["questions"] == 30  # still scored, against its text


@pytest.mark.parametrize("change, message", [
    ({"--data.doc_stride": "200"}, "data.doc_stride=200 skips text"),
    ({"--data.doc_stride": "0"}, "data.doc_stride must be at least 1"),
    ({"--data.max_query_length": "0"}, "data.max_query_length must be at least 1"),
    ({"--task_args.max_answer_length": "0"}, "task_args.max_answer_length must be at least 1"),
    ({"--task_args.scoring": "squad2"}, "task_args.scoring"),
    ({"--data.text_pair": "x"}, "data.text_pair does not apply to the qa task"),
])
def test_bad_qa_config(qa_data, tmp_path, capsys, change, message):
    args = qa_args(qa_data, tmp_path, steps=2)
    for key, value in change.items():
        if key in args:
            args[args.index(key) + 1] = value
        else:
            args += [key, value]
    assert message in cli_error(["finetune", *args], capsys)


def test_no_located_answer_at_all_is_an_error(qa_data, tmp_path, capsys):
    doc = squad(3, 4)
    for art in doc["data"]:
        for q in art["paragraphs"][0]["qas"]:
            q["answers"] = [{"text": "absent words", "answer_start": 0}]
    (tmp_path / "t.json").write_text(json.dumps(doc))
    args = qa_args(qa_data, tmp_path, steps=2)
    args[args.index("--data.train") + 1] = str(tmp_path / "t.json")
    assert "no answer of any question could be located" in cli_error(["finetune", *args], capsys)


def test_scoring_auto_picks_cmrc2018_for_chinese():
    from lmforge.data.readers import QAExample

    zh = [QAExample("1", "谁？", "北京是中国的首都。", ["北京"], [(0, 2)], "x")]
    en = [QAExample("1", "who?", "Paris is the capital.", ["Paris"], [(0, 5)], "x")]
    assert QA.resolve_options(QAOptions(), zh).scoring == "cmrc2018"
    assert QA.resolve_options(QAOptions(), en).scoring == "squad"
    assert QA.resolve_options(QAOptions(scoring="squad"), zh).scoring == "squad"

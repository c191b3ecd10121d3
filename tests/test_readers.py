"""Task readers: tables and tagged files, the label set, tag-scheme conversion, and one clear error per
kind of bad input. Real files: every classification and NER folder of ../shared/data with its README's
counts; the Resume/Weibo BMES files against the same data's independent B/I/S jsonl conversion; CoNLL-2003's
entities against seqeval's reading of the raw tags."""
from __future__ import annotations

import gzip
import json

import pytest
from helpers import need_shared

from lmforge.data.readers import (Example, LabelSet, TaggedSentence, detect_scheme, read_conll, read_table,
                                  to_iob2)
from lmforge.errors import ConfigError, DataError


def write(tmp_path, name, text, encoding="utf-8"):
    p = tmp_path / name
    p.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return p


def one_line_error(exc_info, *parts):
    msg = str(exc_info.value)
    assert "\n" not in msg
    for part in parts:
        assert part in msg, (part, msg)
    return msg


# ---- tables ----------------------------------------------------------------------------------------
def test_tsv_with_header_by_name(tmp_path):
    p = write(tmp_path, "a.tsv", "sentence\tlabel\nit 's good \t1\nbad\t0\n")
    assert read_table(p, text="sentence") == [Example("it 's good", None, "1", f"{p}:2"),
                                              Example("bad", None, "0", f"{p}:3")]


def test_tsv_never_quotes_and_keeps_bom_out(tmp_path):
    # MRPC: a BOM before the header, strings with bare and unbalanced double quotes
    p = write(tmp_path, "m.tsv", '\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n'
                                 '1\t1\t2\tHe said "the witness", of\t"The pie\n')
    [ex] = read_table(p, text="#1 String", text_pair="#2 String", label="Quality")
    assert ex == Example('He said "the witness", of', '"The pie', "1", f"{p}:2")


def test_no_header_by_index_and_digit_strings(tmp_path):
    p = write(tmp_path, "c.tsv", "好\tpositive\n差\tnegative\n一般\tpositive\n")
    want = [Example("好", None, "positive", f"{p}:1"), Example("差", None, "negative", f"{p}:2"),
            Example("一般", None, "positive", f"{p}:3")]
    assert read_table(p, text=0, label=1) == want
    assert read_table(p, text="0", label="1") == want
    assert read_table(p, text=0, label=-1, header=False) == want


@pytest.mark.parametrize("content, header", [
    ("sentence\tlabel\na\t1\nb\t0\n", True),                 # numeric column below a name
    ("a\tnews\nb\tnews\nc\tsport\n", False),                 # first label recurs
    ("a\tx\nb\ty\nc\tz\n", False),                           # no evidence: data
    ("qid\ttext_a\n0\t一\n1\t二\n", True),                   # unlabelled, numeric id column
])
def test_header_detection_by_index(tmp_path, content, header):
    p = write(tmp_path, "h.tsv", content)
    label = None if content.startswith("qid") else 1
    text = 1 if label is None else 0
    rows = read_table(p, text=text, label=label)
    n = content.count("\n")
    assert len(rows) == n - header
    assert rows[0].where == f"{p}:{1 + header}"


def test_header_guess_refuses_an_ambiguous_first_row(tmp_path):
    p = write(tmp_path, "h.tsv", "text\ttopic\na\tnews\nb\tnews\nc\tsport\n")  # header, or a rare class?
    with pytest.raises(DataError) as e:
        read_table(p, text=0, label=1)
    one_line_error(e, f"{p}:1", "'topic'", "header=True or header=False")
    assert len(read_table(p, text=0, label=1, header=True)) == 3
    assert len(read_table(p, text=0, label=1, header=False)) == 4


def test_explicit_header_overrides_the_guess(tmp_path):
    p = write(tmp_path, "h.tsv", "a\tx\nb\ty\nc\tx\n")
    assert [e.text for e in read_table(p, text=0, label=1, header=True)] == ["b", "c"]


def test_csv_quoting_and_multiline_fields(tmp_path):
    p = write(tmp_path, "a.csv", 'text,label\n"hello, world",pos\n"two\nlines ""q""",neg\nplain,pos\n')
    got = read_table(p)
    assert [(e.text, e.label, e.where) for e in got] == [
        ("hello, world", "pos", f"{p}:2"), ('two\nlines "q"', "neg", f"{p}:3"), ("plain", "pos", f"{p}:5")]


def test_jsonl_and_gzip(tmp_path):
    rows = [{"text": "a", "b": "x", "label": 1}, {"text": "c", "b": "y", "label": 0}]
    body = "".join(json.dumps(r) + "\n" for r in rows)
    want = [Example("a", "x", "1", None), Example("c", "y", "0", None)]
    for name, data in [("t.jsonl", body.encode()), ("t.jsonl.gz", gzip.compress(body.encode()))]:
        p = write(tmp_path, name, data)
        got = read_table(p, text_pair="b")
        assert [(e.text, e.text_pair, e.label) for e in got] == [(w.text, w.text_pair, w.label) for w in want]
        assert got[1].where == f"{p}:2"
    p = write(tmp_path, "t.tsv.gz", gzip.compress(b"text\tlabel\nq\t1\n"))
    assert read_table(p) == [Example("q", None, "1", f"{p}:2")]


def test_unlabelled_file_with_label_none(tmp_path):
    p = write(tmp_path, "t.tsv", "qid\ttext_a\n0\thello\n")
    assert read_table(p, text="text_a", label=None) == [Example("hello", None, None, f"{p}:2")]


def test_crlf_and_blank_lines(tmp_path):
    p = write(tmp_path, "t.tsv", "text\tlabel\r\na\t1\r\n\r\nb\t0\r\n")
    assert [(e.text, e.label, e.where) for e in read_table(p)] == [("a", "1", f"{p}:2"), ("b", "0", f"{p}:4")]


# ---- table errors ----------------------------------------------------------------------------------
def test_error_missing_file(tmp_path):
    with pytest.raises(DataError) as e:
        read_table(tmp_path / "nope.tsv")
    one_line_error(e, "nope.tsv", "file not found")


def test_error_missing_column_names_the_available_ones(tmp_path):
    p = write(tmp_path, "t.tsv", "sentence\tlabel\na\t1\n")
    with pytest.raises(DataError) as e:
        read_table(p)
    one_line_error(e, str(p), "'text'", "'sentence', 'label'")


def test_error_index_out_of_range(tmp_path):
    p = write(tmp_path, "t.tsv", "a\t1\nb\t1\n")
    with pytest.raises(DataError) as e:
        read_table(p, text=0, label=5, header=False)
    one_line_error(e, f"{p}:1", "no column 5", "2 columns")


def test_error_ragged_row(tmp_path):
    p = write(tmp_path, "t.tsv", "text\tlabel\na\t1\nb\tc\t0\n")
    with pytest.raises(DataError) as e:
        read_table(p)
    one_line_error(e, f"{p}:3", "3 fields, expected 2")


@pytest.mark.parametrize("content", ["", "\n\n", "text\tlabel\n"])
def test_error_empty_split(tmp_path, content):
    p = write(tmp_path, "t.tsv", content)
    with pytest.raises(DataError) as e:
        read_table(p, text=0, label=1, header=bool(content.strip()))
    one_line_error(e, str(p), "no examples")


def test_error_empty_text_and_label(tmp_path):
    p = write(tmp_path, "t.tsv", "text\tlabel\na\t1\n  \t0\n")
    with pytest.raises(DataError) as e:
        read_table(p)
    one_line_error(e, f"{p}:3", "empty text", "'text'")
    p = write(tmp_path, "u.tsv", "text\tlabel\na\t\n")
    with pytest.raises(DataError) as e:
        read_table(p)
    one_line_error(e, f"{p}:2", "empty label")


def test_error_undecodable_names_the_line(tmp_path):
    p = write(tmp_path, "t.tsv", b"text\tlabel\na\t1\ncaf\xe9\t0\n")
    with pytest.raises(DataError) as e:
        read_table(p)
    one_line_error(e, f"{p}:3", "UTF-8", "0xe9")


def test_error_bad_json_and_missing_key(tmp_path):
    p = write(tmp_path, "t.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": \n')
    with pytest.raises(DataError) as e:
        read_table(p)
    one_line_error(e, f"{p}:2", "not valid JSON")
    p = write(tmp_path, "u.jsonl", '{"text": "a", "label": 1}\n{"sentence": "b", "label": 0}\n')
    with pytest.raises(DataError) as e:
        read_table(p)
    one_line_error(e, f"{p}:2", "no key 'text'", "'sentence', 'label'")


def test_error_bad_gzip(tmp_path):
    p = write(tmp_path, "t.tsv.gz", b"not gzip at all")
    with pytest.raises(DataError) as e:
        read_table(p)
    one_line_error(e, str(p), "gzip")


def test_error_name_without_header(tmp_path):
    p = write(tmp_path, "t.tsv", "a\t1\n")
    with pytest.raises(ConfigError) as e:
        read_table(p, text="sentence", label=1, header=False)
    one_line_error(e, "text='sentence'", "header=False")


def test_error_unterminated_csv_quote(tmp_path):
    p = write(tmp_path, "t.csv", 'text,label\n"open quote,1\n')
    with pytest.raises(DataError) as e:
        read_table(p)
    one_line_error(e, str(p), "csv")


# ---- the shared data sets --------------------------------------------------------------------------
def counts(examples):
    out: dict = {}
    for e in examples:
        out[e.label] = out.get(e.label, 0) + 1
    return out


def test_sst2():
    d = need_shared("sst2")
    assert counts(read_table(d / "train.tsv", text="sentence")) == {"1": 33828, "0": 26786}
    assert counts(read_table(d / "dev.tsv", text="sentence")) == {"1": 3741, "0": 2994}
    assert counts(read_table(d / "test.tsv", text=0, label=1)) == {"1": 444, "0": 428}  # header guessed


def test_mrpc_including_quotes_and_the_labelled_msr_test():
    d = need_shared("mrpc")
    cols = dict(text="#1 String", text_pair="#2 String", label="Quality")
    assert counts(read_table(d / "train.tsv", **cols)) == {"1": 2474, "0": 1194}
    dev = read_table(d / "dev.tsv", **cols)
    assert counts(dev) == {"1": 279, "0": 129}
    assert dev[0].text_pair.startswith('"The foodservice pie business')  # a bare quote stays text
    msr = read_table(d / "msr_paraphrase_test.txt", **cols)
    assert counts(msr) == {"1": 1147, "0": 578}
    unlabelled = read_table(d / "test.tsv", text="#1 String", text_pair="#2 String", label=None)
    assert [(e.text, e.text_pair) for e in unlabelled] == [(e.text, e.text_pair) for e in msr]


def test_chnsenticorp():
    d = need_shared("chnsenticorp")
    assert counts(read_table(d / "train.tsv", text=0, label=1)) == {"negative": 4801, "positive": 4799}
    assert counts(read_table(d / "dev.tsv", text=0, label=1)) == {"negative": 607, "positive": 593}
    test = read_table(d / "test.tsv", text="text_a", label=None)
    assert len(test) == 1200 and test[0].where.endswith(":2")


def test_tnews():
    d = need_shared("tnews")
    train = read_table(d / "train.tsv", text=0, label=1)
    assert len(train) == 53360 and counts(train)["news_stock"] == 257
    labels = LabelSet.from_examples(train)
    assert sorted(labels.names) == sorted((d / "labels.txt").read_text().split())
    labels.check(read_table(d / "dev.tsv", text=0, label=1), d / "dev.tsv")


# ---- tag schemes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme, tags, iob2", [
    ("IOB2", ["B-PER", "I-PER", "O", "B-LOC", "B-LOC"], ["B-PER", "I-PER", "O", "B-LOC", "B-LOC"]),
    ("IOB1", ["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG"], ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "B-ORG"]),
    ("BIOES", ["B-PER", "I-PER", "E-PER", "S-LOC", "S-LOC", "O", "B-ORG", "E-ORG"],
     ["B-PER", "I-PER", "I-PER", "B-LOC", "B-LOC", "O", "B-ORG", "I-ORG"]),
    ("BMES", ["B-ORG", "M-ORG", "M-ORG", "E-ORG", "S-NAME", "B-T", "E-T", "O"],
     ["B-ORG", "I-ORG", "I-ORG", "I-ORG", "B-NAME", "B-T", "I-T", "O"]),
    # repairs: a chunk opened by I/M/E, a type change inside, an E followed by I
    ("BMES", ["M-ORG", "E-ORG", "B-A", "E-B", "E-B"], ["B-ORG", "I-ORG", "B-A", "B-B", "B-B"]),
    ("BIOES", ["E-X", "I-X", "S-X", "I-X"], ["B-X", "B-X", "B-X", "B-X"]),
    ("IOB2", ["O", "I-MISC", "I-ORG"], ["O", "B-MISC", "B-ORG"]),
])
def test_to_iob2_hand_checked(scheme, tags, iob2):
    assert to_iob2(tags, scheme) == iob2
    assert to_iob2(tags, "auto") == iob2


@pytest.mark.parametrize("tag, scheme, part", [
    ("PER", "IOB2", "not O or PREFIX-TYPE"), ("B-", "IOB2", "not O or PREFIX-TYPE"),
    ("E-PER", "IOB2", "prefix E-"), ("M-PER", "BIOES", "prefix M-"), ("I-PER", "BMES", "prefix I-"),
    ("X-PER", "auto", "prefix X-"),
])
def test_to_iob2_unreadable_tags(tag, scheme, part):
    with pytest.raises(DataError) as e:
        to_iob2(["O", tag], scheme)
    one_line_error(e, repr(tag), "word 2", part)


def test_detect_scheme():
    assert detect_scheme([["B-X", "I-X"], ["O", "B-Y"]]) == "IOB2"
    assert detect_scheme([["B-X", "I-X"], ["O", "I-Y"], ["B-Z"]]) == "IOB2"  # a stray I- start
    assert detect_scheme([["I-X", "I-X", "O", "I-Y", "B-Y"]]) == "IOB1"
    assert detect_scheme([["B-X", "E-X", "S-Y"]]) == "BIOES"
    assert detect_scheme([["B-X", "I-X"], ["S-Y"]]) == "BIOES"  # B/I/S as in bertorch's jsonl
    assert detect_scheme([["B-X", "M-X", "E-X"]]) == "BMES"


# ---- tagged files ----------------------------------------------------------------------------------
def test_conll_columns_docstart_and_where(tmp_path):
    p = write(tmp_path, "t.txt", "-DOCSTART- -X- O\n\nEU NNP I-ORG\nrejects VBZ O\n\n\n"
                                 "-DOCSTART- -X- O\nPeter NNP I-PER\nBlackburn NNP I-PER\n")
    got = read_conll(p)
    assert got == [TaggedSentence(["EU", "rejects"], ["B-ORG", "O"], f"{p}:3"),
                   TaggedSentence(["Peter", "Blackburn"], ["B-PER", "I-PER"], f"{p}:8")]
    assert got.scheme == "IOB1" and got.repaired == 0
    assert got[1].word_where(1) == f"{p}:9"
    pos = read_conll(p, word_col=1, tag_col=2)
    assert [s.words for s in pos] == [["NNP", "VBZ"], ["NNP", "NNP"]]
    with pytest.raises(DataError) as e:
        read_conll(p, tag_col=1)
    one_line_error(e, f"{p}:3", "'NNP'", "not O or PREFIX-TYPE")


def test_sentence_per_line_and_jsonl(tmp_path):
    p = write(tmp_path, "r.char.bmes", "高 勇 ：\tB-NAME E-NAME O\n汉 族\tB-RACE E-RACE\n")
    got = read_conll(p)
    assert got.scheme == "BMES"
    assert got == [TaggedSentence(["高", "勇", "："], ["B-NAME", "I-NAME", "O"], f"{p}:1", word_per_line=False),
                   TaggedSentence(["汉", "族"], ["B-RACE", "I-RACE"], f"{p}:2", word_per_line=False)]
    j = write(tmp_path, "r.json", '{"text": ["高", "勇", "："], "label": ["B-NAME", "I-NAME", "O"]}\n'
                                  '{"text": ["汉"], "label": ["S-RACE"]}\n')
    got = read_conll(j)
    assert got.scheme == "BIOES" and [s.tags for s in got] == [["B-NAME", "I-NAME", "O"], ["B-RACE"]]
    assert got[1].word_where(0) == f"{j}:2"


def test_explicit_scheme(tmp_path):
    p = write(tmp_path, "t.txt", "a I-X\nb I-X\n\nc B-X\n")
    got = read_conll(p, scheme="IOB2")
    assert got.scheme == "IOB2" and got.repaired == 1 and got[0].tags == ["B-X", "I-X"]
    with pytest.raises(DataError) as e:
        read_conll(write(tmp_path, "u.txt", "a B-X\nb E-X\n"), scheme="IOB2")
    one_line_error(e, "u.txt:2", "'E-X'", "IOB2")
    with pytest.raises(ConfigError, match="BILOU"):
        read_conll(p, scheme="BILOU")


def test_conll_errors(tmp_path):
    cases = [
        ("short.txt", "a B-X\nb\n", "short.txt:2", "1 columns, expected 2 as on line 1"),
        ("one.txt", "a\nb\n", "one.txt:1", "1 columns, too few"),
        ("bad.txt", "a B-X\nb Q-X\n", "bad.txt:2", "'Q-X'"),
        ("notag.txt", "a B-X\n\nb PER\n", "notag.txt:3", "'PER'"),
        ("uneven.bmes", "a b\tO O\na b c\tO O\n", "uneven.bmes:2", "3 words but 2 tags"),
        ("uneven.jsonl", '{"text": ["a"], "label": ["O", "O"]}\n', "uneven.jsonl:1", "1 words but 2 tags"),
        ("keys.jsonl", '{"x": ["a"], "label": ["O"]}\n', "keys.jsonl:1", "no key"),
        ("empty.txt", "\n-DOCSTART- O\n\n", "empty.txt", "no sentences"),
        ("latin1.txt", b"caf\xe9 O\n", "latin1.txt:1", "UTF-8"),
    ]
    for name, content, where, part in cases:
        with pytest.raises(DataError) as e:
            read_conll(write(tmp_path, name, content))
        one_line_error(e, where, part)
    with pytest.raises(DataError) as e:
        read_conll(tmp_path / "missing.txt")
    one_line_error(e, "missing.txt", "not found")


def test_resume_and_weibo_bmes_equal_their_bio_jsonl_conversion():
    """The same data in two formats, converted by two hands (ours from BMES; bertorch's to B/I/S)."""
    for folder, stem in [("ner_zh_resume", "char.bmes"), ("ner_zh_weibo", "all.bmes")]:
        d = need_shared(folder)
        for split in ("train", "dev", "test"):
            bmes, jsonl = read_conll(d / f"{split}.{stem}"), read_conll(d / f"{split}.json")
            assert bmes.scheme == "BMES"
            assert [(s.words, s.tags) for s in bmes] == [(s.words, s.tags) for s in jsonl]
    train = read_conll(need_shared("ner_zh_resume/train.char.bmes"))
    assert (len(train), sum(len(s.words) for s in train)) == (3821, 124099)
    assert {t[2:] for s in train for t in s.tags if t != "O"} == {
        "NAME", "ORG", "TITLE", "EDU", "CONT", "PRO", "RACE", "LOC"}


def test_conll2003_counts_and_entities_equal_seqeval_on_raw_tags():
    from seqeval.metrics.sequence_labeling import get_entities

    d = need_shared("conll2003")
    for split, n, words in [("train", 14041, 203621), ("dev", 3250, 51362), ("test", 3453, 46435)]:
        got = read_conll(d / f"{split}.txt")
        assert (len(got), sum(len(s.words) for s in got)) == (n, words)
    raw = [ln.split()[-1] for ln in (d / "dev.txt").read_text().split("\n") if ln.strip()]
    dev = read_conll(d / "dev.txt")
    assert dev.scheme == "IOB2" and dev.repaired > 0  # the file's stray I- starts
    ours = [t for s in dev for t in s.tags]
    assert get_entities(ours) == get_entities(raw)  # one flat sequence: same spans, same types


# ---- label sets ------------------------------------------------------------------------------------
def test_labelset_order_index_and_check(tmp_path):
    ex = [Example("a", None, lab, f"f:{i}") for i, lab in enumerate(["10", "2", "2", "1"])]
    labels = LabelSet.from_examples(ex)
    assert labels.names == ["1", "2", "10"] and len(labels) == 3 and labels.index("10") == 2
    assert LabelSet.from_examples([Example("a", None, x, "f:1") for x in ["pos", "neg"]]).names == ["neg", "pos"]
    labels.check([Example("a", None, "2", "dev:1"), Example("b", None, None, "dev:2")], "dev")
    with pytest.raises(DataError) as e:
        labels.check([Example("a", None, "2", "dev.tsv:1"), Example("b", None, "3", "dev.tsv:7")], "dev.tsv")
    one_line_error(e, "dev.tsv:7", "label '3' never seen in training", "known: 1, 2, 10")
    with pytest.raises(DataError) as e:
        labels.index("x")
    one_line_error(e, "'x'", "never seen")
    with pytest.raises(DataError) as e:
        labels.check([], "dev.tsv")
    one_line_error(e, "dev.tsv", "empty split")
    with pytest.raises(DataError) as e:
        LabelSet.from_examples([Example("a", None, None, "train.tsv:4")])
    one_line_error(e, "train.tsv:4", "no label")
    assert LabelSet(**{"names": labels.names}) == labels  # round-trips through its saved form


def test_labelset_of_tags(tmp_path):
    train = read_conll(write(tmp_path, "train.txt", "a B-PER\nb I-PER\nc O\n\nd B-LOC\n"))
    labels = LabelSet.from_examples(train)
    assert labels.names == ["O", "B-LOC", "B-PER", "I-PER"]
    dev = read_conll(write(tmp_path, "dev.txt", "a O\n\nb B-LOC\nc I-LOC\n"))
    with pytest.raises(DataError) as e:
        labels.check(dev, "dev.txt")
    one_line_error(e, "dev.txt:4", "tag 'I-LOC' never seen in training")

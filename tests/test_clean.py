import gzip
import json
import random
import unicodedata
from pathlib import Path

import pytest

from lmforge.errors import ConfigError, DataError
from lmforge.text.clean import clean, clean_documents, clean_text, read_documents

from helpers import SHARED_DATA as DATA, need_shared as need




def docs_of(paths, **kw) -> list[str]:
    return [text for _, text in read_documents(paths, **kw)]


# ---- read_documents ------------------------------------------------------------------------------
def test_doc_sep_modes(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(b"\xef\xbb\xbfone\r\nstill one\r\n\r\n\r\n  \ntwo\n\nthree  \n")  # BOM, CRLF, spaces-only line
    assert docs_of(f) == ["one\nstill one", "two", "three  "]
    assert docs_of(f, doc_sep="line") == ["one", "still one", "two", "three  "]
    # "file" keeps every byte but the BOM
    assert docs_of(f, doc_sep="file") == ["one\r\nstill one\r\n\r\n\r\n  \ntwo\n\nthree  \n"]


def test_jsonl_gz_and_folders(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text('{"text": "j1", "id": 1}\n\n{"text": "j2"}\n')
    with gzip.open(tmp_path / "c.txt.gz", "wt", encoding="utf-8") as f:
        f.write("g1\n\ng2 中文\n")
    with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"body": "zipped json"}) + "\n")
    (tmp_path / "a.txt").write_text("t1\n")
    (tmp_path / "skip.csv").write_text("not read,\n")
    # d.jsonl.gz has no "text" field, so read the others first, then d with its own field
    assert docs_of([tmp_path / "a.txt", tmp_path / "c.txt.gz", tmp_path / "sub"]) == ["t1", "g1", "g2 中文", "j1", "j2"]
    assert docs_of(tmp_path / "d.jsonl.gz", jsonl_field="body") == ["zipped json"]
    (tmp_path / "d.jsonl.gz").unlink()
    sources = [Path(s).name for s, _ in read_documents(tmp_path)]  # folder: recursive, sorted, no .csv
    assert sources == ["a.txt", "c.txt.gz", "c.txt.gz", "b.jsonl", "b.jsonl"]


def test_jsonl_errors_name_file_line_field(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"text": "ok"}\n{"content": "no text"}\n')
    with pytest.raises(DataError, match=r"x\.jsonl: line 2: no field 'text' \(found: content\)"):
        docs_of(f)
    f.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"x\.jsonl: line 2: not valid JSON"):
        docs_of(f)
    f.write_text('{"text": 3}\n')
    with pytest.raises(DataError, match=r"x\.jsonl: line 1: field 'text' is int, not text"):
        docs_of(f)


def test_missing_paths_and_bad_options(tmp_path):
    with pytest.raises(DataError, match=r"nope\.txt: no such file or folder"):
        docs_of(tmp_path / "nope.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: folder has no \.txt"):
        docs_of(tmp_path / "empty")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ConfigError, match="doc_sep"):
        docs_of(tmp_path / "a.txt", doc_sep="paragraph")
    with pytest.raises(ConfigError, match="errors"):
        docs_of(tmp_path / "a.txt", errors="ignore")
    (tmp_path / "bad.txt.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"bad\.txt\.gz: cannot read"):
        docs_of(tmp_path / "bad.txt.gz")


@pytest.mark.parametrize("doc_sep", ["blank_line", "line", "file"])
def test_non_utf8_names_byte_offset(tmp_path, doc_sep):
    prefix = "first line\n\nsecond 中文 line\n".encode("utf-8")
    f = tmp_path / "corpus.txt"
    f.write_bytes(prefix + b"bad \xff byte\n")
    offset = len(prefix) + 4  # hand count: the 0xff byte
    with pytest.raises(DataError, match=rf"corpus\.txt: not UTF-8 at byte {offset} \(use --errors replace"):
        docs_of(f, doc_sep=doc_sep)
    assert "bad \ufffd byte" in "\n".join(docs_of(f, doc_sep=doc_sep, errors="replace"))


def test_non_utf8_in_gzip(tmp_path):
    f = tmp_path / "corpus.txt.gz"
    f.write_bytes(gzip.compress(b"ok\n\xc3(\n"))
    with pytest.raises(DataError, match=r"corpus\.txt\.gz: not UTF-8 at byte 3 of the decompressed text"):
        docs_of(f)


def test_real_corpora_document_counts():
    imdb = need("imdb_unsup/imdb_unsup_even.txt")
    assert sum(1 for _ in read_documents(imdb)) == 25_000  # the README's count
    shakespeare = need("tinyshakespeare/input.txt")
    (text,) = docs_of(shakespeare, doc_sep="file")
    assert text == shakespeare.read_text(encoding="utf-8") and len(text) == 1_115_394


# ---- clean_text ---------------------------------------------------------------------------------------
def test_clean_text_hand_checked():
    assert clean_text("ＡＢＣ１２３，ﬁne") == "ABC123,fine"  # NFKC: full-width and ligature
    assert clean_text("ＡＢＣ，", nfkc=False) == "ＡＢＣ，"
    assert clean_text("a\x00b\x07c\x1b[0m") == "abc[0m"  # control characters go
    assert clean_text("a \t  b\u3000c\xa0d   \nnext\t\n") == "a b c d\nnext"
    assert clean_text("p1\r\n\r\n\r\n\r\np2\rp3") == "p1\n\np2\np3"
    assert clean_text("\n\n  \nbody\n\n") == "body"
    assert clean_text("e\u0301") == "\xe9"  # NFKC composes
    assert clean_text("👩\u200d👩\u200d👧 emoji") == "👩\u200d👩\u200d👧 emoji"  # ZWJ (format, not control) kept


def _reference_clean(text: str) -> str:
    """Character-by-character reference for clean_text (no regular expressions)."""
    text = text.replace("\r\n", "\n")
    for nl in "\r\u2028\u2029\x85":
        text = text.replace(nl, "\n")
    text = "".join(c for c in text if c in "\n\t" or unicodedata.category(c) != "Cc")
    text = unicodedata.normalize("NFKC", text)
    lines = []
    for line in text.split("\n"):
        out, in_space = [], False
        for c in line:
            if c.isspace():
                if not in_space:
                    out.append(" ")
                in_space = True
            else:
                out.append(c)
                in_space = False
        lines.append("".join(out).rstrip(" "))
    text = "\n".join(lines)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.strip("\n")


def test_clean_text_matches_reference_on_random_strings():
    alphabet = list("ab 中文\t\n\r\x00\x1f\x7f\x85\u3000\xa0\u2028ＡＢ，ﬁ\u0301😀\u200b") + ["\r\n", "  ", "\n\n\n"]
    rng = random.Random(0)
    for _ in range(2000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        got = clean_text(s)
        assert got == _reference_clean(s), repr(s)
        assert clean_text(got) == got  # idempotent


# ---- clean_documents and the verb ---------------------------------------------------------------------
def test_clean_documents_report():
    docs = [("f", "a"), ("f", "  \n "), ("f", "hello"), ("g", "hello  "), ("g", "hi"), ("g", ""), ("g", "world!")]
    kept, report = clean_documents(docs, min_chars=3)
    assert kept == [("f", "hello"), ("g", "world!")]
    assert (report.docs_read, report.kept, report.dropped_empty, report.dropped_short, report.dropped_duplicate) == (
        7, 2, 2, 2, 1)
    assert report.chars_in == sum(len(t) for _, t in docs) and report.chars_out == len("hello") + len("world!")
    assert report.files == ["f", "g"]
    kept, report = clean_documents(docs, min_chars=1, dedup=False)
    assert [t for _, t in kept] == ["a", "hello", "hello", "hi", "world!"] and report.dropped_duplicate == 0
    with pytest.raises(ConfigError, match="min_chars"):
        clean_documents(docs, min_chars=-1)


def test_clean_verb_txt_and_jsonl(tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("Doc  one\n\n\n\nDoc   one\n\nDoc\ttwo\n")
    (tmp_path / "in2.jsonl").write_text(json.dumps({"text": "para 1\n\n\npara 2\n"}) + "\n")
    out = tmp_path / "out.txt"
    result = clean([str(src), str(tmp_path / "in2.jsonl")], str(out))
    # documents separated by one blank line; blank lines inside a document became single newlines
    assert out.read_text() == "Doc one\n\nDoc two\n\npara 1\npara 2\n"
    assert docs_of(out) == ["Doc one", "Doc two", "para 1\npara 2"]
    report = json.loads((tmp_path / "out.txt.report.json").read_text())
    assert report == result and report["kept"] == 3 and report["dropped_duplicate"] == 1
    assert "kept 3" in capsys.readouterr().out

    out_jsonl = tmp_path / "out.jsonl.gz"
    clean([str(src)], str(out_jsonl), dedup=False)
    records = [json.loads(line) for line in gzip.decompress(out_jsonl.read_bytes()).decode().splitlines()]
    assert records == [{"text": "Doc one"}, {"text": "Doc one"}, {"text": "Doc two"}]
    assert docs_of(out_jsonl) == ["Doc one", "Doc one", "Doc two"]


def test_clean_verb_errors(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("ab\n\ncd\n")
    with pytest.raises(DataError, match=r"no documents left after cleaning .*in\.txt \(2 read: 0 empty, 2 shorter than 5"):
        clean([str(src)], str(tmp_path / "out.txt"), min_chars=5)
    assert not (tmp_path / "out.txt").exists()
    with pytest.raises(DataError, match="missing.txt: no such file"):
        clean([str(tmp_path / "missing.txt")], str(tmp_path / "out.txt"))
    with pytest.raises(ConfigError, match=r"min_chars: must be >= 0, got -1"):
        clean([str(src)], str(tmp_path / "out.txt"), min_chars=-1)


def test_clean_never_overwrites_without_asking(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("one\n\ntwo\n")
    (tmp_path / "taken.txt").write_text("precious")
    with pytest.raises(DataError, match=r"taken\.txt: exists; pass --overwrite to replace it"):
        clean([str(src)], str(tmp_path / "taken.txt"))
    assert (tmp_path / "taken.txt").read_text() == "precious"
    (tmp_path / "adir").mkdir()
    with pytest.raises(DataError, match=r"adir: is a folder; the output is a file"):
        clean([str(src)], str(tmp_path / "adir"), overwrite=True)
    clean([str(src)], str(tmp_path / "taken.txt"), overwrite=True)
    assert (tmp_path / "taken.txt").read_text() == "one\n\ntwo\n"
    with pytest.raises(DataError, match=r"taken\.txt: exists; pass --overwrite"):  # the report is there too now
        clean([str(src)], str(tmp_path / "taken.txt"))


def test_clean_cli_error_is_one_line(tmp_path, capsys):
    from lmforge.cli import main

    code = main(["clean", f"[{tmp_path / 'missing.txt'}]", str(tmp_path / "out.txt")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "missing.txt: no such file or folder" in err

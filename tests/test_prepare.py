import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from lmforge.data.prepare import prepare, split_sentences
from lmforge.data.shards import TokenShards, open_prepared
from lmforge.errors import ConfigError, DataError
from lmforge.text.clean import read_documents
from lmforge.text.tokenizer import Tokenizer, build_char, train_tokenizer

from helpers import SHARED_DATA as DATA, need_shared as need




def make_docs(n: int) -> list[str]:
    """Distinct documents of a few sentences each (English and Chinese)."""
    docs = []
    for i in range(n):
        if i % 3 == 2:
            docs.append(f"第{i}篇。天子驾坐紫宸殿，受百官朝贺！但见：“祥云迷凤阁。”瑞气罩龙楼")
        else:
            docs.append(f"Document {i} begins here. It has \"quoted speech!\" and more? Yes.\n"
                        f"A second paragraph, number {i * 7}.")
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    docs = make_docs(30)
    (d / "corpus.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    tok = train_tokenizer(docs, kind="bpe", vocab_size=300)
    tok.save(d / "bpe.json")
    return d, docs, tok


def split_docs(shards: TokenShards) -> list[list[int]]:
    o = shards.doc_offsets
    return [shards.tokens[o[i]:o[i + 1]].tolist() for i in range(shards.n_docs)]


# ---- document split ----------------------------------------------------------------------------------
def test_document_split_equals_direct_tokenization(corpus, tmp_path, capsys):
    d, docs, tok = corpus
    result = prepare([str(d / "corpus.txt")], str(tmp_path / "out"), str(d / "bpe.json"), val_fraction=0.2, seed=3)
    train, val, tok2 = open_prepared(tmp_path / "out")
    eos = tok.token_to_id("<|endoftext|>")
    reference = [tok.encode(doc) + [eos] for doc in docs]  # doc by doc, eos after each (bpe default)
    where = {tuple(r): k for k, r in enumerate(reference)}
    assert len(where) == len(docs)
    train_ids = [where[tuple(x)] for x in split_docs(train)]
    val_ids = [where[tuple(x)] for x in split_docs(val)]
    assert len(val_ids) == 6 and sorted(train_ids + val_ids) == list(range(30))  # round(30 * 0.2), disjoint
    assert train_ids == sorted(train_ids) and val_ids == sorted(val_ids)  # corpus order kept in each split
    assert np.array_equal(train.tokens, np.concatenate([reference[k] for k in train_ids]))
    assert train.doc_offsets.tolist() == np.cumsum([0] + [len(reference[k]) for k in train_ids]).tolist()
    assert train.tokens.dtype == np.uint16 and isinstance(train.tokens, np.memmap)
    assert len(train) + len(val) == sum(map(len, reference)) and train.sent_offsets is None
    assert tok2.hash == tok.hash == train.tokenizer_hash and train.vocab_size == 300
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["splits"] == {"train": {"tokens": len(train), "docs": 24}, "val": {"tokens": len(val), "docs": 6}}
    assert index["split"] == {"mode": "document", "val_fraction": 0.2, "seed": 3} and index["append_eos"] is True
    assert index["dtype"] == "uint16" and index["tokenizer_kind"] == "bpe" and index["format"] == 1
    assert {k: result[k] for k in index} == {**index}
    assert result["mb_per_s"] > 0 and result["tokens_per_s"] > 0
    out = capsys.readouterr().out
    assert "MB/s" in out and "tokens/s" in out


def test_document_split_is_seeded(corpus, tmp_path):
    d, _, _ = corpus
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        prepare([str(d / "corpus.txt")], str(tmp_path / name), str(d / "bpe.json"), seed=seed, workers=1)
        runs[name] = (tmp_path / name / "val.bin").read_bytes()
    assert runs["a"] == runs["b"] and runs["a"] != runs["c"]
    # workers only changes speed, never the result
    prepare([str(d / "corpus.txt")], str(tmp_path / "w"), str(d / "bpe.json"), seed=1, workers=0)
    assert (tmp_path / "w" / "val.bin").read_bytes() == runs["a"]


@pytest.mark.parametrize("val_fraction", [0.01, 0.99])
def test_at_least_one_document_each_side(tmp_path, val_fraction):
    (tmp_path / "c.txt").write_text("one doc\n\nanother doc\n")
    build_char("one doc\nanother").save(tmp_path / "char.json")
    prepare([str(tmp_path / "c.txt")], str(tmp_path / "out"), str(tmp_path / "char.json"), val_fraction=val_fraction)
    train, val, _ = open_prepared(tmp_path / "out")
    assert train.n_docs == 1 and val.n_docs == 1


# ---- tail split ----------------------------------------------------------------------------------------
def test_tail_split_tinyshakespeare_is_nanogpt(tmp_path):
    path = need("tinyshakespeare/input.txt")
    text = path.read_text(encoding="utf-8")
    train_tokenizer([text], kind="char").save(tmp_path / "char")
    prepare([str(path)], str(tmp_path / "out"), str(tmp_path / "char"), split="tail", doc_sep="file")
    train, val, tok = open_prepared(tmp_path / "out")
    # nanoGPT data/shakespeare_char/prepare.py
    n = len(text)
    stoi = {ch: i for i, ch in enumerate(sorted(set(text)))}
    assert np.array_equal(train.tokens, np.array([stoi[c] for c in text[:int(n * 0.9)]], dtype=np.uint16))
    assert np.array_equal(val.tokens, np.array([stoi[c] for c in text[int(n * 0.9):]], dtype=np.uint16))
    assert train.doc_offsets.tolist() == [0, int(n * 0.9)] and val.doc_offsets.tolist() == [0, n - int(n * 0.9)]
    assert train.index["append_eos"] is False and train.index["split"]["cut_char"] == int(n * 0.9)


def test_tail_split_cuts_the_document_holding_the_cut(corpus, tmp_path):
    d, _, tok = corpus
    docs = ["aaaa bbbb", "cc dd ee", "ff gg"]  # 9 + 8 + 5 = 22 chars; cut at int(22 * 0.5) = 11
    (tmp_path / "c.txt").write_text("\n\n".join(docs))
    prepare([str(tmp_path / "c.txt")], str(tmp_path / "out"), str(d / "bpe.json"), split="tail", val_fraction=0.5)
    train, val, _ = open_prepared(tmp_path / "out")
    eos = tok.eos_id
    head, rest = "cc", " dd ee"  # the second document split at character 11 - 9 = 2
    assert split_docs(train) == [tok.encode(docs[0]) + [eos], tok.encode(head)]  # no eos: the doc goes on
    assert split_docs(val) == [tok.encode(rest) + [eos], tok.encode(docs[2]) + [eos]]


# ---- sentences -------------------------------------------------------------------------------------------
def test_split_sentences_hand_checked():
    assert split_sentences('Hi there. "Quoted!" he said.\nNext line?  Yes') == [
        "Hi there.", ' "Quoted!"', " he said.", "\nNext line?", "  Yes"]
    assert split_sentences("你好。世界！“好。”然后\n\n真的吗?是的") == ["你好。", "世界！", "“好。”", "然后", "\n\n真的吗?", "是的"]
    assert split_sentences("3.14 is pi. e.g.x") == ["3.14 is pi.", " e.g.x"]
    assert split_sentences("\nlead. \n") == ["\nlead. \n"]  # whitespace-only pieces join a neighbour
    assert split_sentences("") == [""] and split_sentences("One.") == ["One."]


def test_split_sentences_partition_the_text():
    for doc in make_docs(6) + ["a. b. c.", "...!!", "。。。", "  x  \n\n y. "]:
        parts = split_sentences(doc)
        assert "".join(parts) == doc and all(p.strip() for p in parts)


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_sentence_offsets_land_on_sentence_boundaries(corpus, tmp_path, kind):
    d, docs, _ = corpus
    tok = train_tokenizer(docs, kind=kind, vocab_size=300)
    tok.save(tmp_path / "tok.json")
    prepare([str(d / "corpus.txt")], str(tmp_path / "out"), str(tmp_path / "tok.json"), sentences=True,
            append_eos=True)
    train, val, _ = open_prepared(tmp_path / "out")
    end = tok.eos_id if kind == "bpe" else tok.sep_id
    assert end == (0 if kind == "bpe" else 3)
    def by_sentence(doc):  # reference: every sentence encoded on its own
        return [tok.encode(s) for s in split_sentences(doc)]

    where = {tuple(t for ids in by_sentence(doc) for t in ids) + (end,): k for k, doc in enumerate(docs)}
    for shards in (train, val):
        originals = [docs[where[tuple(x)]] for x in split_docs(shards)]  # the docs that landed here
        starts, sents, pos = [], [], 0
        for doc in originals:
            starts.append(pos)
            for ids in by_sentence(doc):
                if ids:
                    sents.append(pos)
                pos += len(ids)
            pos += 1  # the end token
        assert shards.doc_offsets.tolist() == starts + [pos]
        assert shards.sent_offsets.tolist() == sents + [pos]
        assert set(starts) <= set(sents)  # every doc start is a sentence start
        assert shards.index["splits"][shards.split]["sentences"] == len(sents)
        if kind == "bpe":  # each sentence decodes to exactly its text
            o = shards.sent_offsets
            got = [tok.decode(shards.tokens[o[i]:o[i + 1]], skip_special_tokens=True) for i in range(len(o) - 1)]
            assert got == [s for doc in originals for s in split_sentences(doc)]


def test_zhwiki_sample_with_wordpiece_and_sentences(tmp_path):
    path = need("zhwiki_zh/zhwiki_zh_hans.txt")
    docs = []
    for _, doc in read_documents(path):
        docs.append(doc)
        if len(docs) == 200:
            break
    (tmp_path / "zh.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    tok = train_tokenizer(docs, kind="wordpiece", vocab_size=3000)
    tok.save(tmp_path / "wp")
    prepare([str(tmp_path / "zh.txt")], str(tmp_path / "out"), str(tmp_path / "wp"), sentences=True)
    train, val, _ = open_prepared(tmp_path / "out")
    assert train.n_docs + val.n_docs == 200 and val.n_docs == 20
    reference = {tuple(t for s in split_sentences(doc) for t in tok.encode(s)) for doc in docs}
    assert all(tuple(x) in reference for x in split_docs(train) + split_docs(val))  # no eos for wordpiece
    assert np.isin(train.doc_offsets, train.sent_offsets).all() and (np.diff(train.sent_offsets) > 0).all()


# ---- dtypes and inputs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_chars, dtype", [(65536, np.uint16), (65537, np.uint32)])
def test_dtype_follows_vocab_size(tmp_path, n_chars, dtype):
    chars = [chr(0x20000 + i) for i in range(n_chars)]  # CJK extension planes: no surrogates
    tok = build_char(chars)
    tok.save(tmp_path / "big.json")
    text = "".join(chars[-3:]) + chars[0]
    (tmp_path / "c.txt").write_text(text + "\n\n" + text[::-1] + "\n", encoding="utf-8")
    prepare([str(tmp_path / "c.txt")], str(tmp_path / "out"), str(tmp_path / "big.json"))
    train, val, _ = open_prepared(tmp_path / "out")
    assert train.tokens.dtype == dtype and train.index["dtype"] == np.dtype(dtype).name
    got = sorted([train.tokens.tolist(), val.tokens.tolist()])
    assert got == sorted([[n_chars - 3, n_chars - 2, n_chars - 1, 0], [0, n_chars - 1, n_chars - 2, n_chars - 3]])


def test_jsonl_gz_inputs_and_wordpiece_eos(corpus, tmp_path):
    d, docs, _ = corpus
    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        for doc in docs[:5]:
            f.write(json.dumps({"body": doc}) + "\n")
    tok = train_tokenizer(docs, kind="wordpiece", vocab_size=200)
    tok.save(tmp_path / "wp.json")
    prepare([str(tmp_path)], str(tmp_path / "out"), str(tmp_path / "wp.json"), jsonl_field="body", append_eos=True)
    train, val, _ = open_prepared(tmp_path / "out")
    reference = sorted(tok.encode(doc) + [tok.sep_id] for doc in docs[:5])
    assert sorted(split_docs(train) + split_docs(val)) == reference and train.index["eos_id"] == 3
    prepare([str(tmp_path / "c.jsonl.gz")], str(tmp_path / "out2"), str(tmp_path / "wp.json"), jsonl_field="body")
    train, val, _ = open_prepared(tmp_path / "out2")  # default for wordpiece: no [SEP] appended
    assert sorted(split_docs(train) + split_docs(val)) == sorted(tok.encode(doc) for doc in docs[:5])


# ---- errors ---------------------------------------------------------------------------------------------------
def test_bad_inputs(corpus, tmp_path):
    d, _, _ = corpus
    src, tok = str(d / "corpus.txt"), str(d / "bpe.json")
    out = str(tmp_path / "out")
    with pytest.raises(DataError, match=r"missing\.txt: no such file or folder"):
        prepare([str(tmp_path / "missing.txt")], out, tok)
    (tmp_path / "blank.txt").write_text("\n \n\n")
    with pytest.raises(DataError, match=r"blank\.txt: no documents \(the corpus is empty\)"):
        prepare([str(tmp_path / "blank.txt")], out, tok)
    (tmp_path / "one.txt").write_text("just one document\n")
    with pytest.raises(DataError, match=r"one\.txt: only one document.*use --split tail"):
        prepare([str(tmp_path / "one.txt")], out, tok)
    with pytest.raises(DataError, match=r"nope\.json: tokenizer file not found"):
        prepare([src], out, str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match=r"bad\.json: not a valid tokenizer\.json"):
        prepare([src], out, str(tmp_path / "bad.json"))
    for vf in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match=rf"val_fraction: must be between 0 and 1 \(exclusive\), got {vf}"):
            prepare([src], out, tok, val_fraction=vf)
    with pytest.raises(ConfigError, match="workers"):
        prepare([src], out, tok, workers=-1)
    build_char("abc").save(tmp_path / "char.json")
    with pytest.raises(ConfigError, match="append_eos: tokenizer .* has no end-of-text"):
        prepare([src], out, str(tmp_path / "char.json"), append_eos=True)
    with pytest.raises(DataError, match=r"character 'D' \(U\+0044\) is not in the char tokenizer"):
        prepare([src], out, str(tmp_path / "char.json"))
    assert not Path(out).exists()  # nothing half-written
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "precious.txt").write_text("mine")
    with pytest.raises(DataError, match=r"keep: exists and is not empty; pass --overwrite"):
        prepare([src], str(tmp_path / "keep"), tok)
    with pytest.raises(DataError, match=r"keep: exists and does not look like this verb's output \(no index\.json\); "
                                        r"refusing to replace it even with --overwrite"):
        prepare([src], str(tmp_path / "keep"), tok, overwrite=True)
    assert (tmp_path / "keep" / "precious.txt").read_text() == "mine"
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(DataError, match=r"afile: exists and is a file; the output is a folder"):
        prepare([src], str(tmp_path / "afile"), tok, overwrite=True)
    assert (tmp_path / "afile").read_text() == "mine"


def test_reprepare_replaces_and_reader_errors(corpus, tmp_path):
    d, docs, _ = corpus
    out = tmp_path / "out"
    prepare([str(d / "corpus.txt")], str(out), str(d / "bpe.json"))
    with pytest.raises(DataError, match=r"out: exists and is not empty; pass --overwrite to replace it"):
        prepare([str(d / "corpus.txt")], str(out), str(d / "bpe.json"), sentences=True)
    prepare([str(d / "corpus.txt")], str(out), str(d / "bpe.json"), sentences=True, overwrite=True)  # replaces it
    assert TokenShards(out, "val").sent_offsets is not None
    with pytest.raises(DataError, match=r"no split 'test' \(has: train, val\)"):
        TokenShards(out, "test")
    # a different tokenizer.json than the shards were made with
    good = (out / "tokenizer.json").read_text()
    train_tokenizer(docs, kind="bpe", vocab_size=290).save(out / "tokenizer.json")
    with pytest.raises(DataError, match=rf"{out}: tokenizer\.json does not match"):
        open_prepared(out)
    (out / "tokenizer.json").write_text(good)
    assert open_prepared(out)[2].hash == Tokenizer.load(d / "bpe.json").hash
    # a truncated token file
    data = (out / "train.bin").read_bytes()
    (out / "train.bin").write_bytes(data[:-2])
    with pytest.raises(DataError, match=r"train\.bin: holds .* tokens but index\.json says"):
        open_prepared(out)
    with pytest.raises(DataError, match=r"is not a prepared data directory \(no index\.json\); run `lmforge prepare`"):
        open_prepared(d)
    with pytest.raises(DataError, match=r"nowhere: no such directory"):
        TokenShards(tmp_path / "nowhere")


def test_encodes_in_parallel_batches(corpus, tmp_path, monkeypatch):
    """Documents go to the Rust encode_batch many at a time, with TOKENIZERS_PARALLELISM on even
    when something turned it off; the setting is restored afterwards."""
    import os

    d, docs, _ = corpus
    calls = []
    original = Tokenizer.encode_batch

    def spy(self, texts, add_special_tokens=False):
        calls.append((len(texts), os.environ.get("TOKENIZERS_PARALLELISM")))
        return original(self, texts, add_special_tokens)

    monkeypatch.setattr(Tokenizer, "encode_batch", spy)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    prepare([str(d / "corpus.txt")], str(tmp_path / "out"), str(d / "bpe.json"))
    assert calls == [(len(docs), "true")]  # the whole small corpus in one batch
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"

import json
from pathlib import Path

import pytest
import tokenizers

from lmforge.errors import ConfigError, DataError
from lmforge.text.tokenizer import Tokenizer, build_char, train, train_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

ENGLISH = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
           "You are all resolved rather to die than to famish? Resolved. resolved.\n") * 40
CHINESE = "话说大宋仁宗天子在位，嘉佑三年三月三日五更三点，天子驾坐紫宸殿，受百官朝贺。但见：祥云迷凤阁，瑞气罩龙楼。\n" * 30
CORPUS = [ENGLISH, CHINESE, "Café naïve façade — résumé. Ünïcödé TEXT, MixedCase words!\n" * 20]

TRICKY = [
    "", " ", "   leading and trailing   ", "multiple   spaces\tand\ttabs", "new\nlines\n\n\nand\r\nCRLF\n",
    "中文文本，还有标点！", "emoji 😀👍🏽 and ZWJ 👩\u200d👩\u200d👧", "combining e\u0301 a\u0308 vs é ä",
    "mixed العربية עברית русский 日本語 한국어 ελληνικά", "\x00 nul and \x7f del", "<|endoftext|> inside",
    "tab\tend\t", "\u3000full-width space\u3000ＡＢＣ", "math ∑∫√ and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer(CORPUS, kind="bpe", vocab_size=400, min_frequency=2)


@pytest.fixture(scope="module")
def wordpiece():
    return train_tokenizer(CORPUS, kind="wordpiece", vocab_size=400, min_frequency=2)


# ---- bpe ----------------------------------------------------------------------------------------------
def test_bpe_round_trips_any_unicode(bpe):
    for text in TRICKY + CORPUS:
        assert bpe.decode(bpe.encode(text)) == text, repr(text)
    assert bpe.decode_batch(bpe.encode_batch(TRICKY)) == TRICKY


def test_bpe_special_tokens(bpe):
    eot = bpe.token_to_id("<|endoftext|>")
    assert eot == 0 and bpe.eos_id == bpe.bos_id == bpe.pad_id == eot
    assert bpe.unk_id is None and bpe.cls_id is None and bpe.sep_id is None and bpe.mask_id is None
    assert bpe.special_ids == {eot} and bpe.vocab_size == 400 and bpe.kind == "bpe"
    assert bpe.encode("a<|endoftext|>b")[1] == eot  # the special token is matched as one token
    assert bpe.decode(bpe.encode("x<|endoftext|>y"), skip_special_tokens=True) == "xy"


def test_bpe_matches_transformers_gpt2(bpe, tmp_path):
    """Our vocab + merges loaded by transformers' GPT-2 tokenizer give the same ids."""
    transformers = pytest.importorskip("transformers")
    bpe.backend.model.save(str(tmp_path))  # vocab.json + merges.txt
    ref = transformers.GPT2TokenizerFast.from_pretrained(str(tmp_path))
    for text in TRICKY[1:] + CORPUS:
        assert bpe.encode(text) == ref(text, add_special_tokens=False)["input_ids"], repr(text)


# ---- wordpiece -----------------------------------------------------------------------------------------
def test_wordpiece_specials_and_cjk(wordpiece):
    assert [wordpiece.id_to_token(i) for i in range(5)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert (wordpiece.pad_id, wordpiece.unk_id, wordpiece.cls_id, wordpiece.sep_id, wordpiece.mask_id) == (0, 1, 2, 3, 4)
    assert wordpiece.eos_id is None and wordpiece.special_ids == {0, 1, 2, 3, 4}
    ids = wordpiece.encode("天子驾坐")
    assert [wordpiece.id_to_token(i) for i in ids] == ["天", "子", "驾", "坐"]  # one token per CJK char
    assert wordpiece.encode("speak", add_special_tokens=True) == [2, *wordpiece.encode("speak"), 3]
    ids, types = wordpiece.encode_pair("speak", "天子")
    a, b = wordpiece.encode("speak"), wordpiece.encode("天子")
    assert ids == [2, *a, 3, *b, 3] and types == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    assert wordpiece.decode(wordpiece.encode("Resolved, speak!")) == "resolved, speak!"
    assert wordpiece.decode([2, *wordpiece.encode("speak"), 3], skip_special_tokens=True) == "speak"


@pytest.mark.parametrize("lowercase", [True, False])
def test_wordpiece_matches_transformers_bert(tmp_path, lowercase):
    transformers = pytest.importorskip("transformers")
    tok = train_tokenizer(CORPUS, kind="wordpiece", vocab_size=500, lowercase=lowercase)
    vocab = [tok.id_to_token(i) for i in range(tok.vocab_size)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    ref = transformers.BertTokenizerFast.from_pretrained(str(tmp_path), do_lower_case=lowercase)
    texts = ["Before we proceed any further, hear me SPEAK.", "Café naïve résumé unknownwordzzz",
             "天子驾坐紫宸殿，受百官朝贺。", "mixed 中文 and English: Resolved!", "  spaces\tand\nnewlines  "]
    for text in texts:
        assert tok.encode(text) == ref(text, add_special_tokens=False)["input_ids"], text
        assert tok.encode(text, add_special_tokens=True) == ref(text)["input_ids"], text
    pair = ref(texts[0], texts[2])
    assert tok.encode_pair(texts[0], texts[2]) == (pair["input_ids"], pair["token_type_ids"])


# ---- model inputs through the tokenizer's own template, truncation and padding --------------------------------
MODEL_TEXTS = ["Before we proceed any further, hear me SPEAK.", "Café naïve résumé unknownwordzzz",
               "天子驾坐紫宸殿，受百官朝贺。", "Resolved!", "mixed 中文 and English: rather to die than to famish"]


@pytest.fixture(scope="module")
def bert_ref(tmp_path_factory, wordpiece):
    """transformers' BertTokenizerFast over the same vocabulary: the reference for model inputs."""
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("vocab")
    (d / "vocab.txt").write_text("\n".join(wordpiece.id_to_token(i) for i in range(wordpiece.vocab_size)) + "\n",
                                 encoding="utf-8")
    return transformers.BertTokenizerFast.from_pretrained(str(d))


def _reference(ref, texts, pairs=None, **kw):
    out = ref(texts, pairs, return_offsets_mapping=True, **kw)
    return out, [out.word_ids(i) for i in range(len(texts))]


@pytest.mark.parametrize("max_length, padding", [(None, True), (12, True), (9, False), (None, False)])
def test_encode_for_model_equals_transformers_single(wordpiece, bert_ref, max_length, padding):
    got = wordpiece.encode_for_model(MODEL_TEXTS, max_length=max_length, padding=padding)
    ref, words = _reference(bert_ref, MODEL_TEXTS, truncation=max_length is not None, max_length=max_length,
                            padding=padding)
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert got[key] == ref[key], key
    assert got["offsets"] == [[tuple(o) for o in row] for row in ref["offset_mapping"]]
    assert got["word_ids"] == words
    full = [len(r) for r in wordpiece.encode_for_model(MODEL_TEXTS, padding=False)["input_ids"]]
    assert got["truncated"] == [max_length is not None and n > max_length for n in full]
    if padding:
        assert len({len(r) for r in got["input_ids"]}) == 1


@pytest.mark.parametrize("max_length", [None, 14, 7])
def test_encode_for_model_equals_transformers_pairs(wordpiece, bert_ref, max_length):
    """`[CLS] a [SEP] b [SEP]`, segment ids 0/1, longest-first truncation of the pair, right padding."""
    firsts, seconds = MODEL_TEXTS[:4], MODEL_TEXTS[1:]
    got = wordpiece.encode_for_model(firsts, seconds, max_length=max_length)
    ref, words = _reference(bert_ref, firsts, seconds, truncation="longest_first" if max_length else False,
                            max_length=max_length, padding=True)
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert got[key] == ref[key], key
    assert got["word_ids"] == words
    row = got["input_ids"][3]  # "Resolved!" + "mixed ...": [CLS] a [SEP] b [SEP] (then padding, if any)
    a, b = wordpiece.encode(firsts[3]), wordpiece.encode(seconds[3])
    if max_length is None:
        assert row[: len(a) + len(b) + 3] == [2, *a, 3, *b, 3]


def test_encode_for_model_pretokenized_words(wordpiece, bert_ref):
    words = [["Before", "we", "proceed"], ["天子", "驾坐", "unknownwordzzz", "!"]]
    got = wordpiece.encode_for_model(words, pretokenized=True, max_length=8)
    ref, word_ids = _reference(bert_ref, words, is_split_into_words=True, truncation=True, max_length=8, padding=True)
    assert got["input_ids"] == ref["input_ids"] and got["word_ids"] == word_ids


def test_encode_for_model_of_a_bpe_adds_nothing_and_pads_with_endoftext(bpe):
    got = bpe.encode_for_model(["hear me speak", "a"], max_length=3)
    assert got["input_ids"][0] == bpe.encode("hear me speak")[:3]
    assert got["input_ids"][1] == bpe.encode("a") + [bpe.pad_id] * (3 - len(bpe.encode("a")))
    assert got["attention_mask"][1] == [1] * len(bpe.encode("a")) + [0] * (3 - len(bpe.encode("a")))


def test_encode_for_model_leaves_the_tokenizer_unchanged_and_skips_specials_on_request(wordpiece):
    before = wordpiece.hash
    wordpiece.encode_for_model(MODEL_TEXTS, max_length=6)
    assert wordpiece.hash == before and wordpiece.backend.truncation is None and wordpiece.backend.padding is None
    plain = wordpiece.encode_for_model(["speak"], add_special_tokens=False, padding=False)["input_ids"][0]
    assert plain == wordpiece.encode("speak")


def test_encode_for_model_adds_the_bert_template_a_wordpiece_file_lacks(wordpiece):
    bare = Tokenizer.from_str(wordpiece.to_str())
    bare.backend.post_processor = None
    assert bare.encode_for_model(["speak"], ["天子"], padding=False)["input_ids"] == \
        wordpiece.encode_for_model(["speak"], ["天子"], padding=False)["input_ids"]


def test_encode_for_model_errors(wordpiece):
    with pytest.raises(ConfigError, match="max_length 2 leaves no room for text beside the 2 special tokens"):
        wordpiece.encode_for_model(["speak"], max_length=2)
    with pytest.raises(ConfigError, match="max_length 4 leaves no room .* 3 special tokens"):
        wordpiece.encode_for_model(["speak"], ["a"], max_length=4)
    with pytest.raises(ConfigError, match="2 texts but 1 pairs"):
        wordpiece.encode_for_model(["a", "b"], ["c"])
    with pytest.raises(ConfigError, match="padding needs a tokenizer with a padding token"):
        build_char("abc").encode_for_model(["ab", "c"])
    with pytest.raises(DataError, match="character 'z'"):
        build_char("abc").encode_for_model(["az"], padding=False)


# ---- char ------------------------------------------------------------------------------------------------
def test_char_matches_nanogpt_on_tinyshakespeare():
    path = DATA / "tinyshakespeare" / "input.txt"
    if not path.exists():
        pytest.skip(f"shared data {path} not available")
    text = path.read_text(encoding="utf-8")
    tok = train_tokenizer([text], kind="char")
    stoi = {ch: i for i, ch in enumerate(sorted(set(text)))}  # nanoGPT's shakespeare_char/prepare.py
    assert tok.vocab_size == len(stoi) == 65
    assert all(tok.token_to_id(ch) == i for ch, i in stoi.items())
    sample = text[:20000]
    assert tok.encode(sample) == [stoi[c] for c in sample]
    assert tok.decode(tok.encode(sample)) == sample
    assert tok.special_ids == set() and tok.eos_id is None and tok.pad_id is None and tok.unk_id is None


def test_char_unknown_characters():
    tok = build_char("ab \n中")
    assert tok.decode(tok.encode("ab 中\nba")) == "ab 中\nba"
    with pytest.raises(DataError, match=r"character '☃' \(U\+2603\) is not in the char tokenizer's vocabulary"):
        tok.encode("ab☃")
    with pytest.raises(DataError, match=r"'z'"):
        tok.encode_batch(["ab", "az"])
    with_unk = build_char("ab", special_tokens=["[UNK]"])
    assert with_unk.unk_id == 2 and with_unk.special_ids == {2}
    assert with_unk.encode("a?b") == [0, 2, 1]


def test_train_from_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n\nhello there\n")
    tok = train_tokenizer([tmp_path / "a.txt"], kind="char")  # a list of Paths is read as files
    assert tok.vocab_size == len(set("hello world\nhello there")) - 1  # "\n" inside no document
    tok2 = train_tokenizer(kind="char", files=[str(tmp_path)])
    assert tok2.to_str() == tok.to_str()


# ---- files -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "char"])
def test_save_load_round_trip(tmp_path, kind):
    tok = train_tokenizer(CORPUS, kind=kind, vocab_size=400)
    file = tok.save(tmp_path / "dir")
    assert file == tmp_path / "dir" / "tokenizer.json"
    for path in (tmp_path / "dir", file, tok.save(tmp_path / "t.json")):
        back = Tokenizer.load(path)
        assert back.kind == kind and back.hash == tok.hash and back.vocab_size == tok.vocab_size
        assert back.encode(CORPUS[0]) == tok.encode(CORPUS[0])
    # the file is plain tokenizers json: loads in the library itself
    assert tokenizers.Tokenizer.from_file(str(file)).encode(CORPUS[1], add_special_tokens=False).ids == tok.encode(CORPUS[1])
    other = train_tokenizer(CORPUS[:1], kind=kind, vocab_size=300)
    assert other.hash != tok.hash


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match=r"missing\.json: tokenizer file not found"):
        Tokenizer.load(tmp_path / "missing.json")
    with pytest.raises(DataError, match=r"has no tokenizer\.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "bad.json").write_text('{"version": "1.0", "model": 3}')
    with pytest.raises(DataError, match=r"bad\.json: not a valid tokenizer\.json"):
        Tokenizer.load(tmp_path / "bad.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe")
    with pytest.raises(DataError, match=r"bin\.json: not a valid tokenizer\.json"):
        Tokenizer.load(tmp_path / "bin.json")
    unigram = tokenizers.Tokenizer(tokenizers.models.Unigram([("a", -1.0), ("b", -2.0)], 0))
    (tmp_path / "uni.json").write_text(unigram.to_str())
    with pytest.raises(DataError, match="model type 'Unigram' is not supported"):
        Tokenizer.load(tmp_path / "uni.json")
    with pytest.raises(ConfigError, match="kind"):
        Tokenizer.from_backend(unigram, "sentencepiece")


def test_train_errors():
    with pytest.raises(ConfigError, match="vocab_size: a byte-level BPE needs at least 257"):
        train_tokenizer(CORPUS, kind="bpe", vocab_size=100)
    with pytest.raises(ConfigError, match="vocab_size: must exceed the 5 special tokens, got 5"):
        train_tokenizer(CORPUS, kind="wordpiece", vocab_size=5)
    with pytest.raises(ConfigError, match="kind: 'gpt'"):
        train_tokenizer(CORPUS, kind="gpt")
    with pytest.raises(ConfigError, match="min_frequency"):
        train_tokenizer(CORPUS, min_frequency=0)
    for kind in ("bpe", "wordpiece", "char"):
        with pytest.raises(DataError, match="corpus is empty"):
            train_tokenizer([], kind=kind, vocab_size=300)


def test_train_verb(tmp_path, capsys):
    (tmp_path / "c.txt").write_text("\n\n".join(CORPUS))
    result = train([str(tmp_path / "c.txt")], str(tmp_path / "tok"), kind="wordpiece", vocab_size=150)
    assert "vocab size 150" in capsys.readouterr().out
    tok = Tokenizer.load(tmp_path / "tok")
    assert result == {"path": str(tmp_path / "tok" / "tokenizer.json"), "kind": "wordpiece",
                      "vocab_size": 150, "hash": tok.hash}
    assert json.loads((tmp_path / "tok" / "tokenizer.json").read_text())["model"]["type"] == "WordPiece"
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    with pytest.raises(DataError, match=r"blank\.txt: no text to train the tokenizer on"):
        train([str(tmp_path / "blank.txt")], str(tmp_path / "t2"))
    with pytest.raises(DataError, match=r"nope\.txt: no such file"):
        train([str(tmp_path / "nope.txt")], str(tmp_path / "t2"))
    assert not (tmp_path / "t2").exists()


TRAIN_IN_A_FRESH_PROCESS = """
import sys
from lmforge.text.tokenizer import train_tokenizer
text = open(sys.argv[1], encoding="utf-8").read().split("\\n\\n")
print(train_tokenizer(text, kind=sys.argv[2], vocab_size=int(sys.argv[3]), min_frequency=1).hash)
"""


@pytest.mark.parametrize("kind, vocab_size", [("bpe", 400), ("char", 100), ("wordpiece", 400)])
def test_training_gives_the_same_file_in_every_process(tmp_path, kind, vocab_size):
    """tokenizers' hash maps are seeded per process, so only separate processes show whether training
    depends on their order (tokenizers' own WordPiece trainer does: huggingface/tokenizers#1794; six runs of
    it on this corpus gave six vocabularies)."""
    import subprocess
    import sys

    (tmp_path / "c.txt").write_text("\n\n".join(CORPUS), encoding="utf-8")
    hashes = {subprocess.run([sys.executable, "-c", TRAIN_IN_A_FRESH_PROCESS, str(tmp_path / "c.txt"), kind,
                              str(vocab_size)], capture_output=True, text=True, check=True).stdout.strip()
              for _ in range(4)}
    assert len(hashes) == 1 and len(next(iter(hashes))) == 64, hashes


def test_wordpiece_vocabulary_is_the_wordpiece_trainers_up_to_ties():
    """The reproducible WordPiece training learns the vocabulary of tokenizers' WordPieceTrainer (same
    normalizer, pre-tokenizer and settings): they differ only where equally frequent merges tie, which
    that trainer breaks differently on each run (on this text: 1,995 of 2,000 pieces in common)."""
    from tokenizers import trainers

    from lmforge.text.tokenizer import BERT_SPECIALS, _wordpiece

    path = DATA / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        pytest.skip(f"shared data {path} not available")
    texts = path.read_text(encoding="utf-8").split("\n\n")
    ours = train_tokenizer(texts, kind="wordpiece", vocab_size=2000)
    backend = _wordpiece(lowercase=True)
    backend.train_from_iterator(texts, trainers.WordPieceTrainer(
        vocab_size=2000, min_frequency=2, special_tokens=BERT_SPECIALS, show_progress=False,
        continuing_subword_prefix="##"))
    mine, theirs = set(json.loads(ours.to_str())["model"]["vocab"]), set(backend.get_vocab())
    assert len(mine) == len(theirs) == 2000
    assert len(mine & theirs) >= 1980, sorted(mine ^ theirs)
    words = "First Citizen: Before we proceed any further, hear me speak unpredictably."
    assert ours.backend.encode(words, add_special_tokens=False).tokens == backend.encode(words).tokens

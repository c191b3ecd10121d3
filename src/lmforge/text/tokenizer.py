"""Tokenizers, built on Hugging Face `tokenizers` (the Rust library does all the tokenization).

Three kinds:
  bpe        GPT-style byte-level BPE; `<|endoftext|>` is eos, bos and pad; decode(encode(x)) == x
             for any Unicode text.
  wordpiece  BERT-style: BertNormalizer (lowercase by default, every CJK character its own word),
             WordPiece with "##" continuations, [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, and
             "[CLS] A [SEP] (B [SEP])" added when add_special_tokens=True.
  char       one token per distinct character of the training text, ids in sorted character order
             (nanoGPT's `stoi`), no special tokens unless asked for.

`Tokenizer` wraps a `tokenizers.Tokenizer`; the file on disk is the library's own tokenizer.json, so
it also loads in `tokenizers` and `transformers`. The kind is read back from the model type
(BPE, WordPiece, WordLevel) and special-token roles from the usual token names.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Iterator, Literal, Optional, Sequence

import tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers

from lmforge.errors import ConfigError, DataError
from lmforge.storage import atomic_write_text

Kind = Literal["bpe", "wordpiece", "char"]
KINDS = ("bpe", "wordpiece", "char")
ENDOFTEXT = "<|endoftext|>"
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# Special-token roles, found by name (first match wins). Covers our kinds and the common HF ones.
_ROLE_NAMES = {
    "pad": ("[PAD]", "<pad>", ENDOFTEXT),
    "unk": ("[UNK]", "<unk>"),
    "bos": ("<s>", "<bos>", ENDOFTEXT),
    "eos": ("</s>", "<eos>", ENDOFTEXT),
    "cls": ("[CLS]", "<cls>"),
    "sep": ("[SEP]", "<sep>"),
    "mask": ("[MASK]", "<mask>"),
}
_MODEL_KIND = {"BPE": "bpe", "WordPiece": "wordpiece", "WordLevel": "char"}


class Tokenizer:
    """A trained tokenizer: a `tokenizers.Tokenizer` (`backend`) plus its `kind`."""

    def __init__(self, backend: tokenizers.Tokenizer, kind: str):
        if kind not in KINDS:
            raise ConfigError(f"tokenizer kind: {kind!r} is not one of {', '.join(KINDS)}")
        self.backend = backend
        self.kind = kind
        self._vocab: dict[str, int] | None = None  # char kind: for naming an unknown character
        self._for_model: dict[tuple, tokenizers.Tokenizer] = {}  # encode_for_model's configured copies

    # ---- construction and files ------------------------------------------------------------
    @classmethod
    def from_backend(cls, backend: tokenizers.Tokenizer, kind: str | None = None) -> "Tokenizer":
        """Wrap any `tokenizers.Tokenizer`; `kind` defaults to the one implied by its model type."""
        return cls(backend, kind or _infer_kind(backend))

    @classmethod
    def from_str(cls, text: str, kind: str | None = None, where: str = "tokenizer") -> "Tokenizer":
        try:
            backend = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # the Rust side raises a bare Exception for malformed json
            raise DataError(f"{where}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
        return cls.from_backend(backend, kind)

    @classmethod
    def load(cls, path: str | Path, kind: str | None = None) -> "Tokenizer":
        """Load a tokenizer.json file, or a directory that contains one."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            what = "has no tokenizer.json" if path.is_dir() else "tokenizer file not found"
            raise DataError(f"{path}: {what}")
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{file}: not a valid tokenizer.json (not UTF-8)") from None
        return cls.from_str(text, kind, where=str(file))

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json atomically; `path` is a .json file or a directory. Returns the file."""
        path = Path(path)
        file = path if path.suffix == ".json" else path / "tokenizer.json"
        atomic_write_text(file, self.backend.to_str(pretty=True))
        return file

    def to_str(self) -> str:
        """The canonical (compact) tokenizer.json text."""
        return self.backend.to_str()

    @property
    def hash(self) -> str:
        """sha256 of the canonical tokenizer.json text (the same before and after save/load)."""
        return hashlib.sha256(self.to_str().encode("utf-8")).hexdigest()

    # ---- encoding ----------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text` (with [CLS]/[SEP] etc. only when `add_special_tokens`)."""
        return self.encode_batch([text], add_special_tokens)[0]

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Token ids of many texts, encoded in parallel by the Rust thread pool."""
        try:
            encodings = self.backend.encode_batch_fast(list(texts), add_special_tokens=add_special_tokens)
        except Exception as e:
            raise self._encode_error(texts, e) from None
        return [e.ids for e in encodings]

    def encode_pair(self, a: str, b: str) -> tuple[list[int], list[int]]:
        """`[CLS] a [SEP] b [SEP]` (or the tokenizer's own pair template): (ids, token type ids)."""
        enc = self.encode_for_model([a], [b], padding=False)
        return enc["input_ids"][0], enc["token_type_ids"][0]

    def encode_for_model(self, texts: Sequence[str] | Sequence[Sequence[str]], pairs: Sequence[str] | None = None, *,
                         max_length: int | None = None, padding: bool = True, add_special_tokens: bool = True,
                         pretokenized: bool = False) -> dict[str, list]:
        """Model inputs built by the tokenizer itself: its post-processor adds the special tokens (`[CLS] a
        [SEP]`, `[CLS] a [SEP] b [SEP]` with segment ids 0/1 for a BERT wordpiece; nothing for a GPT BPE),
        truncation keeps room for them (longest-first for pairs), padding is on the right with [PAD].

        Args:
            texts: the first sequences; with `pretokenized`, each is a list of words.
            pairs: the second sequences (one per text), or None.
            max_length: longest row in tokens, special tokens included (None: no truncation).
            padding: pad every row to the longest one (else rows keep their own lengths).
            add_special_tokens: False leaves the template out (a causal LM's input).
            pretokenized: texts are lists of words (word_ids then index those words).

        Returns:
            python lists, one entry per text: `input_ids`, `token_type_ids`, `attention_mask` (1 = real
            token), `offsets` ((start, end) characters of each token in its own text; (0, 0) for special
            and padding tokens), `word_ids` (the word of each token, None for special and padding tokens)
            and `truncated` (bool: tokens were cut).
        """
        if pairs is not None and len(pairs) != len(texts):
            raise ConfigError(f"encode_for_model: {len(texts)} texts but {len(pairs)} pairs")
        backend = self.backend_for_model(max_length=max_length, padding=padding, specials=add_special_tokens,
                                         pair=pairs is not None)
        inputs = list(texts) if pairs is None else list(zip(texts, pairs))
        try:
            encodings = backend.encode_batch(inputs, add_special_tokens=add_special_tokens,
                                              is_pretokenized=pretokenized)
        except Exception as e:
            raise self._encode_error([t for t in texts if isinstance(t, str)], e) from None
        return {"input_ids": [e.ids for e in encodings], "token_type_ids": [e.type_ids for e in encodings],
                "attention_mask": [e.attention_mask for e in encodings], "offsets": [e.offsets for e in encodings],
                "word_ids": [e.word_ids for e in encodings], "truncated": [bool(e.overflowing) for e in encodings]}

    def backend_for_model(self, *, max_length: int | None = None, padding: bool = False, specials: bool = True,
                          pair: bool = False) -> tokenizers.Tokenizer:
        """The `tokenizers` backend that `encode_for_model` uses, for code that needs its encodings
        themselves (overflow windows, offsets, `truncate`): a copy with the model's template (a BERT
        wordpiece file lacking one gets `[CLS] a [SEP] (b [SEP])`), this truncation and padding switched
        on, made once per setting; the tokenizer itself and its saved file stay as they are.

        Args:
            max_length: truncate to this many tokens, special tokens included (None: no truncation).
            padding: pad batches on the right with [PAD] to their longest row.
            specials: the caller adds the special tokens (checks that max_length leaves room for them).
            pair: the caller encodes pairs (the room check counts the pair template's tokens).
        """
        key = (max_length, padding, specials)
        if key not in self._for_model:
            backend = tokenizers.Tokenizer.from_str(self.backend.to_str())
            if backend.post_processor is None and self.kind == "wordpiece" and None not in (self.cls_id, self.sep_id):
                _add_bert_template(backend)  # a BERT vocabulary whose file lacks its template
            backend.no_truncation()
            backend.no_padding()
            if max_length is not None:
                backend.enable_truncation(max_length=max_length, strategy="longest_first")
            if padding:
                if self.pad_id is None:
                    raise ConfigError("padding needs a tokenizer with a padding token ([PAD])")
                backend.enable_padding(direction="right", pad_id=self.pad_id, pad_token=self.id_to_token(self.pad_id))
            self._for_model[key] = backend
        backend = self._for_model[key]
        added = backend.num_special_tokens_to_add(pair) if specials else 0
        if max_length is not None and max_length < added + (2 if pair else 1):
            raise ConfigError(f"max_length {max_length} leaves no room for text beside the {added} special tokens")
        return backend

    def _encode_error(self, texts: Sequence[str], e: Exception) -> Exception:
        if self.kind == "char" and "Missing" in str(e):
            if self._vocab is None:
                self._vocab = self.backend.get_vocab()
            for text in texts:
                for ch in text:
                    if ch not in self._vocab:
                        return DataError(f"character {ch!r} (U+{ord(ch):04X}) is not in the char tokenizer's "
                                         f"vocabulary; retrain it on this text or give it an [UNK] token")
        return DataError(f"cannot tokenize: {str(e).splitlines()[0]}")

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        return self.backend.decode_batch([[int(i) for i in ids] for ids in batch],
                                         skip_special_tokens=skip_special_tokens)

    # ---- vocabulary ----------------------------------------------------------------------------
    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(int(i))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def _role(self, role: str) -> int | None:
        for name in _ROLE_NAMES[role]:
            i = self.backend.token_to_id(name)
            if i is not None:
                return i
        return None

    pad_id = property(lambda self: self._role("pad"), doc="id of the padding token, or None")
    unk_id = property(lambda self: self._role("unk"), doc="id of the unknown token, or None")
    bos_id = property(lambda self: self._role("bos"), doc="id of the begin-of-text token, or None")
    eos_id = property(lambda self: self._role("eos"), doc="id of the end-of-text token, or None")
    cls_id = property(lambda self: self._role("cls"), doc="id of [CLS], or None")
    sep_id = property(lambda self: self._role("sep"), doc="id of [SEP], or None")
    mask_id = property(lambda self: self._role("mask"), doc="id of [MASK], or None")

    @property
    def special_ids(self) -> set[int]:
        """Ids of all special (added) tokens."""
        return {i for i, tok in self.backend.get_added_tokens_decoder().items() if tok.special}

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"


def _infer_kind(backend: tokenizers.Tokenizer) -> str:
    model_type = json.loads(backend.to_str())["model"]["type"]
    if model_type not in _MODEL_KIND:
        raise DataError(f"tokenizer model type {model_type!r} is not supported "
                        f"(expected BPE, WordPiece or WordLevel)")
    return _MODEL_KIND[model_type]


# ---- building and training ------------------------------------------------------------------------
def build_char(chars: Iterable[str], special_tokens: Sequence[str] = ()) -> Tokenizer:
    """A char tokenizer over `chars` (ids in sorted order); special tokens get the ids after them.
    If "[UNK]" is among `special_tokens`, unknown characters map to it instead of being an error."""
    alphabet = sorted(set(chars))
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for tok in special_tokens:
        vocab.setdefault(tok, len(vocab))
    # WordLevel needs an unk token name; when it is not in the vocab an unknown char raises an error.
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")  # every char, \n too
    backend.decoder = decoders.Fuse()  # concatenate, no spaces
    if special_tokens:
        backend.add_special_tokens(list(special_tokens))
    return Tokenizer(backend, "char")


def _bpe(vocab_size: int, min_frequency: int, special_tokens: Sequence[str]):
    if vocab_size < 256 + len(special_tokens):
        raise ConfigError(f"vocab_size: a byte-level BPE needs at least {256 + len(special_tokens)} "
                          f"(256 bytes + special tokens), got {vocab_size}")
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    return backend, trainer


def _wordpiece(lowercase: bool) -> tokenizers.Tokenizer:
    """An untrained BERT WordPiece tokenizer: BERT's normalizer (Chinese characters split apart) and
    pre-tokenizer; `_train_wordpiece` gives it its vocabulary."""
    backend = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=None, lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    return backend


def _add_bert_template(backend: tokenizers.Tokenizer) -> None:
    cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])


def train_tokenizer(texts: Iterable[str] | Sequence[Path] = (), kind: Kind = "bpe", vocab_size: int = 8000,
                    min_frequency: int = 2, lowercase: bool = True,
                    special_tokens: Optional[Sequence[str]] = None, *,
                    files: Optional[Sequence[str | Path]] = None) -> Tokenizer:
    """Train a tokenizer.

    Args:
        texts: training texts (an iterable of str, streamed), or a list of `Path`s to read as files.
        kind: "bpe", "wordpiece" or "char".
        vocab_size: target vocabulary size including special tokens (ignored for char: its
            vocabulary is every distinct character).
        min_frequency: a merge must occur this often (bpe/wordpiece; ignored for char).
        lowercase: lowercase (and strip accents) before tokenizing (wordpiece only).
        special_tokens: defaults: bpe ["<|endoftext|>"], wordpiece [PAD] [UNK] [CLS] [SEP] [MASK],
            char none. Given explicitly they replace the defaults (wordpiece always keeps its five).
        files: text files to read (plain documents, blank-line separated; .jsonl/.gz/folders work too).
    """
    from lmforge.text.clean import read_documents

    if kind not in KINDS:
        raise ConfigError(f"kind: {kind!r} is not one of {', '.join(KINDS)}")
    if min_frequency < 1:
        raise ConfigError(f"min_frequency: must be >= 1, got {min_frequency}")
    if files is None and isinstance(texts, (list, tuple)) and texts and all(isinstance(t, Path) for t in texts):
        files, texts = list(texts), ()
    stream: Iterable[str] = texts
    if files is not None:
        stream = (doc for _, doc in read_documents(files))
    counted = _Counting(stream)

    if kind == "char":
        chars: set[str] = set()
        for text in counted:
            chars.update(text)
        tok = build_char(chars, special_tokens or ())
    else:
        if kind == "bpe":
            specials = list(special_tokens) if special_tokens is not None else [ENDOFTEXT]
            backend, trainer = _bpe(vocab_size, min_frequency, specials)
            backend.train_from_iterator(counted, trainer)
        else:
            specials = BERT_SPECIALS + [t for t in (special_tokens or ()) if t not in BERT_SPECIALS]
            backend = _wordpiece(lowercase)
            _train_wordpiece(backend, counted, vocab_size, min_frequency, specials)
            _add_bert_template(backend)
        tok = Tokenizer(backend, kind)
    if counted.chars == 0:
        raise _EmptyCorpus("no text to train the tokenizer on (the corpus is empty)")
    return tok


_SPELLING_BASE = 0x10000  # the supplementary planes: 1,048,576 code points, none of them whitespace


def _train_wordpiece(backend: tokenizers.Tokenizer, texts: Iterable[str], vocab_size: int, min_frequency: int,
                     specials: Sequence[str]) -> None:
    """Train `backend`'s WordPiece vocabulary on `texts` (`vocab_size` pieces including `specials`, merges
    seen at least `min_frequency` times), the same on every run.

    tokenizers' WordPieceTrainer is its BPE trainer with a '##' prefix, but it numbers the '##' pieces in
    the order of a hash map seeded per process and breaks ties between equally frequent merges by those
    numbers, so one corpus gave a different vocabulary on each run (huggingface/tokenizers#1794). Here each
    (character, starts the word or not) pair is spelled as a code point of its own, numbered in order of
    first appearance, and the BPE trainer (whose alphabet is sorted) learns the merges of the words so
    spelled: the same algorithm and counts, the same ties broken the same way on every run. The pieces are
    then spelled back, with '##' for a piece that starts inside a word."""
    if vocab_size <= len(specials):
        raise ConfigError(f"vocab_size: must exceed the {len(specials)} special tokens, got {vocab_size}")
    normalize, split = backend.normalizer.normalize_str, backend.pre_tokenizer.pre_tokenize_str
    codes: dict[tuple[str, bool], str] = {}
    symbols: list[tuple[str, bool]] = []  # code point - _SPELLING_BASE -> (character, inside a word)
    spelled: dict[str, str] = {}

    def code(char: str, inside: bool) -> str:
        got = codes.get((char, inside))
        if got is None:
            if _SPELLING_BASE + len(symbols) > 0x10FFFF:
                raise DataError("the corpus has more distinct characters than a WordPiece vocabulary can spell")
            got = codes[(char, inside)] = chr(_SPELLING_BASE + len(symbols))
            symbols.append((char, inside))
        return got

    def spell(word: str) -> str:
        got = spelled.get(word)
        if got is None:
            got = code(word[0], False) + "".join(code(c, True) for c in word[1:])
            if len(spelled) < 1_000_000:  # bounded memory on huge corpora; a miss only costs time
                spelled[word] = got
        return got

    def words() -> Iterator[str]:
        for text in texts:
            yield " ".join(spell(w) for w, _ in split(normalize(text)) if w)

    specials = list(specials)
    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bpe.train_from_iterator(words(), trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
        show_progress=False))
    vocab = {}
    for piece, i in bpe.get_vocab().items():
        if piece in specials:
            vocab[piece] = i
            continue
        chars = [symbols[ord(p) - _SPELLING_BASE] for p in piece]
        vocab[("##" if chars[0][1] else "") + "".join(c for c, _ in chars)] = i
    backend.model = models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##")
    backend.add_special_tokens(specials)


class _EmptyCorpus(DataError):
    pass


class _Counting:
    """Pass texts through, counting characters (to detect an empty corpus after streaming it)."""

    def __init__(self, texts: Iterable[str]):
        self.texts, self.chars = texts, 0

    def __iter__(self):
        for t in self.texts:
            self.chars += len(t)
            yield t


def train(inputs: list[str], out: str, kind: Kind = "bpe", vocab_size: int = 8000, min_frequency: int = 2,
          lowercase: bool = True, doc_sep: Literal["blank_line", "line", "file"] = "blank_line",
          jsonl_field: str = "text", errors: Literal["strict", "replace"] = "strict", overwrite: bool = False) -> dict:
    """Train a tokenizer on text files and save it as tokenizer.json.

    Args:
        inputs: text/JSON-lines files (optionally .gz) or folders of them.
        out: a .json file, or a directory (gets OUT/tokenizer.json).
        kind: bpe (GPT byte-level BPE), wordpiece (BERT) or char (one token per character).
        vocab_size: vocabulary size including special tokens (ignored for char).
        min_frequency: minimum count of a merge (ignored for char).
        lowercase: lowercase and strip accents (wordpiece only).
        doc_sep: how text inputs split into documents: blank_line, line or file.
        jsonl_field: the field holding the text in .jsonl inputs.
        errors: strict (invalid UTF-8 is an error) or replace (substitute U+FFFD).
        overwrite: replace an existing tokenizer file at OUT.
    """
    from lmforge.storage import check_output
    from lmforge.text.clean import read_documents

    check_output(out if str(out).endswith(".json") else Path(out) / "tokenizer.json", overwrite=overwrite)
    docs = (doc for _, doc in read_documents(inputs, doc_sep=doc_sep, jsonl_field=jsonl_field, errors=errors))
    try:
        tok = train_tokenizer(docs, kind=kind, vocab_size=vocab_size, min_frequency=min_frequency,
                              lowercase=lowercase)
    except _EmptyCorpus:
        raise DataError(f"{', '.join(map(str, inputs))}: no text to train the tokenizer on "
                        f"(every document is empty)") from None
    path = tok.save(out)
    print(f"trained a {kind} tokenizer: vocab size {tok.vocab_size:,}; wrote {path}")
    return {"path": str(path), "kind": kind, "vocab_size": tok.vocab_size, "hash": tok.hash}

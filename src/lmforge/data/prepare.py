"""`lmforge prepare`: tokenize a corpus once into flat token shards that training reads zero-copy.

OUT/ holds, for each split (train, val):
  SPLIT.bin        all tokens of the split, back to back (uint16 if vocab_size <= 65536, else uint32)
  SPLIT.docs.npy   int64 document start offsets into SPLIT.bin, plus the total at the end (n_docs + 1)
  SPLIT.sents.npy  (with --sentences) int64 sentence start offsets, plus the total; every document
                   start is a sentence start
and index.json (dtype, counts, tokenizer hash, how it was split) and tokenizer.json (a copy).

The corpus is read twice (once to count documents and characters, once to tokenize) so that token
lists never all sit in memory: chunks of about a megabyte of text go through the tokenizer's Rust
`encode_batch` (all cores) in a background thread while the next chunk is read, and each chunk's
tokens are appended to the .bin file at once. `lmforge.data.shards` reads the result.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Literal, Optional

import numpy as np
from tqdm import tqdm

from lmforge.errors import ConfigError, DataError
from lmforge.storage import atomic_dir, atomic_write_json, check_output
from lmforge.text.clean import find_files, read_documents
from lmforge.text.tokenizer import Tokenizer

FORMAT = 1
CHUNK_CHARS = 1 << 20  # text per encode_batch call: enough documents to keep every core busy

# ---- sentence splitting -----------------------------------------------------------------------------
_CLOSERS = "\"'”’」』)）\\]"
_SENTENCE_END = re.compile(
    rf"[.!?]+[{_CLOSERS}]*(?=\s)"                   # English: . ! ? (+ closing quotes) then whitespace
    rf"|[!?]+[{_CLOSERS}]*(?=[\u3400-\u9fff])"      # ! ? right before a CJK character (NFKC'd Chinese)
    rf"|[。！？]+[{_CLOSERS}]*"                       # Chinese: 。！？ (+ closing quotes), no space needed
    r"|(?<!\n)(?=\n)"                                # before a run of newlines
)


def split_sentences(text: str) -> list[str]:
    """Split a document into sentences whose concatenation is exactly `text`.

    A sentence ends after . ! ? (and any closing quotes/brackets) when whitespace follows, after
    。！？ (and closers) always, after ! ? directly followed by a CJK character, and before every run of
    newlines. The whitespace after a boundary starts the next sentence (as GPT-style BPE tokenizes a
    word with its leading space). Whitespace-only pieces join the previous sentence. Abbreviations
    such as "Mr." are split too: the rule is deliberately simple.
    """
    cuts = sorted({m.end() for m in _SENTENCE_END.finditer(text)} - {0, len(text)})
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    out: list[str] = []
    for piece in pieces:
        if out and (not piece.strip() or not out[-1].strip()):
            out[-1] += piece
        else:
            out.append(piece)
    return out


# ---- writing one split --------------------------------------------------------------------------------
class _SplitWriter:
    """Appends documents' tokens to SPLIT.bin, keeping document (and sentence) start offsets."""

    def __init__(self, path: Path, dtype: np.dtype, sentences: bool):
        self.file = open(path, "wb")
        self.dtype = dtype
        self.pos = 0
        self.docs: list[int] = []
        self.sents: list[int] | None = [] if sentences else None
        self.pending: list[list[int]] = []

    def _sentence_start(self, pos: int) -> None:
        if not self.sents or pos > self.sents[-1]:
            self.sents.append(pos)

    def add(self, pieces: list[list[int]], tail: list[int]) -> None:
        """One document: its pieces' (sentences') token ids, then `tail` (the eos token, or nothing)."""
        self.docs.append(self.pos)
        if self.sents is not None:
            self._sentence_start(self.pos)  # every document start is a sentence start
        for ids in pieces:
            if self.sents is not None and ids:
                self._sentence_start(self.pos)
            self.pending.append(ids)
            self.pos += len(ids)
        if tail:
            self.pending.append(tail)
            self.pos += len(tail)

    def flush(self) -> None:
        n = sum(map(len, self.pending))
        np.fromiter(itertools.chain.from_iterable(self.pending), self.dtype, count=n).tofile(self.file)
        self.pending = []

    def close(self, out: Path, split: str) -> dict:
        self.flush()
        self.file.close()
        np.save(out / f"{split}.docs.npy", np.array(self.docs + [self.pos], dtype=np.int64))
        info = {"tokens": self.pos, "docs": len(self.docs)}
        if self.sents is not None:
            sents = self.sents if self.sents and self.sents[-1] == self.pos else self.sents + [self.pos]
            np.save(out / f"{split}.sents.npy", np.array(sents, dtype=np.int64))
            info["sentences"] = len(sents) - 1
        return info


# ---- reading in pieces ------------------------------------------------------------------------------------
def _documents(files: list[Path], **reader) -> Iterator[str]:
    for _, doc in read_documents(files, **reader):
        if doc.strip():  # empty documents are skipped (in both passes alike)
            yield doc


def _pieces(docs: Iterator[str], is_val: np.ndarray | None, cut: int | None) -> Iterator[tuple[str, str, bool]]:
    """(split, text, ends a document). Document split: whole documents, to val where `is_val`.
    Tail split: documents before character `cut` of their concatenation go to train, the rest to
    val; the document holding the cut comes in two pieces."""
    seen = 0
    for i, doc in enumerate(docs):
        if is_val is not None:
            yield ("val" if is_val[i] else "train"), doc, True
        elif seen + len(doc) <= cut:
            yield "train", doc, True
        elif seen >= cut:
            yield "val", doc, True
        else:
            yield "train", doc[:cut - seen], False
            yield "val", doc[cut - seen:], True
        seen += len(doc)


def _chunks(pieces: Iterator[tuple[str, str, bool]], chars: int = CHUNK_CHARS) -> Iterator[list]:
    chunk, size = [], 0
    for piece in pieces:
        chunk.append(piece)
        size += len(piece[1])
        if size >= chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _encoder(tok: Tokenizer, sentences: bool):
    """A function from a chunk of pieces to each piece's token ids, as a list of its parts' ids:
    its sentences with `sentences`, else the whole text (in slices for a char tokenizer, which maps
    each character on its own, so one big document, as with --doc_sep file, still uses every core)."""
    slice_chars = 1 << 16 if tok.kind == "char" and not tok.special_ids else 0

    def parts(text: str) -> list[str]:
        if sentences:
            return split_sentences(text)
        if slice_chars and len(text) > slice_chars:
            return [text[i:i + slice_chars] for i in range(0, len(text), slice_chars)]
        return [text]

    def encode(chunk: list[tuple[str, str, bool]]) -> list[list[list[int]]]:
        groups = [parts(text) for _, text, _ in chunk]
        flat = iter(tok.encode_batch([p for g in groups for p in g]))
        return [[next(flat) for _ in g] for g in groups]

    return encode


# ---- the verb -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _parallelism(workers: int) -> Iterator[None]:
    """Let the Rust thread pool run (TOKENIZERS_PARALLELISM may have been turned off by a library);
    workers=1 runs single-threaded. RAYON_NUM_THREADS sizes the pool only before its first use in a
    process, which is the case when prepare runs from the command line."""
    saved = {k: os.environ.get(k) for k in ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")}
    os.environ["TOKENIZERS_PARALLELISM"] = "false" if workers == 1 else "true"
    if workers > 1 and saved["RAYON_NUM_THREADS"] is None:
        os.environ["RAYON_NUM_THREADS"] = str(workers)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def prepare(inputs: list[str], out: str, tokenizer: str, val_fraction: float = 0.1,
            split: Literal["document", "tail"] = "document",
            doc_sep: Literal["blank_line", "line", "file"] = "blank_line", jsonl_field: str = "text",
            errors: Literal["strict", "replace"] = "strict", append_eos: Optional[bool] = None,
            sentences: bool = False, workers: int = 0, seed: int = 0, overwrite: bool = False) -> dict:
    """Tokenize a corpus into train/val token shards (OUT/train.bin, val.bin, index.json, ...).

    Args:
        inputs: text/JSON-lines files (optionally .gz) or folders of them.
        out: output directory (written atomically). An existing one is refused unless --overwrite, and
            then replaced only if it is a prepared data directory.
        tokenizer: a tokenizer.json file or a directory containing one (from `lmforge tokenizer`).
        val_fraction: share held out for validation, in (0, 1): of documents (split=document) or of
            characters (split=tail).
        split: document (a seeded random choice of whole documents goes to val) or tail (the last
            val_fraction of the concatenated text's characters, as nanoGPT does).
        doc_sep: how text inputs split into documents: blank_line, line or file.
        jsonl_field: the field holding the text in .jsonl inputs.
        errors: strict (invalid UTF-8 is an error) or replace (substitute U+FFFD).
        append_eos: append the end-of-text token (bpe) or [SEP] (wordpiece) after each document;
            default: true for bpe tokenizers, false otherwise.
        sentences: also write sentence start offsets (SPLIT.sents.npy), for next-sentence prediction;
            each sentence is tokenized on its own.
        workers: tokenizer threads; 0 = all cores.
        seed: seed of the document split.
        overwrite: replace an existing prepared directory at OUT.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction: must be between 0 and 1 (exclusive), got {val_fraction}")
    if split not in ("document", "tail"):
        raise ConfigError(f"split: {split!r} is not one of 'document', 'tail'")
    if workers < 0:
        raise ConfigError(f"workers: must be >= 0 (0 = all cores), got {workers}")
    out_dir = check_output(out, overwrite=overwrite, kind="dir", replaceable=["index.json"])
    tok = Tokenizer.load(tokenizer)
    if append_eos is None:
        append_eos = tok.kind == "bpe"
    eos = tok.eos_id if tok.eos_id is not None else tok.sep_id
    if append_eos and eos is None:
        raise ConfigError(f"append_eos: tokenizer {tokenizer} has no end-of-text or [SEP] token")
    files = find_files(inputs)

    reader = {"doc_sep": doc_sep, "jsonl_field": jsonl_field, "errors": errors}
    where = ", ".join(map(str, inputs))

    start = time.perf_counter()
    n_docs = n_chars = n_bytes = 0
    for doc in _documents(files, **reader):  # pass 1: count
        n_docs += 1
        n_chars += len(doc)
        n_bytes += len(doc.encode("utf-8"))
    if n_docs == 0:
        raise DataError(f"{where}: no documents (the corpus is empty)")

    split_info: dict = {"mode": split, "val_fraction": val_fraction}
    is_val = cut = None
    if split == "document":
        if n_docs < 2:
            raise DataError(f"{where}: only one document, cannot hold whole documents "
                            f"out for validation; use --split tail (or --doc_sep line)")
        n_val = min(max(1, round(n_docs * val_fraction)), n_docs - 1)
        is_val = np.zeros(n_docs, dtype=bool)
        is_val[np.random.default_rng(seed).choice(n_docs, n_val, replace=False)] = True
        split_info["seed"] = seed
    else:
        if n_chars < 2:
            raise DataError(f"{where}: too little text to split ({n_chars} character)")
        cut = min(max(int(n_chars * (1 - val_fraction)), 1), n_chars - 1)
        split_info.update(chars=n_chars, cut_char=cut)

    dtype = np.dtype(np.uint16 if tok.vocab_size <= 65536 else np.uint32)
    tail = [eos] if append_eos else []
    with atomic_dir(out_dir) as tmp, _parallelism(workers), ThreadPoolExecutor(1) as pool, \
            contextlib.ExitStack() as files_open, \
            tqdm(total=n_bytes, unit="B", unit_scale=True, desc="prepare", disable=None) as bar:
        writers = {name: _SplitWriter(tmp / f"{name}.bin", dtype, sentences) for name in ("train", "val")}
        for w in writers.values():
            files_open.callback(w.file.close)  # closed on error too (closing twice is harmless)

        def write(chunk, encoded) -> None:
            for (name, _, ends_doc), ids in zip(chunk, encoded):
                writers[name].add(ids, tail if ends_doc else [])
            for w in writers.values():
                w.flush()
            bar.update(sum(len(text.encode("utf-8")) for _, text, _ in chunk))

        encode = _encoder(tok, sentences)
        pending = None  # encode chunk k in the background while chunk k+1 is read
        for chunk in _chunks(_pieces(_documents(files, **reader), is_val, cut)):
            future = pool.submit(encode, chunk)
            if pending is not None:
                write(pending[0], pending[1].result())
            pending = (chunk, future)
        if pending is not None:
            write(pending[0], pending[1].result())
        splits = {name: w.close(tmp, name) for name, w in writers.items()}

        index = {
            "format": FORMAT,
            "dtype": dtype.name,
            "vocab_size": tok.vocab_size,
            "tokenizer_hash": tok.hash,
            "tokenizer_kind": tok.kind,
            "splits": splits,
            "split": split_info,
            "append_eos": append_eos,
            "eos_id": eos if append_eos else None,
            "sentences": sentences,
            "reader": reader,
            "source": [str(p) for p in inputs],
            "text_bytes": n_bytes,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        tok.save(tmp / "tokenizer.json")
        atomic_write_json(tmp / "index.json", index)

    seconds = time.perf_counter() - start
    tokens = sum(s["tokens"] for s in splits.values())
    stats = {"seconds": round(seconds, 3), "mb_per_s": round(n_bytes / 1e6 / seconds, 3),
             "tokens_per_s": round(tokens / seconds, 1)}
    print(f"{out_dir}: train {splits['train']['tokens']:,} tokens in {splits['train']['docs']:,} docs, "
          f"val {splits['val']['tokens']:,} tokens in {splits['val']['docs']:,} docs ({dtype.name})")
    print(f"{n_bytes / 1e6:.1f} MB of text in {seconds:.1f} s: {stats['mb_per_s']:.2f} MB/s, "
          f"{stats['tokens_per_s']:,.0f} tokens/s")
    return {**index, "out": str(out_dir), **stats}

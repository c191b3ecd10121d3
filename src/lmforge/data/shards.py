"""Reading prepared token shards (written by `lmforge prepare`, see `lmforge.data.prepare`).

`TokenShards(dir, split)` maps SPLIT.bin with numpy.memmap (zero-copy: any window is a slice) and
loads the document and sentence offsets; `open_prepared(dir)` opens both splits and the tokenizer,
checking that the tokenizer is the one the shards were made with.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lmforge.errors import DataError
from lmforge.storage import read_json
from lmforge.text.tokenizer import Tokenizer

FORMAT = 1


def read_index(directory: str | Path) -> dict:
    """index.json of a prepared directory; a clear error when there is none."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: no such directory; run `lmforge prepare` first")
    if not (directory / "index.json").is_file():
        raise DataError(f"{directory} is not a prepared data directory (no index.json); "
                        f"run `lmforge prepare` first")
    index = read_json(directory / "index.json")
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        found = index.get("format") if isinstance(index, dict) else None
        raise DataError(f"{directory}/index.json: unsupported format {found!r} (expected {FORMAT}); "
                        f"re-run `lmforge prepare`")
    return index


class TokenShards:
    """One split of a prepared directory.

    Attributes:
        tokens: 1-D np.memmap of token ids (dtype from index.json).
        doc_offsets: int64 document start offsets, length n_docs + 1 (the last is len(tokens)).
        sent_offsets: int64 sentence start offsets (length n_sentences + 1), or None when the
            directory was prepared without --sentences.
        index: the directory's index.json.
    """

    def __init__(self, directory: str | Path, split: str = "train", index: dict | None = None):
        self.dir = Path(directory)
        self.split = split
        self.index = index if index is not None else read_index(self.dir)
        splits = self.index.get("splits", {})
        if split not in splits:
            raise DataError(f"{self.dir}: no split '{split}' (has: {', '.join(splits) or 'none'})")
        info = splits[split]
        dtype = np.dtype(self.index["dtype"])
        bin_path = self.dir / f"{split}.bin"
        if not bin_path.is_file():
            raise DataError(f"{bin_path}: file missing; re-run `lmforge prepare`")
        n = bin_path.stat().st_size // dtype.itemsize
        if n != info["tokens"] or bin_path.stat().st_size % dtype.itemsize:
            raise DataError(f"{bin_path}: holds {n} tokens but index.json says {info['tokens']} "
                            f"(truncated or replaced?); re-run `lmforge prepare`")
        # np.memmap cannot map an empty file
        self.tokens = np.memmap(bin_path, dtype=dtype, mode="r") if n else np.zeros(0, dtype=dtype)
        self.doc_offsets = self._offsets(f"{split}.docs.npy", info["docs"] + 1)
        self.sent_offsets = None
        if "sentences" in info:
            self.sent_offsets = self._offsets(f"{split}.sents.npy", info["sentences"] + 1)

    def _offsets(self, name: str, length: int) -> np.ndarray:
        path = self.dir / name
        if not path.is_file():
            raise DataError(f"{path}: file missing; re-run `lmforge prepare`")
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise DataError(f"{path}: not a readable .npy file ({e})") from None
        if arr.ndim != 1 or len(arr) != length or (length and (arr[0] != 0 or arr[-1] != len(self.tokens))):
            raise DataError(f"{path}: offsets do not match index.json; re-run `lmforge prepare`")
        return arr.astype(np.int64, copy=False)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def tokenizer_hash(self) -> str:
        return self.index["tokenizer_hash"]

    @property
    def vocab_size(self) -> int:
        return self.index["vocab_size"]

    def doc(self, i: int) -> np.ndarray:
        """Tokens of document `i` (a memmap view)."""
        return self.tokens[self.doc_offsets[i]:self.doc_offsets[i + 1]]

    def __repr__(self) -> str:
        return f"TokenShards({str(self.dir)!r}, split={self.split!r}, tokens={len(self):,}, docs={self.n_docs:,})"


def open_prepared(directory: str | Path) -> tuple[TokenShards, TokenShards | None, Tokenizer]:
    """Open a prepared directory: (train shards, val shards or None, tokenizer).

    The tokenizer is DIR/tokenizer.json; its hash must match index.json's, so that token ids are
    never read with a different vocabulary than they were written with.
    """
    directory = Path(directory)
    index = read_index(directory)
    tok = Tokenizer.load(directory / "tokenizer.json")
    if tok.hash != index.get("tokenizer_hash"):
        raise DataError(f"{directory}: tokenizer.json does not match the one the shards were made with "
                        f"(hash differs from index.json); re-run `lmforge prepare`")
    train = TokenShards(directory, "train", index)
    val = TokenShards(directory, "val", index) if "val" in index.get("splits", {}) else None
    return train, val, tok

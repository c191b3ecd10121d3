"""Reading and cleaning raw text: the first step from a pile of files to a corpus.

`read_documents` turns files (.txt, .jsonl, either gzipped, or folders of them) into a stream of
(source file, document) pairs. `clean_text` normalises one document (NFKC, control characters,
whitespace); `clean_documents` applies it to a stream and drops empty, short and duplicate
documents, counting what it did. The `clean` verb writes the result and its report.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Iterable, Iterator, Literal

from lmforge.errors import ConfigError, DataError
from lmforge.storage import atomic_write_bytes, atomic_write_json, check_output

DocSep = Literal["blank_line", "line", "file"]
Errors = Literal["strict", "replace"]

# Extensions picked up when a folder is given (an explicitly named file is read whatever its name).
EXTENSIONS = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")


def find_files(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Expand files and folders (recursively, sorted) into the list of files to read.

    Args:
        paths: one path or several; folders contribute their .txt/.jsonl(.gz) files.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(EXTENSIONS))
            if not found:
                raise DataError(f"{p}: folder has no {'/'.join(EXTENSIONS)} files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    if not files:
        raise DataError("no input files given")
    return files


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _lines(path: Path, errors: str) -> Iterator[tuple[int, str]]:
    """(line number, line without its line ending), decoding line by line so a decode error can name
    the exact byte offset (of the decompressed stream for .gz files)."""
    offset = 0
    try:
        with _open_binary(path) as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8", errors=errors)
                except UnicodeDecodeError as e:
                    where = " of the decompressed text" if path.name.endswith(".gz") else ""
                    raise DataError(f"{path}: not UTF-8 at byte {offset + e.start}{where} "
                                    f"(use --errors replace to substitute U+FFFD)") from None
                if n == 1 and line.startswith("\ufeff"):
                    line = line[1:]  # a byte-order mark is not text
                offset += len(raw)
                yield n, line.rstrip("\r\n")
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read ({e})") from None


def _read_file_text(path: Path, errors: str) -> str:
    """A whole file, exactly (used for doc_sep='file', where every character counts)."""
    try:
        with _open_binary(path) as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    try:
        text = data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 at byte {e.start} "
                        f"(use --errors replace to substitute U+FFFD)") from None
    return text[1:] if text.startswith("\ufeff") else text


def _jsonl_documents(path: Path, field_name: str, errors: str) -> Iterator[str]:
    for n, line in _lines(path, errors):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or field_name not in record:
            keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{path}: line {n}: no field '{field_name}' (found: {keys}); "
                            f"set --jsonl_field")
        text = record[field_name]
        if not isinstance(text, str):
            raise DataError(f"{path}: line {n}: field '{field_name}' is {type(text).__name__}, not text")
        yield text


def _text_documents(path: Path, doc_sep: str, errors: str) -> Iterator[str]:
    if doc_sep == "file":
        yield _read_file_text(path, errors)
        return
    if doc_sep == "line":
        for _, line in _lines(path, errors):
            if line.strip():
                yield line
        return
    block: list[str] = []  # blank_line: one or more blank lines end a document
    for _, line in _lines(path, errors):
        if line.strip():
            block.append(line)
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def read_documents(paths: str | Path | Iterable[str | Path], *, doc_sep: DocSep = "blank_line",
                   jsonl_field: str = "text", errors: Errors = "strict") -> Iterator[tuple[str, str]]:
    """Yield (source file, document text) from text and JSON-lines files.

    Args:
        paths: files or folders (folders: .txt, .jsonl, .txt.gz, .jsonl.gz, recursive, sorted).
        doc_sep: how a text file splits into documents: "blank_line" (blank lines separate documents;
            lines inside one are joined by "\\n"), "line" (each non-blank line), "file" (the whole file,
            byte for byte). JSON-lines files always hold one document per record.
        jsonl_field: the record field holding the text.
        errors: "strict" (invalid UTF-8 is an error naming the byte offset) or "replace" (U+FFFD).
    """
    if doc_sep not in ("blank_line", "line", "file"):
        raise ConfigError(f"doc_sep: {doc_sep!r} is not one of 'blank_line', 'line', 'file'")
    if errors not in ("strict", "replace"):
        raise ConfigError(f"errors: {errors!r} is not one of 'strict', 'replace'")
    for path in find_files(paths):
        is_jsonl = path.name.endswith((".jsonl", ".jsonl.gz"))
        docs = _jsonl_documents(path, jsonl_field, errors) if is_jsonl else _text_documents(path, doc_sep, errors)
        for doc in docs:
            yield str(path), doc


_NEWLINES = re.compile(r"\r\n?|[\u2028\u2029\x85]")
_HSPACE = re.compile(r"[^\S\n]+")  # any whitespace but the newline: spaces, tabs, NBSP, U+3000, ...
_MANY_BLANK = re.compile(r"\n{3,}")


def _is_control(ch: str) -> bool:
    return ch not in "\n\t" and unicodedata.category(ch) == "Cc"


def clean_text(text: str, *, nfkc: bool = True) -> str:
    """Normalise one document.

    Line endings become "\\n"; control characters other than "\\n" and "\\t" are removed; with
    `nfkc`, Unicode NFKC (full-width letters, digits and punctuation become ASCII, e.g. "，" → ",";
    ligatures split; "e" + combining accent becomes "é"); every run of other whitespace (spaces,
    tabs, U+3000, ...) becomes one space; trailing spaces on each line are stripped; runs of more
    than one blank line become one blank line; leading and trailing blank lines are removed.
    Newlines inside the document are kept.
    """
    text = _NEWLINES.sub("\n", text)
    if any(_is_control(ch) for ch in set(text)):  # before NFKC, which may join what they separated
        text = "".join(ch for ch in text if not _is_control(ch))
    if nfkc:
        text = unicodedata.normalize("NFKC", text)
    text = _HSPACE.sub(" ", text)
    text = "\n".join(line.rstrip(" ") for line in text.split("\n"))
    return _MANY_BLANK.sub("\n\n", text).strip("\n")


@dataclass
class CleanReport:
    """What `clean_documents` did (counts of documents and characters)."""

    docs_read: int = 0
    kept: int = 0
    dropped_empty: int = 0
    dropped_short: int = 0
    dropped_duplicate: int = 0
    chars_in: int = 0
    chars_out: int = 0
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"read {self.docs_read:,} documents from {len(self.files)} file(s); kept {self.kept:,}; "
                f"dropped {self.dropped_empty:,} empty, {self.dropped_short:,} short, "
                f"{self.dropped_duplicate:,} duplicate; characters {self.chars_in:,} -> {self.chars_out:,}")


def iter_clean(docs: Iterable[tuple[str, str]], report: CleanReport, *, min_chars: int = 1,
               dedup: bool = True, nfkc: bool = True) -> Iterator[tuple[str, str]]:
    """Clean a stream of (source, text) pairs lazily, counting into `report` as it goes."""
    if min_chars < 0:
        raise ConfigError(f"min_chars: must be >= 0, got {min_chars}")
    seen: set[bytes] = set()
    for source, text in docs:
        report.docs_read += 1
        report.chars_in += len(text)
        if not report.files or report.files[-1] != source:
            report.files.append(source)
        cleaned = clean_text(text, nfkc=nfkc)
        if not cleaned.strip():
            report.dropped_empty += 1
            continue
        if len(cleaned) < min_chars:
            report.dropped_short += 1
            continue
        if dedup:
            digest = hashlib.blake2b(cleaned.encode("utf-8"), digest_size=16).digest()
            if digest in seen:
                report.dropped_duplicate += 1
                continue
            seen.add(digest)
        report.kept += 1
        report.chars_out += len(cleaned)
        yield source, cleaned


def clean_documents(docs: Iterable[tuple[str, str]], *, min_chars: int = 1, dedup: bool = True,
                    nfkc: bool = True) -> tuple[list[tuple[str, str]], CleanReport]:
    """Clean (source, text) pairs: `clean_text` each, then drop empty documents, those shorter than
    `min_chars` characters and exact duplicates (same cleaned text) when `dedup`.

    Returns:
        the kept (source, cleaned text) pairs, in order, and a `CleanReport`.
    """
    report = CleanReport()
    kept = list(iter_clean(docs, report, min_chars=min_chars, dedup=dedup, nfkc=nfkc))
    return kept, report


def clean(inputs: list[str], out: str, doc_sep: DocSep = "blank_line", jsonl_field: str = "text",
          errors: Errors = "strict", min_chars: int = 1, dedup: bool = True, nfkc: bool = True,
          overwrite: bool = False) -> dict:
    """Clean raw text files into one corpus file, plus a report (`OUT.report.json`).

    Args:
        inputs: text/JSON-lines files (optionally .gz) or folders of them.
        out: output file; `.jsonl` writes {"text": ...} records, anything else plain text with
            documents separated by one blank line (blank lines inside a document become single
            newlines, so the file reads back with --doc_sep blank_line). A `.gz` suffix compresses.
        doc_sep: how text inputs split into documents: blank_line, line or file.
        jsonl_field: the field holding the text in .jsonl inputs.
        errors: strict (invalid UTF-8 is an error) or replace (substitute U+FFFD).
        min_chars: drop documents shorter than this many characters after cleaning.
        dedup: drop exact duplicate documents.
        nfkc: apply Unicode NFKC normalisation.
        overwrite: replace an existing OUT (and OUT.report.json); without it an existing one is an error.
    """
    out_path = Path(out)
    report_path = out_path.with_name(out_path.name + ".report.json")
    check_output(out_path, overwrite=overwrite)
    check_output(report_path, overwrite=overwrite)
    if min_chars < 0:
        raise ConfigError(f"min_chars: must be >= 0, got {min_chars}")
    docs, report = clean_documents(read_documents(inputs, doc_sep=doc_sep, jsonl_field=jsonl_field, errors=errors),
                                   min_chars=min_chars, dedup=dedup, nfkc=nfkc)
    if not docs:
        raise DataError(f"no documents left after cleaning {', '.join(map(str, inputs))} "
                        f"({report.docs_read} read: {report.dropped_empty} empty, "
                        f"{report.dropped_short} shorter than {min_chars} chars, {report.dropped_duplicate} duplicate)")
    base = out_path.name[:-3] if out_path.name.endswith(".gz") else out_path.name
    if base.endswith(".jsonl"):
        body = "".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for _, text in docs)
    else:
        body = "\n\n".join(re.sub(r"\n+", "\n", text) for _, text in docs) + "\n"
    data = body.encode("utf-8")
    atomic_write_bytes(out_path, gzip.compress(data, mtime=0) if out_path.name.endswith(".gz") else data)
    result = {"out": str(out_path), **report.to_dict()}
    atomic_write_json(report_path, result)
    print(report.summary())
    print(f"wrote {out_path}")
    return result

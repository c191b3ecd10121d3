"""Task data readers (no torch): labelled tables and tagged text, and the label set of a task.

- `read_table`: tsv / csv / jsonl (optionally .gz) rows -> `Example(text, text_pair, label, where)`, each
  column given by header name or by 0-based index.
- `read_conll`: tagged sentences -> `TaggedSentence(words, tags, where)` with tags converted to IOB2,
  from three layouts, told apart by the file itself:
    columns    one `word ... tag` per line, blank line between sentences, `-DOCSTART-` lines skipped
               (CoNLL-2003; Weibo NER's `*.all.bmes`);
    lines      one sentence per line, `w1 w2 ...<TAB>t1 t2 ...` (Resume NER's `*.char.bmes`);
    jsonl      `{"text": [...], "label": [...]}` per line (also words/tokens and tags/labels/ner_tags).
  The tag scheme (IOB1, IOB2, BIOES, BMES) is detected per file or given; the result is a `TaggedFile`,
  a list of sentences whose `.scheme` says which scheme the file used.
- `LabelSet`: the labels (or tags) of the training split, in a fixed order, and the check that a dev or
  test file uses no other.

Every mistake in a file is a `DataError` naming FILE:LINE and the value.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from lmforge.errors import ConfigError, DataError

SCHEMES = ("auto", "IOB1", "IOB2", "BIOES", "BMES")
_PREFIXES = {"IOB1": "BI", "IOB2": "BI", "BIOES": "BIES", "BMES": "BMES", "auto": "BIMES"}
_NUMBER = re.compile(r"[+-]?\d+(\.\d+)?")
_BLANKS = re.compile(r"[ \t]+")


@dataclass
class Example:
    """One row of a classification file. `where` is "FILE:LINE" (1-based) for error messages."""

    text: str
    text_pair: str | None
    label: str | None
    where: str


@dataclass
class TaggedSentence:
    """One tagged sentence (tags in IOB2). `where` is "FILE:LINE" of its first word; with
    `word_per_line` (the columns layout) word i sits i lines further down."""

    words: list[str]
    tags: list[str]
    where: str
    word_per_line: bool = True

    def word_where(self, i: int) -> str:
        """"FILE:LINE" of word i."""
        if not self.word_per_line:
            return self.where
        path, line = self.where.rsplit(":", 1)
        return f"{path}:{int(line) + i}"


class TaggedFile(list):
    """The sentences of one tagged file (a plain list of `TaggedSentence`, tags in IOB2) plus
    `scheme`, the tag scheme the file was written in ("IOB1", "IOB2", "BIOES" or "BMES"), and
    `repaired`, how many chunks opened with I-/M-/E- instead of B-/S- and now open with B- (always 0 for
    IOB1, where that is the rule)."""

    def __init__(self, sentences: Iterable[TaggedSentence], scheme: str, repaired: int = 0):
        super().__init__(sentences)
        self.scheme, self.repaired = scheme, repaired


# ---- reading text ----------------------------------------------------------------------------------
def _read_lines(path: str | Path) -> list[str]:
    """The lines of a UTF-8 (optionally gzipped) text file, BOM and CR removed; line i+1 is item i."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{path}: is a folder, expected a file")
    if not p.is_file():
        raise DataError(f"{path}: file not found")
    data = p.read_bytes()
    if p.name.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: not a readable gzip file ({e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x}); "
                        "convert the file to UTF-8") from None
    text = text.removeprefix("\ufeff")
    # split on \n only: str.splitlines would also break at \x1c, \x85, \u2028 inside a text field
    return [ln.removesuffix("\r") for ln in text.split("\n")]


def _stem_suffix(path: str | Path) -> str:
    name = Path(path).name.lower().removesuffix(".gz")
    return name.rsplit(".", 1)[-1] if "." in name else ""


# ---- tables ----------------------------------------------------------------------------------------
Column = int | str | None


def _as_column(spec: Column) -> int | str | None:
    """An int or a digit string is a 0-based index; any other string is a header name."""
    if spec is None or isinstance(spec, int):
        return spec
    s = str(spec)
    return int(s) if s.isdigit() else s


def _is_number(s: str) -> bool:
    return bool(_NUMBER.fullmatch(s.strip()))


def _looks_like_header(path, rows: list[tuple[int, list[str]]], label: int | None) -> bool:
    """Guess whether the first row names the columns: yes when some column is numeric below it but not
    in it. When its label value never comes again although the labels below repeat, the first row may be
    a header or a rare class: that is a DataError asking for `header` rather than a silent guess."""
    if len(rows) < 2:
        return False
    (line, first), rest = rows[0], [r for _, r in rows[1:]]
    for j, head in enumerate(first):
        below = [r[j] for r in rest if j < len(r)]
        if head.strip() and not _is_number(head) and below and all(_is_number(v) for v in below):
            return True
    if label is not None and -len(first) <= label < len(first):
        below = [r[label].strip() for r in rest if -len(r) <= label < len(r)]
        if first[label].strip() not in below and len(set(below)) < len(below):
            raise DataError(f"{path}:{line}: cannot tell whether the first row is a header: its label "
                            f"{first[label].strip()!r} occurs nowhere else; say header=True or header=False")
    return False


def _split_rows(path, lines: list[str], delimiter: str) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every non-blank row. Tabs never quote (MRPC's strings hold bare `"`);
    other delimiters follow csv quoting, so a quoted field may span lines."""
    if delimiter == "\t":
        return [(i + 1, ln.split("\t")) for i, ln in enumerate(lines) if ln.strip()]
    rows, reader = [], csv.reader(io.StringIO("\n".join(lines)), delimiter=delimiter, strict=True)
    start = 1
    try:
        for fields in reader:
            if any(f.strip() for f in fields):
                rows.append((start, fields))
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed csv row ({e})") from None
    return rows


def _json_rows(path, lines: list[str]) -> list[tuple[int, dict | list]]:
    rows = []
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            row = json.loads(ln)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i + 1}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, (dict, list)):
            raise DataError(f"{path}:{i + 1}: expected a JSON object per line, got {type(row).__name__}")
        rows.append((i + 1, row))
    return rows


def read_json_objects(path: str | Path) -> list[dict]:
    """The JSON objects of a .jsonl file (optionally gzipped), one per non-blank line, e.g. the inputs of
    `lmforge predict`. A line that is not valid JSON or not an object, and a file without any, are errors
    naming FILE:LINE."""
    objects = []
    for line, row in _json_rows(path, _read_lines(path)):
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line}: expected a JSON object such as {{\"text\": \"...\"}}, got a list")
        objects.append(row)
    if not objects:
        raise DataError(f"{path}: no inputs")
    return objects


def read_table(path: str | Path, *, text: Column = "text", text_pair: Column = None, label: Column = "label",
               header: bool | None = None, delimiter: str | None = None) -> list[Example]:
    """Read a classification file into `Example`s.

    Args:
        path: .tsv / .txt (tab-separated, no quoting), .csv (comma, csv quoting) or .jsonl / .json (one
            JSON object per line, columns are keys); each may end in .gz.
        text, text_pair, label: the columns, by header name or 0-based index (an int or a digit string).
            `text_pair=None`: single sentences. `label=None`: an unlabelled file (labels are None).
        header: whether the first row names the columns. None: yes when a column is given by name,
            else when a column is numeric below the first row but not in it; a first row whose label
            occurs nowhere else (a header or a rare class?) is an error asking for header=True/False.
        delimiter: override the field separator of a table.

    Returns: one `Example` per non-blank row, `where` = "FILE:LINE".
    Raises: DataError (missing file, missing column, ragged row, empty split, empty text or label,
        not UTF-8, bad JSON), ConfigError (a column name with header=False).
    """
    specs = {"text": _as_column(text), "text_pair": _as_column(text_pair), "label": _as_column(label)}
    if specs["text"] is None:
        raise ConfigError("read_table: the text column is required")
    lines = _read_lines(path)
    if _stem_suffix(path) in ("jsonl", "json"):
        rows = _json_rows(path, lines)
        names, header = None, False
    else:
        delimiter = delimiter or ("," if _stem_suffix(path) == "csv" else "\t")
        rows = _split_rows(path, lines, delimiter)
        by_name = [f"{k}={v!r}" for k, v in specs.items() if isinstance(v, str)]
        if header is False and by_name:
            raise ConfigError(f"{path}: {', '.join(by_name)} is a column name but header=False; "
                              "give a 0-based column index")
        if header is None:
            label_index = specs["label"] if isinstance(specs["label"], int) else None
            header = bool(by_name) or _looks_like_header(path, rows, label_index)
        names = [h.strip() for h in rows[0][1]] if header and rows else None
        width = len(rows[0][1]) if rows else 0
        for line, fields in rows:
            if len(fields) != width:
                raise DataError(f"{path}:{line}: {len(fields)} fields, expected {width} as on line {rows[0][0]}"
                                " (a stray delimiter or a broken quote?)")
        if header:
            rows = rows[1:]
    if not rows:
        raise DataError(f"{path}: no examples (empty split)")
    index = {k: _resolve(path, k, v, names, rows) for k, v in specs.items() if v is not None}
    out = []
    for line, row in rows:
        where = f"{path}:{line}"
        values = {k: _field(path, line, row, k, specs[k], c) for k, c in index.items()}
        for k in ("text", "text_pair", "label"):
            if k in values and not values[k]:
                what = "label" if k == "label" else "text"
                raise DataError(f"{where}: empty {what} in column {specs[k]!r}")
        out.append(Example(values["text"], values.get("text_pair"), values.get("label"), where))
    return out


def _resolve(path, key: str, spec: int | str, names: list[str] | None, rows) -> int | str:
    """A column spec -> an index (tables) or key (JSON objects)."""
    first_line, first = rows[0]
    if isinstance(first, dict):
        if isinstance(spec, int):
            raise ConfigError(f"{path}: {key}={spec} is an index but the rows are JSON objects; give the key name")
        return spec
    if isinstance(spec, str):
        if names is None:
            raise ConfigError(f"{path}: {key}={spec!r} is a column name but the rows have no header; give an index")
        if spec not in names:
            raise DataError(f"{path}: no column {spec!r} for {key} (columns: {', '.join(map(repr, names))})")
        return names.index(spec)
    if not -len(first) <= spec < len(first):
        raise DataError(f"{path}:{first_line}: no column {spec} for {key} (rows have {len(first)} columns, 0-based)")
    return spec


def _field(path, line: int, row: dict | list, key: str, spec, col: int | str) -> str:
    if isinstance(row, dict):
        if col not in row:
            raise DataError(f"{path}:{line}: no key {col!r} for {key} (keys: {', '.join(map(repr, row))})")
        value = row[col]
    else:
        if not -len(row) <= col < len(row):
            raise DataError(f"{path}:{line}: no column {spec} for {key} (the row has {len(row)} columns)")
        value = row[col]
    if value is None:
        return ""
    if key == "label" and isinstance(value, (int, bool)):
        return str(int(value))
    if not isinstance(value, str):
        raise DataError(f"{path}:{line}: {key} {col!r} is a {type(value).__name__}, expected a string")
    return value.strip()


# ---- tag schemes -----------------------------------------------------------------------------------
def _split_tag(tag: str) -> tuple[str, str] | None:
    """'B-PER' -> ('B', 'PER'); 'O' -> ('O', ''); anything else -> None."""
    if tag == "O":
        return "O", ""
    prefix, dash, kind = tag.partition("-")
    if not dash or len(prefix) != 1 or not kind:
        return None
    return prefix, kind


class _BadTag(Exception):
    def __init__(self, i: int, reason: str):
        super().__init__(reason)
        self.i, self.reason = i, reason


def _convert(tags: Sequence[str], scheme: str) -> tuple[list[str], int]:
    """Tags of one sentence -> (IOB2 tags, number of chunks that did not open with B-/S-). B/S open a
    chunk; I/M/E continue an open chunk of the same type, else open one (the conlleval reading of e.g.
    I-X after O); E/S close it. Raises _BadTag for a tag that cannot be read."""
    allowed = _PREFIXES[scheme]
    out: list[str] = []
    open_kind = None  # type of the chunk that the next word may continue
    repaired = 0
    for i, tag in enumerate(tags):
        parts = _split_tag(tag)
        if parts is None:
            raise _BadTag(i, "not O or PREFIX-TYPE")
        prefix, kind = parts
        if prefix == "O":
            out.append("O")
            open_kind = None
            continue
        if prefix not in allowed:
            name = "any scheme" if scheme == "auto" else scheme
            raise _BadTag(i, f"prefix {prefix}- is not one of {name}'s ({', '.join(allowed)}, and O)")
        continues = prefix in "IME" and open_kind == kind
        repaired += prefix in "IME" and not continues
        out.append(f"{'I' if continues else 'B'}-{kind}")
        open_kind = None if prefix in "ES" else kind
    return out, repaired


def to_iob2(tags: Sequence[str], scheme: str) -> list[str]:
    """Convert one sentence's tags from `scheme` (IOB1, IOB2, BIOES, BMES or auto = any of their prefixes)
    to IOB2: S- -> B-, M-/E- -> I-, and a chunk that starts with I-/M-/E- starts with B- instead.

    Raises DataError for a tag that is not O or PREFIX-TYPE with a prefix of the scheme."""
    if scheme not in SCHEMES:
        raise ConfigError(f"tag scheme {scheme!r} is not one of {', '.join(SCHEMES)}")
    try:
        return _convert(tags, scheme)[0]
    except _BadTag as e:
        raise DataError(f"tag {tags[e.i]!r} (word {e.i + 1}): {e.reason}") from None


def detect_scheme(sentences: Iterable[Sequence[str]]) -> str:
    """The scheme of a file's tag sequences: M- -> BMES; else E- or S- -> BIOES; else IOB1 when more
    chunks start with I- (after O, another type or at the start) than with B-, else IOB2 (whose stray
    I- starts, annotation slips as in CoNLL-2003's files, are read as B- by either)."""
    prefixes, i_starts, b_starts = set(), 0, 0
    for tags in sentences:
        prev = None
        for tag in tags:
            parts = _split_tag(tag)
            if parts is None:
                prev = None
                continue
            prefix, kind = parts
            prefixes.add(prefix)
            i_starts += prefix == "I" and prev != kind
            b_starts += prefix == "B"
            prev = kind if prefix != "O" else None
    if "M" in prefixes:
        return "BMES"
    if prefixes & {"E", "S"}:
        return "BIOES"
    return "IOB1" if i_starts > b_starts else "IOB2"


# ---- tagged files ----------------------------------------------------------------------------------
def _conll_layout(path, lines: list[str]) -> str:
    if _stem_suffix(path) in ("jsonl", "json"):
        return "jsonl"
    first = next((ln for ln in lines if ln.strip()), "")
    if first.lstrip().startswith("{"):
        return "jsonl"
    parts = first.split("\t")
    if len(parts) == 2:
        words, tags = _BLANKS.split(parts[0].strip(" ")), _BLANKS.split(parts[1].strip(" "))
        if len(words) == len(tags) > 1:
            return "lines"
    return "columns"


def _column_sentences(path, lines: list[str], word_col: int, tag_col: int):
    """(words, tags, first line) per blank-line separated block of `word ... tag` lines."""
    words, tags, start, width, width_line = [], [], 0, None, 0
    for i, ln in enumerate(lines):
        fields = _BLANKS.split(ln.strip(" \t")) if ln.strip(" \t") else []
        if not fields or fields[0] == "-DOCSTART-":
            if words:
                yield words, tags, start
            words, tags = [], []
            continue
        if width is None:
            width, width_line = len(fields), i + 1
            if not (-width <= word_col < width and -width <= tag_col < width) or word_col % width == tag_col % width:
                raise DataError(f"{path}:{i + 1}: {width} columns, too few for word_col={word_col} and "
                                f"tag_col={tag_col}: {ln.strip()!r}")
        elif len(fields) != width:
            raise DataError(f"{path}:{i + 1}: {len(fields)} columns, expected {width} as on line {width_line}: "
                            f"{ln.strip()!r}")
        if not words:
            start = i + 1
        words.append(fields[word_col])
        tags.append(fields[tag_col])
    if words:
        yield words, tags, start


def _line_sentences(path, lines: list[str]):
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        parts = ln.split("\t")
        if len(parts) != 2:
            raise DataError(f"{path}:{i + 1}: expected 'words<TAB>tags', found {len(parts)} tab-separated fields")
        words, tags = _BLANKS.split(parts[0].strip(" ")), _BLANKS.split(parts[1].strip(" "))
        if len(words) != len(tags):
            raise DataError(f"{path}:{i + 1}: {len(words)} words but {len(tags)} tags")
        yield words, tags, i + 1


_WORD_KEYS, _TAG_KEYS = ("words", "tokens", "text", "chars"), ("tags", "labels", "label", "ner_tags")


def _json_sentences(path, lines: list[str]):
    for line, row in _json_rows(path, lines):
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line}: expected a JSON object with words and tags")
        wk = next((k for k in _WORD_KEYS if k in row), None)
        tk = next((k for k in _TAG_KEYS if k in row), None)
        if wk is None or tk is None:
            need = f"one of {_WORD_KEYS}" if wk is None else f"one of {_TAG_KEYS}"
            raise DataError(f"{path}:{line}: no key {need} (keys: {', '.join(map(repr, row))})")
        words, tags = row[wk], row[tk]
        if not (isinstance(words, list) and isinstance(tags, list)
                and all(isinstance(x, str) for x in words + tags)):
            raise DataError(f"{path}:{line}: {wk!r} and {tk!r} must be lists of strings")
        if len(words) != len(tags):
            raise DataError(f"{path}:{line}: {len(words)} words but {len(tags)} tags")
        if words:
            yield words, tags, line


def read_conll(path: str | Path, *, word_col: int = 0, tag_col: int = -1, scheme: str = "auto") -> TaggedFile:
    """Read a tagged file (columns, one sentence per line, or jsonl; see the module docstring).

    Args:
        path: the file (optionally .gz).
        word_col, tag_col: columns of the word and the tag in the columns layout (0-based, negative from
            the end).
        scheme: "auto" (detect, see `detect_scheme`) or the file's scheme: IOB1, IOB2, BIOES, BMES.

    Returns: a `TaggedFile`: the sentences with tags converted to IOB2, `.scheme` the file's scheme and
        `.repaired` the number of chunks that opened without B-/S- (read as B-, as conlleval does).
    Raises: DataError (missing/undecodable file, no sentences, a short row, words/tags of unequal length,
        a tag that is not O or PREFIX-TYPE of the scheme), ConfigError (unknown scheme).
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"tag scheme {scheme!r} is not one of {', '.join(SCHEMES)}")
    lines = _read_lines(path)
    layout = _conll_layout(path, lines)
    if layout == "columns":
        raw = list(_column_sentences(path, lines, word_col, tag_col))
    elif layout == "lines":
        raw = list(_line_sentences(path, lines))
    else:
        raw = list(_json_sentences(path, lines))
    if not raw:
        raise DataError(f"{path}: no sentences (empty split)")
    if scheme == "auto":
        scheme = detect_scheme(tags for _, tags, _ in raw)
        if scheme == "BIOES" and ".bmes" in Path(path).name.lower() and not any(
                t.startswith("I-") for _, tags, _ in raw for t in tags):
            scheme = "BMES"  # a .bmes file whose entities all happen to be one or two words long
    out, repaired = [], 0
    for words, tags, line in raw:
        sentence = TaggedSentence(words, tags, f"{path}:{line}", word_per_line=layout == "columns")
        try:
            sentence.tags, n = _convert(tags, scheme)
        except _BadTag as e:
            raise DataError(f"{sentence.word_where(e.i)}: tag {tags[e.i]!r}: {e.reason} "
                            f"(file read as {scheme})") from None
        repaired += n
        out.append(sentence)
    return TaggedFile(out, scheme, 0 if scheme == "IOB1" else repaired)


# ---- label sets ------------------------------------------------------------------------------------
def _label_order(names: set[str], tags: bool) -> list[str]:
    if tags:
        return (["O"] if "O" in names else []) + sorted(names - {"O"})
    if all(_NUMBER.fullmatch(n) and "." not in n for n in names):
        return sorted(names, key=int)  # "2" before "10"
    return sorted(names)


@dataclass
class LabelSet:
    """The labels of a task, from its training split, in a fixed order: class labels sorted (numerically
    when all are integers, so "0" < "1" and index 1 is the positive class of a 0/1 task), tags with "O"
    first and the rest sorted. `names` is all that is saved with a model."""

    names: list[str]

    def __post_init__(self):
        self.names = list(self.names)
        self._index = {n: i for i, n in enumerate(self.names)}
        if len(self._index) != len(self.names):
            raise DataError(f"label set has duplicate names: {self.names}")

    @classmethod
    def from_examples(cls, train: Sequence[Example] | Sequence[TaggedSentence], path: str | Path = "training split"
                      ) -> LabelSet:
        """The label set of a training split (`Example`s: their labels; `TaggedSentence`s: their tags)."""
        if not train:
            raise DataError(f"{path}: no examples (empty split)")
        tags = isinstance(train[0], TaggedSentence)
        names: set[str] = set()
        for ex in train:
            if tags:
                names.update(ex.tags)
            elif ex.label is None:
                raise DataError(f"{ex.where}: no label (the training split must be labelled)")
            else:
                names.add(ex.label)
        return cls(_label_order(names, tags))

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        """Position of a label; DataError for a label outside the set."""
        try:
            return self._index[name]
        except KeyError:
            raise DataError(f"label {name!r} never seen in training (known: {self._known()})") from None

    def _known(self, limit: int = 30) -> str:
        shown = ", ".join(self.names[:limit])
        return shown + (f", ... ({len(self.names)} in all)" if len(self.names) > limit else "")

    def check(self, examples: Sequence[Example] | Sequence[TaggedSentence], path: str | Path) -> None:
        """Raise DataError "FILE:LINE: label 'x' never seen in training (known: ...)" for the first label
        (or tag) of a dev/test split outside the set, or for an empty split. Unlabelled examples pass."""
        if not examples:
            raise DataError(f"{path}: no examples (empty split)")
        for ex in examples:
            if isinstance(ex, TaggedSentence):
                for i, tag in enumerate(ex.tags):
                    if tag not in self._index:
                        raise DataError(f"{ex.word_where(i)}: tag {tag!r} never seen in training "
                                        f"(known: {self._known()})")
            elif ex.label is not None and ex.label not in self._index:
                raise DataError(f"{ex.where}: label {ex.label!r} never seen in training (known: {self._known()})")


# ---- extractive QA: SQuAD and CMRC 2018 json ---------------------------------------------------------
@dataclass
class QAExample:
    """One question over one context. `answers` are the reference texts as the file gives them (a
    non-string reference is read with `str()`); `spans[i]` is the (start, end) characters of answer i in
    the context, or None when it cannot be located there. `where` names the file and the question."""

    id: str
    question: str
    context: str
    answers: list[str]
    spans: list[tuple[int, int] | None]
    where: str

    @property
    def located(self) -> tuple[int, int] | None:
        """The span training uses: the first reference that was located."""
        return next((s for s in self.spans if s is not None), None)


class QAFile(list):
    """The questions of one QA file (a list of `QAExample`) plus what reading found: `format` ('squad' or
    'cmrc2018'), `non_string` (references that were numbers, read with str()), `unlocated` (references
    not found in their context), `relocated` (SQuAD answers whose answer_start did not point at the text,
    found at another occurrence), `questions_unlocated` (questions with no located reference) and
    `empty_questions` (questions whose text is empty: kept, as the official scripts score them)."""

    def __init__(self, examples: Iterable[QAExample], format: str, non_string: int = 0, relocated: int = 0):
        super().__init__(examples)
        self.empty_questions = 0
        self.format = format
        self.non_string = non_string
        self.relocated = relocated
        self.unlocated = sum(s is None for ex in self for s in ex.spans)
        self.questions_unlocated = sum(1 for ex in self if ex.answers and ex.located is None)

    def counts(self) -> dict[str, int]:
        return {"questions": len(self), "references": sum(len(ex.answers) for ex in self),
                "references_unlocated": self.unlocated, "questions_unlocated": self.questions_unlocated,
                "references_non_string": self.non_string, "references_relocated": self.relocated,
                "questions_empty": self.empty_questions}


def _locate(context: str, text: str, start: int | None) -> tuple[tuple[int, int] | None, bool]:
    """(span of `text` in `context` or None, whether it was found away from the given `start`). With a
    start (SQuAD) the occurrence nearest to it; without (CMRC 2018) the first. Surrounding whitespace of
    the answer is not part of the span."""
    text = text.strip()
    if not text:
        return None, False
    if start is not None and context[start : start + len(text)] == text:
        return (start, start + len(text)), False
    hits, i = [], context.find(text)
    while i >= 0:
        hits.append(i)
        i = context.find(text, i + 1)
    if not hits:
        return None, False
    best = hits[0] if start is None else min(hits, key=lambda h: abs(h - start))
    return (best, best + len(text)), start is not None


def _qa_text(path, where: str, obj: dict, *keys: str, allow_empty: bool = False) -> str:
    for key in keys:
        if key in obj:
            value = obj[key]
            if not isinstance(value, str):
                raise DataError(f"{path}: {where}: '{key}' is a {type(value).__name__}, expected a string")
            if not value.strip() and not allow_empty:
                raise DataError(f"{path}: {where}: empty '{key}'")
            return value
    raise DataError(f"{path}: {where}: no {' or '.join(repr(k) for k in keys)} (keys: {', '.join(map(repr, obj))})")


def _qa_answers(path, where: str, raw, labelled: bool) -> list[tuple[str, int | None, bool]]:
    """(text, answer_start or None, was a non-string) of each reference: a list of strings (CMRC 2018),
    a list of {"text", "answer_start"} (SQuAD) or {"text": [...], "answer_start": [...]} (datasets)."""
    if isinstance(raw, dict) and "text" in raw:
        texts, starts = raw.get("text"), raw.get("answer_start")
        if not isinstance(texts, list) or (starts is not None and (not isinstance(starts, list) or len(starts) != len(texts))):
            raise DataError(f"{path}: {where}: 'answers' must hold lists 'text' and 'answer_start' of equal length")
        raw = [{"text": t, "answer_start": s} for t, s in zip(texts, starts or [None] * len(texts))]
    if not isinstance(raw, list):
        raise DataError(f"{path}: {where}: 'answers' must be a list, got {type(raw).__name__}")
    out = []
    for k, item in enumerate(raw):
        start = None
        if isinstance(item, dict):
            if "text" not in item:
                raise DataError(f"{path}: {where}: answers[{k}] has no 'text'")
            start = item.get("answer_start")
            if start is not None and (not isinstance(start, int) or isinstance(start, bool) or start < 0):
                raise DataError(f"{path}: {where}: answers[{k}].answer_start must be a non-negative integer, got {start!r}")
            item = item["text"]
        non_string = not isinstance(item, str)
        if non_string and not isinstance(item, (int, float)) or isinstance(item, bool):
            raise DataError(f"{path}: {where}: answers[{k}] is a {type(item).__name__}, expected a string")
        text = str(item)
        if not text.strip():
            raise DataError(f"{path}: {where}: answers[{k}] is empty")
        out.append((text, start, non_string))
    if labelled and not out:
        raise DataError(f"{path}: {where}: no reference answers (unanswerable questions, as in SQuAD 2.0, "
                        "are not supported)")
    return out


def read_qa(path: str | Path, labelled: bool = True) -> QAFile:
    """Read an extractive QA file into `QAExample`s (one per question).

    Formats, told apart by their content:
        squad     {"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question",
                  "answers": [{"text", "answer_start"}]}]}]}]} (SQuAD v1.1; CMRC 2018's SQuAD-style files);
        cmrc2018  [{"context_id", "context_text", "qas": [{"query_id", "query_text", "answers": [str]}]}]
                  (CMRC 2018's own release: answers are strings without offsets, located with find);
        jsonl     one {"id", "question", "context", "answers"} per line (answers as above, or the
                  datasets layout {"text": [...], "answer_start": [...]}); .gz allowed for all.

    Each reference is located in its context (SQuAD: at answer_start, else the nearest occurrence;
    CMRC 2018: the first occurrence); one that cannot be located keeps span None and is counted in the
    file's `counts()`, never dropped: scoring uses every reference's text.

    Args:
        path: the file.
        labelled: False reads questions without answers (prediction input).
    Raises: DataError (missing/undecodable file, bad JSON, a missing question, an empty context or answer,
        a labelled question without answers, is_impossible questions, an empty file).
    """
    lines = _read_lines(path)
    if _stem_suffix(path) == "jsonl":
        items = [(f"line {line}", row) for line, row in _json_rows(path, lines)]
        fmt = "jsonl"
    else:
        try:
            doc = json.loads("\n".join(lines))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        items, fmt = _qa_items(path, doc)
    out, non_string, relocated, empty_questions = [], 0, 0, 0
    seen: set[str] = set()
    for where, q in items:
        if not isinstance(q, dict):
            raise DataError(f"{path}: {where}: expected a JSON object, got {type(q).__name__}")
        context = q["__context"] if "__context" in q else _qa_text(path, where, q, "context")
        # an empty question is kept and counted (CMRC 2018's trial file has two): the official scripts score it
        question = _qa_text(path, where, q, "question", "query_text", allow_empty=True)
        empty_questions += not question.strip()
        qid = str(q.get("id", q.get("query_id", where)))
        if qid in seen:
            raise DataError(f"{path}: {where}: question id {qid!r} occurs twice")
        seen.add(qid)
        if q.get("is_impossible"):
            raise DataError(f"{path}: {where}: an unanswerable question (is_impossible); SQuAD 2.0 is not supported")
        raw = q.get("answers", [])
        answers = _qa_answers(path, where, raw, labelled) if (labelled or raw) else []
        texts, spans = [], []
        for text, start, odd in answers:
            span, moved = _locate(context, text, start)
            texts.append(text)
            spans.append(span)
            non_string += odd
            relocated += moved
        out.append(QAExample(qid, question, context, texts, spans, f"{path}: question {qid}"))
    if not out:
        raise DataError(f"{path}: no questions (empty split)")
    qa_file = QAFile(out, "cmrc2018" if fmt == "cmrc2018" else "squad", non_string, relocated)
    qa_file.empty_questions = empty_questions
    return qa_file


def _qa_items(path, doc) -> tuple[list[tuple[str, dict]], str]:
    """(where, question object with its context under '__context') of every question in a json file."""
    items = []
    if isinstance(doc, dict) and "data" in doc:
        doc = doc["data"]
        if not isinstance(doc, list):
            raise DataError(f"{path}: 'data' must be a list of articles")
    if not isinstance(doc, list):
        raise DataError(f"{path}: expected SQuAD json ({{\"data\": [...]}}) or a CMRC 2018 list of passages")
    cmrc = bool(doc) and isinstance(doc[0], dict) and "context_text" in doc[0]
    for i, art in enumerate(doc):
        if not isinstance(art, dict):
            raise DataError(f"{path}: data[{i}]: expected a JSON object, got {type(art).__name__}")
        if cmrc:
            paragraphs = [(f"[{i}]", art, "context_text")]
        else:
            if "paragraphs" not in art:
                raise DataError(f"{path}: data[{i}]: no 'paragraphs' (neither SQuAD nor CMRC 2018 layout)")
            paragraphs = [(f"data[{i}].paragraphs[{j}]", p, "context") for j, p in enumerate(art["paragraphs"])]
        for where, para, key in paragraphs:
            if not isinstance(para, dict):
                raise DataError(f"{path}: {where}: expected a JSON object")
            context = _qa_text(path, where, para, key)
            qas = para.get("qas")
            if not isinstance(qas, list):
                raise DataError(f"{path}: {where}: no 'qas' list")
            for k, q in enumerate(qas):
                w = f"{where}.qas[{k}]"
                if isinstance(q, dict):
                    q = {**q, "__context": context}
                items.append((w, q))
    return items, "cmrc2018" if cmrc else "squad"


# ---- prompt / response pairs (generation fine-tuning) ------------------------------------------------
@dataclass
class Pair:
    """One prompt and its response (None when unlabelled). `where` is "FILE:LINE"."""

    prompt: str
    response: str | None
    where: str


_TABLES = ("tsv", "csv", "txt", "jsonl", "json")


def _pair_files(path: Path, source, target) -> tuple[Path, Path | None] | None:
    """(source file, target file) of a line-aligned pair PREFIX.SRC[.gz] / PREFIX.TGT[.gz], or None."""
    def find(suffix):
        for cand in (Path(f"{path}.{suffix}"), Path(f"{path}.{suffix}.gz")):
            if cand.is_file():
                return cand
        return None

    if source is None or isinstance(source, int):
        return None
    src = find(source)
    if src is None:
        return None
    return src, (find(target) if target is not None and not isinstance(target, int) else None)


def _plain_lines(path) -> list[tuple[int, str]]:
    lines = _read_lines(path)
    if lines and lines[-1] == "":
        lines.pop()  # the file's final newline (a blank line before it is an empty item, reported)
    return [(i + 1, ln) for i, ln in enumerate(lines)]


def read_pairs(path: str | Path, *, source: Column = None, target: Column = None, header: bool | None = None,
               labelled: bool = True) -> list[Pair]:
    """Read prompt/response pairs for generation fine-tuning.

    Layouts:
        table       .tsv / .txt / .csv (columns by 0-based index or header name; default 0 and 1) or
                    .jsonl (keys; default "prompt" and "response"); .gz allowed.
        two files   PATH.SOURCE[.gz] and PATH.TARGET[.gz], line-aligned (`source`/`target` are the
                    suffixes, e.g. PATH=multi30k/train, source=en, target=de): line i of one pairs with
                    line i of the other.
        plain text  unlabelled only: any other file is one prompt per line.

    Args:
        path: the file, or the common prefix of two line-aligned files.
        source, target: the prompt and response columns/keys, or the two files' suffixes.
        header: tables: whether the first row names the columns (None: detect).
        labelled: False reads prompts only (prediction input; a response column, if any, is ignored).
    Raises: DataError (missing file, an empty prompt or response naming FILE:LINE, two files with
        different line counts, a labelled plain-text file, an empty split).
    """
    p = Path(path)
    if not p.is_file():
        files = _pair_files(p, source, target)
        if files is None:
            extra = f" (nor {p}.{source}[.gz])" if isinstance(source, str) else ""
            raise DataError(f"{path}: file not found{extra}")
        src, tgt = files
        if labelled and tgt is None:
            raise DataError(f"{path}.{target}[.gz]: file not found (the responses, line-aligned with {src})")
        prompts = _plain_lines(src)
        if not labelled:
            out = [Pair(text, None, f"{src}:{n}") for n, text in prompts]
        else:
            responses = _plain_lines(tgt)
            if len(prompts) != len(responses):
                raise DataError(f"{src} has {len(prompts)} lines but {tgt} has {len(responses)}: line-aligned "
                                "files must have the same number of lines")
            out = [Pair(a, b, f"{src}:{n}") for (n, a), (_, b) in zip(prompts, responses)]
            for (n, a), (_, b) in zip(prompts, responses):
                if not b.strip():
                    raise DataError(f"{tgt}:{n}: empty response")
        for pair in out:
            if not pair.prompt.strip():
                raise DataError(f"{pair.where}: empty prompt")
        if not out:
            raise DataError(f"{src}: no examples (empty split)")
        return [Pair(x.prompt.strip(), x.response.strip() if x.response is not None else None, x.where) for x in out]
    kind = _stem_suffix(p)
    if kind not in _TABLES:
        if labelled:
            raise DataError(f"{path}: a plain text file holds prompts only; give a .tsv/.csv/.jsonl of pairs, "
                            "or two line-aligned files PREFIX.SRC / PREFIX.TGT with data.source/data.target")
        out = [Pair(text.strip(), None, f"{path}:{n}") for n, text in _plain_lines(p)]
        for pair in out:
            if not pair.prompt:
                raise DataError(f"{pair.where}: empty prompt")
        if not out:
            raise DataError(f"{path}: no examples (empty split)")
        return out
    json_rows = kind in ("jsonl", "json")
    src = source if source is not None else ("prompt" if json_rows else 0)
    tgt = target if target is not None else ("response" if json_rows else 1)
    try:
        rows = read_table(p, text=src, text_pair=tgt if labelled else None, label=None, header=header)
    except DataError as e:  # say prompt/response, not the classification reader's text/text_pair
        msg = str(e).replace("empty text in column " + repr(_as_column(tgt)), "empty response in column "
                             + repr(_as_column(tgt))).replace("empty text", "empty prompt")
        msg = msg.replace(" for text_pair", " for data.target (the response)").replace(" for text", " for data.source (the prompt)")
        raise DataError(msg) from None
    return [Pair(r.text, r.text_pair, r.where) for r in rows]

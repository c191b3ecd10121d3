"""Tokenizers in and out of Hugging Face `transformers` directories, without `transformers`.

Reading, first match wins:
  tokenizer.json            the serialized fast tokenizer, as is (its baked-in padding and truncation
                            are switched off: lmforge pads and truncates per batch).
  vocab.txt                 BERT's WordPiece, built the way transformers' BertTokenizer builds it:
                            BertNormalizer (do_lower_case / strip_accents / tokenize_chinese_chars from
                            tokenizer_config.json), BertPreTokenizer, WordPiece with "##", and the
                            "[CLS] A [SEP] (B [SEP])" template.
  vocab.json + merges.txt   GPT-2's byte-level BPE.

Writing: tokenizer.json, tokenizer_config.json (the class transformers should use and its special
tokens), special_tokens_map.json, and vocab.txt (WordPiece) or vocab.json + merges.txt (BPE) for
tools that read the slow files.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from lmforge.errors import CheckpointError
from lmforge.storage import atomic_write_json, atomic_write_text, read_json
from lmforge.text.tokenizer import Tokenizer

BERT_TOKENS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
               "mask_token": "[MASK]"}
GPT2_TOKEN = "<|endoftext|>"


def has_tokenizer(directory: Path) -> bool:
    d = Path(directory)
    return (d / "tokenizer.json").is_file() or (d / "vocab.txt").is_file() or (
        (d / "vocab.json").is_file() and (d / "merges.txt").is_file())


def _token(value: Any, default: str) -> str:
    """A special token from tokenizer_config.json: a string or an AddedToken dict ({"content": ...})."""
    if isinstance(value, dict):
        return str(value.get("content", default))
    return default if value is None else str(value)


def load_hf_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer of a transformers directory (see the module docstring for the files read)."""
    d = Path(directory)
    tok_cfg = read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() else {}
    if (d / "tokenizer.json").is_file():
        try:
            backend = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
        except Exception as e:  # the Rust side raises bare Exceptions
            raise CheckpointError(f"{d / 'tokenizer.json'}: not a readable tokenizer.json ({str(e).splitlines()[0]})") from None
        backend.no_padding()
        backend.no_truncation()
    elif (d / "vocab.txt").is_file():
        backend = _bert_wordpiece(d / "vocab.txt", tok_cfg)
    elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        backend = _gpt2_bpe(d / "vocab.json", d / "merges.txt", tok_cfg)
    else:
        raise CheckpointError(f"{d}: no tokenizer files (tokenizer.json, vocab.txt, or vocab.json + merges.txt)")
    try:
        return Tokenizer.from_backend(backend)
    except Exception as e:
        raise CheckpointError(f"{d}: unsupported tokenizer ({e})") from None


def _bert_wordpiece(vocab_file: Path, tok_cfg: dict[str, Any]) -> tokenizers.Tokenizer:
    lines = vocab_file.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    vocab: dict[str, int] = {}
    for i, token in enumerate(lines):
        vocab.setdefault(token.rstrip("\r"), i)  # the first occurrence wins, as in transformers' load_vocab
    specials = {k: _token(tok_cfg.get(k), v) for k, v in BERT_TOKENS.items()}
    backend = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token=specials["unk_token"],
                                                    continuing_subword_prefix="##", max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=tok_cfg.get("tokenize_chinese_chars", True),
        strip_accents=tok_cfg.get("strip_accents"), lowercase=tok_cfg.get("do_lower_case", True))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.add_special_tokens([t for t in specials.values() if t in vocab])
    cls, sep = specials["cls_token"], specials["sep_token"]
    if cls in vocab and sep in vocab:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
            special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
    return backend


def _gpt2_bpe(vocab_file: Path, merges_file: Path, tok_cfg: dict[str, Any]) -> tokenizers.Tokenizer:
    vocab = read_json(vocab_file)
    merges = []
    for line in merges_file.read_text(encoding="utf-8").split("\n"):
        if line.startswith("#version") or not line.strip():
            continue
        a, _, b = line.partition(" ")
        merges.append((a, b))
    backend = tokenizers.Tokenizer(models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="",
                                              fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(tok_cfg.get("add_prefix_space", False)))
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    names = {_token(tok_cfg.get(k), GPT2_TOKEN) for k in ("bos_token", "eos_token", "unk_token")}
    backend.add_special_tokens([t for t in sorted(names) if t in vocab])
    return backend


# ---- writing ------------------------------------------------------------------------------------------
def save_hf_tokenizer(tokenizer: Tokenizer, out: str | Path, *, model_max_length: int | None = None) -> list[str]:
    """Write the tokenizer files of a transformers directory into `out`; returns the file names."""
    out = Path(out)
    spec = json.loads(tokenizer.backend.to_str())
    model, normalizer, pre = spec.get("model") or {}, spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}
    present = lambda t: tokenizer.token_to_id(t) is not None  # noqa: E731
    files = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]

    if model.get("type") == "WordPiece" and normalizer.get("type") == "BertNormalizer" \
            and pre.get("type") == "BertPreTokenizer":
        # BertTokenizer (transformers 5) rebuilds its pipeline from vocab + these flags, so they must be exact.
        specials = {k: v for k, v in BERT_TOKENS.items() if present(v)}
        cfg = {"tokenizer_class": "BertTokenizer", "do_lower_case": bool(normalizer.get("lowercase", True)),
               "strip_accents": normalizer.get("strip_accents"),
               "tokenize_chinese_chars": bool(normalizer.get("handle_chinese_chars", True)),
               "do_basic_tokenize": True, "never_split": None, **specials}
        vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
        if [i for _, i in vocab] != list(range(len(vocab))):
            raise CheckpointError("the WordPiece vocabulary has gaps in its ids; it cannot be written as vocab.txt")
        atomic_write_text(out / "vocab.txt", "".join(f"{t}\n" for t, _ in vocab))
        files.append("vocab.txt")
    elif model.get("type") == "BPE" and pre.get("type") == "ByteLevel" and present(GPT2_TOKEN):
        specials = {"bos_token": GPT2_TOKEN, "eos_token": GPT2_TOKEN, "unk_token": GPT2_TOKEN}
        cfg = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": bool(pre.get("add_prefix_space", False)),
               "errors": "replace", **specials}
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        atomic_write_json(out / "vocab.json", model["vocab"])
        atomic_write_text(out / "merges.txt", "#version: 0.2\n" + "".join(f"{m}\n" for m in merges))
        files += ["vocab.json", "merges.txt"]
    else:  # anything else: the generic fast tokenizer, which uses tokenizer.json as it is
        roles = {"pad_token": tokenizer.pad_id, "unk_token": tokenizer.unk_id, "bos_token": tokenizer.bos_id,
                 "eos_token": tokenizer.eos_id, "cls_token": tokenizer.cls_id, "sep_token": tokenizer.sep_id,
                 "mask_token": tokenizer.mask_id}
        specials = {k: tokenizer.id_to_token(i) for k, i in roles.items() if i is not None}
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **specials}
    cfg["model_max_length"] = model_max_length if model_max_length else int(1e30)
    cfg["clean_up_tokenization_spaces"] = False

    backend = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
    backend.no_padding()
    backend.no_truncation()
    atomic_write_text(out / "tokenizer.json", backend.to_str(pretty=True))
    atomic_write_json(out / "tokenizer_config.json", cfg)
    atomic_write_json(out / "special_tokens_map.json", specials)
    return files

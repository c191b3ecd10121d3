from dataclasses import dataclass
from typing import Literal, Optional

import pytest

from lmforge.config import from_dict, load_yaml, save_yaml, to_dict
from lmforge.errors import ConfigError, DataError
from lmforge.train.config import TrainConfig


def test_roundtrip_yaml(tmp_path):
    cfg = TrainConfig(lr=3e-4, max_steps=7, eval_batches=3)
    save_yaml(cfg, tmp_path / "c.yaml")
    again = from_dict(TrainConfig, load_yaml(tmp_path / "c.yaml"))
    assert again == cfg
    assert to_dict(again)["lr"] == 3e-4


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr'.*did you mean 'lr'"):
        from_dict(TrainConfig, {"lrr": 1.0}, "train")


def test_bad_types_name_the_field():
    with pytest.raises(ConfigError, match="train.max_steps: expected an integer"):
        from_dict(TrainConfig, {"max_steps": "many"}, "train")
    with pytest.raises(ConfigError, match="train.max_steps: expected an integer"):
        from_dict(TrainConfig, {"max_steps": 1.5}, "train")
    with pytest.raises(ConfigError, match="schedule"):
        from_dict(TrainConfig, {"schedule": "cosin"}, "train")
    with pytest.raises(ConfigError, match="batch_size must be at least 1"):
        from_dict(TrainConfig, {"batch_size": 0}, "train")


def test_coercion():
    @dataclass
    class C:
        a: Optional[int] = None
        b: bool = False
        c: Literal["x", "y"] = "x"
        d: list[str] = None

    c = from_dict(C, {"a": "3", "b": "true", "c": "y", "d": ["p", "q"]})
    assert (c.a, c.b, c.c, c.d) == (3, True, "y", ["p", "q"])
    assert from_dict(C, {"a": None}).a is None


def test_yaml_errors(tmp_path):
    with pytest.raises(DataError, match="config file not found"):
        load_yaml(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(DataError, match="bad.yaml: not valid YAML"):
        load_yaml(tmp_path / "bad.yaml")

import os

import pytest
import torch

from lmforge.errors import CheckpointError
from lmforge.storage import atomic_dir, atomic_write_text, load_tensors, save_tensors, torch_load, torch_save


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as d:
        (d / "a.txt").write_text("one")
    assert (target / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as d:
            (d / "a.txt").write_text("two")
            raise RuntimeError("crash mid-write")
    assert (target / "a.txt").read_text() == "one"  # the old checkpoint survives a crash
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary left behind


def test_atomic_write_and_tensors(tmp_path):
    atomic_write_text(tmp_path / "x.txt", "héllo")
    assert (tmp_path / "x.txt").read_text(encoding="utf-8") == "héllo"
    w = torch.randn(4, 3)
    save_tensors({"a": w, "tied": w, "b": torch.arange(3)}, tmp_path / "m.safetensors")
    back = load_tensors(tmp_path / "m.safetensors")
    torch.testing.assert_close(back["a"], w)
    torch.testing.assert_close(back["tied"], w)
    (tmp_path / "bad.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_tensors(tmp_path / "bad.safetensors")
    torch_save({"step": 3, "t": w}, tmp_path / "o.pt")
    assert torch_load(tmp_path / "o.pt")["step"] == 3

import json
import os
from pathlib import Path

import pytest
import torch

from lmforge.errors import CheckpointError, DataError
from lmforge.storage import (
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    check_output,
    clean_temporaries,
    load_tensors,
    save_tensors,
    torch_load,
    torch_save,
)


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


# ---- one atomic-write path, permissions, output guards ---------------------------------------------------
def _mode(p):
    return os.stat(p).st_mode & 0o777


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_files_and_folders_honour_the_umask(tmp_path, mask):
    """Atomic files and folders get the permissions `open`/`mkdir` would give under the umask (mkstemp
    and mkdtemp alone make 0600/0700)."""
    old = os.umask(mask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        save_tensors({"w": torch.zeros(2)}, tmp_path / "m.safetensors")
        torch_save({"t": torch.zeros(1)}, tmp_path / "o.pt")
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("y")
        with open(tmp_path / "plain.txt", "w") as f:  # the reference: what open() does
            f.write("z")
        os.mkdir(tmp_path / "plain_dir")
    finally:
        os.umask(old)
    for name in ("a.txt", "m.safetensors", "o.pt"):
        assert _mode(tmp_path / name) == _mode(tmp_path / "plain.txt") == 0o666 & ~mask, name
    assert _mode(tmp_path / "d") == _mode(tmp_path / "plain_dir") == 0o777 & ~mask


def test_atomic_file_is_the_one_writer(tmp_path, monkeypatch):
    """atomic_write_bytes, save_tensors and torch_save all go through atomic_file: a failure inside
    any of them leaves the old file and no temporary."""
    import lmforge.storage as storage

    calls = []
    real = storage.atomic_file

    def spy(path):
        calls.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(storage, "atomic_file", spy)
    storage.atomic_write_bytes(tmp_path / "a.bin", b"1")
    storage.save_tensors({"w": torch.ones(1)}, tmp_path / "m.safetensors")
    storage.torch_save({"w": torch.ones(1)}, tmp_path / "o.pt")
    assert calls == ["a.bin", "m.safetensors", "o.pt"]
    with pytest.raises((TypeError, AttributeError)):
        storage.torch_save({"w": lambda: 0}, tmp_path / "o.pt")  # unpicklable: fails mid-write
    assert torch_load(tmp_path / "o.pt")["w"].item() == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "m.safetensors", "o.pt"]


def test_never_a_folder_for_a_file_nor_a_file_for_a_folder(tmp_path):
    (tmp_path / "f.txt").write_text("precious")
    with pytest.raises(DataError, match=r"f\.txt: exists and is a file; refusing to replace a file with a folder"):
        with atomic_dir(tmp_path / "f.txt"):
            pass
    assert (tmp_path / "f.txt").read_text() == "precious"
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataError, match=r"dir: is a folder; expected a file name"):
        atomic_write_text(tmp_path / "dir", "x")
    with pytest.raises(DataError, match=r"a part of the path is a file"):
        atomic_write_text(tmp_path / "f.txt" / "inner.txt", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "f.txt"]


def test_check_output_rules(tmp_path):
    file, empty, full, mine = tmp_path / "f.txt", tmp_path / "empty", tmp_path / "full", tmp_path / "mine"
    file.write_text("x")
    empty.mkdir()
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    mine.mkdir()
    (mine / "index.json").write_text("{}")
    assert check_output(tmp_path / "new", overwrite=False) == tmp_path / "new"
    assert check_output(empty, overwrite=False, kind="dir") == empty
    with pytest.raises(DataError, match=r"f\.txt: exists; pass --overwrite to replace it"):
        check_output(file, overwrite=False)
    assert check_output(file, overwrite=True) == file
    with pytest.raises(DataError, match=r"f\.txt: exists and is a file; the output is a folder"):
        check_output(file, overwrite=True, kind="dir")
    with pytest.raises(DataError, match=r"empty: is a folder; the output is a file"):
        check_output(empty, overwrite=True)
    with pytest.raises(DataError, match=r"full: exists and is not empty; pass --overwrite"):
        check_output(full, overwrite=False, kind="dir", replaceable=["index.json"])
    with pytest.raises(DataError, match=r"full: exists and does not look like this verb's output \(no index\.json\); "
                                        r"refusing to replace it even with --overwrite"):
        check_output(full, overwrite=True, kind="dir", replaceable=["index.json"])
    assert check_output(mine, overwrite=True, kind="dir", replaceable=["index.json"]) == mine
    assert (full / "notes.txt").read_text() == "mine" and file.read_text() == "x"


def test_clean_temporaries_removes_leftovers_and_restores_a_renamed_folder(tmp_path):
    (tmp_path / ".step-4.abc123.tmp").mkdir()
    (tmp_path / ".step-4.abc123.tmp" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".x.json.k2j3.tmp").write_text("half")
    (tmp_path / ".step-8.old").mkdir()  # killed between the two renames of a replacement: step-8 is gone
    (tmp_path / ".step-8.old" / "a").write_text("old but whole")
    (tmp_path / "step-2").mkdir()
    (tmp_path / ".step-2.old").mkdir()  # killed after the new step-2 was in place
    done = clean_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2", "step-8"]
    assert (tmp_path / "step-8" / "a").read_text() == "old but whole"
    assert len(done) == 4
    assert clean_temporaries(tmp_path / "missing") == []


def test_non_finite_json_is_null(tmp_path):
    atomic_write_json(tmp_path / "r.json", {"loss": float("nan"), "x": [float("inf"), 1.5], "n": 2})
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"loss": None, "x": [None, 1.5], "n": 2}


def test_corrupt_tensor_file_is_a_clear_error(tmp_path):
    (tmp_path / "o.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match=r"o\.pt: not a readable tensor file"):
        torch_load(tmp_path / "o.pt")

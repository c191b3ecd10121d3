"""Atomic file writes, output guards and tensor files.

Every output goes to a temporary sibling first and is renamed into place (`atomic_file` for one
file, `atomic_dir` for a folder), so a crash never leaves a half-written file or checkpoint. Files
and folders are created with the permissions the umask allows, as `open` would. `check_output` is the
one rule for verbs that write: an existing output is refused unless the user asked to overwrite it,
and a file is never replaced by a folder (or a folder by a file).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Literal

if TYPE_CHECKING:
    import torch

from lmforge.errors import CheckpointError, DataError


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: set and restore (briefly process-wide)
    os.umask(mask)
    return mask


def _make_parent(path: Path) -> None:
    """Create `path`'s folder; a path component that is a file, or no permission, is a DataError."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise DataError(f"{path}: cannot create its folder {path.parent} (a part of the path is a file)") from None
    except PermissionError:
        raise DataError(f"{path}: no permission to create the folder {path.parent}") from None


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; whatever the body writes there replaces `path` when the
    body succeeds (flushed to disk, then one atomic rename). On error the temporary file is removed and
    `path` is untouched. The one place where files are written atomically.

    Args:
        path: the file to write. An existing folder there is a DataError (a folder is never replaced
            by a file).
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; expected a file name")
    _make_parent(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except PermissionError:
        raise DataError(f"{path}: no permission to write in {path.parent}") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 (and a writer may re-create the file)
        _fsync(tmp)
        os.replace(tmp, path)
        with contextlib.suppress(OSError):
            _fsync(path.parent)  # the rename itself
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (see `atomic_file`)."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(obj: Any) -> Any:
    """`obj` with every non-finite float (NaN, inf) replaced by None, so that it is valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write `obj` as valid JSON (non-finite numbers become null), atomically."""
    return atomic_write_text(path, json.dumps(json_safe(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def _old_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `path` (an old `path` is removed only
    after the new one is complete; every file in it is flushed to disk first), on error it is deleted
    and `path` is untouched. An existing *file* at `path` is a DataError: a file is never replaced by
    a folder. Callers decide whether an existing folder may be replaced (see `check_output`)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DataError(f"{path}: exists and is a file; refusing to replace a file with a folder")
    _make_parent(path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except PermissionError:
        raise DataError(f"{path}: no permission to write in {path.parent}") from None
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        _fsync(tmp)
        if path.exists():
            old = _old_name(path)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)  # a crash from here to the rmtree leaves .NAME.old: see recover_dir
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        with contextlib.suppress(OSError):
            _fsync(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clean_temporaries(folder: str | Path) -> list[str]:
    """Remove what interrupted `atomic_file`/`atomic_dir` calls left in `folder` (`.NAME.*.tmp`), and
    put back an old folder that a crash left renamed aside (`.NAME.old` with no NAME) or delete it when
    NAME is there. Only for folders that no other process is writing to. Returns what it did."""
    folder = Path(folder)
    done: list[str] = []
    if not folder.is_dir():
        return done
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if name.startswith(".") and name.endswith(".tmp"):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            done.append(f"removed {entry}")
        elif name.startswith(".") and name.endswith(".old") and entry.is_dir():
            target = folder / name[1:-4]
            if target.exists():
                shutil.rmtree(entry, ignore_errors=True)
                done.append(f"removed {entry}")
            else:
                os.replace(entry, target)
                done.append(f"restored {target}")
    return done


def check_output(path: str | Path, *, overwrite: bool, kind: Literal["file", "dir"] = "file",
                 replaceable: Iterable[str] = (), flag: str = "--overwrite") -> Path:
    """Refuse to destroy what is at an output path. Call it before any long work.

    An existing file, or a non-empty folder, is refused unless `overwrite`; a file is never replaced
    by a folder nor a folder by a file. With `overwrite`, a non-empty folder is replaced only when it
    holds one of `replaceable` (the files this verb itself writes, e.g. `index.json`): an unrelated
    folder (`--out .`, a home directory) is never deleted.

    Args:
        path: the output file or folder.
        overwrite: the user asked to replace an existing output.
        kind: 'file' or 'dir': what the verb writes at `path`.
        replaceable: for kind 'dir', names of which one must be present for a folder to be replaced.
        flag: the option that allows overwriting, as the user spells it.

    Returns:
        `path` as a Path.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return path
    if kind == "dir":
        if not path.is_dir():
            raise DataError(f"{path}: exists and is a file; the output is a folder and will not replace a file "
                            f"(choose another path)")
        if not any(path.iterdir()):
            return path
        markers = list(replaceable)
        if overwrite and (not markers or any((path / m).exists() for m in markers)):
            return path
        if overwrite:
            raise DataError(f"{path}: exists and does not look like this verb's output (no {' or '.join(markers)}); "
                            f"refusing to replace it even with {flag} (choose another path)")
        raise DataError(f"{path}: exists and is not empty; pass {flag} to replace it, or choose another path")
    if path.is_dir():
        raise DataError(f"{path}: is a folder; the output is a file (give a file name)")
    if not overwrite:
        raise DataError(f"{path}: exists; pass {flag} to replace it, or choose another path")
    return path


def read_json(path: str | Path) -> Any:
    """Read a JSON file; a missing or malformed file is a `DataError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Save tensors as safetensors, atomically. Shared storage (tied weights) is saved once per name
    by cloning, since safetensors refuses aliased tensors."""
    from safetensors.torch import save_file

    path = Path(path)
    seen: dict[int, str] = {}
    clean = {}
    for name, t in tensors.items():
        t = t.detach()
        key = t.untyped_storage().data_ptr() if t.numel() else id(t)
        clean[name] = t.clone().contiguous() if key in seen else t.contiguous()
        seen[key] = name
    with atomic_file(path) as tmp:
        save_file({k: v.cpu() for k, v in clean.items()}, str(tmp), metadata=metadata)
    return path


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file (never pickle)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def torch_save(obj: Any, path: str | Path) -> Path:
    """torch.save, atomically (for optimizer state: tensors and plain containers only)."""
    import torch

    path = Path(path)
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)
    return path


def torch_load(path: str | Path) -> Any:
    """torch.load with weights_only=True: tensors and plain containers, never arbitrary pickle."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: zip, unpickling and weights_only errors
        raise CheckpointError(f"{path}: not a readable tensor file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None

"""File plumbing shared by the adapter and Hugging Face writers/readers.

* `atomic_directory`: build a directory under a temporary name beside the target and rename it
  into place, so a failed save leaves nothing (and an existing directory is replaced only when
  asked).
* `contained`: join a file name from a file's contents onto a directory, refusing anything that
  would land outside it.
* `read_safetensors` / `write_safetensors`: NumPy arrays in and out of safetensors files, with
  read errors turned into a ``ValueError`` that names the file.

No pickle is ever involved: safetensors, JSON and msgpack only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator, Mapping, Optional

import numpy as np

__all__ = ["atomic_directory", "contained", "read_safetensors", "write_safetensors", "read_json", "write_json",
           "to_numpy"]


def _check_target(path: str, overwrite: bool, what: str) -> None:
    if os.path.lexists(path):
        if not os.path.isdir(path) or os.path.islink(path):
            raise ValueError(f"{what}: {path!r} exists and is not a directory; choose another path")
        entries = os.listdir(path)
        if entries and not overwrite:
            raise ValueError(f"{what}: {path!r} is not empty ({len(entries)} entries, e.g. {sorted(entries)[:3]}); "
                             "pass overwrite=True to replace it")


@contextlib.contextmanager
def atomic_directory(path, *, overwrite: bool = False, what: str = "save") -> Iterator[str]:
    """Yield a fresh temporary directory that replaces ``path`` when the block succeeds.

    The temporary directory is created next to ``path`` (same file system, so the final rename is
    atomic). If the block raises, it is removed and ``path`` is untouched. An existing non-empty
    ``path`` is refused unless ``overwrite`` is True; then the old directory is moved aside, the
    new one renamed in, and the old one deleted.

    Example:
      >>> import os, tempfile
      >>> d = os.path.join(tempfile.mkdtemp(), "out")
      >>> with atomic_directory(d) as tmp:
      ...     open(os.path.join(tmp, "x.txt"), "w").write("hi")
      2
      >>> os.listdir(d)
      ['x.txt']
    """
    path = os.path.abspath(os.fspath(path))
    _check_target(path, overwrite, what)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    # mkdtemp makes the directory private (0o700); recreate it so it gets the usual umask-based mode
    os.rmdir(tmp)
    os.mkdir(tmp)
    try:
        yield tmp
        _check_target(path, overwrite, what)  # the target may have appeared while we were writing
        if os.path.lexists(path) and os.listdir(path):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.rmdir(old)
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            if os.path.lexists(path):
                os.rmdir(path)  # empty directory: replace it
            os.rename(tmp, path)
    finally:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def contained(root, name: str, *, what: str = "file name") -> str:
    """``root/name``, refusing absolute names and names that resolve outside ``root``.

    Raises:
      ValueError: naming ``name`` and ``root`` when the file would lie outside ``root``.
    """
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ValueError(f"{what} {name!r}: expected a non-empty relative file name")
    root = os.path.realpath(os.fspath(root))
    if os.path.isabs(name):
        raise ValueError(f"{what} {name!r} is an absolute path; only names inside {root!r} are allowed")
    full = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, full]) != root:
        raise ValueError(f"{what} {name!r} resolves to {full!r}, outside {root!r}; refusing to read or write it")
    return full


def to_numpy(x) -> np.ndarray:
    """A host NumPy copy of an array (JAX, NumPy; bfloat16 kept through ml_dtypes)."""
    return np.asarray(x)


def read_safetensors(file: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors of a safetensors file as NumPy arrays, and its string metadata.

    Raises:
      FileNotFoundError: when the file does not exist.
      ValueError: when it is not a complete, well-formed safetensors file (truncated, bad
        header, ...); the message names the file and the reader's complaint.
    """
    from safetensors import safe_open

    if not os.path.isfile(file):
        raise FileNotFoundError(f"no safetensors file at {file!r}")
    try:
        out = {}
        with safe_open(file, framework="numpy") as f:
            meta = dict(f.metadata() or {})
            for k in f.keys():
                out[k] = f.get_tensor(k)
    except Exception as e:  # safetensors raises its own error types (SafetensorError, OSError...)
        raise ValueError(f"{file!r} is not a readable safetensors file: {type(e).__name__}: {e}") from None
    return out, meta


def write_safetensors(file: str, tensors: Mapping[str, Any], metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write NumPy/JAX arrays to a safetensors file (made C-contiguous, dtypes kept)."""
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(to_numpy(v)) for k, v in tensors.items()}
    save_file(arrays, file, metadata=None if metadata is None else {str(k): str(v) for k, v in metadata.items()})


def read_json(file: str, *, what: str = "JSON file") -> Any:
    """Parse a JSON file; a missing or malformed file raises an error naming it."""
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no {what} at {file!r}")
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file!r} is not valid JSON ({what}): {e}") from None


def write_json(file: str, obj: Any) -> None:
    with open(file, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")

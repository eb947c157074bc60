"""Writes that appear complete or not at all: a directory or a text file is written beside its
final name and renamed into place.

A process killed mid-write leaves only a hidden ``.<name>.tmp-XXXX`` (or ``.<name>.old-XXXX``)
entry beside the target; `remove_leftovers` deletes those when a run is resumed.

Example:
  >>> import os, tempfile
  >>> d = os.path.join(tempfile.mkdtemp(), "out")
  >>> with atomic_dir(d) as tmp:
  ...     _ = open(os.path.join(tmp, "x.txt"), "w").write("hi")
  >>> os.listdir(d)
  ['x.txt']
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile

__all__ = ["atomic_dir", "atomic_write_text", "leftovers", "remove_leftovers"]

# the names `atomic_dir`, `atomic_write_text` and lora_jax.io's atomic_directory write under
_LEFTOVER = re.compile(r"^\.[^/]+\.(tmp|old)-[A-Za-z0-9_]+(\.png)?$")


@contextlib.contextmanager
def atomic_dir(path: str):
    """Yield a temporary directory beside ``path``; on success it replaces ``path``.

    On an exception the temporary directory is removed and ``path`` is left as it was.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".tmp-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".old-", dir=parent)
        os.rmdir(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".tmp-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def leftovers(directory: str) -> list[str]:
    """Names of the temporary entries a killed atomic write left in ``directory`` (sorted)."""
    if not os.path.isdir(directory):
        return []
    return sorted(n for n in os.listdir(directory) if _LEFTOVER.match(n))


def remove_leftovers(directory: str) -> list[str]:
    """Delete what `leftovers` lists (the targets themselves are never touched); returns the names."""
    names = leftovers(directory)
    for n in names:
        p = os.path.join(directory, n)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                os.remove(p)
            except FileNotFoundError:
                pass
    return names

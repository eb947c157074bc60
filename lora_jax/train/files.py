"""Writes that appear complete or not at all: a directory or a text file is written beside its
final name and renamed into place.

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
import shutil
import tempfile

__all__ = ["atomic_dir", "atomic_write_text"]


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

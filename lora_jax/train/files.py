"""Writes that appear complete or not at all: a text file is written beside its final name and
renamed into place (directories: `lora_jax.io._files.atomic_directory`, the one helper for them).

A process killed mid-write leaves only a hidden ``.<name>.tmp-XXXX`` (or ``.<name>.old-XXXX``)
entry beside the target; `remove_leftovers` deletes those when a run is resumed.

Example:
  >>> import os, tempfile
  >>> p = os.path.join(tempfile.mkdtemp(), "x.txt")
  >>> atomic_write_text(p, "hi")
  >>> open(p).read()
  'hi'
"""

from __future__ import annotations

import os
import re
import tempfile

from ..io._files import _remove_entry, usual_mode

__all__ = ["atomic_write_text", "leftovers", "remove_leftovers", "usual_mode"]

# the names `atomic_write_text` and lora_jax.io's atomic_directory write under
_LEFTOVER = re.compile(r"^\.[^/]+\.(tmp|old)-[A-Za-z0-9_]+(\.png)?$")


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory (the file gets
    the usual mode: 0666 less the umask)."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".tmp-", dir=os.path.dirname(path))
    try:
        usual_mode(fd)
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
        _remove_entry(os.path.join(directory, n))
    return names

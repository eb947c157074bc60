"""Data file formats: one `Reader` per format, in a registry the config's ``data.format`` choices
come from. A new format is one reader.

A reader streams ``(where, payload)`` pairs from one file: ``where`` names the record in errors
(``file:line`` or ``file row N``), ``payload`` is a raw JSON line (parsed where it is encoded, so
the parsing runs on every core), a row mapping, or a ready `records` record (text paragraphs).
`records.parse` turns the first two into records.

Formats: ``text`` (``.txt``/``.md``/``.text``: each blank-line-separated paragraph a document; in
a directory each such file is one document), ``jsonl`` (``.jsonl``/``.json``: one JSON object per
line), ``parquet`` (``.parquet``), ``arrow`` (``.arrow``/``.feather``/``.ipc``, Arrow IPC file or
stream). A directory is read file by file in name order; a Hugging Face ``datasets`` directory
(``save_to_disk``: ``state.json`` naming its Arrow files) is read as its files.

Example:
  >>> import os, tempfile
  >>> p = os.path.join(tempfile.mkdtemp(), "a.txt")
  >>> _ = open(p, "w").write("one\\n\\ntwo")
  >>> [(w.split(os.sep)[-1], r.text) for w, r in read(p)]
  [('a.txt:1', 'one'), ('a.txt:3', 'two')]
"""

from __future__ import annotations

import dataclasses
import os
import stat
from typing import Callable, Iterator, Optional

from . import records as _rec

__all__ = ["Reader", "READERS", "FORMATS", "files", "read", "reader_for"]

ROW_BATCH = 1024  # rows per Arrow record batch read


def _decode(raw: bytes, path: str, line: int, at: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {at + e.start}: "
                         f"{e.reason}); save the file as UTF-8") from None


def _text_lines(path: str) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` with ``\\r\\n`` and ``\\r`` read as ``\\n``, streaming."""
    at = 0
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            yield n, _decode(raw, path, n, at).replace("\r\n", "\n").replace("\r", "\n")
            at += len(raw)


def _paragraphs(path: str, whole: bool) -> Iterator[tuple[str, object]]:
    if whole:  # a text file in a directory: one document
        text = "".join(line for _, line in _text_lines(path)).strip()
        if text:
            yield f"{path}:1", _rec.Text(text)
        return
    buf, start = [], None
    for n, line in _text_lines(path):
        if line.strip():
            if start is None:
                start = n
            buf.append(line)
        elif buf:
            yield f"{path}:{start}", _rec.Text("".join(buf).strip())
            buf, start = [], None
    if buf:
        yield f"{path}:{start}", _rec.Text("".join(buf).strip())


def _jsonl(path: str, whole: bool) -> Iterator[tuple[str, object]]:
    for n, line in _text_lines(path):
        if line.strip():
            yield f"{path}:{n}", line.rstrip("\n")


def _arrow_batches(path: str):
    import pyarrow as pa

    try:
        reader = pa.ipc.open_file(path)
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
        return
    except pa.ArrowInvalid:
        pass
    with pa.ipc.open_stream(path) as reader:  # datasets' save_to_disk writes the stream format
        yield from reader


def _parquet_batches(path: str):
    import pyarrow.parquet as pq

    yield from pq.ParquetFile(path).iter_batches(batch_size=ROW_BATCH)


def _rows(batches: Callable) -> Callable:
    def read(path: str, whole: bool) -> Iterator[tuple[str, object]]:
        import pyarrow as pa

        n = 0
        try:
            for b in batches(path):
                for row in b.to_pylist():
                    yield f"{path} row {n}", row
                    n += 1
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{path}: not a readable {'Parquet' if path.endswith('.parquet') else 'Arrow'} file "
                             f"({type(e).__name__}: {e})") from None
    return read


@dataclasses.dataclass(frozen=True)
class Reader:
    """A file format: its name (a ``data.format`` choice), the file name endings it claims and
    ``read(path, whole) -> iter((where, payload))`` (``whole``: the file is one of a directory's)."""

    name: str
    exts: tuple
    read: Callable


READERS: tuple = (
    Reader("text", (".txt", ".md", ".text"), _paragraphs),
    Reader("jsonl", (".jsonl", ".json"), _jsonl),
    Reader("parquet", (".parquet",), _rows(_parquet_batches)),
    Reader("arrow", (".arrow", ".feather", ".ipc"), _rows(_arrow_batches)),
)
FORMATS = ("auto",) + tuple(r.name for r in READERS)
_BY_NAME = {r.name: r for r in READERS}
_EXTS = tuple(e for r in READERS for e in r.exts)


def reader_for(path: str, fmt: str = "auto") -> Reader:
    """The reader of one file: by ``fmt``, or with ``"auto"`` by its ending (text otherwise)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt != "auto":
        return _BY_NAME[fmt]
    low = path.lower()
    return next((r for r in READERS if low.endswith(r.exts)), _BY_NAME["text"])


def _datasets_dir(path: str) -> Optional[list[str]]:
    """The Arrow files of a ``datasets`` ``save_to_disk`` directory, or None when it is not one."""
    from ..io._files import contained, read_json

    state = os.path.join(path, "state.json")
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        splits = read_json(os.path.join(path, "dataset_dict.json"), what="datasets DatasetDict")
        splits = splits.get("splits", []) if isinstance(splits, dict) else []
        splits = [str(x) for x in splits] if isinstance(splits, list) else []
        raise ValueError(f"{path}: a datasets DatasetDict with splits {splits}; point at one split's directory, e.g. "
                         f"{os.path.join(path, splits[0] if splits else 'train')}")
    if not os.path.isfile(state):
        return None
    info = read_json(state, what="datasets state.json")
    try:
        names = [f["filename"] for f in info["_data_files"]]
        if not all(isinstance(n, str) for n in names):
            raise TypeError("a filename is not a string")
    except (KeyError, TypeError) as e:
        raise ValueError(f"{state}: not a datasets state.json ({type(e).__name__}: {e})") from None
    return [contained(path, n, what="data file name") for n in names]


def _regular(path: str) -> str:
    """``path`` when it is (or links to) a regular file; otherwise an error naming what it is (a
    FIFO would block the read forever, a device such as /dev/zero never ends)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            raise FileNotFoundError(f"data file {path!r} is a link to {os.readlink(path)!r}, which does not exist") from None
        raise FileNotFoundError(f"data file not found: {path!r}") from None
    if stat.S_ISREG(mode):
        return path
    kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "not a regular file")
    raise ValueError(f"data file {path!r} is {kind}{' (through a link)' if os.path.islink(path) else ''}; "
                     "expected a regular file")


def files(paths, fmt: str = "auto") -> list[tuple[str, Reader, bool]]:
    """``(file, reader, whole)`` for every file ``paths`` name, directories expanded in name order.

    Raises:
      FileNotFoundError: a path that does not exist (or a link to nothing).
      ValueError: a directory with no data file, an entry that is not a regular file (a FIFO, a
        device, a directory named like a data file), or an unknown ``fmt``.
    """
    out = []
    for p in [paths] if isinstance(paths, (str, os.PathLike)) else list(paths):
        p = os.fspath(p)
        if os.path.isdir(p):
            arrow = _datasets_dir(p)
            if arrow is not None:
                out += [(_regular(f), _BY_NAME["arrow"], False) for f in arrow]
                continue
            names = sorted(n for n in os.listdir(p) if n.lower().endswith(_EXTS) and not n.startswith("."))
            if not names:
                raise ValueError(f"{p}: directory holds no {'/'.join(_EXTS)} files")
            for n in names:
                r = reader_for(n)
                out.append((_regular(os.path.join(p, n)), r, r.name == "text"))
        else:
            out.append((_regular(p), reader_for(p, fmt), False))
    return out


def read(paths, fmt: str = "auto") -> Iterator[tuple[str, object]]:
    """Every ``(where, payload)`` of ``paths`` in order (see the module docstring)."""
    for f, r, whole in files(paths, fmt):
        yield from r.read(f, whole)


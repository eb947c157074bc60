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
import math
import os
import re
import shutil
import signal
import socket
import struct
import tempfile
import threading
import zlib
from typing import Any, Iterator, Mapping, Optional

import ml_dtypes
import numpy as np

__all__ = ["atomic_directory", "InterruptedAfterWrite", "sweep_leftovers", "contained", "local_model_dir", "refuse_overlap", "read_safetensors", "write_safetensors", "read_json",
           "write_json", "to_numpy", "nonfinite", "SAFETENSORS_DTYPES"]


# files by which an earlier export is recognised: an HF checkpoint, a PEFT adapter, a lora_jax
# adapter; overwrite replaces only a directory holding one of them (never a thesis, never photos)
EXPORT_MARKERS = ("config.json", "adapter_config.json", "model.safetensors", "model.safetensors.index.json",
                  "adapter.json")


def _check_target(path: str, overwrite: bool, what: str) -> None:
    if os.path.lexists(path):
        if not os.path.isdir(path) or os.path.islink(path):
            raise ValueError(f"{what}: {path!r} exists and is not a directory; choose another path")
        entries = os.listdir(path)
        if entries and not overwrite:
            raise ValueError(f"{what}: {path!r} is not empty ({len(entries)} entries, e.g. {sorted(entries)[:3]}); "
                             "pass overwrite=True to replace it")
        if entries and not any(m in entries for m in EXPORT_MARKERS):
            raise ValueError(f"{what}: {path!r} holds {len(entries)} entries (e.g. {sorted(entries)[:3]}) but no "
                             f"earlier export (none of {', '.join(EXPORT_MARKERS)}); overwrite replaces only an "
                             "export: remove the directory yourself or choose another output")


class InterruptedAfterWrite(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived while `atomic_directory` put a finished output in place: the swap
    was completed first (the output is whole and kept), then the interrupt is raised as this."""

    def __init__(self, signum: int, path: str):
        super().__init__(f"{signal.Signals(signum).name} after {path!r} was completely written")
        self.signum, self.path = signum, path


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT/SIGTERM until the block ends (main thread only; elsewhere nothing is held; a
    signal the process ignores stays ignored): yields the list the held signals are appended to."""
    held: list = []
    if threading.current_thread() is not threading.main_thread():
        yield held
        return
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield held
    finally:
        for s, p in previous.items():
            signal.signal(s, p)


def _owner_tag() -> str:
    """``p<pid>h<host hash>``: which process on which host made a temporary entry."""
    return f"p{os.getpid()}h{zlib.crc32(socket.gethostname().encode()):08x}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_leftovers(path: str) -> list[str]:
    """Delete the temporary entries earlier writes of the output ``path`` left beside it: those of
    processes of this host that are gone (killed mid-write), and ``.old-`` directories of older
    versions (always finished with). Entries of live processes and of other hosts are kept.
    Returns the names removed."""
    parent, name = os.path.split(os.path.abspath(path))
    here = _owner_tag()[_owner_tag().index("h"):]
    tagged = re.compile(rf"^\.{re.escape(name)}\.(tmp|old)-p(\d+)(h[0-9a-f]{{8}})_")
    legacy = re.compile(rf"^\.{re.escape(name)}\.old-[A-Za-z0-9_]+$")
    gone = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return gone
    for n in entries:
        m = tagged.match(n)
        if (m and m.group(3) == here and not _alive(int(m.group(2)))) or (not m and legacy.match(n)):
            _remove_entry(os.path.join(parent, n))
            gone.append(n)
    return gone


@contextlib.contextmanager
def atomic_directory(path, *, overwrite: bool = False, what: str = "save") -> Iterator[str]:
    """Yield a fresh temporary directory that replaces ``path`` when the block succeeds.

    The temporary directory is created next to ``path`` (same file system, so the final rename is
    atomic), named after this process (``.NAME.tmp-p<pid>h<host>_XXXX``), and what earlier, killed
    writes of the same output left there is swept first (`sweep_leftovers`). If the block raises,
    it is removed and ``path`` is untouched. An existing non-empty ``path`` is refused unless
    ``overwrite`` is True; then the old directory is moved aside, the new one renamed in, and the
    old one deleted. SIGINT/SIGTERM during that swap are held until it is complete, then raised as
    `InterruptedAfterWrite` (the new output is whole and in place).

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
    sweep_leftovers(path)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-{_owner_tag()}_", dir=parent)
    # mkdtemp makes the directory private (0o700); recreate it so it gets the usual umask-based mode
    os.rmdir(tmp)
    os.mkdir(tmp)
    try:
        yield tmp
        _check_target(path, overwrite, what)  # the target may have appeared while we were writing
        with _signals_deferred() as held:
            if os.path.lexists(path) and os.listdir(path):
                old = tempfile.mkdtemp(prefix=f".{name}.old-{_owner_tag()}_", dir=parent)
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
    if held:
        raise InterruptedAfterWrite(held[0], path)


def refuse_overlap(out, inputs: Mapping[str, Any], *, what: str = "save") -> None:
    """Refuse an output directory that is, contains or lies inside one of ``inputs`` (symlinks resolved).

    ``inputs`` maps a description (``"the run directory"``) to a path; ``None`` paths are skipped.
    An export written there would replace or nest inside what it reads from.

    Raises:
      ValueError: naming the output, the input it overlaps and how.

    Example:
      >>> refuse_overlap("/tmp/run/x", {"the run": "/tmp/run"})
      Traceback (most recent call last):
      ...
      ValueError: save: the output '/tmp/run/x' is inside the run '/tmp/run'; choose an output outside it
    """
    o = os.path.realpath(os.fspath(out))
    for desc, path in inputs.items():
        if path is None:
            continue
        p = os.path.realpath(os.fspath(path))
        how = ("is" if o == p else "contains" if os.path.commonpath([o, p]) == o else
               "is inside" if os.path.commonpath([o, p]) == p else None)
        if how:
            raise ValueError(f"{what}: the output {os.fspath(out)!r} {how} {desc} {os.fspath(path)!r}; choose an "
                             f"output {'outside' if how == 'is inside' else 'apart from'} it")


def _hub_blobs(root: str) -> Optional[str]:
    """The blob store a Hugging Face hub cache snapshot (``models--ORG--NAME/snapshots/REV``) links
    its files into (``models--ORG--NAME/blobs``, resolved), or None when ``root`` is not one."""
    snapshots, _ = os.path.split(os.path.abspath(root))
    repo, kind = os.path.split(snapshots)
    if kind != "snapshots" or not os.path.basename(repo).startswith(("models--", "datasets--")):
        return None
    blobs = os.path.join(repo, "blobs")
    return os.path.realpath(blobs) if os.path.isdir(blobs) else None


def contained(root, name: str, *, what: str = "file name") -> str:
    """``root/name`` resolved, refusing names that are not plain relative paths or that resolve
    outside ``root``.

    ``name`` (read from a file: an index's shard name, a config's file name) must be relative and
    free of ``..`` parts, so it means the same before and after links are resolved and cannot climb
    out of wherever it is joined next. Links inside ``root`` may only lead to files inside ``root``,
    or, for a Hugging Face hub cache snapshot (``models--ORG--NAME/snapshots/REV/``), into that
    repository's own ``blobs/`` (how the cache stores every file).

    Raises:
      ValueError: naming ``name`` and ``root`` when the file would lie outside ``root``.

    Example:
      >>> contained("/ckpt", "sub/../../x.safetensors")
      Traceback (most recent call last):
      ...
      ValueError: file name 'sub/../../x.safetensors' has a '..' part; only plain names inside '/ckpt' are allowed
    """
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ValueError(f"{what} {name!r}: expected a non-empty relative file name")
    shown = os.fspath(root)
    if os.path.isabs(name) or name.startswith("~"):
        raise ValueError(f"{what} {name!r} is an absolute path; only names inside {shown!r} are allowed")
    if any(part == ".." for part in re.split(r"[/\\]", name)):
        raise ValueError(f"{what} {name!r} has a '..' part; only plain names inside {shown!r} are allowed")
    real = os.path.realpath(os.fspath(root))
    full = os.path.realpath(os.path.join(real, name))
    allowed = [real] + [b for b in (_hub_blobs(os.fspath(root)),) if b]
    if not any(os.path.commonpath([a, full]) == a for a in allowed):
        raise ValueError(f"{what} {name!r} resolves to {full!r}, outside {shown!r}; refusing to read or write it")
    return full


_HUB_ID = re.compile(r"([A-Za-z0-9][\w.\-]*(?:/[A-Za-z0-9][\w.\-]*)?)(?:@([\w.\-/]+))?")


def hub_id(spec) -> Optional[tuple]:
    """``(repo, revision or None)`` when ``spec`` reads as a Hugging Face hub id (``org/name``, a
    bare ``name``, either with ``@revision``) rather than a path; None otherwise."""
    raw = os.fspath(spec)
    m = _HUB_ID.fullmatch(raw)
    return None if m is None or raw.startswith((".", "/", "~")) else (m.group(1), m.group(2))


def _remove_entry(p: str) -> None:
    """Delete a file, link or directory tree (gone already: nothing to do)."""
    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass


def _hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return True


def local_model_dir(spec, revision: Optional[str] = None, *, what: str = "model",
                    patterns: Optional[list] = None) -> str:
    """The local directory of a model given as a path or a Hugging Face hub id.

    A path (``~`` expanded) that is a directory is returned as is. Otherwise ``spec`` must look
    like a hub id, ``org/name`` (or a bare ``name``) with an optional ``@revision`` (``revision`` overrides the suffix): it
    is looked up in the local hub cache (``HF_HUB_CACHE``; refs such as ``main`` resolved there,
    no network), and only when it is not cached and the hub is online, downloaded
    (``huggingface_hub.snapshot_download``, files matching ``patterns``).

    Raises:
      FileNotFoundError: neither a directory nor a cached (or downloadable) hub id, naming both
        the path tried and the cache.
      ValueError: ``spec`` is a file, not a directory.
    """
    raw = os.fspath(spec)
    path = os.path.expanduser(raw)
    if os.path.isdir(path):
        return path
    where = os.path.abspath(path)
    if os.path.exists(path):
        raise ValueError(f"{what}: {where!r} is a file; pass the checkpoint directory")
    parsed = hub_id(raw)
    if parsed is None:
        raise FileNotFoundError(f"{what}: no directory at {where!r}")
    repo, rev = parsed[0], revision or parsed[1]
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{what}: no directory at {where!r} (and huggingface_hub is not installed to read "
                                f"the hub id {raw!r} from its cache)") from None
    try:
        return snapshot_download(repo_id=repo, revision=rev, local_files_only=True)
    except Exception as e:  # the hub client raises many unrelated types
        cached = f"{type(e).__name__}: {e}"
    if _hub_offline():
        raise FileNotFoundError(f"{what}: no directory at {where!r}, and the hub id {repo!r}"
                                + (f" at revision {rev!r}" if rev else "") + " is not in the local Hugging Face "
                                f"cache {constants.HF_HUB_CACHE!r} ({cached}); the hub is offline (HF_HUB_OFFLINE), "
                                "so it was not downloaded")
    try:
        return snapshot_download(repo_id=repo, revision=rev, allow_patterns=patterns)
    except Exception as e:  # the hub client raises many unrelated types
        raise FileNotFoundError(f"{what}: no directory at {where!r}, and downloading the hub id {repo!r} failed: "
                                f"{type(e).__name__}: {e}") from None


def to_numpy(x) -> np.ndarray:
    """A host NumPy copy of an array (JAX, NumPy; bfloat16 kept through ml_dtypes)."""
    return np.asarray(x)


def nonfinite(tensors: Mapping[str, Any]) -> list[str]:
    """``"NAME holds NaN or Inf"`` for each floating-point tensor of ``tensors`` that does (in order).

    Example:
      >>> nonfinite({"a": np.ones(2), "b": np.array([1.0, np.nan]), "i": np.arange(3)})
      ['b holds NaN or Inf']
    """
    out = []
    for name, x in tensors.items():
        x = to_numpy(x)
        if (x.dtype.kind == "f" or x.dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2")) and \
                not np.isfinite(x.astype(np.float32)).all():
            out.append(f"{name} holds NaN or Inf")
    return out


SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


def read_safetensors(file) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors of a safetensors file as read-only NumPy arrays (memory-mapped), and its metadata.

    The format is read directly (an 8-byte little-endian header length, a JSON header
    ``{name: {dtype, shape, data_offsets}}``, the raw little-endian bytes), so bfloat16 and float8
    tensors come back as ``ml_dtypes`` arrays, which ``safetensors.numpy`` cannot return. Nothing
    is copied until the caller converts an array.

    Raises:
      FileNotFoundError: when the file does not exist.
      ValueError: when it is not a complete, well-formed safetensors file (truncated, bad header,
        offsets that do not fit); the message names the file and the problem.

    Example:
      >>> import numpy as np, tempfile, os
      >>> from safetensors.numpy import save_file
      >>> path = os.path.join(tempfile.mkdtemp(), "x.safetensors")
      >>> save_file({"w": np.ones((2, 3), np.float32)}, path)
      >>> read_safetensors(path)[0]["w"].shape
      (2, 3)
    """
    file = os.fspath(file)
    bad = f"{file!r} is not a readable safetensors file:"
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no safetensors file at {file!r}")
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{bad} shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"{bad} header length {n} exceeds the file size {size}")
        header = parse_json(f.read(n), f"the header of {file!r}")
    if not isinstance(header, dict):
        raise ValueError(f"{bad} header is {type(header).__name__}, expected an object")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError(f"{bad} __metadata__ must be an object of strings, got {type(meta).__name__}")
    data_len = size - 8 - n
    mm = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + n, shape=(data_len,)) if data_len else \
        np.zeros((0,), np.uint8)
    out, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(_dim(d) for d in info["shape"])
            begin, end = (_dim(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{bad} tensor {name!r} has an unsupported or malformed header entry {info!r} "
                             "(dtypes: " + ", ".join(sorted(SAFETENSORS_DTYPES)) + "; shape and data_offsets: "
                             "lists of integers >= 0)") from None
        nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow for any claimed shape
        if not begin <= end <= data_len or end - begin != nbytes:
            raise ValueError(f"{bad} tensor {name!r} ({info['dtype']}{list(shape)}) has data offsets "
                             f"[{begin}, {end}) that do not fit its size {nbytes} or the data length {data_len} "
                             "(truncated or corrupt file?)")
        spans.append((begin, end, name))
        out[name] = np.asarray(mm[begin:end].view(dtype).reshape(shape))
    # As the reference library: the tensors tile the data exactly, in order of their offsets; an
    # overlap (two names for one set of bytes), a gap or bytes after the last tensor are refused.
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            what = "overlaps the tensor before it" if begin < at else f"leaves a gap of {begin - at} bytes before it"
            raise ValueError(f"{bad} tensor {name!r} at data offsets [{begin}, {end}) {what} "
                             "(the tensors must tile the data exactly)")
        at = end
    if at != data_len:
        raise ValueError(f"{bad} {data_len - at} bytes follow the last tensor (the tensors must tile the data exactly)")
    return out, {str(k): str(v) for k, v in meta.items()}


def umask() -> int:
    """The process's umask, read without changing it where the OS allows (another thread may be
    creating files)."""
    try:  # Linux
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def usual_mode(file) -> None:
    """Give a file (a path or an open descriptor) the mode ``open`` would have given it: 0666 less
    the umask (``tempfile.mkstemp`` and the safetensors library create files 0600)."""
    mode = 0o666 & ~umask()
    if isinstance(file, int):
        os.fchmod(file, mode)
    else:
        os.chmod(file, mode)


def write_safetensors(file: str, tensors: Mapping[str, Any], metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write NumPy/JAX arrays to a safetensors file (made C-contiguous, dtypes kept; the usual file
    mode, not the library's 0600)."""
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(to_numpy(v)) for k, v in tensors.items()}
    save_file(arrays, file, metadata=None if metadata is None else {str(k): str(v) for k, v in metadata.items()})
    usual_mode(file)


def _dim(v) -> int:
    """A size or offset from a file's header: an integer >= 0 (not a bool, float or string)."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(v)
    return v


def parse_json(text, where: str) -> Any:
    """Parse JSON text (str or bytes) read from ``where``; malformed text, bad UTF-8 or nesting too
    deep for the parser (a nesting bomb) raise one ``ValueError`` naming ``where``.

    Example:
      >>> parse_json('{"a": [1, 2]}', "config.json")
      {'a': [1, 2]}
    """
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where} is not valid JSON: {e}") from None
    except RecursionError:
        raise ValueError(f"{where} is not usable JSON: its values nest deeper than the parser allows") from None


def read_json(file: str, *, what: str = "JSON file") -> Any:
    """Parse a JSON file; a missing or malformed file raises an error naming it."""
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no {what} at {file!r}")
    with open(file, "rb") as f:
        return parse_json(f.read(), f"{file!r} ({what})")


def write_json(file: str, obj: Any) -> None:
    with open(file, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")

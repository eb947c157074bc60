"""The tokenized cache: data files tokenized once, on every core, into memory-mapped arrays.

``load(paths, tokenizer, root=...)`` returns the files' documents as `data.Docs` whose arrays are
memory maps of a cache entry ``ROOT/<key>/``. The key is a SHA-256 of everything that changes the
tokens: the content of every data file (hashed once; a file's size, mtime, inode and path map to
its content hash after that, so a warm start reads no data), the formats and column mapping, the
tokenizer (its serialized vocabulary and merges, special tokens, chat template) and the source of
the encoding code (`records`, `readers`). A cache built with another tokenizer or template, or
before a data file changed, is never found. ``seq_len`` and packing do not change the tokens:
they key the row plans stored beside them (``plans/``), computed once per layout.

Building streams: the main process reads records in chunks (a JSONL line is parsed where it is
encoded), worker processes encode them (``spawn``ed, each with the tokenizer), results are written
to ``tokens.bin``/``weights.bin`` as they come back in order, one chunk per worker in
flight, so the build's memory does not grow with the data. Progress (records, records/s) goes
to ``say`` every few seconds.

Safety: an entry is built in a temporary directory and renamed into place whole
(`lora_jax.io._files.atomic_directory`), so an interrupted build leaves nothing a later run
trusts (its leftovers are swept by the next build); builders of one key take a ``flock`` on
``ROOT/.<key>.lock``, so two runs building the same cache at once build it once; an entry whose
files disagree with its ``meta.json`` is rebuilt. Plans are written to a temporary name and
renamed.

Example:
  >>> import os, tempfile
  >>> from lora_jax.train.model import build_tokenizer
  >>> d = tempfile.mkdtemp()
  >>> _ = open(os.path.join(d, "a.txt"), "w").write("one two\\n\\nthree")
  >>> tok = build_tokenizer(["one two three"], vocab_size=300)
  >>> docs, info = load([os.path.join(d, "a.txt")], tok, root=os.path.join(d, "cache"))
  >>> len(docs), info["built"], load([os.path.join(d, "a.txt")], tok, root=os.path.join(d, "cache"))[1]["built"]
  (2, True, False)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
import tempfile
import time
from typing import Callable, Mapping, Optional

import numpy as np

from . import data as _data
from . import readers as _readers
from . import records as _rec

__all__ = ["load", "default_root", "tokenizer_fingerprint", "CHUNK", "FORMAT"]

FORMAT = 1  # bump when the layout of an entry changes
CHUNK = 256  # records per work item
SMALL = 4 << 20  # data under this many bytes is encoded in-process (no worker start-up)


def default_root() -> str:
    """``$LORA_JAX_CACHE/tokenized``, else ``$XDG_CACHE_HOME/lora_jax/tokenized``, else
    ``~/.cache/lora_jax/tokenized``."""
    base = os.environ.get("LORA_JAX_CACHE")
    if not base:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lora_jax")
    return os.path.join(base, "tokenized")


def tokenizer_fingerprint(tok) -> Optional[str]:
    """A SHA-256 of what makes a tokenizer's ids (None when it cannot be read: no cache then)."""
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    elif callable(getattr(tok, "get_vocab", None)):
        h.update(json.dumps(tok.get_vocab(), sort_keys=True).encode())
    else:
        return None
    special = {k: getattr(tok, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    h.update(json.dumps([type(tok).__name__, special, getattr(tok, "chat_template", None)], sort_keys=True,
                        default=str).encode())
    return h.hexdigest()


def _code_fingerprint() -> str:
    h = hashlib.sha256()
    for m in (_rec, _readers):
        with open(m.__file__, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()


def _content_hash(path: str, root: str) -> str:
    """The SHA-256 of a file's bytes, remembered under ``root/stat/`` by (path, size, mtime, inode)."""
    st = os.stat(path)
    who = hashlib.sha256(repr((os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)).encode())
    memo = os.path.join(root, "stat", who.hexdigest())
    try:
        with open(memo) as fh:
            got = fh.read().strip()
        if len(got) == 64:
            return got
    except OSError:
        pass
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    _write_small(memo, digest)
    return digest


def _write_small(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------
# encoding (runs in workers)
# ------------------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(tokenizer, columns) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER["tok"], _WORKER["columns"] = tokenizer, columns


def _encode_chunk(items, tokenizer=None, columns=None):
    """Encode ``[(where, payload)]``: ``(ids, weights, lengths, targets, shapes, stats)``; a
    malformed record raises ValueError naming it."""
    tok = tokenizer if tokenizer is not None else _WORKER["tok"]
    columns = columns if tokenizer is not None else _WORKER["columns"]
    ids, ws, lengths, targets, shapes = [], [], [], [], []
    stats = {"chats": 0, "chats_without_assistant": 0, "roles": set(), "prompted": 0}
    for where, payload in items:
        rec, shape = _data.to_record(where, payload, columns)
        if not shapes or shapes[-1][0] != shape:
            shapes.append((shape, where))
        try:
            i, w = rec.encode(tok)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        ids.append(i)
        ws.append(w)
        lengths.append(i.size)
        targets.append(int(w[1:].sum()))
        if isinstance(rec, _rec.Chat):
            stats["chats"] += 1
            roles = {m["role"] for m in rec.messages}
            if "assistant" not in roles:
                stats["chats_without_assistant"] += 1
                stats["roles"] |= roles
            stats["prompted"] += 1
        elif isinstance(rec, _rec.Completion):
            stats["prompted"] += 1
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
    return cat(ids, np.int32), cat(ws, np.uint8), np.asarray(lengths, np.int64), np.asarray(targets, np.int64), \
        shapes, stats


# ------------------------------------------------------------------------------------------
# building
# ------------------------------------------------------------------------------------------


def _chunks(fmt_files):
    """Work items of up to `CHUNK` records, never spanning two files."""
    for f, reader, whole in fmt_files:
        buf = []
        for item in reader.read(f, whole):
            buf.append(item)
            if len(buf) == CHUNK:
                yield buf
                buf = []
        if buf:
            yield buf


def _workers(requested: int, size: int) -> int:
    if requested and requested > 0:
        return int(requested)
    if size < SMALL:
        return 1
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _serve(conn, tokenizer, columns) -> None:
    """A worker: encode each chunk received, send back its result (or its exception), until None."""
    _init_worker(tokenizer, columns)
    while True:
        items = conn.recv()
        if items is None:
            return
        try:
            out = ("ok", _encode_chunk(items))
        except Exception as e:  # noqa: BLE001 - re-raised in the parent
            out = ("error", e)
        try:
            conn.send(out)
        except Exception:  # noqa: BLE001 - an exception that does not pickle
            conn.send(("error", RuntimeError(f"{type(out[1]).__name__}: {out[1]}")))


def _results(chunks, tokenizer, columns, workers: int):
    """The encoded chunks in order: in-process for one worker, else `workers` spawned processes,
    each with its own pipe and one chunk in flight (chunk ``i`` goes to worker ``i % workers``).

    Every wait also watches the workers' process sentinels, so a worker that dies (killed, out of
    memory, or unable to start) ends the build with an error at once; a shared task queue (a
    `multiprocessing.Pool`, and `ProcessPoolExecutor` when a worker dies mid-transfer) can wait
    forever instead. A worker is only sent a chunk once its previous result was read, so neither
    side ever blocks on a full pipe the other is not reading."""
    if workers <= 1:
        for c in chunks:
            yield _encode_chunk(c, tokenizer, columns or {})
        return
    import multiprocessing as mp
    from multiprocessing.connection import wait

    died = RuntimeError(
        "a tokenizing worker process died (killed, out of memory, or it could not start: a script that "
        "starts training must guard its entry with `if __name__ == \"__main__\":`, since workers are "
        "spawned and import the main module); nothing of this cache build is kept")
    ctx = mp.get_context("spawn")
    procs, conns = [], []
    try:
        for _ in range(workers):
            here, there = ctx.Pipe()
            p = ctx.Process(target=_serve, args=(there, tokenizer, columns or {}), daemon=True)
            p.start()
            there.close()
            procs.append(p)
            conns.append(here)
        sentinels = [p.sentinel for p in procs]

        def send(w, item):
            try:
                conns[w].send(item)
            except OSError:
                raise died from None

        it = iter(chunks)
        busy = 0
        for w in range(workers):
            c = next(it, None)
            if c is None:
                break
            send(w, c)
            busy += 1
        i = 0
        while busy:
            w = i % workers
            if conns[w] not in wait([conns[w]] + sentinels):
                raise died
            try:
                status, out = conns[w].recv()
            except (EOFError, OSError):
                raise died from None
            busy -= 1
            if status == "error":
                raise out
            c = next(it, None)
            if c is not None:
                send(w, c)
                busy += 1
            yield out
            i += 1
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for p in procs:
            p.join(timeout=10)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
        for conn in conns:
            conn.close()


def _build(tmp: str, fmt_files, tokenizer, columns, workers: int, say: Callable) -> dict:
    check = _data.ShapeCheck()
    offsets = [0]
    targets: list[np.ndarray] = []
    stats = {"chats": 0, "chats_without_assistant": 0, "roles": set(), "prompted": 0}
    n = 0
    t0 = last = time.perf_counter()
    with open(os.path.join(tmp, "tokens.bin"), "wb") as ft, open(os.path.join(tmp, "weights.bin"), "wb") as fw:
        for ids, ws, lengths, tg, shapes, st in _results(_chunks(fmt_files), tokenizer, columns, workers):
            for shape, where in shapes:
                check.see(where, shape)
            ft.write(ids.tobytes())
            fw.write(ws.tobytes())
            offsets.extend((offsets[-1] + np.cumsum(lengths)).tolist())
            targets.append(tg)
            for k in ("chats", "chats_without_assistant", "prompted"):
                stats[k] += st[k]
            stats["roles"] |= st["roles"]
            n += lengths.size
            now = time.perf_counter()
            if now - last > 5:
                say(f"# tokenizing: {n:,} records, {n / (now - t0):,.0f} records/s ({workers} processes)")
                last = now
    dt = time.perf_counter() - t0
    np.save(os.path.join(tmp, "offsets.npy"), np.asarray(offsets, np.int64))
    np.save(os.path.join(tmp, "targets.npy"), np.concatenate(targets) if targets else np.zeros(0, np.int64))
    stats["roles"] = sorted(stats["roles"])
    meta = {"format": FORMAT, "documents": n, "tokens": int(offsets[-1]), "stats": stats,
            "files": [f for f, _, _ in fmt_files], "seconds": round(dt, 3), "workers": workers,
            "records_per_s": round(n / max(dt, 1e-9), 1)}
    with open(os.path.join(tmp, "meta.json"), "w") as fh:
        json.dump(meta, fh, indent=1)
    return meta


@contextlib.contextmanager
def _locked(root: str, key: str, say: Callable):
    os.makedirs(root, exist_ok=True)
    fd = os.open(os.path.join(root, f".{key}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"# waiting for another process building the tokenized cache {os.path.join(root, key)}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _open(entry: str) -> Optional[tuple[_data.Docs, dict]]:
    """The documents of a finished entry, or None when it is missing or its files disagree with its meta."""
    try:
        with open(os.path.join(entry, "meta.json")) as fh:
            meta = json.load(fh)
        offsets = np.load(os.path.join(entry, "offsets.npy"), mmap_mode="r")
        targets = np.load(os.path.join(entry, "targets.npy"), mmap_mode="r")
        n_tok, n_doc = int(meta["tokens"]), int(meta["documents"])
        if (meta.get("format") != FORMAT or offsets.shape != (n_doc + 1,) or targets.shape != (n_doc,)
                or int(offsets[-1]) != n_tok
                or os.path.getsize(os.path.join(entry, "tokens.bin")) != 4 * n_tok
                or os.path.getsize(os.path.join(entry, "weights.bin")) != n_tok):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    mm = lambda name, dt: (np.memmap(os.path.join(entry, name), dt, "r") if n_tok  # noqa: E731
                           else np.zeros(0, dt))
    return _data.Docs(mm("tokens.bin", np.int32), mm("weights.bin", np.uint8), offsets, targets), meta


def load(paths, tokenizer, *, root: Optional[str] = None, fmt: str = "auto",
         columns: Optional[Mapping[str, str]] = None, workers: int = 0,
         say: Optional[Callable[[str], None]] = None) -> tuple[_data.Docs, dict]:
    """The documents of ``paths`` tokenized, from the cache under ``root`` (built on a miss).

    Args:
      paths: data files or directories (`readers.files`).
      tokenizer: a transformers tokenizer.
      root: the cache directory (`default_root()` when None). ``False``: no persistent cache
        (built in a temporary directory that is removed when the process exits).
      fmt: a `readers.FORMATS` choice for files.
      columns: ``{our field: the dataset's field}`` (`records.check_columns`).
      workers: encoding processes; 0: one per core for data over 4 MB, else in-process.
      say: progress lines (``print`` to stderr by default).

    Returns:
      ``(docs, info)``: memory-mapped `data.Docs`, and the entry's meta with ``key``, ``entry``
      and ``built`` (True when this call tokenized).

    Raises:
      FileNotFoundError, ValueError: a missing file, a malformed record (file and line/row named),
        two shapes in one file, a bad ``columns``.
    """
    say = say or (lambda s: print(s, file=sys.stderr, flush=True))
    columns = _rec.check_columns(columns)
    fmt_files = _readers.files(paths, fmt)
    if root is None:
        root = default_root()
    temporary = root is False
    if temporary:
        root = tempfile.mkdtemp(prefix="lora_jax-tokenized-")
        import atexit
        import shutil

        atexit.register(shutil.rmtree, root, True)
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    tok_fp = tokenizer_fingerprint(tokenizer)
    parts = {"format": FORMAT, "code": _code_fingerprint(), "tokenizer": tok_fp, "columns": columns,
             "files": [[_content_hash(f, root), r.name, whole] for f, r, whole in fmt_files]}
    if tok_fp is None:  # an unknown tokenizer: never shared
        parts["private"] = os.urandom(16).hex()
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]
    entry = os.path.join(root, key)
    got = _open(entry)
    built = False
    if got is None:
        from ..io._files import _remove_entry, atomic_directory

        with _locked(root, key, say):
            got = _open(entry)  # another run may have built it while we waited
            if got is None:
                size = sum(os.path.getsize(f) for f, _, _ in fmt_files)
                n_workers = _workers(workers, size)
                say(f"# tokenizing {len(fmt_files)} file(s), {size / 2**20:,.1f} MB, with {n_workers} process(es) "
                    f"into {entry}")
                if os.path.lexists(entry):  # damaged (its files disagree with its meta): never read
                    say(f"# the tokenized cache {entry} is damaged; rebuilding it")
                    _remove_entry(entry)
                with atomic_directory(entry, what="tokenized cache") as tmp:
                    meta = _build(tmp, fmt_files, tokenizer, columns, n_workers, say)
                say(f"# tokenized {meta['documents']:,} records ({meta['tokens']:,} tokens) in {meta['seconds']:.1f} s, "
                    f"{meta['records_per_s']:,.0f} records/s")
                got = _open(entry)
                built = True
                if got is None:
                    raise RuntimeError(f"the tokenized cache {entry} was written but does not read back")
    docs, meta = got
    return docs, {**meta, "key": key, "entry": entry, "built": built}


def plan(docs: _data.Docs, entry: Optional[str], seq_len: int, packing: str, span: tuple[int, int]):
    """The `data.PackedRows.make_plan` rows of documents ``span`` of a cache ``entry``, computed
    once per (layout, ``seq_len``, span) and kept in ``entry/plans/`` (None for ``"stream"``)."""
    packing = _data.packing_mode(packing)
    if packing == "stream":
        return None
    lengths = docs.lengths[span[0]:span[1]]
    if entry is None:
        return _data.PackedRows.make_plan(lengths, seq_len, packing)
    path = os.path.join(entry, "plans", f"{packing}-{seq_len}-{span[0]}-{span[1]}.npz")
    try:
        with np.load(path) as z:
            return z["row_ptr"], z["doc"], z["off"], z["len"]
    except (OSError, ValueError, KeyError):
        pass
    got = _data.PackedRows.make_plan(lengths, seq_len, packing)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=os.path.dirname(path))
    with os.fdopen(fd, "wb") as fh:
        np.savez(fh, row_ptr=got[0], doc=got[1], off=got[2], len=got[3])
    os.replace(tmp, path)
    return got

"""Training rows: encoded documents packed into fixed-length rows, served by index; the row order.

Documents are tokenized records (`records`: ``(ids, weights)``, weight 1 on a token the loss
predicts) stored flat: `Docs` holds every document's tokens back to back with their offsets, in
memory or memory-mapped from the tokenized cache (`tokcache`). A row holds ``L + 1`` tokens
(``L = seq_len``): the model reads the first ``L``, the targets are the last ``L``. Three layouts
(``packing``):

* ``"documents"`` (the default): whole documents packed into rows by best-fit decreasing (TRL's
  ``bfd``); a document longer than a row is cut into pieces of ``L + 1`` tokens overlapping by
  one (every token after the first a target exactly once). Each piece is a *segment*: the batch
  carries its id (``mask``: 1, 2, ... per piece of the row, 0 on padding) and its own positions
  (``positions``: 0, 1, ... from each piece's start), so attention never crosses a document and
  RoPE restarts per document (`lora_jax.models.layers.segment_mask`). The first token of each
  piece is never a target (its input would be the previous document's last token).
* ``"stream"``: GPT-style: the documents concatenated and cut every ``L`` tokens (rows overlap by
  one token); attention runs across documents inside a row. ``mask`` is 1 on tokens, 0 on padding.
* ``"none"``: one document per row, cut to ``L + 1`` tokens.

A row source is anything with ``len()``, ``seq_len``, ``n_targets`` and ``batch(idx) -> dict``
(`Rows`: materialized arrays; `PackedRows`: rows assembled from `Docs` on demand, so the training
loop reads only the rows of each batch). A batch holds ``inputs``, ``targets``, ``weights``
(float32), ``mask`` (int32) and, for ``"documents"``, ``positions``.

The training order is a fresh permutation of the rows each epoch, drawn from ``(seed, epoch)``;
the *position* (rows consumed so far) is all a checkpoint needs to continue exactly.

Several adapters trained side by side each read their own data: a `Mixture` serves K row sources
as one (each batch also holds ``adapter``, the source of each row), and `MixedOrder` takes, every
step, each source's share of rows in that source's own `Order` — the rows a run of it alone would
read at that step.

Example:
  >>> import numpy as np
  >>> from lora_jax.train.data import pack
  >>> rows = pack([(np.array([0, 5, 6]), np.array([0, 1, 1])), (np.array([0, 7, 8]), np.array([0, 1, 1]))],
  ...             seq_len=5, pad_id=0)
  >>> b = rows.batch(np.array([0]))
  >>> b["inputs"].tolist(), b["mask"].tolist(), b["positions"].tolist(), b["weights"].tolist()
  ([[0, 5, 6, 0, 7]], [[1, 1, 1, 2, 2]], [[0, 1, 2, 0, 1]], [[1.0, 1.0, 0.0, 1.0, 1.0]])
"""

from __future__ import annotations

import dataclasses
import json
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from . import readers as _readers
from . import records as _rec

__all__ = ["PACKING", "Docs", "Rows", "PackedRows", "Order", "Mixture", "MixedOrder", "read_documents", "to_record", "encode", "pack",
           "plan_documents", "batch", "eval_batches", "split_count", "split_eval", "ShapeCheck", "why_no_targets"]

PACKING = ("documents", "stream", "none")


def packing_mode(packing) -> str:
    """``packing`` as one of `PACKING` (True reads as ``"documents"``, False as ``"none"``)."""
    if packing is True:
        return "documents"
    if packing is False:
        return "none"
    if packing not in PACKING:
        raise ValueError(f"packing must be one of {', '.join(PACKING)}, got {packing!r}")
    return packing


# ------------------------------------------------------------------------------------------
# records
# ------------------------------------------------------------------------------------------


def to_record(where: str, payload, columns: Optional[Mapping[str, str]] = None):
    """``(record, shape name)`` of a reader's payload (a JSON line, a row mapping, or a record)."""
    if isinstance(payload, _rec.Record):
        return payload, "text"
    if isinstance(payload, str):
        try:
            payload = json.loads(payload)
        except json.JSONDecodeError as e:  # some of json's messages end in "at" already
            at = "column" if e.msg.endswith(" at") else "at column"
            raise ValueError(f"{where}: not valid JSON ({e.msg} {at} {e.colno})") from None
        except RecursionError:
            raise ValueError(f"{where}: not usable JSON: its values nest deeper than the parser allows") from None
    return _rec.parse(payload, where, columns)


class ShapeCheck:
    """One record shape per file: `see` raises on a record whose shape differs from the file's first."""

    def __init__(self):
        self.first: dict[str, tuple[str, str]] = {}

    def see(self, where: str, shape: str) -> None:
        file = where.rsplit(" row ", 1)[0] if " row " in where else where.rsplit(":", 1)[0]
        got = self.first.setdefault(file, (shape, where))
        if got[0] != shape:
            raise ValueError(f"{where}: a {shape} record, but {got[1]} holds a {got[0]} record; a file holds records "
                             "of one shape (split it, or convert the records)")


def read_documents(paths, fmt: str = "auto", columns: Optional[Mapping[str, str]] = None) -> list:
    """The records of one or more files or directories, in order, in memory (small data: the
    trainer streams large data through `tokcache` instead).

    Raises:
      FileNotFoundError: a path that does not exist.
      ValueError: a malformed record (file and line/row named), a mix of shapes in one file, an
        unknown ``fmt``.
    """
    check, out = ShapeCheck(), []
    for where, payload in _readers.read(paths, fmt):
        rec, shape = to_record(where, payload, columns)
        check.see(where, shape)
        out.append(rec)
    return out


def encode(doc, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """``(ids int32, weights uint8)`` of a record (or of a mapping in one of `records.SHAPES`)."""
    if not isinstance(doc, _rec.Record):
        doc, _ = _rec.parse(doc)
    return doc.encode(tokenizer)


def why_no_targets(stats: Mapping, seq_len: int, packing: str) -> str:
    """Why documents that were read gave no trained token at all (for the error message);
    ``stats`` is `tokcache.Stats`-like: ``chats``, ``roles`` (of chats without an assistant turn
    when no chat has one), ``prompted`` (records with untrained prompts)."""
    if stats.get("chats") and stats.get("chats_without_assistant") == stats.get("chats"):
        roles = ", ".join(map(repr, stats.get("roles", [])))
        return (f"none of the {stats['chats']} chat records has an 'assistant' turn (roles found: {roles}); only "
                "assistant turns are trained")
    if packing == "none" and stats.get("prompted"):
        return (f"with data.packing=none each record is cut to data.seq_len + 1 = {seq_len + 1} tokens, and every "
                "record's prompt (or non-assistant turns) fills them: no completion token is left")
    return "every token is masked (prompts, non-assistant turns) or cut off"


# ------------------------------------------------------------------------------------------
# documents, flat
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Docs:
    """Documents back to back: document ``d`` is ``tokens[offsets[d]:offsets[d + 1]]``.

    Attributes:
      tokens: ``(T,)`` int32 (a memory map when read from the cache).
      weights: ``(T,)`` uint8, 1 on a token the loss predicts.
      offsets: ``(n + 1,)`` int64.
      targets: ``(n,)`` int64, each document's weight sum after its first token.
    """

    tokens: np.ndarray
    weights: np.ndarray
    offsets: np.ndarray
    targets: np.ndarray

    def __len__(self) -> int:
        return int(self.offsets.shape[0]) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def from_encoded(cls, encoded: Iterable[tuple[np.ndarray, np.ndarray]]) -> "Docs":
        enc = [(np.asarray(i, np.int32).reshape(-1), np.asarray(w).reshape(-1)) for i, w in encoded]
        for i, w in enc:
            if i.shape != w.shape:
                raise ValueError(f"a document's ids {i.shape} and weights {w.shape} differ in length")
        offsets = np.zeros(len(enc) + 1, np.int64)
        np.cumsum([i.size for i, _ in enc], out=offsets[1:])
        tokens = np.concatenate([i for i, _ in enc]) if enc else np.zeros(0, np.int32)
        weights = (np.concatenate([w for _, w in enc]) if enc else np.zeros(0)).astype(np.uint8)
        targets = np.asarray([int(w[1:].astype(np.int64).sum()) for _, w in enc], np.int64)
        return cls(tokens, weights, offsets, targets)


def plan_documents(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Best-fit-decreasing packing of documents into rows of ``seq_len + 1`` tokens.

    Documents longer than a row are cut into pieces of ``seq_len + 1`` overlapping by one (a last
    piece of a single token, which holds no target, is dropped); documents of fewer than 2 tokens
    are left out. Pieces are placed longest first, each into the open row it fills most tightly
    (a segment tree over the rows' free space), a new row when none has room.

    Returns:
      ``(row_ptr, piece_doc, piece_off, piece_len)``: row ``r`` holds pieces
      ``row_ptr[r]:row_ptr[r + 1]``, piece ``j`` is tokens ``piece_off[j] : piece_off[j] +
      piece_len[j]`` of document ``piece_doc[j]``.

    Example:
      >>> ptr, doc, off, ln = plan_documents(np.array([3, 5, 2, 9]), seq_len=5)
      >>> [[(int(doc[j]), int(ln[j])) for j in range(ptr[r], ptr[r + 1])] for r in range(len(ptr) - 1)]
      [[(3, 6)], [(1, 5)], [(3, 4), (2, 2)], [(0, 3)]]
    """
    width = int(seq_len) + 1
    lengths = np.asarray(lengths, np.int64)
    pd, po, pl = [], [], []
    for d in np.flatnonzero(lengths >= 2):  # pieces in document order
        n = int(lengths[d])
        for off in range(0, max(n - 1, 1), seq_len):
            pd.append(d), po.append(off), pl.append(min(width, n - off))
    pd, po, pl = np.asarray(pd, np.int64), np.asarray(po, np.int64), np.asarray(pl, np.int64)
    order = np.argsort(-pl, kind="stable")
    size = 1
    while size < width + 1:
        size *= 2
    tree = [0] * (2 * size)  # open rows by free space: leaves size + free
    open_at: list[list[int]] = [[] for _ in range(width + 1)]
    rows: list[list[int]] = []

    def add(free, delta):
        i = free + size
        while i:
            tree[i] += delta
            i //= 2

    def tightest(n):  # the smallest free space >= n among open rows, or -1
        i = n + size
        if tree[i]:
            return n
        while i > 1:
            if not i & 1 and tree[i + 1]:
                i += 1
                while i < size:
                    i = 2 * i if tree[2 * i] else 2 * i + 1
                return i - size
            i //= 2
        return -1

    for j in order.tolist():
        n = int(pl[j])
        free = tightest(n)
        if free < 0:
            rows.append([j])
            r, left = len(rows) - 1, width - n
        else:
            r = open_at[free].pop()
            add(free, -1)
            rows[r].append(j)
            left = free - n
        if left >= 2:  # a row with one free slot takes nothing more (a piece has 2 tokens at least)
            open_at[left].append(r)
            add(left, 1)
    flat = [j for row in rows for j in row]
    row_ptr = np.zeros(len(rows) + 1, np.int64)
    np.cumsum([len(row) for row in rows], out=row_ptr[1:])
    return row_ptr, pd[flat], po[flat], pl[flat]


# ------------------------------------------------------------------------------------------
# row sources
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rows:
    """Materialized rows of ``seq_len + 1`` tokens (a row source held in memory).

    Attributes:
      tokens: ``(n, seq_len + 1)`` int32.
      weights: ``(n, seq_len + 1)`` float32, 1 where the token is a loss target.
      valid: ``(n, seq_len + 1)`` bool, False on padding.
      segments: ``(n, seq_len + 1)`` int32 segment ids (0 on padding) of ``"documents"`` rows, or None.
      positions: ``(n, seq_len + 1)`` int32 positions within each segment, or None.
    """

    tokens: np.ndarray
    weights: np.ndarray
    valid: np.ndarray
    segments: Optional[np.ndarray] = None
    positions: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1]) - 1

    @property
    def n_targets(self) -> int:
        """Trained tokens over all rows (the first token of a row is never a target)."""
        return int(self.weights[:, 1:].sum())

    @property
    def n_tokens(self) -> int:
        """Real (not padding) input tokens over all rows."""
        return int(self.valid[:, :-1].sum())

    def batch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        t, w = self.tokens[idx], self.weights[idx]
        m = self.valid[idx].astype(np.int32) if self.segments is None else self.segments[idx]
        out = {"inputs": t[:, :-1], "targets": t[:, 1:], "weights": w[:, 1:].astype(np.float32),
               "mask": m[:, :-1].astype(np.int32)}
        if self.positions is not None:
            out["positions"] = self.positions[idx][:, :-1].astype(np.int32)
        return out


class PackedRows:
    """Rows assembled from `Docs` on demand (`batch`), in one of the `PACKING` layouts.

    Args:
      docs: the documents (memory-mapped or in memory).
      seq_len: ``L``; rows hold ``L + 1`` tokens.
      pad_id: the token written into padding (weight 0, mask 0).
      packing: one of `PACKING`.
      span: ``(first, end)``: only documents ``first .. end - 1`` (an eval split); all by default.
      plan: a precomputed `plan_documents` result for ``"documents"`` (the cache stores them).

    Raises:
      ValueError: ``seq_len < 1``, or no document with 2 or more tokens.
    """

    def __init__(self, docs: Docs, seq_len: int, pad_id: int, packing: str = "documents",
                 span: Optional[tuple[int, int]] = None, plan=None):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.docs, self._L, self.pad_id = docs, int(seq_len), int(pad_id)
        self.packing = packing_mode(packing)
        a, b = span if span is not None else (0, len(docs))
        self.span = (int(a), int(b))
        lengths = docs.lengths[a:b]
        if not (lengths >= 2).any():
            raise ValueError("no document has 2 or more tokens" if b > a else "no documents")
        if self.packing == "stream":
            self._start, self._end = int(docs.offsets[a]), int(docs.offsets[b])
            self._n = -(-(self._end - self._start - 1) // self._L)
            self.plan = None
        else:
            if plan is None:
                plan = self.make_plan(lengths, seq_len, self.packing)
            row_ptr, pdoc, poff, plen = plan
            self.plan = (row_ptr, pdoc, poff, plen)
            self._doc0 = a
            self._n = len(row_ptr) - 1

    @staticmethod
    def make_plan(lengths, seq_len: int, packing: str):
        """The rows of ``"documents"`` or ``"none"`` over documents of ``lengths`` (see `plan_documents`)."""
        if packing_mode(packing) == "documents":
            return plan_documents(lengths, seq_len)
        keep = np.flatnonzero(np.asarray(lengths) >= 2)
        return (np.arange(keep.size + 1, dtype=np.int64), keep.astype(np.int64), np.zeros(keep.size, np.int64),
                np.minimum(np.asarray(lengths)[keep], seq_len + 1).astype(np.int64))

    def __len__(self) -> int:
        return self._n

    @property
    def seq_len(self) -> int:
        return self._L

    @property
    def n_targets(self) -> int:
        """Trained tokens over all rows."""
        if not hasattr(self, "_targets"):
            w = self.docs.weights
            if self.packing == "stream":
                starts = np.arange(self._n, dtype=np.int64) * self._L + self._start
                self._targets = int(w[self._start:self._end].sum(dtype=np.int64) - w[starts].sum(dtype=np.int64))
            else:
                _, pdoc, poff, plen = self.plan
                d = pdoc + self._doc0
                whole = (poff == 0) & (plen == self.docs.lengths[d])
                t = int(self.docs.targets[d[whole]].sum())
                for j in np.flatnonzero(~whole):  # pieces of documents longer than a row
                    s = int(self.docs.offsets[d[j]] + poff[j])
                    t += int(w[s + 1:s + int(plen[j])].sum(dtype=np.int64))
                self._targets = t
        return self._targets

    @property
    def n_tokens(self) -> int:
        """Real (not padding) input tokens over all rows."""
        if self.packing == "stream":
            return self._end - self._start - 1
        return int(self.plan[3].sum()) - self._n

    def _assemble(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(tokens, weights, segment ids, positions)``, each ``(len(idx), L + 1)``, of rows ``idx``."""
        idx = np.asarray(idx, np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self._n):
            raise IndexError(f"row index out of range 0..{self._n - 1}")
        W, k = self._L + 1, idx.size
        tok = np.full((k, W), self.pad_id, np.int32)
        wt = np.zeros((k, W), np.float32)
        seg = np.zeros((k, W), np.int32)
        pos = np.zeros((k, W), np.int32)
        docs = self.docs
        if self.packing == "stream":
            for r, row in enumerate(idx.tolist()):
                s = self._start + row * self._L
                e = min(s + W, self._end)
                tok[r, :e - s], wt[r, :e - s], seg[r, :e - s] = docs.tokens[s:e], docs.weights[s:e], 1
                pos[r, :e - s] = np.arange(e - s)
            return tok, wt, seg, pos
        row_ptr, pdoc, poff, plen = self.plan
        for r, row in enumerate(idx.tolist()):
            at = 0
            for n, j in enumerate(range(int(row_ptr[row]), int(row_ptr[row + 1])), 1):
                s = int(docs.offsets[int(pdoc[j]) + self._doc0] + poff[j])
                ln = int(plen[j])
                tok[r, at:at + ln] = docs.tokens[s:s + ln]
                wt[r, at + 1:at + ln] = docs.weights[s + 1:s + ln]  # a piece's first token: no target
                seg[r, at:at + ln] = n
                pos[r, at:at + ln] = np.arange(ln, dtype=np.int32)
                at += ln
        return tok, wt, seg, pos

    def batch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """The model's view of rows ``idx`` (module docstring)."""
        return self.materialize(idx).batch(slice(None))

    def materialize(self, idx: Optional[np.ndarray] = None) -> Rows:
        """Rows ``idx`` (all by default) as arrays in memory."""
        tok, wt, seg, pos = self._assemble(np.arange(self._n) if idx is None else idx)
        if self.packing == "documents":
            return Rows(tok, wt, seg > 0, seg, pos)
        return Rows(tok, wt, seg > 0)


def pack(encoded: Iterable[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int,
         packing: Union[str, bool] = "documents") -> Rows:
    """Encoded documents as materialized rows in one of the `PACKING` layouts (module docstring).

    Args:
      encoded: ``(ids, weights)`` per document, as `encode` returns.
      seq_len: ``L``: tokens fed to the model per row; rows hold ``L + 1``.
      pad_id: the token written into padding (weight 0, mask 0).
      packing: ``"documents"``, ``"stream"`` or ``"none"`` (True/False: documents/none).

    Raises:
      ValueError: if ``seq_len < 1`` or no document has 2 tokens.
    """
    docs = Docs.from_encoded(encoded)
    if len(docs) == 0:
        raise ValueError("no documents to pack")
    if packing_mode(packing) == "stream" and int(docs.offsets[-1]) < 2:
        raise ValueError(f"only {int(docs.offsets[-1])} token(s) of data; need at least 2")
    return PackedRows(docs, seq_len, pad_id, packing).materialize()


# ------------------------------------------------------------------------------------------
# order and batches
# ------------------------------------------------------------------------------------------


class Order:
    """The row order: epoch ``e`` is ``default_rng([seed, e]).permutation(n)``, epochs back to back.

    Example:
      >>> Order(4, seed=0).take(2, 4).shape
      (4,)
    """

    def __init__(self, n_rows: int, seed: int):
        if n_rows < 1:
            raise ValueError(f"need at least one row of data, got {n_rows}")
        self.n, self.seed = int(n_rows), int(seed)
        self._cache: dict[int, np.ndarray] = {}

    def epoch(self, e: int) -> np.ndarray:
        if e not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            self._cache[e] = np.random.default_rng([self.seed, e]).permutation(self.n)
        return self._cache[e]

    def take(self, position: int, count: int) -> np.ndarray:
        """Row indices ``position .. position + count`` of the endless sequence of epochs."""
        out = np.empty(count, np.int64)
        for j in range(count):
            e, k = divmod(position + j, self.n)
            out[j] = self.epoch(e)[k]
        return out


class Mixture:
    """K row sources served as one (several adapters trained side by side, one source each): row
    ``offsets[k] + i`` is row ``i`` of source ``k``, and every batch also holds ``"adapter"``:
    ``(rows, seq_len)`` int32, the id of each row's source (``ids[k]``, default ``k``) repeated
    along it.

    Raises:
      ValueError: no sources, or sources of different ``seq_len`` or batch fields.

    Example:
      >>> import numpy as np
      >>> a = pack([(np.arange(6), np.ones(6))], seq_len=5, pad_id=0)
      >>> b = pack([(np.arange(9), np.ones(9)), (np.arange(4), np.ones(4))], seq_len=5, pad_id=0)
      >>> m = Mixture([a, b])
      >>> len(m), m.batch(np.array([2, 0]))["adapter"][:, 0].tolist()
      (4, [1, 0])
    """

    def __init__(self, sources: Sequence, ids: Optional[Sequence[int]] = None):
        self.sources = list(sources)
        if not self.sources:
            raise ValueError("Mixture: no row sources")
        self.ids = np.arange(len(self.sources), dtype=np.int32) if ids is None else np.asarray(ids, np.int32)
        if self.ids.shape != (len(self.sources),):
            raise ValueError(f"Mixture: {len(self.ids)} ids for {len(self.sources)} sources")
        lens = {int(src.seq_len) for src in self.sources}
        if len(lens) > 1:
            raise ValueError(f"Mixture: the sources have different seq_len {sorted(lens)}; one is needed")
        keys = {tuple(sorted(src.batch(np.zeros(1, np.int64)))) for src in self.sources}
        if len(keys) > 1:
            raise ValueError(f"Mixture: the sources' batches hold different fields {sorted(keys)} (one packing for all)")
        self.sizes = np.asarray([len(src) for src in self.sources], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def seq_len(self) -> int:
        return int(self.sources[0].seq_len)

    @property
    def n_targets(self) -> int:
        return sum(int(src.n_targets) for src in self.sources)

    @property
    def n_tokens(self) -> int:
        return sum(int(src.n_tokens) for src in self.sources)

    def batch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        idx = np.asarray(idx, np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"Mixture: row index out of range 0..{len(self) - 1}")
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        out: dict[str, np.ndarray] = {}
        for k in np.unique(which):
            at = np.flatnonzero(which == k)
            part = self.sources[k].batch(idx[at] - self.offsets[k])
            for key, v in part.items():
                if key not in out:
                    out[key] = np.empty((len(idx),) + v.shape[1:], v.dtype)
                out[key][at] = v
        out["adapter"] = np.repeat(self.ids[which][:, None], self.seq_len, axis=1)
        return out


class MixedOrder:
    """The order of a `Mixture`: every step takes ``batch_sizes[k]`` rows of source ``k`` in that
    source's own ``Order(len(source), seed)``, so each source's rows come exactly as in a run of
    it alone with batch size ``batch_sizes[k]``. With ``grad_accum`` micro-batches each micro-batch
    holds its share of every source (micro-batch ``j`` of source ``k``: the rows that run's
    micro-batch ``j`` would hold). The position counts rows of all sources together.

    Raises:
      ValueError: a batch size not divisible by ``grad_accum``, or (in `take`) a position or count
        that is not whole steps.
    """

    def __init__(self, mixture: Mixture, batch_sizes: Sequence[int], seed: int, grad_accum: int = 1):
        self.batch_sizes = [int(b) for b in batch_sizes]
        if len(self.batch_sizes) != len(mixture.sources):
            raise ValueError(f"MixedOrder: {len(self.batch_sizes)} batch sizes for {len(mixture.sources)} sources")
        bad = [b for b in self.batch_sizes if b < 1 or b % int(grad_accum)]
        if bad:
            raise ValueError(f"MixedOrder: batch sizes {self.batch_sizes} must be positive and divide by grad_accum "
                             f"{grad_accum}")
        self.orders = [Order(len(src), seed) for src in mixture.sources]
        self.offsets, self.accum = mixture.offsets, int(grad_accum)
        self.total = sum(self.batch_sizes)

    def take(self, position: int, count: int) -> np.ndarray:
        """The rows of the steps from ``position`` (rows of all sources so far) on, ``count`` rows."""
        if position % self.total or count % self.total:
            raise ValueError(f"MixedOrder: position {position} and count {count} must be whole steps of "
                             f"{self.total} rows")
        out = []
        for s in range(position // self.total, (position + count) // self.total):
            for j in range(self.accum):
                for k, (order, bs) in enumerate(zip(self.orders, self.batch_sizes)):
                    mb = bs // self.accum
                    out.append(order.take(s * bs + j * mb, mb) + self.offsets[k])
        return np.concatenate(out)


def batch(rows, idx: np.ndarray) -> dict[str, np.ndarray]:
    """The model's view of some rows of a row source: ``rows.batch(idx)`` (module docstring)."""
    return rows.batch(np.asarray(idx))


def eval_batches(rows, batch_size: int, max_batches: int = 0, shares: Optional[Sequence[int]] = None):
    """Every eval row in order, in batches of ``batch_size`` (the last one padded with weight 0).

    With ``shares`` (``rows`` a `Mixture`, one share per source, ``sum(shares) <= batch_size``),
    batch ``b`` holds rows ``b * shares[k] ...`` of each source ``k``: each source is evaluated in
    the batches of ``shares[k]`` rows (and at most ``max_batches`` of them) it would get alone, the
    rest of a batch padded with weight 0.

    Example:
      >>> import numpy as np
      >>> a = pack([(np.arange(12), np.ones(12))], seq_len=3, pad_id=0)
      >>> b = pack([(np.arange(4), np.ones(4))], seq_len=3, pad_id=0)
      >>> [x["adapter"][:, 0].tolist() for x in eval_batches(Mixture([a, b]), 4, 2, shares=[2, 1])]
      [[0, 0, 1, 0], [0, 0, 0, 0]]
    """
    if shares is None:
        parts = [(0, len(rows), batch_size)]
    else:
        if not isinstance(rows, Mixture) or len(shares) != len(rows.sources):
            raise ValueError(f"eval_batches: shares={list(shares)} needs a Mixture of {len(shares)} sources")
        if sum(shares) > batch_size or min(shares) < 1:
            raise ValueError(f"eval_batches: shares={list(shares)} must be >= 1 and sum to <= batch_size={batch_size}")
        parts = [(int(rows.offsets[k]), int(rows.sizes[k]), int(m)) for k, m in enumerate(shares)]
    counts = [-(-n // m) for _, n, m in parts]
    if max_batches:
        counts = [min(c, max_batches) for c in counts]
    for b in range(max(counts, default=0)):
        idx, real = np.zeros(batch_size, np.int64), np.zeros(batch_size, bool)
        at = 0
        for (first, n, m), c in zip(parts, counts):
            local = np.arange(b * m, (b + 1) * m)
            ok = (local < n) & (b < c)
            idx[at:at + m] = np.where(ok, first + local, 0)
            real[at:at + m] = ok
            at += m
        out = rows.batch(idx)
        out["weights"] = out["weights"] * real[:, None]
        yield out


def split_count(n: int, fraction: float) -> int:
    """How many of ``n`` documents train when the last ``ceil(fraction * n)`` are held out for eval."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"eval fraction must be in [0, 1), got {fraction!r}")
    n_eval = int(np.ceil(fraction * n)) if fraction > 0 else 0
    if n_eval and n_eval >= n:
        raise ValueError(f"holding out {n_eval} of {n} documents for eval leaves none to train on")
    return n - n_eval


def split_eval(docs: Sequence, fraction: float) -> tuple[list, list]:
    """``(train, eval)``: the last ``ceil(fraction * n)`` documents are held out (none if 0)."""
    k = split_count(len(docs), fraction)
    return list(docs[:k]), list(docs[k:])

"""Training checkpoints with orbax: adapter, optimizer state, rng, step and data position.

Each checkpoint is one orbax step directory holding two items:

* ``state``: the arrays (``ocp.args.StandardSave``), as a nested dict keyed by each leaf's key
  path (``adapter/model/layers/0/self_attn/q_proj/kernel/a``, ``opt_state/0/mu/...``,
  ``rng``) — flat string keys keep custom pytree nodes (`LoraWeight`, optax states) out of the
  file format; the live tree's structure is used to rebuild them on restore;
* ``meta``: JSON (``ocp.args.JsonSave``): step, data position, seed and anything else passed,
  plus ``arrays`` (each array's dtype, shape and `checksum`) and ``meta_checksum`` (a SHA-256 of
  the rest of the JSON).

Checkpoints that prove themselves: `Checkpointer.restore` reads the metadata first (its checksum,
its keys, the arrays it lists against the target: a different shape or name is a config mismatch,
a plain ``ValueError``), then the arrays, and compares every array's checksum with the saved one.
A file that cannot be read, a checksum that differs, or a NaN / infinity (the trainer never saves
one) raises `DamagedCheckpoint` naming the step and the file; no exception of orbax or TensorStore
gets out of `restore` otherwise, and the "Event loop is closed" noise of reads still in flight
after a failed one is dropped. Checkpoints written before checksums existed are restored with the
finiteness check only.

Saving is asynchronous when asked (``enable_async_checkpointing``): `save` returns once the arrays
are copied off the devices, the writing goes on in the background, and only finalized steps are
ever listed or restored. Restoring takes the target shardings, so a run may resume on a different
mesh.

Crashes: orbax writes a step under a temporary name (``<step>.orbax-checkpoint-tmp...``) and
renames it into place once complete, so a process killed during a save leaves a temporary
directory, never a step that looks finalized. Opening a `Checkpointer` with
``remove_unfinished=True`` (what a resuming run does) deletes such leftovers (listed in
`Checkpointer.removed`, for a message).

Test hook (tests only): with ``LORA_JAX_TEST_HOLD_SAVE=STEP:FILE`` in the environment, the
background write of checkpoint ``STEP`` creates ``FILE`` and then waits (up to 10 minutes) before
finishing, so a test can kill the process while that save is in flight. Nothing else reads it.

Example:
  >>> import jax.numpy as jnp, tempfile
  >>> ck = Checkpointer(tempfile.mkdtemp(), keep=2, async_save=False)
  >>> ck.save(3, {"x": jnp.ones(2)}, {"position": 12})
  >>> ck.latest_step()
  3
  >>> ck.close()
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ..rules import key_str

__all__ = ["Checkpointer", "DamagedCheckpoint", "latest_step", "unfinished_saves", "flatten_state",
           "unflatten_state", "checksums"]

TMP_MARK = ".orbax-checkpoint-tmp"
HOLD_ENV = "LORA_JAX_TEST_HOLD_SAVE"


def _quiet():
    """orbax logs every save at INFO through absl; keep warnings (never lower a level set higher)."""
    for name in ("absl", "orbax"):
        log = logging.getLogger(name)
        if log.getEffectiveLevel() < logging.WARNING:
            log.setLevel(logging.WARNING)


def flatten_state(tree) -> tuple[dict, Any]:
    """A nested dict of the leaves keyed by their key-path parts, and the tree's structure.

    Raises:
      ValueError: if two leaves map to the same keys (never for the trees the trainer saves).
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    out: dict = {}
    for kp, leaf in flat:
        parts = [key_str(k) for k in kp] or ["_"]
        node = out
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ValueError(f"checkpoint keys collide at {'/'.join(parts)}")
            node = nxt
        if parts[-1] in node:
            raise ValueError(f"checkpoint keys collide at {'/'.join(parts)}")
        node[parts[-1]] = leaf
    return out, treedef


def unflatten_state(nested: dict, treedef, like) -> Any:
    """Inverse of `flatten_state`: the leaves of ``nested`` put back into ``like``'s structure."""
    leaves = []
    for kp, _ in jax.tree_util.tree_flatten_with_path(like)[0]:
        node = nested
        for part in [key_str(k) for k in kp] or ["_"]:
            node = node[part]
        leaves.append(node)
    return jax.tree_util.tree_unflatten(treedef, leaves)


class DamagedCheckpoint(ValueError):
    """A finalized checkpoint that cannot be read or whose contents fail verification.

    Attributes:
      step: the checkpoint's step.
      file: the file or item directory at fault.
      reason: what is wrong, in one line.
    """

    def __init__(self, step: int, file: str, reason: str):
        self.step, self.file, self.reason = int(step), file, reason
        super().__init__(f"checkpoint step {step} is damaged: {file}: {reason}")


def _fmix(x):
    """MurmurHash3's 32-bit finalizer: a bijection of uint32 that mixes every bit into every other."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _words(x):
    """The bits of ``x`` as uint32 words, same shape (2- and 1-byte items widened; 8-byte items
    split into a trailing axis of 2)."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = x.dtype.itemsize
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}
    if size in unsigned:
        return jax.lax.bitcast_convert_type(x, unsigned[size]).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)


def _positions(shape):
    """Each element's row-major position (mod 2**32), built from iotas: no reshape, so a sharded
    array is summed where it lies."""
    idx = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for k in reversed(range(len(shape))):
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, shape, k) * jnp.uint32(stride % 2**32)
        stride *= shape[k]
    return idx


def _sums(nested):
    def one(x):
        w = _words(x)
        i = _positions(w.shape)
        h1 = jnp.sum(w * (i * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
        h2 = jnp.sum(_fmix(w + i * jnp.uint32(0x9E3779B9) + jnp.uint32(0x7F4A7C15)), dtype=jnp.uint32)
        return jnp.stack([h1, h2])

    return jax.tree_util.tree_map(one, nested)


_SUMS = jax.jit(_sums)
_FINITE = jax.jit(lambda nested: jax.tree_util.tree_map(
    lambda x: jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.asarray(True), nested))


def checksums(nested: dict) -> dict:
    """``{"a/b/c": "16 hex digits"}``: a 64-bit checksum of each array's bits in a nested dict.

    Two position-weighted sums modulo 2**32 of the array's 32-bit words ``w[i]``:
    ``sum(w[i] * (2 i + 1))`` and ``sum(fmix32(w[i] + i * 0x9E3779B9 + c))``. A change of any one
    word always changes the first (an odd factor is invertible modulo 2**32); random damage goes
    unnoticed with probability about 2**-64. Integer sums do not depend on the order of addition,
    so the result is the same for any sharding of the array (computed on its devices, jitted).

    Example:
      >>> import jax.numpy as jnp
      >>> a = checksums({"x": jnp.arange(4.0)})
      >>> b = checksums({"x": jnp.arange(4.0).at[3].set(3.0000002)})
      >>> sorted(a), a == b
      (['x'], False)
    """
    sums = jax.device_get(_SUMS(nested))
    return {k: "".join(f"{int(v):08x}" for v in np.asarray(h)) for k, h in _flat_items(sums)}


def _flat_items(nested: dict, prefix: str = ""):
    for k, v in nested.items():
        if isinstance(v, dict):
            yield from _flat_items(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


def _meta_checksum(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _describe(e: BaseException, where: str, limit: int = 300) -> tuple[str, str]:
    """``(file, reason)`` of a failed read, in one line: the innermost cause's message without
    TensorStore's spec dumps; the file is the last one TensorStore names (else ``where``)."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).split("See full TensorStore details")[0].split(" [tensorstore_spec")[0].strip()
    line = (text.splitlines() or [type(e).__name__])[0].strip()
    if isinstance(e, KeyError):
        line = f"missing key {line}"
    files = list(re.finditer(r'local file "([^"]+)"', line))
    if files:  # TensorStore: 'CODE: Error reading "KEY/..." in ... local file "PATH": why'
        code = re.match(r"([A-Z_]+): ", line)
        key = re.search(r'Error reading "([^"/]+)', line)
        tail = line[files[-1].end():].lstrip(": ").strip() or {"NOT_FOUND": "no such file"}.get(
            code.group(1) if code else "", "unreadable")
        context = ", ".join(x for x in (code.group(1) if code else None,
                                        f"reading {key.group(1)}" if key else None) if x)
        if not files[-1].group(1).endswith("/"):
            where = files[-1].group(1)
        line = tail + (f" ({context})" if context else "")
    return where, line if len(line) <= limit else line[:limit] + " ..."


def _quiet_failed_reads() -> None:
    """After a failed restore, TensorStore reads still in flight finish into orbax's closed event
    loop, and Python prints "Event loop is closed" tracebacks and never-retrieved orbax read
    errors through ``sys.unraisablehook``, possibly much later. Drop exactly those (a filter put
    in front of the current hook on a failed restore, unless it is there already; everything else
    goes on to that hook)."""
    if getattr(sys.unraisablehook, "_lora_jax_filter", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        exc, obj = unraisable.exc_value, unraisable.object
        if isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc):
            return
        code = getattr(obj, "cr_code", None)
        if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
            return
        previous(unraisable)

    hook._lora_jax_filter = True
    sys.unraisablehook = hook


class _Silenced:
    """Orbax logs (ERROR, through absl) what it finds wrong while reading; `restore` reports it."""

    def __enter__(self):
        self._levels = [(log, log.level) for log in map(logging.getLogger, ("absl", "orbax"))]
        for log, _ in self._levels:
            log.setLevel(logging.CRITICAL)

    def __exit__(self, *exc):
        for log, level in self._levels:
            log.setLevel(level)


def _manager(directory: str, *, keep: int = 1, async_save: bool = True, read_only: bool = False):
    import orbax.checkpoint as ocp

    _quiet()
    opts = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=async_save,
        create=not read_only,
        read_only=read_only,
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=opts)


def unfinished_saves(directory: str) -> list[str]:
    """Names of the temporary step directories under ``directory`` that a killed save left behind
    (sorted; none of them is ever restored)."""
    if not os.path.isdir(directory):
        return []
    return sorted(n for n in os.listdir(directory) if TMP_MARK in n)


def _json_args():
    """``(JsonSave, JsonRestore)`` for the ``meta`` item; under the test hook, variants whose
    handler holds the background write of one step (see the module docstring)."""
    import orbax.checkpoint as ocp

    hold = os.environ.get(HOLD_ENV)
    if not hold:
        return ocp.args.JsonSave, ocp.args.JsonRestore
    step, _, marker = hold.partition(":")
    return _held_json_args(int(step), marker)


_HELD: dict = {}


def _held_json_args(step: int, marker: str):
    if (step, marker) in _HELD:
        return _HELD[(step, marker)]
    import asyncio
    import dataclasses
    import time

    import orbax.checkpoint as ocp

    class HeldJsonHandler(ocp.handlers.JsonCheckpointHandler):
        async def _save_fn(self, x, directory):
            if int(x.get("step", -1)) == step:
                with open(marker + ".tmp", "w", encoding="utf-8") as fh:
                    fh.write(str(directory))
                os.replace(marker + ".tmp", marker)
                t0 = time.monotonic()
                while time.monotonic() - t0 < 600:
                    await asyncio.sleep(0.05)
            await super()._save_fn(x, directory)

    @ocp.args.register_with_handler(HeldJsonHandler, for_save=True)
    @dataclasses.dataclass
    class HeldJsonSave(ocp.args.JsonSave):
        pass

    @ocp.args.register_with_handler(HeldJsonHandler, for_restore=True)
    @dataclasses.dataclass
    class HeldJsonRestore(ocp.args.JsonRestore):
        pass

    _HELD[(step, marker)] = (HeldJsonSave, HeldJsonRestore)
    return HeldJsonSave, HeldJsonRestore


def latest_step(directory: str) -> Optional[int]:
    """The newest finalized checkpoint step under ``directory`` (None if there is none). Writes nothing."""
    if not os.path.isdir(directory):
        return None
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(logging.ERROR)  # orbax warns that a read-only manager is read-only
    try:
        m = _manager(directory, read_only=True)
        try:
            return m.latest_step()
        finally:
            m.close()
    finally:
        log.setLevel(level)


class Checkpointer:
    """An orbax ``CheckpointManager`` for training state.

    Args:
      directory: where step directories go (created on first save).
      keep: how many of the newest checkpoints to keep.
      async_save: write in the background (`wait` / `close` block until finished).
      remove_unfinished: delete the temporary step directories a killed run left (only for the
        process that will write here: a reader must not delete a live run's save in flight).

    Attributes:
      removed: the unfinished saves found and deleted when this checkpointer was opened.
    """

    def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True, remove_unfinished: bool = False):
        self.directory = os.path.abspath(directory)
        self.removed = unfinished_saves(self.directory) if remove_unfinished else []
        if jax.process_index() == 0:
            for name in self.removed:  # what a killed run left: never finalized, never read
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        if remove_unfinished:  # no process opens the directory before they are gone
            from .hosts import barrier

            barrier("checkpointer: unfinished saves removed")
        self._json_save, self._json_restore = _json_args()
        self._m = _manager(self.directory, keep=keep, async_save=async_save)

    def save(self, step: int, state, meta: dict) -> None:
        """Save ``state`` (a pytree of arrays) and ``meta`` (JSON-able) as ``step``."""
        import orbax.checkpoint as ocp

        nested, _ = flatten_state(state)
        sums = checksums(nested)
        arrays = {k: {"dtype": np.dtype(v.dtype).name, "shape": [int(d) for d in v.shape], "checksum": sums[k]}
                  for k, v in _flat_items(nested)}
        meta = dict(meta, step=int(step), arrays=arrays)
        meta["meta_checksum"] = _meta_checksum(meta)
        self._m.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(nested),
                                                          meta=self._json_save(meta)), force=True)

    def latest_step(self) -> Optional[int]:
        """The newest finalized step (None if none)."""
        return self._m.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._m.all_steps())

    def restore(self, step: int, target) -> tuple[Any, dict]:
        """``(state, meta)`` of ``step``, verified; ``target`` is a pytree of
        ``jax.ShapeDtypeStruct`` with shardings (or arrays) giving the structure, dtypes and
        placement to restore into.

        Raises:
          DamagedCheckpoint: a file of the step cannot be read, the metadata or an array does not
            match its checksum, or an array holds NaN / Inf (names the step and the file).
          ValueError: the saved arrays do not match the target (names the differences).
        """
        import orbax.checkpoint as ocp

        step = int(step)
        meta = self._read_meta(step)
        nested, treedef = flatten_state(target)
        abstract = jax.tree_util.tree_map(
            lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else
            jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)), nested)
        saved = meta.get("arrays")
        if saved is not None:
            self._check_manifest(step, saved, abstract)
        state_dir = os.path.join(self.directory, str(step), "state")
        try:
            with _Silenced():
                out = self._m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        except Exception as e:  # noqa: BLE001 - orbax / TensorStore raise plain Exceptions for damaged files
            _quiet_failed_reads()
            if saved is None and isinstance(e, (ValueError, KeyError, TypeError)):
                raise ValueError(f"checkpoint step {step} in {self.directory} does not match this run's state "
                                 f"(different model, adapter or optimizer config?): {e}") from None
            raise DamagedCheckpoint(step, *_describe(e, state_dir)) from None
        if saved is not None:
            got = checksums(out["state"])
            bad = [k for k in sorted(got) if got[k] != saved[k]["checksum"]]
            if bad:
                more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
                raise DamagedCheckpoint(step, state_dir, f"array {bad[0]}{more} does not match its checksum "
                                        f"(saved {saved[bad[0]]['checksum']}, read {got[bad[0]]})")
        finite = jax.device_get(_FINITE(out["state"]))
        bad = [k for k, ok in _flat_items(finite) if not bool(ok)]
        if bad:  # the trainer never saves one: written by something else, or damaged unnoticed
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            raise DamagedCheckpoint(step, state_dir, f"array {bad[0]}{more} holds NaN or Inf")
        state = unflatten_state(out["state"], treedef, target)
        return state, meta

    def _read_meta(self, step: int) -> dict:
        """The ``meta`` item of ``step``, checked (its checksum, ``step`` and ``position``)."""
        import orbax.checkpoint as ocp

        path = os.path.join(self.directory, str(step), "meta", "metadata")
        try:
            with _Silenced():
                meta = self._m.restore(step, args=ocp.args.Composite(meta=self._json_restore()))["meta"]
        except Exception as e:  # noqa: BLE001 - see restore
            _quiet_failed_reads()
            raise DamagedCheckpoint(step, *_describe(e, path)) from None
        if not isinstance(meta, dict):
            raise DamagedCheckpoint(step, path, f"expected a JSON object, got {type(meta).__name__}")
        meta = dict(meta)
        for key in ("step", "position"):
            if key not in meta:
                raise DamagedCheckpoint(step, path, f"missing key {key!r}")
            if isinstance(meta[key], bool) or not isinstance(meta[key], int):
                raise DamagedCheckpoint(step, path, f"{key} is {meta[key]!r}, expected an integer")
        if meta["step"] != step:
            raise DamagedCheckpoint(step, path, f"it says step {meta['step']}")
        if "meta_checksum" in meta and meta["meta_checksum"] != _meta_checksum(meta):
            raise DamagedCheckpoint(step, path, "the metadata does not match its checksum")
        arrays = meta.get("arrays")
        if arrays is not None and not (isinstance(arrays, dict) and all(
                isinstance(v, dict) and {"dtype", "shape", "checksum"} <= set(v) for v in arrays.values())):
            raise DamagedCheckpoint(step, path, "malformed 'arrays' entry")
        return meta

    def _check_manifest(self, step: int, saved: dict, abstract: dict) -> None:
        want = {k: (np.dtype(v.dtype).name, [int(d) for d in v.shape]) for k, v in _flat_items(abstract)}
        got = {k: (v["dtype"], list(v["shape"])) for k, v in saved.items()}
        diffs = [f"{k}: saved {got[k][0]}{got[k][1]}, this run {want[k][0]}{want[k][1]}"
                 for k in sorted(set(want) & set(got)) if got[k] != want[k]]
        diffs += [f"{k}: not in the checkpoint" for k in sorted(set(want) - set(got))]
        diffs += [f"{k}: in the checkpoint, not in this run" for k in sorted(set(got) - set(want))]
        if diffs:
            more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
            raise ValueError(f"checkpoint step {step} in {self.directory} does not match this run's state "
                             f"(different model, adapter or optimizer config?): {'; '.join(diffs[:3])}{more}")

    def wait(self) -> None:
        """Block until background writes are finished."""
        self._m.wait_until_finished()

    def close(self) -> None:
        self._m.wait_until_finished()
        self._m.close()

"""Training checkpoints with orbax: adapter, optimizer state, rng, step and data position.

Each checkpoint is one orbax step directory holding two items:

* ``state``: the arrays (``ocp.args.StandardSave``), as a nested dict keyed by each leaf's key
  path (``adapter/model/layers/0/self_attn/q_proj/kernel/a``, ``opt_state/0/mu/...``,
  ``rng``) — flat string keys keep custom pytree nodes (`LoraWeight`, optax states) out of the
  file format; the live tree's structure is used to rebuild them on restore;
* ``meta``: JSON (``ocp.args.JsonSave``): step, data position, seed and anything else passed.

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

import logging
import os
import shutil
from typing import Any, Optional

import jax
import numpy as np

from ..rules import key_str

__all__ = ["Checkpointer", "latest_step", "unfinished_saves", "flatten_state", "unflatten_state"]

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
        self._json_save, self._json_restore = _json_args()
        self._m = _manager(self.directory, keep=keep, async_save=async_save)

    def save(self, step: int, state, meta: dict) -> None:
        """Save ``state`` (a pytree of arrays) and ``meta`` (JSON-able) as ``step``."""
        import orbax.checkpoint as ocp

        nested, _ = flatten_state(state)
        meta = dict(meta, step=int(step))
        self._m.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(nested),
                                                          meta=self._json_save(meta)), force=True)

    def latest_step(self) -> Optional[int]:
        """The newest finalized step (None if none)."""
        return self._m.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._m.all_steps())

    def restore(self, step: int, target) -> tuple[Any, dict]:
        """``(state, meta)`` of ``step``; ``target`` is a pytree of ``jax.ShapeDtypeStruct`` with
        shardings (or arrays) giving the structure, dtypes and placement to restore into.

        Raises:
          ValueError: if the saved arrays do not match the target (names the differences).
        """
        import orbax.checkpoint as ocp

        nested, treedef = flatten_state(target)
        abstract = jax.tree_util.tree_map(
            lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else
            jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)), nested)
        try:
            out = self._m.restore(int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                     meta=self._json_restore()))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"checkpoint step {step} in {self.directory} does not match this run's state "
                             f"(different model, adapter or optimizer config?): {e}") from None
        state = unflatten_state(out["state"], treedef, target)
        return state, dict(out["meta"])

    def wait(self) -> None:
        """Block until background writes are finished."""
        self._m.wait_until_finished()

    def close(self) -> None:
        self._m.wait_until_finished()
        self._m.close()

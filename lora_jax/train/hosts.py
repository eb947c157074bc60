"""What the processes of one distributed run agree on before they act.

A run over several processes (``distributed: true``, one process per host or per group of
devices) must take every decision alike: which run directory, which checkpoint to resume, whether
a setting is bad. A decision taken by one process alone (a refused lock on process 0, a damaged
checkpoint only one of them saw) would leave the others waiting in a collective until their
heartbeat timeout. So every check that can fail goes through `agree`: each process contributes
its outcome, all see every outcome, and all raise the same error or none does. `check_same` is
the first such check: the processes must run the same config and the same code.

Everything here is a no-op with one process, and uses only JAX's public multi-host API
(``jax.experimental.multihost_utils``: collectives over the processes' devices).

Example:
  >>> agree("mesh", None)  # one process: nothing to compare
  >>> check_same({"lr": 1e-3})
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping, Optional, TypeVar

import jax
import numpy as np

from .config import ConfigError

T = TypeVar("T")

__all__ = ["gather_bytes", "agree", "together", "check_same", "barrier", "code_version"]


def code_version() -> str:
    """The installed lora_jax's version and a digest of its source files: two processes of one
    run must run the same code, whatever version string they report."""
    import hashlib
    import os

    from .. import __version__

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256()
    for d, dirs, names in sorted(os.walk(root)):
        dirs.sort()
        for n in sorted(names):
            if n.endswith(".py"):
                with open(os.path.join(d, n), "rb") as fh:
                    h.update(os.path.relpath(os.path.join(d, n), root).encode() + b"\0" + fh.read())
    return f"{__version__} ({h.hexdigest()[:12]})"


def gather_bytes(data: bytes) -> list[bytes]:
    """Every process's ``data``, in process order (``[data]`` with one process)."""
    if jax.process_count() == 1:
        return [data]
    from jax.experimental import multihost_utils as mh

    sizes = np.asarray(mh.process_allgather(np.asarray([len(data)], np.int64))).reshape(-1)
    buf = np.zeros(int(sizes.max()) or 1, np.uint8)
    buf[: len(data)] = np.frombuffer(data, np.uint8)
    got = np.asarray(mh.process_allgather(buf)).reshape(len(sizes), -1)
    return [got[i, : int(n)].tobytes() for i, n in enumerate(sizes)]


def agree(what: str, error: Optional[str]) -> None:
    """Every process passes the outcome of the same check (``None``: fine, else its error message);
    if any failed, every process raises `ConfigError` with the first failure (naming its process
    when there are several), so all stop alike instead of some waiting for the others."""
    if jax.process_count() == 1:
        if error is not None:
            raise ConfigError(error)
        return
    outcomes = [json.loads(b) for b in gather_bytes(json.dumps(error).encode())]
    failed = [(i, e) for i, e in enumerate(outcomes) if e is not None]
    if failed:
        i, e = failed[0]
        raise ConfigError(f"{e} [{what}: process {i} of {len(outcomes)}]")


def together(what: str, fn: Callable[[], T]) -> T:
    """``fn()`` on every process, its `ConfigError` on any of them raised on all (`agree`); with
    one process simply ``fn()``."""
    if jax.process_count() == 1:
        return fn()
    error, out = None, None
    try:
        out = fn()
    except ConfigError as e:
        error = str(e)
    agree(what, error)
    return out


def check_same(facts: Mapping[str, Any]) -> None:
    """All processes hold the same ``facts`` (the flattened config, the code's version, ...); a
    process that differs is refused on every process with a message naming each difference."""
    if jax.process_count() == 1:
        return
    mine = {str(k): v for k, v in facts.items()}
    every = [json.loads(b) for b in gather_bytes(json.dumps(mine, sort_keys=True, default=repr).encode())]
    first = every[0]
    diffs = []
    for i, other in enumerate(every[1:], 1):
        for k in sorted(set(first) | set(other)):
            if first.get(k) != other.get(k):
                diffs.append(f"process {i} has {k}={other.get(k)!r}, process 0 {k}={first.get(k)!r}")
    if diffs:
        raise ConfigError("distributed: the processes of one run must run the same config and code; "
                          + "; ".join(diffs[:10]) + (f" (and {len(diffs) - 10} more)" if len(diffs) > 10 else ""))


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils as mh

        mh.sync_global_devices(name)

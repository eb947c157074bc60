"""The step settings that win: remat policy, loss form and layer-scan unrolling, picked within memory.

Three settings of the jitted train step change its speed and its memory, never its numbers:

* ``remat``: the ``jax.checkpoint`` policy of each scanned decoder layer (`lora_jax.models.layers.
  REMAT_POLICIES`, or None: keep every activation);
* ``loss``: ``"plain"`` (the log-softmax of the full ``(B, T, V)`` float32 logits) or ``"chunked"``
  (`lora_jax.train.loss.chunked_token_stats`: a chunk of positions at a time, logits recomputed in
  the backward pass);
* ``unroll``: decoder layers per iteration of the layer scan (0: all of them, i.e. no loop).

`candidates` lists them fastest first for a backend (measured: ``benchmarks/results``), with the
user's fixed choices applied; `pick` compiles them in that order and keeps the first whose
compiled footprint (`footprint`: arguments + outputs + temporaries - donated aliases, from
``Compiled.memory_analysis()``) fits the memory limit. On a GPU the limit is the device's
allocator limit less a safety margin; on a CPU there is none, so the first candidate wins.

Example:
  >>> [c.label for c in candidates("cpu")]
  ['remat=none loss=chunked unroll=1']
  >>> candidates("gpu", loss="chunked")[0].loss
  'chunked'
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import jax

__all__ = ["StepSettings", "candidates", "footprint", "device_memory_limit", "pick", "AUTO", "MEMORY_MARGIN"]

AUTO = "auto"
LOSSES = ("plain", "chunked")
# the share of the device's allocator limit a compiled step may plan to use (fragmentation, the
# runtime's own buffers, the batch being transferred)
MEMORY_MARGIN = 0.92


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """One choice of the three speed settings (none of them changes the step's numbers)."""

    remat: Optional[str]
    loss: str
    unroll: int = 1

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"StepSettings.loss must be one of {LOSSES}, got {self.loss!r}")
        if isinstance(self.unroll, bool) or not isinstance(self.unroll, int) or self.unroll < 0:
            raise ValueError(f"StepSettings.unroll must be an integer >= 0 (0: every layer), got {self.unroll!r}")

    @property
    def label(self) -> str:
        return f"remat={self.remat or 'none'} loss={self.loss} unroll={self.unroll or 'all'}"

    def scan_unroll(self, num_layers: int) -> int:
        """The model config's ``scan_unroll`` for a model of ``num_layers`` layers."""
        return max(1, int(num_layers)) if self.unroll == 0 else self.unroll


_DOTS = "dots_with_no_batch_dims_saveable"
# fastest first, as measured on one H200 (benchmarks/results/): saving the matmul outputs and
# recomputing the elementwise work is faster than saving everything (fewer bytes stacked per
# layer) and far smaller; the plain loss beats the chunked one where its logits fit; unrolling the
# layer scan removes its per-layer copies of weights and activations. Only the first candidate
# is unrolled: when it does not fit, memory is tight, and the rolled scan compiles several times
# faster while `pick` searches.
_ACCEL = (StepSettings(_DOTS, "plain", 0), StepSettings(_DOTS, "plain", 1), StepSettings(_DOTS, "chunked", 1),
          StepSettings("nothing_saveable", "chunked", 1))
# on a CPU memory is rarely the limit and compile time is: no remat, the chunked loss, a rolled scan
_CPU = (StepSettings(None, "chunked", 1),)


def candidates(backend: str, *, remat: Optional[str] = AUTO, loss: str = AUTO, unroll=AUTO) -> list[StepSettings]:
    """The settings to try, fastest first, for ``backend`` (``"gpu"``, ``"tpu"``, ``"cpu"``).

    Args:
      backend: ``jax.default_backend()``.
      remat: a policy name, ``None``/``"none"`` (no remat) or ``"auto"``.
      loss: ``"plain"``, ``"chunked"`` or ``"auto"``.
      unroll: layers per scan iteration (0: all), or ``"auto"``.

    A fixed choice replaces that field in every candidate (duplicates dropped, order kept).
    """
    base = _CPU if backend == "cpu" else _ACCEL
    if loss != AUTO and loss not in LOSSES:
        raise ValueError(f"loss must be 'auto' or one of {LOSSES}, got {loss!r}")
    out: list[StepSettings] = []
    for c in base:
        c = dataclasses.replace(
            c, remat=c.remat if remat == AUTO else (None if remat in (None, "none") else remat),
            loss=c.loss if loss == AUTO else loss, unroll=c.unroll if unroll == AUTO else int(unroll))
        if c not in out:
            out.append(c)
    return out


def footprint(compiled) -> Optional[int]:
    """Bytes a compiled executable needs while it runs: arguments + outputs + temporaries, less the
    outputs that reuse donated arguments (None where the backend does not say)."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def device_memory_limit(device=None) -> Optional[int]:
    """The allocator's limit of ``device`` (default: the first) times `MEMORY_MARGIN`; None on a
    backend that reports none (the CPU)."""
    d = device or jax.devices()[0]
    stats = d.memory_stats() if hasattr(d, "memory_stats") else None
    limit = (stats or {}).get("bytes_limit")
    return None if not limit else int(limit * MEMORY_MARGIN)


def pick(cands: Sequence[StepSettings], compile_fn: Callable, limit: Optional[int]):
    """Compile the candidates in order and return the first that fits ``limit`` bytes.

    Args:
      cands: `candidates` (fastest first).
      compile_fn: ``settings -> compiled step`` (a ``jax.stages.Compiled``).
      limit: bytes the step may use (per device); None: no limit (the first candidate wins).

    Returns:
      ``(settings, compiled, tried)`` where ``tried`` lists ``{"settings", "bytes"}`` of each
      candidate compiled, in order.

    Raises:
      ValueError: no candidate fits; the message names each one's footprint and the limit.
    """
    if not cands:
        raise ValueError("pick: no candidate settings to try")
    tried = []
    for c in cands:
        compiled = compile_fn(c)
        need = footprint(compiled)
        tried.append({"settings": c.label, "bytes": need})
        if limit is None or need is None or need <= limit:
            return c, compiled, tried
        del compiled
    raise ValueError(
        f"no step settings fit the memory limit of {limit / 2**30:.2f} GiB: "
        + "; ".join(f"{t['settings']} needs {t['bytes'] / 2**30:.2f} GiB" for t in tried)
        + " (lower train.batch_size, raise train.grad_accum or shorten data.seq_len)")

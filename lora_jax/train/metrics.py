"""Metrics of a run: JSONL records, a progress bar with tokens/s and ETA, a loss-curve PNG.

Records are one JSON object a line in ``metrics.jsonl``: ``{"kind": "train", "step", "loss",
"lr", "grad_norm", "tokens_per_s", ...}`` and ``{"kind": "eval", "step", "eval_loss",
"eval_ppl", "eval_acc", "eval_tokens"}``. Only process 0 writes.

Example:
  >>> import os, tempfile
  >>> path = os.path.join(tempfile.mkdtemp(), "metrics.jsonl")
  >>> w = MetricsWriter(path)
  >>> w.write({"kind": "train", "step": 1, "loss": 2.5}); w.close()
  >>> read_metrics(path)[0]["loss"]
  2.5
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Optional

import jax

from .files import atomic_write_text, usual_mode

__all__ = ["MetricsWriter", "read_metrics", "plot_losses", "Progress", "strict_json"]


def read_metrics(path: str) -> list[dict]:
    """All records of a metrics file (an empty list if it does not exist).

    A last line that is cut short (a process killed in the middle of writing it) is ignored.

    Raises:
      ValueError: a line before the last is not a JSON object (names the file and line).
    """
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as fh:
        lines = fh.read().split("\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except ValueError as e:
            if i == len(lines) - 1:  # no newline after it: a torn final write
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON record ({e})") from None
        out.append(rec)
    return out


def _clean(v):
    """``v`` with every non-finite float (also inside dicts, lists and tuples) replaced by None."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def strict_json(obj, **kw) -> str:
    """``json.dumps`` that always gives valid JSON: NaN and infinities become ``null``.

    Example:
      >>> strict_json({"loss": float("nan"), "ppl": [float("inf"), 1.5]})
      '{"loss": null, "ppl": [null, 1.5]}'
    """
    return json.dumps(_clean(obj), allow_nan=False, **kw)


class MetricsWriter:
    """Appends records to a JSONL file.

    Each record is one ``write`` of one line, flushed at once; NaN and infinities are written as
    ``null`` (strict JSON).

    Args:
      path: the file.
      resume_step: when resuming from a checkpoint, records of ``phase`` after this step (written
        before the interruption, after the checkpoint) are dropped first, so each step appears once;
        a torn last line is dropped too (the file is rewritten atomically).
      phase: the phase the checkpoints belong to.
      restart: start the file afresh (a run started over).
    """

    def __init__(self, path: str, *, resume_step: Optional[int] = None, phase: str = "lora",
                 restart: bool = False):
        self.path = path
        self.active = jax.process_index() == 0
        self._fh = None
        if not self.active:
            return
        if restart and os.path.isfile(path):
            atomic_write_text(path, "")
        elif resume_step is not None and os.path.isfile(path):
            keep = [r for r in read_metrics(path) if r.get("phase") != phase or r.get("step", 0) <= resume_step]
            atomic_write_text(path, "".join(self._line(r) for r in keep))
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._fh = open(path, "a", encoding="utf-8")

    @staticmethod
    def _line(record: dict) -> str:
        return strict_json(record) + "\n"

    def write(self, record: dict) -> None:
        if self._fh is not None:
            self._fh.write(self._line(record))
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def plot_losses(records: list[dict], png_path: str, *, title: str = "") -> None:
    """Train and eval loss against step, one panel per phase (``pretrain``, ``lora``), written to
    ``png_path`` (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    phases = [p for p in ("pretrain", "lora") if any(r.get("phase") == p for r in records)] or ["lora"]
    names = {"pretrain": "pretraining (all parameters)", "lora": "LoRA fine-tune (adapter only)"}
    fig, axes = plt.subplots(1, len(phases), figsize=(6.0 * len(phases), 4.0), dpi=100, squeeze=False)
    for ax, phase in zip(axes[0], phases):
        mine = [r for r in records if r.get("phase", "lora") == phase]
        train = [(r["step"], r["loss"]) for r in mine if r.get("kind") == "train" and r.get("loss") is not None]
        ev = [(r["step"], r["eval_loss"]) for r in mine if r.get("kind") == "eval" and r.get("eval_loss") is not None]
        if train:
            ax.plot(*zip(*train), label="train loss", lw=1.2)
        if ev:
            ax.plot(*zip(*ev), "o-", label="eval loss", lw=1.2, ms=4)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(names.get(phase, phase))
        ax.grid(alpha=0.3)
        if train or ev:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    import tempfile

    d, name = os.path.split(os.path.abspath(png_path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", suffix=".png", dir=d)  # a leftover `remove_leftovers` knows
    usual_mode(fd)
    os.close(fd)
    try:
        fig.savefig(tmp)
        os.replace(tmp, png_path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


class Progress:
    """A tqdm bar over optimizer steps (stderr, process 0 only) showing loss and tokens/s; tqdm
    adds the ETA. ``enabled=False`` shows no bar; `write` then hands lines to ``echo``."""

    def __init__(self, total: int, initial: int = 0, *, enabled: bool = True, desc: str = "train",
                 echo=print):
        self.main = jax.process_index() == 0
        self._bar = None
        self._echo = echo
        if enabled and self.main:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                             file=sys.stderr, leave=True)

    def update(self, n: int, **postfix) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                      refresh=False)

    def write(self, line: str) -> None:
        if not self.main:
            return
        if self._bar is not None:
            self._bar.write(line)
        elif self._echo is print:
            print(line, flush=True)
        else:
            self._echo(line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def perplexity(loss: Optional[float]) -> float:
    """``exp(loss)``; inf past 80, NaN for a loss that is NaN or None (no scored token)."""
    if loss is None or math.isnan(loss):
        return float("nan")
    return math.exp(loss) if loss < 80 else float("inf")

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

from .files import atomic_write_text

__all__ = ["MetricsWriter", "read_metrics", "plot_losses", "Progress"]


def read_metrics(path: str) -> list[dict]:
    """All records of a metrics file (an empty list if it does not exist)."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


class MetricsWriter:
    """Appends records to a JSONL file.

    Args:
      path: the file.
      resume_step: when resuming from a checkpoint, records of ``phase`` after this step (written
        before the interruption, after the checkpoint) are dropped first, so each step appears once.
      phase: the phase the checkpoints belong to.
    """

    def __init__(self, path: str, *, resume_step: Optional[int] = None, phase: str = "lora"):
        self.path = path
        self.active = jax.process_index() == 0
        self._fh = None
        if not self.active:
            return
        if resume_step is not None and os.path.isfile(path):
            keep = [r for r in read_metrics(path) if r.get("phase") != phase or r.get("step", 0) <= resume_step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._fh = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps(record) + "\n")
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
        train = [(r["step"], r["loss"]) for r in mine if r.get("kind") == "train" and "loss" in r]
        ev = [(r["step"], r["eval_loss"]) for r in mine if r.get("kind") == "eval" and "eval_loss" in r]
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
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)


class Progress:
    """A tqdm bar over optimizer steps (stderr, process 0 only) showing loss and tokens/s; tqdm
    adds the ETA. ``enabled=False`` prints nothing but `write` still prints lines."""

    def __init__(self, total: int, initial: int = 0, *, enabled: bool = True, desc: str = "train"):
        self.main = jax.process_index() == 0
        self._bar = None
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
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 80 else float("inf")

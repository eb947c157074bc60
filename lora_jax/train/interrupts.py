"""Graceful stops: SIGINT / SIGTERM ask the training loop to finish its step and checkpoint.

`StopSignals` is a context manager that, while it is active in the main thread, replaces the
SIGINT and SIGTERM handlers with one that only records the signal; the loop polls
`StopSignals.signum` after each step, writes a checkpoint and raises `TrainingInterrupted`. A
second signal while the first is being handled raises `TrainingInterrupted` at once (no
checkpoint waited for): pressing Ctrl-C twice always stops. The previous handlers are put back
on exit. Outside the main thread (where Python cannot install handlers) it does nothing.

Example:
  >>> import os, signal
  >>> with StopSignals() as stop:
  ...     os.kill(os.getpid(), signal.SIGTERM)
  ...     stop.signum == signal.SIGTERM
  True
  >>> signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
  True
"""

from __future__ import annotations

import signal
import threading
from typing import Optional

__all__ = ["StopSignals", "TrainingInterrupted", "signal_name", "exit_code"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_code(signum: int) -> int:
    """The shell's status for a process ended by ``signum``: 128 + its number (130 SIGINT, 143 SIGTERM)."""
    return 128 + int(signum)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT / SIGTERM.

    A `KeyboardInterrupt` (so ``except Exception`` does not swallow it), with:

    Attributes:
      signum: the signal.
      step: the last step completed (None if unknown: a second signal stopped at once).
      checkpoint_step: the step of the finalized checkpoint a resume starts from (None: none).
      exit_code: ``128 + signum``, what the ``lora-jax`` command exits with.
    """

    def __init__(self, message: str, *, signum: int, step: Optional[int] = None,
                 checkpoint_step: Optional[int] = None):
        super().__init__(message)
        self.signum, self.step, self.checkpoint_step = int(signum), step, checkpoint_step
        self.exit_code = exit_code(signum)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class StopSignals:
    """Record SIGINT / SIGTERM instead of dying (see the module docstring).

    Args:
      enabled: False makes this a no-op (``signum`` stays None).
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.signum: Optional[int] = None
        self._previous: dict = {}

    def _handle(self, signum, frame):  # noqa: ARG002 - the signal module's signature
        if self.signum is None:
            self.signum = signum
            return
        self._restore()
        raise TrainingInterrupted(f"{signal_name(signum)} received again while stopping; stopped at once without "
                                  "waiting for a checkpoint (the newest finalized checkpoint is kept)",
                                  signum=signum)

    def _restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        self.signum = None
        if self.enabled and threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

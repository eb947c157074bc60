"""One run per directory: an exclusive lock on a run's ``out_dir`` held while ``lora-jax train`` runs.

The lock is ``fcntl.flock`` on the file ``out_dir/.lock``, which holds the holder's pid, host and
start time (JSON). The kernel drops a ``flock`` when its process ends, however it ends (exit,
exception, SIGKILL, out of memory), so a crashed run never leaves a lock that blocks the next one:
its file is left with the dead holder's details and is taken over (`RunLock.previous` says by
whom it was left). A clean release empties the file. A second process asking for a held lock gets
`RunDirLocked` at once, naming the live holder.

Not covered: file systems where ``flock`` is not shared between hosts (some network file
systems): there two hosts may both get the lock.

Example:
  >>> import tempfile
  >>> d = tempfile.mkdtemp()
  >>> lock = RunLock.acquire(d)
  >>> try:
  ...     RunLock.acquire(d)
  ... except RunDirLocked as e:
  ...     "in use by another lora-jax run" in str(e)
  True
  >>> lock.release()
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from typing import Optional

__all__ = ["RunLock", "RunDirLocked", "LOCK_NAME"]

LOCK_NAME = ".lock"


class RunDirLocked(RuntimeError):
    """The run directory is locked by a live process.

    Attributes:
      holder: what the lock file says about its holder (``pid``, ``host``, ``started``), or {}.
    """

    def __init__(self, message: str, holder: dict):
        super().__init__(message)
        self.holder = holder


def _read(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)
        info = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _who(info: dict) -> str:
    if not info.get("pid"):
        return "a process that has not written its details yet"
    started = f", started {info['started']}" if info.get("started") else ""
    return f"pid {info['pid']} on host {info.get('host', '?')}{started}"


class RunLock:
    """The held lock of one run directory (see the module docstring); `acquire` makes one.

    Attributes:
      directory: the locked directory.
      created: `acquire` created the directory.
      previous: the details a holder that did not release (a crashed run) left in the lock file;
        {} when the lock was free and clean.
    """

    def __init__(self, directory: str, fd: int, created: bool, previous: dict, created_file: bool = False,
                 found: bytes = b""):
        self.directory, self._fd, self.created, self.previous = directory, fd, created, previous
        self._created_file, self._found = created_file, found

    @property
    def path(self) -> str:
        return os.path.join(self.directory, LOCK_NAME)

    @classmethod
    def acquire(cls, directory: str) -> "RunLock":
        """Lock ``directory`` (created if missing) for this process.

        Raises:
          RunDirLocked: another live process holds it (the message names its pid and host).
          OSError: the directory or the lock file cannot be created.
        """
        directory = os.path.abspath(directory)
        created = not os.path.isdir(directory)
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, LOCK_NAME)
        while True:
            existed = os.path.exists(path)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # umask applies; not inherited by children
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read(fd)
                os.close(fd)
                raise RunDirLocked(f"{directory!r} is in use by another lora-jax run ({_who(holder)}); wait until it "
                                   "ends, or stop it first (SIGTERM checkpoints and stops it), then retry",
                                   holder) from None
            try:  # a holder releasing with release(clean=True) unlinks the file: lock the file at `path`
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read(fd)
        found = os.pread(fd, 1 << 16, 0)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
        return cls(directory, fd, created, previous, created_file=not existed, found=found)

    def describe_previous(self) -> Optional[str]:
        """A line about a stale lock taken over (None when the lock was clean)."""
        if not self.previous:
            return None
        return (f"the lock {self.path} was left by {_who(self.previous)}, which is no longer running (it crashed or "
                "was killed); taken over")

    def release(self, *, clean: bool = False) -> None:
        """Release the lock (idempotent). ``clean``: leave things as `acquire` found them (a run
        that wrote nothing leaves nothing): the lock file removed if `acquire` created it, else
        emptied or given back what a crashed holder left; the directory removed if `acquire`
        created it and it is empty."""
        if self._fd is None:
            return
        try:
            if clean and self._created_file:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                if self.created:
                    try:
                        os.rmdir(self.directory)
                    except OSError:
                        pass
            else:
                os.ftruncate(self._fd, 0)  # a clean end: the next holder finds nothing stale
                if clean and self._found:  # nothing done here: the file as it was (a crashed holder's note)
                    os.pwrite(self._fd, self._found, 0)
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

"""``lora-jax launch``: several processes of one run on this machine, as a cluster would start them.

Each process gets ``JAX_COORDINATOR_ADDRESS`` (``localhost:PORT``), ``JAX_NUM_PROCESSES`` and its
``JAX_PROCESS_ID``, and runs ``lora-jax ARGS... distributed=true``; with ``cpu_devices`` it runs on
the CPU with that many devices per process and gloo collectives (how the tests prove multi-process
behaviour without accelerators). On SLURM, a TPU pod or a set of GPU nodes the cluster starts one
process per host instead and ``jax.distributed.initialize()`` finds its peers itself (README:
"Several processes and hosts").

Faults: the processes run in their own session and die with the launcher (``PR_SET_PDEATHSIG`` on
Linux). When one exits with a failure, the others are given ``grace`` seconds to notice it (a
process whose peer is gone exits with status 4, `lora_jax.cli.EXIT_PEER_LOST`, naming the peer)
and are then killed. The launcher prints every process's exit status and returns the status of
the process that failed first (a signal ``s`` as ``128 + s``), never 0 unless all succeeded.

Example:
  >>> launch(["train", "train.steps=2"], processes=2, cpu_devices=2)  # doctest: +SKIP
  0
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Callable, Optional, Sequence

__all__ = ["launch", "free_port"]


def free_port() -> int:
    """A TCP port that was free a moment ago on localhost."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child before exec
    os.setsid()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _status(rc: int) -> int:
    return 128 - rc if rc < 0 else rc


def _describe(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit status {rc}"


def launch(args: Sequence[str], processes: int, *, cpu_devices: int = 0, port: Optional[int] = None,
           grace: float = 30.0, echo: Callable[[str], None] = print) -> int:
    """Run ``lora-jax ARGS distributed=true`` as ``processes`` processes; returns the exit status.

    Args:
      args: the command and its arguments (``["train", "conf.yaml", "train.steps=20"]``).
      processes: how many processes (>= 1).
      cpu_devices: > 0: run on the CPU with this many devices per process (gloo collectives).
      port: the coordinator's port on localhost (default: a free one).
      grace: seconds the others get to stop by themselves after one failed, before they are killed.

    Raises:
      ValueError: ``processes`` < 1, ``cpu_devices`` < 0 or no command.
    """
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"launch: processes must be an integer >= 1, got {processes!r}")
    if isinstance(cpu_devices, bool) or not isinstance(cpu_devices, int) or cpu_devices < 0:
        raise ValueError(f"launch: cpu_devices must be an integer >= 0, got {cpu_devices!r}")
    if not args:
        raise ValueError("launch: no command given (e.g. lora-jax launch --processes 2 train)")
    port = port or free_port()
    procs = []
    for i in range(processes):
        env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(processes),
                   JAX_PROCESS_ID=str(i))
        if cpu_devices:
            flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
            env.update(JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
                       XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={cpu_devices}"]))
        cmd = [sys.executable, "-m", "lora_jax.cli", *args, "distributed=true"]
        procs.append(subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent))
    echo(f"lora-jax launch: {processes} process(es), coordinator localhost:{port}"
         + (f", {cpu_devices} CPU device(s) each" if cpu_devices else ""))
    first: Optional[int] = None  # the process whose failure decides the status
    deadline = None
    try:
        while any(p.poll() is None for p in procs):
            failed = [i for i, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed and first is None:
                first = failed[0]
                deadline = time.monotonic() + grace
            if deadline is not None and time.monotonic() > deadline:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.1)
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)  # each checkpoints its step and stops (see the trainer)
        for p in procs:
            p.wait()
    rcs = [p.wait() for p in procs]
    failed = [i for i, rc in enumerate(rcs) if rc != 0]
    if not failed:
        echo(f"lora-jax launch: all {processes} process(es) finished")
        return 0
    # the cause is the first process seen failing, unless it only noticed a lost peer (status 4, or
    # SIGABRT from the runtime's own check): then the first that failed for another reason
    from ..cli import EXIT_PEER_LOST

    order = ([first] if first is not None else []) + failed
    cause = next((i for i in order if rcs[i] not in (EXIT_PEER_LOST, -signal.SIGABRT)), order[0])
    echo("lora-jax launch: " + ", ".join(f"process {i}: {_describe(rc)}" for i, rc in enumerate(rcs)))
    return _status(rcs[cause])

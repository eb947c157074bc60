"""Several processes of one run, with real processes on JAX's CPU runtime (gloo collectives).

Each test starts its processes itself (`lora-jax launch`, or one `python -m lora_jax.cli` per
process with the variables a cluster sets) and enforces its own timeout.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lora_jax.train.launch import free_port
from train_helpers import tiny_overrides

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "lora_jax.cli"]


def _env(**kw):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    env.update(kw)
    return env


def _losses(out_dir):
    recs = [json.loads(x) for x in open(os.path.join(out_dir, "metrics.jsonl"))]
    return [(r["phase"], r["step"], r["loss"]) for r in recs if "loss" in r]


def _adapter(out_dir):
    from lora_jax.io._files import read_safetensors

    return {k: np.array(v) for k, v in read_safetensors(os.path.join(out_dir, "adapter",
                                                                     "adapter_model.safetensors"))[0].items()}


def _start(i, n, port, args, **env):
    return subprocess.Popen(CLI + ["train", *args, "distributed=true"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env=_env(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(n),
                                     JAX_PROCESS_ID=str(i), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
                                     XLA_FLAGS="--xla_force_host_platform_device_count=2", **env))


def test_two_processes_of_two_devices_train_as_one_process_of_four(tmp_path):
    one = subprocess.run(CLI + ["train", *tiny_overrides(tmp_path / "one")], capture_output=True, text=True,
                         timeout=300, env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=4"))
    assert one.returncode == 0, one.stdout + one.stderr
    two = subprocess.run(CLI + ["launch", "--processes", "2", "--cpu-devices", "2", "train",
                                *tiny_overrides(tmp_path / "two")], capture_output=True, text=True, timeout=300,
                         env=_env())
    assert two.returncode == 0, two.stdout + two.stderr
    assert "devices: 4 x cpu, processes: 2" in two.stdout and "all 2 process(es) finished" in two.stderr
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [x[:2] for x in a] == [x[:2] for x in b] and len(a) >= 6
    np.testing.assert_allclose([x[2] for x in b], [x[2] for x in a], rtol=1e-6, atol=1e-6)
    wa, wb = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert sorted(wa) == sorted(wb)
    for k in wa:
        np.testing.assert_allclose(wb[k], wa[k], rtol=1e-6, atol=1e-6)
    # every file written once, by process 0, and no temporaries left
    names = sorted(os.listdir(tmp_path / "two"))
    assert not [n for n in names if n.startswith(".") and n != ".lock"], names
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["2", "4"]


def test_a_process_with_another_config_is_refused_on_every_process(tmp_path):
    port = free_port()
    args = tiny_overrides(tmp_path / "r")
    procs = [_start(0, 2, port, args), _start(1, 2, port, args + ["train.lr=0.001"])]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], outs
    for out in outs:
        assert "process 1 has config train.lr=0.001, process 0 config train.lr=0.003" in out, out
    assert not (tmp_path / "r").exists()  # nothing written


def test_a_run_directory_in_use_is_refused_on_every_process(tmp_path):
    from lora_jax.train.lock import RunLock

    (tmp_path / "r").mkdir()
    lock = RunLock.acquire(str(tmp_path / "r"))
    try:
        port = free_port()
        args = tiny_overrides(tmp_path / "r")
        procs = [_start(i, 2, port, args) for i in range(2)]
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        lock.release(clean=True)
    assert [p.returncode for p in procs] == [2, 2], outs
    for out in outs:  # the same error on both, naming the process that found the lock
        assert "out_dir:" in out and str(os.getpid()) in out, out
        assert "[the run directory's lock: process 0 of 2]" in out, out


def test_sigkill_of_one_process_stops_the_other_and_the_run_resumes_as_if_uninterrupted(tmp_path):
    args = tiny_overrides(tmp_path / "r", **{"train.steps": 12, "train.checkpoint_every": 2, "train.eval_every": 4,
                                             "peer_timeout": 10})
    port = free_port()
    procs = [_start(i, 2, port, args) for i in range(2)]
    t0 = time.monotonic()
    ck = tmp_path / "r" / "checkpoints"
    while not (ck.is_dir() and any(n.isdigit() and int(n) >= 4 for n in os.listdir(ck))):
        assert time.monotonic() - t0 < 240 and all(p.poll() is None for p in procs), "run did not reach step 4"
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    t_kill = time.monotonic()
    out0 = procs[0].communicate(timeout=90)[0]
    took = time.monotonic() - t_kill
    procs[1].wait()
    assert procs[0].returncode != 0 and took < 60, (procs[0].returncode, took, out0[-2000:])
    if procs[0].returncode == 4:
        assert "lost contact with process 1" in out0, out0[-2000:]
    assert not (tmp_path / "r" / "adapter").exists()  # no success reported, nothing exported
    # the resumed run (same number of processes) ends as one that was never interrupted
    port = free_port()
    procs = [_start(i, 2, port, args + ["train.resume=true"]) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:]
    ref = subprocess.run(CLI + ["launch", "--processes", "2", "--cpu-devices", "2", "train",
                                *tiny_overrides(tmp_path / "ref", **{"train.steps": 12, "train.checkpoint_every": 2,
                                                                     "train.eval_every": 4})],
                         capture_output=True, text=True, timeout=300, env=_env())
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert _losses(tmp_path / "r") == _losses(tmp_path / "ref")
    wa, wb = _adapter(tmp_path / "r"), _adapter(tmp_path / "ref")
    assert sorted(wa) == sorted(wb) and all(np.array_equal(wa[k], wb[k]) for k in wa)

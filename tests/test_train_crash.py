"""What survives a crash: ``lora-jax train`` killed with SIGKILL at several points (one of them
while an async checkpoint save is in flight, one before the first checkpoint was finalized, one at
a random moment), or stopped with SIGTERM / SIGINT, then resumed, ends with the same adapter,
optimizer state, rng, metrics and exported adapter, bit for bit, as a run that was never stopped.

The in-flight save is made deterministic with the test-only hook ``LORA_JAX_TEST_HOLD_SAVE``
(`lora_jax.train.checkpoint`): the background write of one step's checkpoint stops before it is
finalized, so the kill lands with orbax's temporary directory on disk.
"""

import io
import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from lora_jax.train import load_config, run
from lora_jax.train import sharding as shd
from lora_jax.train.checkpoint import Checkpointer, latest_step, unfinished_saves
from lora_jax.train.files import leftovers
from lora_jax.train.interrupts import StopSignals, TrainingInterrupted
from lora_jax.train.metrics import MetricsWriter, read_metrics
from lora_jax.train.runs import load_checkpoint, load_run
from lora_jax.train.trainer import LoopSpec, Trainer

from train_helpers import TINY_INIT, tiny_overrides, toy_logits, toy_params, toy_rows

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24
SETTINGS = {"model.pretrain.steps": 0, "model.pretrain.warmup_steps": 0, "train.steps": STEPS,
            "data.eval_fraction": 0, "train.plot": False, "train.checkpoint_every": 4, "train.keep_checkpoints": 2,
            "train.log_every": 3, "train.async_checkpoint": True, "train.warmup_steps": 2}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny saved base model + tokenizer, so the runs below skip tokenizer training and pretraining."""
    from lora_jax.train import model as M
    from lora_jax.train.config import resolve_path
    from lora_jax.train.data import read_documents

    d = tmp_path_factory.mktemp("base") / "base"
    texts = [r.text for r in read_documents(resolve_path("builtin:pretrain.txt"))]
    tok = M.build_tokenizer(texts, 300)
    model, params = M.new_model(TINY_INIT, vocab_size=len(tok), seed=0)
    M.save_model(model, params, tok, str(d))
    return d


def _overrides(out_dir, base, **extra):
    return tiny_overrides(out_dir, **{**SETTINGS, "model.path": base, **extra})


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory):
    """The run, never interrupted (in this process)."""
    d = tmp_path_factory.mktemp("ref") / "run"
    run(load_config(None, _overrides(d, base)), echo=lambda *a: None)
    return d


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    """A persistent compilation cache shared by the subprocesses (each would compile the same step)."""
    return tmp_path_factory.mktemp("jax_cache")


def _env(cache, **extra):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu",
               JAX_DEFAULT_MATMUL_PRECISION="highest",  # what conftest sets in this process
               JAX_COMPILATION_CACHE_DIR=str(cache))
    env.pop("LORA_JAX_TEST_HOLD_SAVE", None)
    env.update(extra)
    return env


class Proc:
    """``lora-jax train`` in a subprocess, its output in files."""

    def __init__(self, tmp, name, args, cache, **env):
        self.out, self.err = tmp / f"{name}.out", tmp / f"{name}.err"
        with open(self.out, "w") as o, open(self.err, "w") as e:
            self.p = subprocess.Popen([sys.executable, "-m", "lora_jax.cli", "train"] + args, stdout=o, stderr=e,
                                      env=_env(cache, **env), cwd=tmp)

    def text(self):
        return self.out.read_text() + self.err.read_text()

    def wait_for(self, what, pred, timeout=300):
        t0 = time.monotonic()
        while not pred():
            if self.p.poll() is not None:
                raise AssertionError(f"the process ended (rc {self.p.returncode}) before {what}:\n{self.text()[-3000:]}")
            if time.monotonic() - t0 > timeout:
                self.p.kill()
                raise AssertionError(f"timed out waiting for {what}:\n{self.text()[-3000:]}")
            time.sleep(0.01)

    def kill(self, sig=signal.SIGKILL):
        assert self.p.poll() is None, f"the process already ended (rc {self.p.returncode}):\n{self.text()[-3000:]}"
        self.p.send_signal(sig)
        return self.p.wait(timeout=120)


def _lora_steps(d):
    return [r["step"] for r in read_metrics(str(d / "metrics.jsonl")) if r["kind"] == "train" and r["phase"] == "lora"]


def _train_records(d):
    keys = ("step", "loss", "acc", "grad_norm", "lr")
    return [tuple(r[k] for k in keys) for r in read_metrics(str(d / "metrics.jsonl"))
            if r["kind"] == "train" and r["phase"] == "lora"]


def _assert_same_final_state(d, ref, split_at=None):
    """``split_at``: the step a graceful stop wrote an extra record at; the record of the window
    holding it is then split in two (each step still counted once), every other record is equal."""
    h = load_run(str(ref))
    got, got_meta = load_checkpoint(str(d), h.cfg, h.lora_params)
    want, want_meta = load_checkpoint(str(ref), h.cfg, h.lora_params)
    assert got_meta["step"] == want_meta["step"] == STEPS
    assert got_meta["position"] == want_meta["position"]
    fg, fw = jax.tree_util.tree_flatten_with_path(got)[0], jax.tree_util.tree_flatten_with_path(want)[0]
    assert [k for k, _ in fg] == [k for k, _ in fw] and len(fg) > 4 * 7
    for (kp, g), (_, w) in zip(fg, fw):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype and g.shape == w.shape and np.array_equal(g, w), jax.tree_util.keystr(kp)
    from safetensors.numpy import load_file

    a = load_file(str(d / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(ref / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # the metrics: each step once, the same values, strict JSON, no torn line
    got, want = _train_records(d), _train_records(ref)
    if split_at is not None and split_at not in [r[0] for r in want]:
        nxt = min(r[0] for r in want if r[0] > split_at)
        assert [r[0] for r in got] == sorted([r[0] for r in want] + [split_at])
        got = [r for r in got if r[0] not in (split_at, nxt)]
        want = [r for r in want if r[0] != nxt]
    assert got == want
    text = (d / "metrics.jsonl").read_text()
    assert text.endswith("\n") and "NaN" not in text and len(text.splitlines()) == len(read_metrics(str(d / "metrics.jsonl")))


def _no_temporaries(d):
    found = []
    for root, dirs, files in os.walk(d):
        found += [os.path.join(root, n) for n in dirs + files if ".orbax-checkpoint-tmp" in n]
        found += [os.path.join(root, n) for n in leftovers(root)]
    return found


def test_sigkill_anywhere_then_resume_is_bit_identical(tmp_path, base, reference, jax_cache):
    d = tmp_path / "run"
    ck = d / "checkpoints"
    args = _overrides(d, base)
    resume = _overrides(d, base) + ["--resume"]

    # 1. killed before any checkpoint was finalized: step 4's save is held in flight, training goes on
    p = Proc(tmp_path, "p1", args, jax_cache, LORA_JAX_TEST_HOLD_SAVE=f"4:{tmp_path / 'held4'}")
    p.wait_for("step 4's save to be in flight and step 5 logged",
               lambda: (tmp_path / "held4").exists() and any(s >= 5 for s in _lora_steps(d)))
    p.kill()
    assert latest_step(str(ck)) is None and unfinished_saves(str(ck)) == ["4.orbax-checkpoint-tmp"]

    # 2. resumed (started over: nothing was finalized), killed while step 12's save is in flight;
    #    training went on to step 16, whose save waits for 12's
    p = Proc(tmp_path, "p2", resume, jax_cache, LORA_JAX_TEST_HOLD_SAVE=f"12:{tmp_path / 'held12'}")
    p.wait_for("step 12's save to be in flight and step 16 logged",
               lambda: (tmp_path / "held12").exists() and 16 in _lora_steps(d))
    reader = Checkpointer(str(ck), async_save=False)  # as `lora-jax eval` opens a live run: it must not
    reader.close()                                   # touch the save in flight
    assert reader.removed == [] and unfinished_saves(str(ck)) == ["12.orbax-checkpoint-tmp"]
    time.sleep(0.2)
    p.kill()
    out = p.text()
    assert "# removed unfinished checkpoint save(s) of an interrupted run (never finalized, not used): " \
           "4.orbax-checkpoint-tmp" in out
    assert "no finalized checkpoint in" in out and "starting it over from step 0" in out
    assert latest_step(str(ck)) == 8 and unfinished_saves(str(ck)) == ["12.orbax-checkpoint-tmp"]
    assert sorted(int(n) for n in os.listdir(ck) if n.isdigit()) == [4, 8]
    with open(d / "metrics.jsonl", "a") as fh:  # as if the kill had cut a metrics line short
        fh.write('{"kind": "train", "phase": "lora", "step": 1')

    # 3. resumed from step 8, killed at a random moment after it took its first new step
    p = Proc(tmp_path, "p3", resume, jax_cache)
    # (the metrics file still holds p2's records after step 8 until p3 has dropped them)
    p.wait_for("a step after 8", lambda: "# resuming from step" in p.text() and any(s > 8 for s in _lora_steps(d)))
    time.sleep(random.Random(8).uniform(0.0, 0.5))
    p.kill()
    out = p.text()
    assert "# removed unfinished checkpoint save(s) of an interrupted run (never finalized, not used): " \
           "12.orbax-checkpoint-tmp" in out
    assert f"# resuming from step 8 of {STEPS} (checkpoint {ck / '8'}, data position 64)" in out
    k = latest_step(str(ck))
    assert k is not None and k >= 8

    # 4. resumed to the end
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        summary = run(load_config(None, resume[:-1] + ["train.resume=true"]))
    assert f"# resuming from step {k} of {STEPS} (checkpoint {ck / str(k)}," in buf.getvalue()
    assert summary["step"] == STEPS and not summary["stopped"]
    _assert_same_final_state(d, reference)
    assert sorted(os.listdir(ck)) == ["20", "24"]
    assert _no_temporaries(d) == []


def test_sigterm_checkpoints_the_current_step_exits_143_and_resumes_bit_identically(tmp_path, base, reference,
                                                                                   jax_cache):
    d = tmp_path / "run"
    args = _overrides(d, base)
    p = Proc(tmp_path, "term", args, jax_cache)
    p.wait_for("step 6 logged", lambda: any(s >= 6 for s in _lora_steps(d)))
    rc = p.kill(signal.SIGTERM)
    err = p.err.read_text()
    assert rc == 143, p.text()[-3000:]
    line = [l for l in err.splitlines() if l.startswith("lora-jax: ")]
    assert len(line) == 1, err
    n = _lora_steps(d)[-1]
    assert n >= 6
    assert line[0] == (f"lora-jax: [lora] SIGTERM received: stopped after step {n}; checkpoint step {n} written to "
                       f"{d / 'checkpoints'}; resume with the same command plus out_dir={d} --resume")
    assert f"[lora] SIGTERM received: stopping after step {n}, writing its checkpoint ..." in p.out.read_text()
    assert latest_step(str(d / "checkpoints")) == n and unfinished_saves(str(d / "checkpoints")) == []
    assert not (d / "adapter").exists()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        run(load_config(None, args + ["train.resume=true"]))
    assert f"# resuming from step {n} of {STEPS}" in buf.getvalue()
    _assert_same_final_state(d, reference, split_at=n)
    assert _no_temporaries(d) == []


# ---- in this process, on a toy model: SIGINT, twice, and threads -------------------------------


class _SignalAt(MetricsWriter):
    """Sends ``sig`` to this process ``times`` times while writing the record of ``step``."""

    def __init__(self, path, step, sig=signal.SIGINT, times=1):
        super().__init__(path)
        self.at, self.sig, self.times = step, sig, times

    def write(self, record):
        super().write(record)
        if record.get("kind") == "train" and record["step"] == self.at:
            for _ in range(self.times):
                os.kill(os.getpid(), self.sig)
                time.sleep(0.01)  # let the handler run


def _toy(tmp, metrics=None, steps=10):
    spec = LoopSpec(steps=steps, batch_size=8, lr=0.05, optimizer="adam", warmup_steps=0, log_every=1,
                    checkpoint_every=4, progress=False)
    ck = Checkpointer(str(tmp / "checkpoints"), keep=3)
    return Trainer(spec, mesh=shd.make_mesh(1, 1, 1), logits_fn=toy_logits, trainable=toy_params(), rows=toy_rows(),
                   seed=0, metrics=metrics, checkpointer=ck, echo=lambda *a: None)


def _host(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(tree))]


def test_sigint_finishes_the_step_checkpoints_it_and_restores_the_handler(tmp_path):
    ref = _toy(tmp_path / "ref")
    ref.fit()
    ref.checkpointer.close()
    before = signal.getsignal(signal.SIGINT)
    tr = _toy(tmp_path / "a", metrics=_SignalAt(str(tmp_path / "a" / "m.jsonl"), step=6))
    with pytest.raises(TrainingInterrupted) as e:
        tr.fit()
    assert (e.value.signum, e.value.step, e.value.checkpoint_step, e.value.exit_code) == (signal.SIGINT, 6, 6, 130)
    assert str(e.value) == f"[lora] SIGINT received: stopped after step 6; checkpoint step 6 written to {tmp_path / 'a' / 'checkpoints'}"
    assert signal.getsignal(signal.SIGINT) is before
    assert tr.checkpointer.all_steps() == [4, 6]
    tr.checkpointer.close()
    tr2 = _toy(tmp_path / "a")
    assert tr2.restore() == 6 and tr2.position == 48
    tr2.fit()
    for g, w in zip(_host(tr2.checkpoint_state()), _host(ref.checkpoint_state())):
        assert np.array_equal(g, w)
    tr2.checkpointer.close()


def test_a_second_sigint_stops_at_once_without_a_new_checkpoint(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    tr = _toy(tmp_path, metrics=_SignalAt(str(tmp_path / "m.jsonl"), step=6, times=2))
    with pytest.raises(TrainingInterrupted) as e:
        tr.fit()
    assert e.value.step is None and e.value.exit_code == 130
    assert "SIGINT received again while stopping; stopped at once" in str(e.value)
    assert signal.getsignal(signal.SIGINT) is before
    tr.checkpointer.close()
    assert latest_step(str(tmp_path / "checkpoints")) == 4


def test_outside_the_main_thread_no_handler_is_installed():
    seen = {}

    def body():
        with StopSignals() as s:
            seen["handler"] = signal.getsignal(signal.SIGTERM)
            seen["signum"] = s.signum

    before = signal.getsignal(signal.SIGTERM)
    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == {"handler": before, "signum": None}


def test_sigint_during_pretraining_says_resume_starts_the_run_over(tmp_path, monkeypatch):
    """Pretraining writes no checkpoints: the message says so, and ``--resume`` will start over in
    place (that restart is what step 2 of the SIGKILL test above goes through)."""
    from lora_jax.train import pipeline

    d = tmp_path / "run"
    over = tiny_overrides(d, **{"model.pretrain.steps": 3, "train.steps": 2, "train.warmup_steps": 0,
                                "data.eval_fraction": 0, "train.plot": False, "model.pretrain.warmup_steps": 0})

    class SigintAtPretrainStep2(_SignalAt):
        def __init__(self, path, **kw):
            super().__init__(path, step=2)

    monkeypatch.setattr(pipeline, "MetricsWriter", SigintAtPretrainStep2)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as e:
        run(load_config(None, over), echo=lambda *a: None)
    assert signal.getsignal(signal.SIGINT) is before
    assert e.value.exit_code == 130 and e.value.checkpoint_step is None
    assert str(e.value) == (f"[pretrain] SIGINT received: stopped after step 2; this phase writes no checkpoints "
                            f"(pretraining); resume with the same command plus out_dir={d} --resume to start the run "
                            "over")
    assert latest_step(str(d / "checkpoints")) is None and not (d / "base").exists()
    assert [(r["phase"], r["step"]) for r in read_metrics(str(d / "metrics.jsonl"))] == [("pretrain", 1), ("pretrain", 2)]
    assert pipeline.resolve_out_dir(load_config(None, over + ["train.resume=true"])) == (str(d), None)
    with pytest.raises(pipeline.ConfigError, match="already holds|exists and is not empty"):
        pipeline.resolve_out_dir(load_config(None, over))  # without --resume it is refused

"""Issue 14, the training-run half: checkpoints that prove themselves (checksums, fallback to the
newest intact one, bit-identical), one run per directory (a lock, two real processes), failed
resumes that write nothing, no success for nothing, and the rough edges.

The runs are the tiny, cheapest ones of `test_train_resume` (no pretraining, no eval); damaged
checkpoints are copies of one stopped run, so each case pays for one resume only.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.cli import main
from lora_jax.train import load_config, run
from lora_jax.train.checkpoint import Checkpointer, DamagedCheckpoint, checksums
from lora_jax.train.runs import load_checkpoint, load_run

from train_helpers import tiny_overrides

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
SETTINGS = {"model.pretrain.steps": 0, "model.pretrain.warmup_steps": 0, "train.steps": STEPS,
            "data.eval_fraction": 0, "train.plot": False, "train.checkpoint_every": 2, "train.keep_checkpoints": 2,
            "train.log_every": 1}


def _args(out_dir, **extra):
    return tiny_overrides(out_dir, **{**SETTINGS, **extra})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref") / "run"
    run(load_config(None, _args(d)), echo=lambda *a: None)
    return d


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run stopped after step 4: checkpoints 2 and 4 (keep 2)."""
    d = tmp_path_factory.mktemp("stopped") / "run"
    run(load_config(None, _args(d)), stop_after=4, echo=lambda *a: None)
    assert sorted(os.listdir(d / "checkpoints")) == ["2", "4"]
    return d


def _copy(src, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(src, d)
    return d


def _biggest_data_file(step_dir, db="d"):
    """The largest data file of a checkpoint step's arrays: of the OCDBT database orbax reads
    (``state/d``: small arrays are stored inline in its nodes), or with ``db="ocdbt.process_0/d"``
    of the one the values of big arrays are in."""
    d = step_dir / "state" / db
    return max((d / n for n in os.listdir(d)), key=os.path.getsize)


def _flip(path):
    b = bytearray(open(path, "rb").read())
    k = len(b) // 2
    b[k:k + 64] = bytes(x ^ 0x5A for x in b[k:k + 64])  # 64 bytes inside the array data, as in the issue
    open(path, "wb").write(bytes(b))


def _truncate(path):
    b = open(path, "rb").read()
    open(path, "wb").write(b[: len(b) // 3])


def _data_files(step_dir):
    """Every file of orbax's OCDBT databases of a step's arrays (which one holds which array depends
    on the sizes and the sharding: damage them all)."""
    dirs = [step_dir / "state" / "d", step_dir / "state" / "ocdbt.process_0" / "d"]
    return [x / n for x in dirs if x.is_dir() for n in sorted(os.listdir(x))]


def _wrong_values(step_dir):
    """Bits flipped where no lower layer notices: one optimizer moment reads back 2e31 larger (the
    issue's case 1), written through orbax itself so every file is well-formed."""
    import orbax.checkpoint as ocp

    state = step_dir / "state"
    ck = ocp.StandardCheckpointer()
    flat, treedef = jax.tree_util.tree_flatten_with_path(ck.restore(state))
    k = next(i for i, (kp, x) in enumerate(flat) if "opt_state" in jax.tree_util.keystr(kp) and x.dtype == jnp.float32)
    leaves = [x for _, x in flat]
    leaves[k] = leaves[k] + 2e31
    ck.save(step_dir / "tampered", jax.tree_util.tree_unflatten(treedef, leaves))
    ck.wait_until_finished()
    ck.close()
    shutil.rmtree(state)
    os.rename(step_dir / "tampered", state)


DAMAGE = {"wrong values": _wrong_values,
          "flipped bytes": lambda step: [_flip(f) for f in _data_files(step)],
          "truncated": lambda step: [_truncate(f) for f in _data_files(step)],
          "deleted": lambda step: [os.remove(f) for f in _data_files(step)]}


def _snapshot(d):
    out = {}
    for r, dirs, files in os.walk(d):
        for f in files:
            p = os.path.join(r, f)
            out[os.path.relpath(p, d)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
        for x in dirs:
            out[os.path.relpath(os.path.join(r, x), d) + "/"] = ""
    return out


def _assert_same_final_state(d, ref):
    h = load_run(str(ref))
    got, gm = load_checkpoint(str(d), h.cfg, h.lora_params)
    want, wm = load_checkpoint(str(ref), h.cfg, h.lora_params)
    assert gm["step"] == wm["step"] == STEPS and gm["position"] == wm["position"]
    fg, fw = jax.tree_util.tree_flatten_with_path(got)[0], jax.tree_util.tree_flatten_with_path(want)[0]
    assert [k for k, _ in fg] == [k for k, _ in fw] and len(fg) > 4 * 7
    for (kp, g), (_, w) in zip(fg, fw):
        assert np.array_equal(np.asarray(g), np.asarray(w)), jax.tree_util.keystr(kp)
    from safetensors.numpy import load_file

    a = load_file(str(d / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(ref / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    recs = lambda p: [(r["step"], r["loss"]) for r in map(json.loads, open(p / "metrics.jsonl"))  # noqa: E731
                      if r["kind"] == "train"]
    assert recs(d) == recs(ref)


# ---- checkpoints that prove themselves ---------------------------------------------------------


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_intact_one_bit_identically(damage, stopped, reference,
                                                                                 tmp_path, capfd):
    d = _copy(stopped, tmp_path)
    step = d / "checkpoints" / "4"
    files = [str(f) for f in _data_files(step)]
    DAMAGE[damage](step)
    capfd.readouterr()
    rc = main(["train"] + _args(d) + ["--resume"])
    out, err = capfd.readouterr()
    assert rc == 0, err[-3000:]
    lines = [l for l in out.splitlines() if "is damaged" in l]
    assert len(lines) == 1, out
    prefix = "# checkpoint step 4 is damaged: "
    assert lines[0].startswith(prefix), lines[0]
    named = lines[0][len(prefix):].split(": ")[0]  # the damaged file TensorStore names, else the array directory
    assert named in files + [str(step / "state")], lines[0]
    assert lines[0].endswith("; falling back to step 2"), lines[0]
    if damage == "wrong values":  # read without error: only the checksum sees it
        assert "array opt_state/" in lines[0] and " does not match its checksum (saved " in lines[0], lines[0]
    assert f"# resuming from step 2 of {STEPS}" in out
    assert "Traceback" not in out + err and "Event loop is closed" not in out + err
    _assert_same_final_state(d, reference)
    # the damaged step is kept aside, never deleted; pruning (keep 2) counted only intact steps
    assert os.path.isdir(d / "damaged-checkpoints" / "4" / "state")
    assert sorted(os.listdir(d / "checkpoints")) == ["4", "6"]


def test_each_kind_of_damage_is_named_with_its_step_and_file(tmp_path):
    big = np.random.default_rng(0).standard_normal((4, 1000)).astype(np.float32)  # stored out of line
    state = {"adapter": {"a": jnp.asarray(big), "b": jnp.ones(7, jnp.bfloat16)}, "rng": jnp.arange(2, dtype=jnp.uint32)}
    src = tmp_path / "src"
    ck = Checkpointer(str(src), keep=5, async_save=False)
    ck.save(3, state, {"position": 24})
    ck.close()
    meta_file = "meta/metadata"

    def garble(d):
        (d / "3" / meta_file).write_text('{"position": 24, "step": 3')

    def missing_key(d):
        m = json.loads((d / "3" / meta_file).read_text())
        del m["position"]
        (d / "3" / meta_file).write_text(json.dumps(m))

    def edited(d):  # valid JSON, another data position: only the metadata's checksum can tell
        m = json.loads((d / "3" / meta_file).read_text())
        m["position"] = 16
        (d / "3" / meta_file).write_text(json.dumps(m))

    def delete(d):
        victim = _biggest_data_file(d / "3")
        os.remove(victim)
        return victim

    cases = {"flip": (lambda d: _flip(_biggest_data_file(d / "3", "ocdbt.process_0/d")), "state",
                      "array adapter/a does not match its checksum (saved "),  # wrong values, read without error
             "truncate": (lambda d: _truncate(_biggest_data_file(d / "3", "ocdbt.process_0/d")), "state",
                          "(OUT_OF_RANGE, reading adapter.a)"),
             "delete": (delete, None, "no such file (NOT_FOUND, reading "),
             "garbled": (garble, meta_file, "delimiter"),
             "missing key": (missing_key, meta_file, "missing key 'position'"),
             "edited": (edited, meta_file, "the metadata does not match its checksum")}
    for name, (hurt, where, reason) in cases.items():
        d = tmp_path / name.replace(" ", "_")
        shutil.copytree(src, d)
        file = hurt(d) or str(d / "3" / where)
        ck = Checkpointer(str(d), keep=5, async_save=False)
        with pytest.raises(DamagedCheckpoint) as e:
            ck.restore(3, state)
        ck.close()
        assert e.value.step == 3 and e.value.file == str(file), (name, str(e.value))
        assert reason in e.value.reason, (name, str(e.value))
        assert str(e.value).startswith(f"checkpoint step 3 is damaged: {file}: ") and "\n" not in str(e.value)
        assert "tensorstore_spec" not in str(e.value) and len(str(e.value)) < 500, str(e.value)
    # an intact copy restores, bit for bit
    ck = Checkpointer(str(src), keep=5, async_save=False)
    got, meta = ck.restore(3, state)
    ck.close()
    assert meta["position"] == 24
    assert all(np.array_equal(np.asarray(g), np.asarray(w))
               for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(state)))


def test_checksums_see_any_one_changed_word_and_ignore_sharding():
    x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    base = checksums({"x": jnp.asarray(x)})["x"]
    for i, bit in ((0, 0), (100, 31), (511, 7)):
        y = x.copy().reshape(-1).view(np.uint32)
        y[i] ^= np.uint32(1 << bit)
        assert checksums({"x": jnp.asarray(y.view(np.float32).reshape(8, 64))})["x"] != base
    swapped = x.copy().reshape(-1)
    swapped[[0, 1]] = swapped[[1, 0]]
    assert checksums({"x": jnp.asarray(swapped.reshape(8, 64))})["x"] != base  # positions count
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", "b")))
    assert checksums({"x": sharded})["x"] == base


def test_no_intact_checkpoint_exits_2_with_one_message_and_changes_nothing(stopped, tmp_path, capfd):
    d = _copy(stopped, tmp_path)
    _wrong_values(d / "checkpoints" / "4")
    (d / "checkpoints" / "2" / "meta" / "metadata").write_text("{not json")
    before = _snapshot(d)
    capfd.readouterr()
    rc = main(["train"] + _args(d) + ["--resume"])
    out, err = capfd.readouterr()
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith(f"lora-jax: error: train.resume: no intact checkpoint in "
                                                   f"{str(d / 'checkpoints')!r} to resume from (step 4: "), err
    assert f"step 2: {d / 'checkpoints' / '2' / 'meta' / 'metadata'}: " in err and "nothing was changed" in err
    assert "Traceback" not in out + err
    assert _snapshot(d) == before


def test_eval_skips_a_damaged_newest_checkpoint_and_says_so(stopped, tmp_path, capsys):
    d = _copy(stopped, tmp_path)
    DAMAGE["truncated"](d / "checkpoints" / "4")
    before = _snapshot(d)
    h = load_run(str(d))
    assert h.adapter_source.startswith("checkpoint step 2; skipped damaged step 4: ")
    assert _snapshot(d) == before


# ---- one run per directory ---------------------------------------------------------------------


def _env(cache, **extra):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu",
               JAX_DEFAULT_MATMUL_PRECISION="highest", JAX_COMPILATION_CACHE_DIR=str(cache))
    env.pop("LORA_JAX_TEST_HOLD_SAVE", None)
    env.update(extra)
    return env


def _cli(args, cache, cwd, **env):
    return subprocess.run([sys.executable, "-m", "lora_jax.cli", "train"] + args, capture_output=True, text=True,
                          env=_env(cache, **env), cwd=cwd, timeout=300)


def test_one_run_per_directory_with_two_real_processes(tmp_path, reference, capsys):
    d = tmp_path / "run"
    cache = tmp_path / "jax_cache"
    held = tmp_path / "held"
    first = subprocess.Popen([sys.executable, "-m", "lora_jax.cli", "train"] + _args(d), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                             env=_env(cache, LORA_JAX_TEST_HOLD_SAVE=f"4:{held}"))
    try:
        t0 = time.monotonic()
        while not held.exists():  # the first run is alive, in the middle of its step-4 save
            assert first.poll() is None, first.communicate()
            assert time.monotonic() - t0 < 300
            time.sleep(0.05)
        lock = json.loads((d / ".lock").read_text())
        assert lock["pid"] == first.pid
        refused = f"lora-jax: error: out_dir: {str(d)!r} is in use by another lora-jax run (pid {first.pid} on host "
        second = _cli(_args(d) + ["--resume"], cache, tmp_path)  # a resume, in a second process
        assert second.returncode == 2, second.stderr
        assert second.stderr.startswith(refused) and second.stderr.count("\n") == 1, second.stderr
        capsys.readouterr()
        assert main(["train"] + _args(d)) == 2  # a fresh run of the same directory (this process)
        err = capsys.readouterr().err
        assert err.startswith(refused) and err.count("\n") == 1, err
        first.send_signal(signal.SIGKILL)  # a crash: the lock file stays, the kernel drops the lock
        first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert json.loads((d / ".lock").read_text())["pid"] == first.pid
    assert main(["train"] + _args(d) + ["--resume"]) == 0  # after the crash: the stale lock is taken over
    out = capsys.readouterr().out
    assert f"was left by pid {first.pid} on host " in out and "taken over" in out
    assert (d / ".lock").read_text() == ""  # released cleanly
    _assert_same_final_state(d, reference)


def test_lock_release_and_stale_takeover_in_process(tmp_path):
    from lora_jax.train.lock import RunDirLocked, RunLock

    d = tmp_path / "new"
    a = RunLock.acquire(str(d))
    assert a.created and a.previous == {}
    with pytest.raises(RunDirLocked, match=f"pid {os.getpid()} on host "):
        RunLock.acquire(str(d))
    a.release(clean=True)  # nothing was written: the directory it made is gone again
    assert not d.exists()
    d.mkdir()
    (d / ".lock").write_text(json.dumps({"pid": 999999, "host": "elsewhere"}))  # a crashed holder's file
    b = RunLock.acquire(str(d))
    assert b.previous["pid"] == 999999 and "pid 999999 on host elsewhere" in b.describe_previous()
    b.release()
    assert (d / ".lock").read_text() == "" and RunLock.acquire(str(d)).previous == {}


# ---- a failed resume writes nothing ------------------------------------------------------------


def test_a_failed_resume_writes_nothing_and_the_right_one_then_works(stopped, reference, tmp_path, capsys):
    d = _copy(stopped, tmp_path)
    os.remove(d / "config.yaml")
    before = _snapshot(d)
    rc = main(["train"] + _args(d, **{"lora.rank": 2}) + ["--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("lora-jax: error: train.resume: checkpoint step 4 in ") and \
        "does not match this run's state (different model, adapter or optimizer config?): " in err, err
    assert _snapshot(d) == before  # no config.yaml with the wrong rank, no metrics rewritten, no lock left
    rc = main(["train"] + _args(d, **{"train.steps": 3}) + ["--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and err == (f"lora-jax: error: train.steps: 3 is below step 4 of the checkpoint to resume "
                               f"({d / 'checkpoints' / '4'}); set train.steps=4 or more\n")
    assert _snapshot(d) == before
    assert main(["train"] + _args(d) + ["--resume"]) == 0
    _assert_same_final_state(d, reference)


# ---- no success for nothing --------------------------------------------------------------------


@pytest.mark.parametrize("records,extra,cause", [
    ([{"messages": [{"role": "human", "content": "hi there"}, {"role": "bot", "content": "hello"}]}] * 6, {},
     "none of the 6 chat records has an 'assistant' turn (roles found: 'bot', 'human')"),
    ([{"prompt": "a long prompt " * 20, "completion": "yes"}] * 6, {"data.packing": False},
     "with data.packing=none each record is cut to data.seq_len + 1 = 33 tokens"),
])
def test_zero_trained_tokens_is_an_error_naming_the_file_and_the_cause(tmp_path, capsys, records, extra, cause):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    rc = main(["train"] + _args(tmp_path / "run", **{"data.train": str(data), **extra}))
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith(f"lora-jax: error: data.train: the 6 documents in {str(data)!r} give 0 trained tokens: "
                          + cause), err
    assert not (tmp_path / "run").exists()


def test_eval_output_is_valid_json_even_for_nan_and_infinity(reference, capsys, monkeypatch):
    from lora_jax.train import runs

    monkeypatch.setattr(runs, "eval_rows_of", lambda h: None)
    monkeypatch.setattr(runs, "evaluate", lambda h, rows: {"base": {"eval_loss": float("nan"),
                                                                    "eval_ppl": float("inf")}})
    assert main(["eval", str(reference)]) == 0
    out = capsys.readouterr().out
    assert json.loads(out, parse_constant=lambda c: pytest.fail(f"bare {c} in {out}")) == \
        {"base": {"eval_loss": None, "eval_ppl": None}}


# ---- rough edges -------------------------------------------------------------------------------


def test_a_flag_between_overrides_is_accepted(capsys):
    assert main(["train", "train.steps=5", "--dry-run", "train.lr=0.1", "train.warmup_steps=0"]) == 0
    out = capsys.readouterr().out
    assert "steps: 5" in out and "lr: 0.1" in out


def test_written_files_get_the_usual_mode(tmp_path):
    """Text, PNG and (issue 22.12) every safetensors file lora_jax writes get 0666 less the umask,
    not the 0600 of mkstemp or of the safetensors library."""
    import numpy as np

    import lora_jax as lora
    from lora_jax.io import save_adapter
    from lora_jax.io._files import write_safetensors
    from lora_jax.train.files import atomic_write_text
    from lora_jax.train.metrics import plot_losses

    old = os.umask(0o022)
    try:
        atomic_write_text(str(tmp_path / "a.txt"), "x")
        plot_losses([{"kind": "train", "step": 1, "loss": 1.0}], str(tmp_path / "loss.png"))
        write_safetensors(str(tmp_path / "w.safetensors"), {"w": np.ones((2, 2), np.float32)})
        save_adapter(tmp_path / "ad", lora.init({"k": np.ones((4, 4), np.float32)}, lora.Rules("k", rank=2), 0))
        os.umask(0o027)
        atomic_write_text(str(tmp_path / "b.txt"), "x")
        write_safetensors(str(tmp_path / "v.safetensors"), {"w": np.ones((2, 2), np.float32)})
    finally:
        os.umask(old)
    names = ("a.txt", "loss.png", "w.safetensors", "b.txt", "v.safetensors")
    assert [oct(os.stat(tmp_path / n).st_mode & 0o777) for n in names] == \
        ["0o644", "0o644", "0o644", "0o640", "0o640"]
    files = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "ad") for f in fs]
    assert files and all(os.stat(f).st_mode & 0o777 == 0o644 for f in files), files


def test_data_errors_name_the_file(tmp_path, capsys):
    from lora_jax.train.data import read_documents

    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9\n".encode("utf-8") + "na\u00efve".encode("latin-1"))
    with pytest.raises(ValueError, match=f"^{bad}:2: not UTF-8 text \\(byte 0xef at offset 8"):
        read_documents(str(bad))
    j = tmp_path / "x.jsonl"
    j.write_text('{"text": "ok"}\n{"text": "unterminated\n')
    with pytest.raises(ValueError) as e:
        read_documents(str(j))
    assert "at at" not in str(e.value) and str(e.value) == f"{j}:2: not valid JSON (Unterminated string starting at column 10)"
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n  \n")
    rc = main(["train"] + _args(tmp_path / "run", **{"data.train": str(blank)}))
    err = capsys.readouterr().err
    assert rc == 2 and f"data.train: no documents in {str(blank)!r}" in err, err


def test_a_too_large_rank_is_reported_under_lora_rank(tmp_path, capsys):
    rc = main(["train"] + _args(tmp_path / "run", **{"lora.rank": 100000}))
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("lora-jax: error: lora.rank: ") and "rank 100000 is larger" in err, err


def test_sigterm_before_pretraining_starts_exits_143_with_a_message(tmp_path):
    """SIGTERM while the pretraining step compiles (no handler of the loop yet): a message, 143."""
    code = ("import os, signal, sys\n"
            "from lora_jax.train import pipeline\n"
            "real = pipeline.Trainer\n"
            "def trainer(*a, **k):\n"
            "    if k.get('phase') == 'pretrain':\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return real(*a, **k)\n"
            "pipeline.Trainer = trainer\n"
            "from lora_jax.cli import main\n"
            f"sys.exit(main(['train'] + {tiny_overrides(tmp_path / 'run')!r}))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env=_env(tmp_path / "cache"), timeout=300)
    assert p.returncode == 143, (p.returncode, p.stderr[-2000:])
    assert p.stderr == ("lora-jax: interrupted (SIGTERM) outside the training loop (setup, compiling, pretraining's "
                        "start or export); no new checkpoint was written (finalized ones are kept: continue with "
                        "--resume)\n"), p.stderr[-2000:]
    assert (tmp_path / "run" / ".lock").read_text() == ""  # released on the way out



def test_nan_or_inf_in_an_adapter_is_an_error_at_save_and_at_load_naming_the_tensor(tmp_path):
    import lora_jax as lora
    from lora_jax.io import load_adapter, save_adapter
    from safetensors.numpy import load_file, save_file

    params = {"dense": {"kernel": jnp.ones((8, 6), jnp.float32)}}
    lp = lora.init(params, lora.Rules("dense", rank=2), 0)
    w = lp["dense"]["kernel"]
    with pytest.raises(ValueError, match=r"save_adapter: cannot save this tree:\n  dense/kernel.lora_b holds NaN or Inf"):
        save_adapter(tmp_path / "bad", {"dense": {"kernel": w.replace(b=w.b.at[0, 0].set(jnp.inf))}})
    assert not (tmp_path / "bad").exists()
    save_adapter(tmp_path / "ad", lp)
    f = tmp_path / "ad" / "adapter.safetensors"
    t = load_file(str(f))
    t["dense/kernel.lora_a"][1, 1] = np.nan
    save_file(t, str(f), metadata={"format": "lora_jax"})
    with pytest.raises(ValueError, match="dense/kernel.lora_a holds NaN or Inf"):
        load_adapter(tmp_path / "ad", params)


def test_a_checkpoint_holding_nan_is_not_restored(tmp_path):
    state = {"adapter": {"a": jnp.asarray([1.0, jnp.nan])}, "rng": jnp.zeros(2, jnp.uint32)}
    ck = Checkpointer(str(tmp_path), keep=2, async_save=False)
    ck.save(1, state, {"position": 8})  # the trainer never does this (Trainer.save refuses)
    with pytest.raises(DamagedCheckpoint, match="array adapter/a holds NaN or Inf"):
        ck.restore(1, state)
    ck.close()

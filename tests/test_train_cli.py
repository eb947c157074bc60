"""`lora-jax train` end to end (in-process and as a subprocess), then eval / merge / export /
generate on the run it produced."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import lora_jax as lora
from lora_jax.cli import main
from lora_jax.train import data as D
from lora_jax.train.checkpoint import latest_step
from lora_jax.train.metrics import read_metrics
from lora_jax.train.model import forward, load_model, make_apply
from lora_jax.train.runs import load_checkpoint, load_run

from train_helpers import tiny_overrides

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "run"
    rc = main(["train"] + tiny_overrides(d, **{"train.eval_batches": 0}))
    assert rc == 0
    return d


def test_train_writes_metrics_checkpoints_adapter_and_plot(trained, capsys):
    d = trained
    for f in ("config.yaml", "metrics.jsonl", "loss.png", "summary.json", "base/config.json",
              "base/model.safetensors", "base/tokenizer.json", "adapter/adapter_model.safetensors",
              "adapter/adapter_config.json"):
        assert (d / f).is_file(), f
    assert (d / "loss.png").read_bytes()[:8] == PNG_MAGIC
    assert latest_step(str(d / "checkpoints")) == 4
    assert sorted(int(p) for p in os.listdir(d / "checkpoints") if p.isdigit()) == [2, 4]  # keep 2
    recs = read_metrics(str(d / "metrics.jsonl"))
    lora_train = [r for r in recs if r["kind"] == "train" and r["phase"] == "lora"]
    evals = [r for r in recs if r["kind"] == "eval" and r["phase"] == "lora"]
    assert [r["step"] for r in lora_train] == [1, 2, 3, 4]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert [r["step"] for r in recs if r["phase"] == "pretrain"] == [1, 2]
    for r in lora_train:
        assert np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["lr"] >= 0
        assert r["tflops"] > 0 and r["mfu"] is None  # no known peak FLOP/s on a CPU
    for r in evals:
        assert abs(r["eval_ppl"] - np.exp(r["eval_loss"])) < 1e-6 * r["eval_ppl"]
    summary = json.loads((d / "summary.json").read_text())
    assert summary["eval_loss_before"] == evals[0]["eval_loss"] and summary["eval_loss_after"] == evals[-1]["eval_loss"]
    assert summary["trainable_params"] == 2 * 4 * (4 * 32 + 32 + 16 + 16 + 32 + 3 * (32 + 48))  # r=4, 7 kernels, 2 layers
    assert summary["step_tokens_per_s"] > 0 and summary["model_tflops_per_s"] > 0 and summary["mfu"] is None

    # the exported adapter is the final checkpoint's, in PEFT's layout
    h = load_run(str(d))
    state, meta = load_checkpoint(str(d), h.cfg, h.lora_params)
    assert meta["step"] == 4
    tensors = load_file(str(d / "adapter" / "adapter_model.safetensors"))
    assert len(tensors) == 2 * 7 * 2
    for path, lw in lora.tree.lora_items(state["adapter"]):  # stacked (layers, ...): one PEFT module per layer
        assert lw.layout == "sio" and lw.a.shape[0] == 2
        for i in range(2):
            mod = "base_model.model." + path.rpartition("/")[0].replace("layers/", f"layers/{i}/").replace("/", ".")
            assert np.array_equal(tensors[mod + ".lora_A.weight"], np.asarray(lw.a[i]).T)
            assert np.array_equal(tensors[mod + ".lora_B.weight"], np.asarray(lw.b[i]).T)
    cfg = json.loads((d / "adapter" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["peft_type"]) == (4, 8.0, "LORA")
    assert cfg["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def test_eval_command_reproduces_the_training_evals(trained, capsys):
    assert main(["eval", str(trained)]) == 0
    out = json.loads(capsys.readouterr().out)
    summary = json.loads((trained / "summary.json").read_text())
    assert out["source"] == "checkpoint step 4"
    np.testing.assert_allclose(out["base"]["eval_loss"], summary["eval_loss_before"], rtol=1e-5)
    np.testing.assert_allclose(out["adapter"]["eval_loss"], summary["eval_loss_after"], rtol=1e-5)


def test_merge_gives_the_same_logits_as_base_plus_adapter(trained, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", str(trained), "--out", str(out)]) == 0
    assert "merge: checkpoint step 4 -> " in capsys.readouterr().out
    h = load_run(str(trained))
    merged_model, merged = load_model(str(out))
    x = np.asarray(D.batch(D.pack([D.encode({"text": "LOG. Day 3. Wind W."}, h.tokenizer)], 16,
                                  h.tokenizer.pad_token_id), np.array([0]))["inputs"])
    mask = np.ones_like(x)
    want = forward(make_apply(h.model), h.lora_params, x, mask)
    got = make_apply(merged_model)(merged, x, mask)
    base = make_apply(h.model)(jax.tree_util.tree_map(lambda v: v.w if lora.is_lora(v) else v, h.lora_params,
                                                      is_leaf=lora.is_lora), x, mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert float(np.abs(np.asarray(want) - np.asarray(base)).max()) > 1e-3  # the adapter changes the logits
    assert (out / "tokenizer.json").is_file()


def test_export_and_generate(trained, tmp_path, capsys):
    out = tmp_path / "exp"
    assert main(["export", str(trained), "--out", str(out)]) == 0
    a, b = load_file(str(out / "adapter_model.safetensors")), load_file(str(trained / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert main(["generate", str(trained), "--prompt", "LOG, ALDER", "--max-new-tokens", "6", "--temperature", "0"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("LOG, ALDER") and len(text.strip()) > len("LOG, ALDER")
    assert main(["generate", str(trained), "--adapter", str(out), "--max-new-tokens", "0"]) == 2
    # greedy decoding (with a KV cache): each new token is the argmax of the model's logits at the end of
    # the text so far (one causal forward over the whole sequence gives all of those logits)
    from lora_jax.train.runs import generate_ids

    h = load_run(str(trained), adapter=str(out))
    ids = [h.tokenizer.bos_token_id] + h.tokenizer.encode("LOG, ALDER", add_special_tokens=False)
    new = generate_ids(h, ids, max_new_tokens=3, temperature=0)
    assert len(new) == 3 or (len(new) < 3 and new[-1] == h.tokenizer.eos_token_id)
    x = np.asarray([ids + new])
    logits = np.asarray(forward(h.apply, h.lora_params, x, np.ones_like(x)))[0]
    assert new == [int(np.argmax(logits[len(ids) - 1 + k])) for k in range(len(new))]
    assert text.strip().startswith(h.tokenizer.decode(ids + new, skip_special_tokens=True))


def test_a_second_fresh_run_into_the_same_dir_is_refused(trained, capsys):
    assert main(["train"] + tiny_overrides(trained)) == 2
    assert "already holds a run (checkpoints up to step 4); pass --resume" in capsys.readouterr().err


@pytest.mark.slow
def test_train_as_a_subprocess(tmp_path):
    d = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    cmd = [sys.executable, "-m", "lora_jax.cli", "train"] + tiny_overrides(d, **{"train.steps": 2,
                                                                                   "train.checkpoint_every": 0})
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "# lora-jax train: resolved config" in p.stdout and "eval loss on the held-out data" in p.stdout
    assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 1}" in p.stdout
    for f in ("metrics.jsonl", "loss.png", "adapter/adapter_model.safetensors", "checkpoints/2"):
        assert (d / f).exists(), f
    bad = subprocess.run([sys.executable, "-m", "lora_jax.cli", "train", f"out_dir={tmp_path / 'bad'}",
                          "train.optimizer=adamm"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "train.optimizer: 'adamm' is not allowed; expected one of adamw, adam, sgd, lion (did you mean" in bad.stderr
    assert not (tmp_path / "bad").exists()


def _ours_and_peft(run, text):
    """Logits of the run's base + adapter by lora_jax, by PyTorch PEFT (loading the run's saved base
    and exported adapter), and by PEFT with the adapter disabled; and the run's handle."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    h = load_run(str(run), adapter=str(run / "adapter"))
    x = np.asarray([[h.tokenizer.bos_token_id] + h.tokenizer.encode(text, add_special_tokens=False)])
    ours = np.asarray(forward(h.apply, h.lora_params, x, np.ones_like(x)))
    base = AutoModelForCausalLM.from_pretrained(str(run / "base"), torch_dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    with torch.no_grad():
        theirs = pm(torch.from_numpy(x)).logits.numpy()
        with pm.disable_adapter():
            plain = pm(torch.from_numpy(x)).logits.numpy()
    return ours, theirs, plain, h


def test_run_base_and_adapter_load_in_pytorch_peft(trained, tmp_path):
    """The run's saved base (safetensors) and exported adapter are what PyTorch transformers + PEFT
    load, and they compute the logits lora_jax computes."""
    ours, theirs, _, _ = _ours_and_peft(trained, "LOG. Day 3. Wind W.")
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)


def test_export_refuses_a_non_empty_directory_without_overwrite(trained, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(trained), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    # issue 22.24: --overwrite replaces an earlier export, never a directory of other files
    assert main(["export", str(trained), "--out", str(out), "--overwrite"]) == 2
    assert "no earlier export" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert main(["export", str(trained), "--out", str(tmp_path / "first")]) == 0
    assert main(["export", str(trained), "--out", str(tmp_path / "first"), "--overwrite"]) == 0
    assert sorted(os.listdir(tmp_path / "first")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not [e for e in os.listdir(tmp_path) if e.startswith(".")]


# ---- exports never destroy inputs; OSError is one line; nothing left behind (issue 14) -----------

def _snapshot(d):
    return {os.path.relpath(os.path.join(r, f), d): os.path.getsize(os.path.join(r, f))
            for r, _, fs in os.walk(d) for f in fs}


@pytest.mark.parametrize("cmd", ["export", "merge"])
def test_export_and_merge_refuse_an_output_overlapping_the_run_or_its_base(trained, tmp_path, capsys, cmd):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (tmp_path / "link").symlink_to(run)
    before = _snapshot(run)
    # issue 14 case 4: `export RUN --out RUN --overwrite` replaced the whole run with two adapter files
    for out in (run, run / "base", run / "checkpoints", run / "base" / "x", tmp_path, tmp_path / "link",
                tmp_path / "link" / "base"):
        assert main([cmd, str(run), "--out", str(out), "--overwrite"]) == 2, out
        err = capsys.readouterr().err
        assert "choose an output" in err and err.count("\n") == 1, err
    assert _snapshot(run) == before


@pytest.mark.parametrize("cmd", ["export", "merge"])
def test_export_and_merge_into_an_unwritable_place_is_one_line_and_leaves_no_temporary(trained, tmp_path, capsys,
                                                                                      monkeypatch, cmd):
    import errno

    (tmp_path / "afile").write_text("x")
    assert main([cmd, str(trained), "--out", str(tmp_path / "afile" / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"lora-jax: error: {cmd}: ") and err.count("\n") == 1 and "Traceback" not in err
    # disk full in the middle of writing: exit 1, one line, no temporary directory beside the output
    import lora_jax.io._files as files

    def full(*_, **__):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "write_json", full)
    monkeypatch.setattr("lora_jax.hf.peft.write_json", full)
    monkeypatch.setattr("lora_jax.models.checkpoint.write_json", full)
    (tmp_path / "outs").mkdir()
    assert main([cmd, str(trained), "--out", str(tmp_path / "outs" / "o")]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and err.count("\n") == 1
    assert os.listdir(tmp_path / "outs") == []


def test_merge_refuses_an_adapter_with_implausible_magnitudes(trained, tmp_path, capsys):
    """Issue 14 case 1 (merge): finite but 1e30-sized factors used to merge into 8.8e30 weights."""
    from lora_jax.io._files import read_safetensors, write_safetensors

    adapter = tmp_path / "adapter"
    assert main(["export", str(trained), "--out", str(adapter)]) == 0
    tensors = {k: np.array(v) * (1e15 if "lora_" in k else 1)
               for k, v in read_safetensors(adapter / "adapter_model.safetensors")[0].items()}
    write_safetensors(str(adapter / "adapter_model.safetensors"), tensors)
    capsys.readouterr()
    assert main(["merge", str(trained), "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert "implausibly large values" in err and "q_proj/kernel" in err
    assert not (tmp_path / "merged").exists() and not [e for e in os.listdir(tmp_path) if e.startswith(".")]


@pytest.mark.parametrize("arch,extra,cls", [
    ("olmo2", {}, "Olmo2ForCausalLM"),
    ("gpt_oss", {"model.init.num_local_experts": 4, "model.init.num_experts_per_tok": 2, "model.init.head_dim": 16,
                 "model.init.sliding_window": 8}, "GptOssForCausalLM")])
def test_train_a_fresh_model_and_its_base_loads_in_transformers(tmp_path, arch, extra, cls):
    """``model.init.arch=olmo2`` (post-norm layers, q/k norm over all heads) and ``gpt_oss``
    (experts with biases through target_parameters, sinks, alternating windows) train, export (the
    export checks factorized vs merged logits itself), and the base each wrote is PyTorch's model
    with our logits."""
    import torch
    import transformers as tf

    d = tmp_path / "run"
    assert main(["train"] + tiny_overrides(d, **{"model.init.arch": arch, "train.eval_batches": 0,
                                                 "train.plot": False, **extra})) == 0
    assert json.loads((d / "base" / "config.json").read_text())["model_type"] == arch
    model, params = lora.models.load(str(d / "base"))
    ids = np.random.default_rng(0).integers(3, 100, (2, 12))
    ours = np.asarray(model.apply({"params": params}, ids))
    theirs = tf.AutoModelForCausalLM.from_pretrained(str(d / "base")).eval()
    assert type(theirs).__name__ == cls
    with torch.no_grad():
        ref = theirs(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_a_signal_while_a_command_starts_is_one_line_and_its_status(tmp_path, capsys, monkeypatch):
    """SIGINT / SIGTERM landing before a command's own handling (here while the config is read, as
    during the imports) end it with one line naming the signal and 128 + its number, no traceback."""
    import signal

    import lora_jax.train.config as config

    for sig in (signal.SIGINT, signal.SIGTERM):
        def interrupted(*a, **k):
            os.kill(os.getpid(), sig)
            raise AssertionError("the signal did not stop the command")

        monkeypatch.setattr(config, "load_config", interrupted)
        before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        assert main(["train", f"out_dir={tmp_path / 'r'}"]) == 128 + sig
        name = signal.Signals(sig).name
        assert capsys.readouterr().err == f"lora-jax: train interrupted ({name}) while starting; nothing was written\n"
        assert {s: signal.getsignal(s) for s in before} == before
        assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("swallowed", [True, False])
def test_sigterm_inside_a_jax_callback_is_not_lost(trained, tmp_path, capsys, monkeypatch, swallowed):
    """A signal raised inside a JAX callback reaches the caller as a runtime error, which code may
    catch. The export then either finishes (the output is complete and kept) or fails (nothing is
    written), and in both cases the status is the signal's, 143, not 0."""
    import signal

    import jax.numpy as jnp
    import lora_jax.io._files as files

    real = files.write_json

    def in_callback(*a, **k):
        def cb(x):
            os.kill(os.getpid(), signal.SIGTERM)
            return x

        try:
            jax.pure_callback(cb, jax.ShapeDtypeStruct((), jnp.float32), jnp.float32(1)).block_until_ready()
        except Exception:
            if not swallowed:
                raise
        return real(*a, **k)

    monkeypatch.setattr("lora_jax.hf.peft.write_json", in_callback)
    out = tmp_path / "o"
    assert main(["export", str(trained), "--out", str(out)]) == 143
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("lora-jax: export: SIGTERM arrived where it could not stop the command (inside a "
                              "callback); ")
    if swallowed:
        assert err[-1].endswith("the command then finished, and what it wrote is complete")
        assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    else:
        assert err[-1].endswith("the failure above followed it") and len(err) == 2
        assert not out.exists() and os.listdir(tmp_path) == []


def test_the_console_script_leaves_late_signals_their_default_action(monkeypatch):
    """After the command, a signal kills the process at once instead of raising inside the
    interpreter's shutdown."""
    import signal

    import lora_jax.cli as cli

    monkeypatch.setattr(cli, "main", lambda: 0)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as e:
            cli.console()
        assert e.value.code == 0
        assert [signal.getsignal(s) for s in before] == [signal.SIG_DFL, signal.SIG_DFL]
    finally:
        for s, h in before.items():
            signal.signal(s, h)


@pytest.mark.parametrize("cmd", ["export", "merge"])
def test_export_and_merge_stopped_by_sigterm_leave_nothing(trained, tmp_path, capsys, monkeypatch, cmd):
    import signal

    import lora_jax.io._files as files

    real = files.write_json

    def killed(*a, **k):  # SIGTERM arrives while the files are being written
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr("lora_jax.hf.peft.write_json", killed)
    monkeypatch.setattr("lora_jax.models.checkpoint.write_json", killed)
    (tmp_path / "outs").mkdir()
    before = signal.getsignal(signal.SIGTERM)
    assert main([cmd, str(trained), "--out", str(tmp_path / "outs" / "o")]) == 143
    assert capsys.readouterr().err == f"lora-jax: {cmd} interrupted (SIGTERM); nothing was written\n"
    assert os.listdir(tmp_path / "outs") == []
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is only installed while exporting


def test_train_a_dora_adapter_from_the_config_and_peft_loads_it(tmp_path):
    """``lora.variant=dora`` trains DoRA (a magnitude per output feature) through the trainer, and
    the adapter it writes is PyTorch PEFT's DoRA with our logits."""
    d = tmp_path / "run"
    assert main(["train"] + tiny_overrides(d, **{"lora.variant": "dora", "train.eval_batches": 0, "train.plot": False,
                                                 "train.checkpoint_every": 0})) == 0
    assert json.loads((d / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    ours, theirs, plain, h = _ours_and_peft(d, "LOG. Day 3.")
    nodes = [x for x in jax.tree_util.tree_leaves(h.lora_params, is_leaf=lora.is_lora) if lora.is_lora(x)]
    assert nodes and all(n.variant == "dora" and n.m is not None for n in nodes)
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)
    assert np.abs(theirs - plain).max() > 1e-4  # the trained DoRA adapter changes the logits


def test_generate_serves_several_adapters_in_one_batch(trained, tmp_path, capsys):
    """``lora-jax generate --prompts FILE --adapters a=DIR b=DIR``: each prompt with its adapter (or the
    base), all in one batch through an adapter bank; each text equals a greedy run of that adapter alone."""
    import lora_jax.hf as hf
    from lora_jax.train import runs

    h = load_run(str(trained))
    other = jax.tree_util.tree_map(lambda x: x.replace(b=-2 * x.b) if lora.is_lora(x) else x, h.lora_params,
                                   is_leaf=lora.is_lora)
    hf.save_peft(str(tmp_path / "b"), other, h.model)
    jobs = [("LOG, ALDER", "a"), ("LOG. Day", "b"), ("LOG, ALDER", None), ("Wind", "b")]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"prompt": p, "adapter": n}) for p, n in jobs) + "\n")
    capsys.readouterr()
    argv = ["generate", str(trained), "--prompts", str(tmp_path / "p.jsonl"), "--adapters",
            f"a={trained / 'adapter'}", f"b={tmp_path / 'b'}", "--temperature", "0", "--max-new-tokens", "5"]
    assert main(argv) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["adapter"] for o in out] == [n for _, n in jobs]
    dirs = {"a": str(trained / "adapter"), "b": str(tmp_path / "b")}
    for (prompt, name), o in zip(jobs, out):
        alone = load_run(str(trained), adapter=dirs[name]) if name else h
        assert o["text"] == runs.generate(alone, prompt, max_new_tokens=5, temperature=0, use_adapter=name is not None)
    assert out[0]["text"] != out[2]["text"] or out[1]["text"] != runs.generate(h, jobs[1][0], max_new_tokens=5,
                                                                             temperature=0, use_adapter=False)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "adapter": "c"}\n')
    assert main(argv[:2] + ["--prompts", str(tmp_path / "bad.jsonl"), "--adapters", f"a={tmp_path / 'b'}"]) == 2
    assert "no adapter named ['c']" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')  # no adapter key: not silently the base
    assert main(argv[:2] + ["--prompts", str(tmp_path / "bad.jsonl")]) == 2
    assert 'bad.jsonl:1: expected {"prompt": TEXT, "adapter": NAME or null}' in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "adapter": "a"}\n')
    assert main(argv[:2] + ["--prompts", str(tmp_path / "bad.jsonl"), "--adapters", f"a={tmp_path / 'none'}"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1

"""NaN / Inf during training: the step never applies a non-finite update; ``on_nonfinite=stop``
stops before anything after the last good step is saved, ``skip`` skips and goes on (and stops
after ``max_skipped`` in a row); no checkpoint or adapter ever holds a non-finite value.

NaNs are injected honestly: a toy model whose logits are NaN for rows holding a poison token (the
batches of chosen steps get one such row), a term whose gradient is infinite while the loss is
finite, an optimizer whose learning rate overflows float32, and through the CLI a learning rate so
large that the adapter overflows, as a diverging run would.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lora_jax.train import sharding as shd
from lora_jax.train.checkpoint import Checkpointer, latest_step
from lora_jax.train.metrics import MetricsWriter, read_metrics
from lora_jax.train.trainer import LoopSpec, NonFiniteError, Trainer, make_loss_fn, make_train_step

from train_helpers import POISON, poison_steps, tiny_overrides, toy_logits, toy_params, toy_rows

BATCH = 8


def _strict_records(path):
    """Every line parses as strict JSON (no NaN / Infinity tokens)."""
    def no_constants(c):
        raise AssertionError(f"non-strict JSON constant {c} in {path}")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    assert text.endswith("\n")
    return [json.loads(line, parse_constant=no_constants) for line in text.splitlines()]


def _host(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def _equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


# ---- the step itself ---------------------------------------------------------------------------


def _toy_batch(poison=False):
    rows = toy_rows(BATCH)
    if poison:
        rows.tokens[2, 3] = POISON
    from lora_jax.train.data import batch

    return {k: jnp.asarray(v) for k, v in batch(rows, np.arange(BATCH)).items()}


def _inf_grad_logits(tr, fr, x, m, rng):
    # finite loss, non-finite gradient: d/dz of z**0.5 at z = 0 is infinite (times 0: NaN)
    has = jnp.any(x == POISON)
    z = jnp.where(has, tr["z"], 1.0)
    return tr["emb"][x] @ tr["out"] + 0.0 * z ** 0.5


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
@pytest.mark.parametrize("case", ["nan_loss", "inf_grad", "overflowing_update"])
def test_step_keeps_params_and_opt_state_on_a_nonfinite_step(case):
    params = {k: jnp.asarray(v) for k, v in toy_params().items()}
    logits_fn, tx = toy_logits, optax.adam(1e-2)
    if case == "inf_grad":
        params["z"] = jnp.zeros(())
        logits_fn = _inf_grad_logits
    if case == "overflowing_update":
        tx = optax.sgd(1e39)  # inf in float32: every update overflows
    step = jax.jit(make_train_step(make_loss_fn(logits_fn), tx))
    state = {"params": params, "opt_state": tx.init(params), "rng": jax.random.key(0),
             "step": jnp.zeros((), jnp.int32)}
    bad = case != "overflowing_update"
    new, m = step(state, None, _toy_batch(poison=bad))
    m = jax.device_get(m)
    assert not bool(m["finite"])
    if case == "nan_loss":
        assert np.isnan(m["loss"])
    else:  # loss finite: the gradient (inf_grad) or the updated parameters (overflow) are not
        assert np.isfinite(m["loss"])
        assert np.isfinite(m["grad_norm"]) == (case == "overflowing_update")
    assert _equal(_host(new["params"]), _host(state["params"]))
    assert _equal(_host(new["opt_state"]), _host(state["opt_state"]))
    assert int(new["step"]) == 1
    assert not np.array_equal(jax.random.key_data(new["rng"]), jax.random.key_data(state["rng"]))
    if case != "overflowing_update":  # a clean batch is applied
        new2, m2 = step(state, None, _toy_batch(poison=False))
        assert bool(m2["finite"]) and not _equal(_host(new2["params"]), _host(state["params"]))


# ---- the loop ---------------------------------------------------------------------------------


def _trainer(tmp_path, poison, **kw):
    rows = poison_steps(toy_rows(128), poison, BATCH)
    spec = LoopSpec(**{"steps": 12, "batch_size": BATCH, "lr": 0.05, "optimizer": "adam", "warmup_steps": 0,
                       "schedule": "constant", "log_every": 1, "checkpoint_every": 2, "keep_checkpoints": 10,
                       "progress": False, **kw})
    ck = Checkpointer(str(tmp_path / "checkpoints"), keep=spec.keep_checkpoints, async_save=True)
    metrics = MetricsWriter(str(tmp_path / "metrics.jsonl"))
    lines = []
    tr = Trainer(spec, mesh=shd.make_mesh(1, 1, 1), logits_fn=toy_logits, trainable=toy_params(), rows=rows,
                 seed=0, metrics=metrics, checkpointer=ck, echo=lines.append)
    tr.lines = lines
    return tr


def _checkpoint_params(tmp_path, tr, step):
    ck = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    try:
        from lora_jax.train.trainer import _abstract

        saved, meta = ck.restore(step, _abstract(tr.checkpoint_state()))
    finally:
        ck.close()
    return _host(saved), meta


def test_skip_leaves_the_state_alone_and_goes_on_then_stops_after_max_skipped(tmp_path):
    tr = _trainer(tmp_path, poison=[5, 9, 10, 11], on_nonfinite="skip", max_skipped=3)
    tr.fit(until=4)
    p4, o4 = _host(tr.state["params"]), _host(tr.state["opt_state"])
    tr.fit(until=5)  # poisoned: skipped
    assert tr.step == 5 and tr.position == 5 * BATCH and (tr.skip_run, tr.skipped) == (1, 1)
    assert _equal(_host(tr.state["params"]), p4) and _equal(_host(tr.state["opt_state"]), o4)
    assert any("non-finite loss or gradients at step 5" in l and "update skipped (1 in a row" in l for l in tr.lines)
    tr.fit(until=6)  # clean: applied
    assert tr.skip_run == 0 and not _equal(_host(tr.state["params"]), p4)
    with pytest.raises(NonFiniteError) as e:
        tr.fit()  # 9, 10, 11 poisoned: the third in a row stops
    assert (e.value.step, e.value.checkpoint_step) == (11, 10)
    assert "3 steps in a row (up to step 11) had non-finite loss or gradients (max_skipped=3)" in str(e.value)
    assert "the last good checkpoint is step 10" in str(e.value)
    tr.metrics.close()
    tr.checkpointer.close()
    assert latest_step(str(tmp_path / "checkpoints")) == 10
    # the checkpoint of step 10 holds step 8's parameters (9 and 10 skipped) and the skip count
    saved, meta = _checkpoint_params(tmp_path, tr, 10)
    saved8, _ = _checkpoint_params(tmp_path, tr, 8)
    assert (meta["skipped_in_a_row"], meta["skipped"], meta["position"]) == (2, 3, 10 * BATCH)
    assert _equal(saved["adapter"], saved8["adapter"]) and _equal(saved["opt_state"], saved8["opt_state"])
    recs = _strict_records(tmp_path / "metrics.jsonl")
    train = {r["step"]: r for r in recs if r["kind"] == "train"}
    assert sorted(train) == list(range(1, 12))
    assert [s for s, r in train.items() if r.get("skipped")] == [5, 9, 10, 11]
    assert all(train[s]["loss"] is None for s in (5, 9, 10, 11))
    assert all(np.isfinite(train[s]["loss"]) for s in (1, 2, 3, 4, 6, 7, 8))
    assert recs[-1] == {"kind": "nonfinite", "phase": "lora", "step": 11, "on_nonfinite": "skip",
                        "checkpoint_step": 10}
    # a resumed trainer carries the streak on: one more poisoned step would stop it
    tr2 = _trainer(tmp_path / "again", poison=[], on_nonfinite="skip", max_skipped=3)
    tr2.checkpointer.close()
    tr2.checkpointer = Checkpointer(str(tmp_path / "checkpoints"), keep=10)
    assert tr2.restore() == 10 and tr2.skip_run == 2 and tr2.skipped == 3
    tr2.checkpointer.close()
    tr2.metrics.close()


@pytest.mark.parametrize("log_every", [1, 4])
def test_stop_writes_nothing_after_the_last_good_step(tmp_path, log_every):
    """With log_every=4 the loop learns of step 6's NaN only at step 8, after two more steps; it
    must still not save step 8 (its checkpoint step)."""
    tr = _trainer(tmp_path, poison=[6], log_every=log_every, checkpoint_every=4)
    with pytest.raises(NonFiniteError) as e:
        tr.fit()
    assert (e.value.step, e.value.checkpoint_step) == (6, 4)
    msg = str(e.value)
    assert "non-finite loss or gradients at step 6 (loss nan" in msg and "the update was not applied" in msg
    assert "the last good checkpoint is step 4" in msg
    tr.metrics.close()
    tr.checkpointer.close()
    ck = tmp_path / "checkpoints"
    assert sorted(int(n) for n in os.listdir(ck)) == [4]
    saved, meta = _checkpoint_params(tmp_path, tr, 4)
    assert meta["step"] == 4 and all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(saved))
    if log_every == 1:  # stopped right at the bad step: its update was not applied
        assert tr.step == 6
        p5 = _host(tr.state["params"])
        tr5 = _trainer(tmp_path / "ref", poison=[])
        tr5.fit(until=5)
        assert _equal(_host(tr5.state["params"]), p5)
        tr5.checkpointer.close()
        tr5.metrics.close()
    recs = _strict_records(tmp_path / "metrics.jsonl")
    assert recs[-1] == {"kind": "nonfinite", "phase": "lora", "step": 6, "on_nonfinite": "stop", "checkpoint_step": 4}
    assert [r["step"] for r in recs if r["kind"] == "train"] == ([1, 2, 3, 4, 5, 6] if log_every == 1 else [4, 8])


def test_save_refuses_a_nonfinite_state(tmp_path):
    tr = _trainer(tmp_path, poison=[])
    tr.fit(until=2)
    tr.state["params"]["out"] = tr.state["params"]["out"].at[0, 0].set(jnp.inf)
    tr.state["step"] = tr.state["step"] + 1
    with pytest.raises(NonFiniteError, match=r"step 3: the trainable state holds NaN or infinite values; not saved "
                                             r"\(the last good checkpoint is step 2\)"):
        tr.save()
    tr.checkpointer.close()
    tr.metrics.close()
    assert latest_step(str(tmp_path / "checkpoints")) == 2


def test_metrics_writer_writes_strict_json_and_drops_a_torn_last_line(tmp_path):
    p = tmp_path / "m.jsonl"
    w = MetricsWriter(str(p))
    w.write({"kind": "train", "phase": "lora", "step": 1, "loss": float("nan"), "grad_norm": float("inf")})
    w.write({"kind": "train", "phase": "lora", "step": 2, "loss": 1.5})
    w.close()
    with open(p, "a") as fh:
        fh.write('{"kind": "train", "phase": "lo')  # a process killed in the middle of a write
    assert read_metrics(str(p)) == [{"kind": "train", "phase": "lora", "step": 1, "loss": None, "grad_norm": None},
                                    {"kind": "train", "phase": "lora", "step": 2, "loss": 1.5}]
    w = MetricsWriter(str(p), resume_step=1)
    w.write({"kind": "train", "phase": "lora", "step": 2, "loss": 1.25})
    w.close()
    assert [r["loss"] for r in _strict_records(p)] == [None, 1.25]
    with open(p, "a") as fh:
        fh.write("garbage\n{}\n")
    with pytest.raises(ValueError, match=r"m.jsonl:3: not a JSON record"):
        read_metrics(str(p))


# ---- through the CLI ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def diverged(tmp_path_factory):
    """lr = 1e37 after a step of warmup at lr 0: the adapter overflows within a few steps."""
    from lora_jax.cli import main

    d = tmp_path_factory.mktemp("diverged") / "run"
    over = tiny_overrides(d, **{"model.pretrain.steps": 0, "model.pretrain.warmup_steps": 0, "train.steps": 8,
                                "data.eval_fraction": 0, "train.plot": False, "train.checkpoint_every": 1,
                                "train.keep_checkpoints": 20, "train.lr": 1e37, "train.warmup_steps": 2,
                                "train.schedule": "constant"})
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["train"] + over)
    return d, rc, err.getvalue()


def test_cli_stops_on_a_diverging_run_with_exit_3_and_keeps_the_last_good_checkpoint(diverged):
    d, rc, err = diverged
    assert rc == 3, err
    recs = read_metrics(str(d / "metrics.jsonl"))
    bad = [r for r in recs if r["kind"] == "nonfinite"]
    assert len(bad) == 1
    n, k = bad[0]["step"], bad[0]["checkpoint_step"]
    assert k == n - 1 >= 1  # a checkpoint every step: the last good one is the step before
    assert err.startswith("lora-jax: error: [lora] non-finite loss or gradients at step ")
    assert f"at step {n} " in err and f"the last good checkpoint is step {k}" in err
    assert f"out_dir={d} --resume (from step {k})" in err and "train.on_nonfinite=skip" in err
    steps = sorted(int(x) for x in os.listdir(d / "checkpoints"))
    assert steps == list(range(1, k + 1))
    assert not (d / "adapter").exists() and not (d / "summary.json").exists()
    from lora_jax.train.runs import load_checkpoint, load_run

    h = load_run(str(d))
    for s in steps:
        state, _ = load_checkpoint(str(d), h.cfg, h.lora_params, step=s)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state))


def test_merge_refuses_a_nonfinite_adapter_and_writes_nothing(diverged, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    from lora_jax.cli import main

    d = diverged[0]
    good = tmp_path / "good"
    # the newest checkpoint's adapter (|B| ~ 5e36) is refused by export's own check (its probe logits are
    # not finite): write a sane adapter of the run's model (B zero) as the good one
    import lora_jax as lora
    from lora_jax.train import model as M
    from lora_jax.train.runs import load_run

    h = load_run(str(d))
    sane = jax.tree_util.tree_map(lambda x: x.replace(b=x.b * 0) if lora.is_lora(x) else x, h.lora_params,
                                  is_leaf=lora.is_lora)
    M.export_peft(h.model, sane, str(good))
    assert main(["export", str(d), "--out", str(tmp_path / "refused")]) == 2
    assert "probe logits" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    tensors = load_file(str(good / "adapter_model.safetensors"))
    key = sorted(k for k in tensors if k.endswith("lora_B.weight"))[0]
    tensors[key][0, 0] = np.nan
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    (bad / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    capsys.readouterr()
    out = tmp_path / "merged"
    assert main(["merge", str(d), "--adapter", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    module = key.split("base_model.model.")[1].rsplit(".lora_B", 1)[0]
    # refused as it is read (lora_jax.hf.load_peft checks every tensor), before any merge
    assert err.startswith(f"lora-jax: error: load_peft: 1 problem(s) in {str(bad)!r}"), err
    assert f"non-finite: {module} lora_B holds NaN or Inf" in err, err
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["bad", "good"]  # no temporary left either
    # an adapter that went non-finite in memory: merge(safe=True) refuses it and writes nothing
    from lora_jax.train import model as M
    from lora_jax.train.runs import load_run

    h = load_run(str(d), adapter=str(good))
    node = h.lora_params["model"]["layers"]["mlp"]["down_proj"]["kernel"]
    h.lora_params["model"]["layers"]["mlp"]["down_proj"]["kernel"] = node.replace(b=node.b.at[0, 0, 0].set(np.nan))
    with pytest.raises(ValueError, match=r"merge\(safe=True\): non-finite values in 1 merged kernel\(s\): "
                                         r".*model/layers/mlp/down_proj"):
        M.save_merged(h.model, h.lora_params, h.tokenizer, str(out))
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["bad", "good"]
    # the good adapter merges
    assert main(["merge", str(d), "--adapter", str(good), "--out", str(out)]) == 0
    assert (out / "config.json").is_file()


def test_an_eval_without_a_scored_token_is_null_not_zero(tmp_path):
    """Eval batches that hold no target give loss/ppl/acc NaN (null in metrics.jsonl) and an 'n/a'
    log line: a loss of 0.0 would read as a perfect model."""
    from lora_jax.train.data import Rows

    ev = toy_rows(16)
    empty = Rows(ev.tokens, np.zeros_like(ev.weights), ev.valid)
    spec = LoopSpec(steps=2, batch_size=BATCH, lr=0.05, warmup_steps=0, log_every=1, eval_every=1, progress=False)
    metrics = MetricsWriter(str(tmp_path / "metrics.jsonl"))
    lines = []
    tr = Trainer(spec, mesh=shd.make_mesh(1, 1, 1), logits_fn=toy_logits, trainable=toy_params(), rows=toy_rows(64),
                 eval_rows=empty, seed=0, metrics=metrics, echo=lines.append)
    tr.fit()
    metrics.close()
    evals = [r for r in read_metrics(str(tmp_path / "metrics.jsonl")) if r["kind"] == "eval"]
    assert len(evals) == 3 and all(r["eval_loss"] is None and r["eval_ppl"] is None and r["eval_tokens"] == 0
                                   for r in evals)
    assert any("eval loss n/a (no scored token" in line for line in lines)
    # the same rows with their targets: a finite loss
    tr2 = Trainer(spec, mesh=shd.make_mesh(1, 1, 1), logits_fn=toy_logits, trainable=toy_params(), rows=toy_rows(64),
                  eval_rows=ev, seed=0, echo=lambda *a: None)
    assert np.isfinite(tr2.evaluate()["eval_loss"])

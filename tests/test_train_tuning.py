"""The step settings the trainer picks (`lora_jax.train.tuning`): the candidate lists, the pick
within a memory limit on real compiled steps, and that no setting changes the step's numbers
(remat, layer-scan unrolling, plain vs chunked loss: same loss and gradients as a float32
reference run with none of them)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lora
from lora_jax.train import tuning
from lora_jax.train.model import lora_loss_fn, lora_rules, stacked_paths, with_step_settings
from lora_jax.train.trainer import LoopSpec, Trainer, jit_train_step, make_optimizer
from lora_jax.train import sharding as shd

from helpers import nonzero_b
from train_helpers import VOCAB, synthetic_rows, tiny_model

S = tuning.StepSettings
DOTS = "dots_with_no_batch_dims_saveable"


def test_candidates_fastest_first_with_fixed_choices_applied():
    assert tuning.candidates("cpu") == [S(None, "chunked", 1)]
    gpu = tuning.candidates("gpu")
    assert gpu[0] == S(DOTS, "plain", 0) and gpu[-1] == S("nothing_saveable", "chunked", 1)
    assert len(set(gpu)) == len(gpu) and tuning.candidates("tpu") == gpu
    # a fixed choice replaces that field everywhere; duplicates collapse, order stays
    assert tuning.candidates("gpu", loss="chunked") == [S(DOTS, "chunked", 0), S(DOTS, "chunked", 1),
                                                         S("nothing_saveable", "chunked", 1)]
    assert tuning.candidates("gpu", remat="none", loss="plain", unroll=2) == [S(None, "plain", 2)]
    assert tuning.candidates("cpu", remat=DOTS, unroll=0) == [S(DOTS, "chunked", 0)]
    with pytest.raises(ValueError, match="loss must be 'auto' or one of"):
        tuning.candidates("gpu", loss="fast")
    with pytest.raises(ValueError, match="unroll must be an integer >= 0"):
        S(None, "plain", -1)
    assert S(None, "plain", 0).scan_unroll(22) == 22 and S(None, "plain", 4).scan_unroll(22) == 4


def _lora_step_parts(seed=0, batch=4, seq=32):
    model, params = tiny_model(seed)
    lp = nonzero_b(lora.init(params, lora_rules(model, "all-linear", rank=4, alpha=8), jax.random.key(seed)))
    train, rest = lora.split(lp)
    toks = jax.random.randint(jax.random.key(seed + 1), (batch, seq + 1), 0, VOCAB)
    b = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "weights": jnp.ones((batch, seq)),
         "mask": jnp.ones((batch, seq), jnp.int32)}
    return model, train, rest, b


def test_pick_compiles_in_order_and_keeps_the_first_that_fits():
    model, train, rest, b = _lora_step_parts()
    tx, _ = make_optimizer(LoopSpec(steps=2, batch_size=4, lr=1e-3))
    state = {"params": train, "opt_state": tx.init(train), "rng": jax.random.key(0),
             "step": jnp.zeros((), jnp.int32)}
    compiled_order, cache = [], {}

    def compile_fn(c):  # each candidate compiled once; every call recorded
        compiled_order.append(c)
        if c not in cache:
            fn = lora_loss_fn(with_step_settings(model, c), chunked=c.loss == "chunked", chunk=8)
            cache[c] = jit_train_step(fn, tx).lower(state, rest, b).compile()
        return cache[c]

    cands = [S(None, "plain", 1), S("nothing_saveable", "chunked", 2)]
    need = [tuning.footprint(compile_fn(c)) for c in cands]
    assert need[1] < need[0], need  # remat + chunked loss plan less memory than neither
    compiled_order.clear()
    chosen, step, tried = tuning.pick(cands, compile_fn, limit=need[1])
    assert chosen == cands[1] and compiled_order == cands
    assert [t["bytes"] for t in tried] == need and tried[0]["settings"] == cands[0].label
    compiled_order.clear()
    chosen, _, tried = tuning.pick(cands, compile_fn, limit=None)  # no limit: the first, compiled alone
    assert chosen == cands[0] and compiled_order == cands[:1] and len(tried) == 1
    with pytest.raises(ValueError, match=r"no step settings fit the memory limit of .* GiB: remat=none loss=plain "
                                         r"unroll=1 needs .* GiB; remat=nothing_saveable"):
        tuning.pick(cands, compile_fn, limit=need[1] - 1)


def test_no_setting_changes_the_loss_or_the_gradients():
    """Every candidate setting computes the loss and adapter gradients of a float32 run with none
    of them (no remat, rolled scan, plain loss), to float32 rounding."""
    model, train, rest, b = _lora_step_parts(seed=3)
    ref_model = with_step_settings(model, S(None, "plain", 1))

    def value_and_grad(m, chunked):
        fn = lora_loss_fn(m, chunked=chunked, chunk=8)
        return jax.jit(jax.value_and_grad(lambda t: fn(t, rest, b, None)[0]))(train)

    ref_loss, ref_grad = value_and_grad(ref_model, False)
    ref_flat = jax.tree.leaves(ref_grad)
    assert all(float(jnp.abs(g).max()) > 0 for g in ref_flat)
    for c in [S(DOTS, "plain", 0), S(DOTS, "chunked", 1), S("nothing_saveable", "chunked", 2),
              S(None, "chunked", 0)]:
        m = with_step_settings(model, c)
        assert m.config.scan_unroll == c.scan_unroll(2) and m.config.remat_policy == c.remat
        loss, grad = value_and_grad(m, c.loss == "chunked")
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=2e-6, err_msg=c.label)
        for g, r in zip(jax.tree.leaves(grad), ref_flat):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=2e-5, atol=1e-6 * float(jnp.abs(r).max()),
                                       err_msg=c.label)


def test_unrolling_removes_the_scan_and_its_per_layer_slices():
    """The unrolled step has no loop: no dynamic slices of the stacked weights and activations."""
    model, train, rest, b = _lora_step_parts()
    tx, _ = make_optimizer(LoopSpec(steps=2, batch_size=4, lr=1e-3))
    state = {"params": train, "opt_state": tx.init(train), "rng": jax.random.key(0),
             "step": jnp.zeros((), jnp.int32)}

    def hlo(c):
        fn = lora_loss_fn(with_step_settings(model, c), chunked=False)
        return jit_train_step(fn, tx).lower(state, rest, b).compile().as_text()

    rolled, unrolled = hlo(S(None, "plain", 1)), hlo(S(None, "plain", 0))
    assert " while(" in rolled and "dynamic-update-slice(" in rolled
    assert "dynamic-update-slice(" not in unrolled and "dynamic-slice(" not in unrolled


def test_trainer_runs_the_first_candidate_that_fits(tmp_path):
    """Given candidates and a limit only the second fits, the Trainer compiles both, runs the
    second, and its losses equal a Trainer given that candidate alone."""
    model, params = tiny_model(0)
    rules = lora_rules(model, "all-linear", rank=4, alpha=8)
    rows = synthetic_rows(seq_len=32)
    spec = LoopSpec(steps=3, batch_size=8, lr=3e-3, warmup_steps=1, eval_every=0, log_every=1, checkpoint_every=0)
    cands = [S(None, "plain", 1), S("nothing_saveable", "chunked", 0)]

    def trainer(pairs, limit):
        train, frozen = lora.split(lora.init(params, rules, jax.random.key(0)))
        fns = [(c, lora_loss_fn(with_step_settings(model, c), chunked=c.loss == "chunked", chunk=8)) for c in pairs]
        return Trainer(spec, mesh=shd.make_mesh(), loss_fn=fns if len(fns) > 1 else fns[0][1], trainable=train,
                       frozen=frozen, rows=rows, echo=lambda *_: None, memory_limit=limit,
                       stacked=stacked_paths(model))

    small = trainer(cands[1:], limit=None)
    t = trainer(cands, limit=tuning.footprint(small._step))
    assert t.settings == cands[1] and [x["settings"] for x in t.settings_tried] == [c.label for c in cands]
    t.fit()
    small.fit()
    np.testing.assert_allclose([l for _, l in t.history], [l for _, l in small.history], rtol=1e-6)
    with pytest.raises(TypeError, match="sequence of \\(StepSettings, loss_fn\\) pairs"):
        Trainer(spec, mesh=shd.make_mesh(), loss_fn=[lora_loss_fn(model)], trainable={}, rows=rows)


def test_step_settings_are_plain_hashable_values():
    a = S(DOTS, "plain", 0)
    assert a == dataclasses.replace(a) and hash(a) == hash(S(DOTS, "plain", 0))
    assert a.label == f"remat={DOTS} loss=plain unroll=all"

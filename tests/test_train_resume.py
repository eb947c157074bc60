"""Stop after step k, resume: the final adapter and optimizer state are bit-identical to an
uninterrupted run; resuming on another mesh reshards the checkpoint."""

import json

import jax
import numpy as np
import pytest

from lora_jax.train import load_config, run
from lora_jax.train.checkpoint import latest_step
from lora_jax.train.runs import load_run, load_checkpoint

from train_helpers import tiny_overrides

STEPS = 6


def _cfg(out_dir, **extra):
    # no pretraining, no eval set, no plot, checkpoints only where the run stops: the cheapest run
    extra = {"model.pretrain.steps": 0, "model.pretrain.warmup_steps": 0, "train.steps": STEPS,
             "data.eval_fraction": 0, "train.plot": False, "train.checkpoint_every": 0, **extra}
    return load_config(None, tiny_overrides(out_dir, **extra))


def _final(out_dir):
    h = load_run(str(out_dir))
    state, meta = load_checkpoint(str(out_dir), h.cfg, h.lora_params)
    return state, meta


def _lora_train(out_dir):
    recs = [json.loads(l) for l in open(out_dir / "metrics.jsonl")]
    return [(r["step"], r["loss"]) for r in recs if r["kind"] == "train" and r["phase"] == "lora"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp("full") / "run"
    run(_cfg(d), echo=lambda *a: None)
    return d


def test_resume_is_bit_identical(tmp_path, uninterrupted, capsys):
    d = tmp_path / "run"
    s1 = run(_cfg(d), stop_after=3)
    assert s1["stopped"] and s1["step"] == 3
    assert latest_step(str(d / "checkpoints")) == 3
    assert not (d / "adapter").exists()  # nothing exported from an interrupted run
    capsys.readouterr()
    s2 = run(_cfg(d, **{"train.resume": True}))
    out = capsys.readouterr().out
    assert f"# resuming from step 3 of {STEPS} (checkpoint {d / 'checkpoints' / '3'}, data position 24)" in out
    assert not s2["stopped"] and s2["step"] == STEPS
    # the resume opened the tokenized cache the first start used, tokenizing nothing
    assert s2["data"]["tokenized_now"] is False and s2["data"]["cache"] == s1["data"]["cache"]

    got, got_meta = _final(d)
    want, want_meta = _final(uninterrupted)
    assert got_meta["step"] == want_meta["step"] == STEPS
    assert got_meta["position"] == want_meta["position"] == STEPS * 8
    flat_got = jax.tree_util.tree_flatten_with_path(got)[0]
    flat_want = jax.tree_util.tree_flatten_with_path(want)[0]
    assert [k for k, _ in flat_got] == [k for k, _ in flat_want]
    assert len(flat_got) > 4 * 7  # adapter a/b + Adam mu/nu of 7 stacked kernels, counts, rng
    for (kp, g), (_, w) in zip(flat_got, flat_want):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype and g.shape == w.shape, jax.tree_util.keystr(kp)
        assert np.array_equal(g, w), jax.tree_util.keystr(kp)
    # the metrics of the resumed run hold each step once, with the same losses
    assert _lora_train(d) == _lora_train(uninterrupted)
    assert [s for s, _ in _lora_train(d)] == list(range(1, STEPS + 1))
    # the exported adapter is the checkpoint's
    from safetensors.numpy import load_file

    a = load_file(str(d / "adapter" / "adapter_model.safetensors"))
    q = got["adapter"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"]  # (layers, ...)
    for i in range(2):
        assert np.array_equal(a[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight"], np.asarray(q.a[i]).T)
        assert np.array_equal(a[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight"], np.asarray(q.b[i]).T)


def test_resume_on_another_mesh(tmp_path, uninterrupted):
    d = tmp_path / "run"
    run(_cfg(d), stop_after=3, echo=lambda *a: None)
    run(_cfg(d, **{"train.resume": True, "mesh.data": 2, "mesh.fsdp": 4}), echo=lambda *a: None)
    got, _ = _final(d)
    want, _ = _final(uninterrupted)
    np.testing.assert_allclose([l for _, l in _lora_train(d)], [l for _, l in _lora_train(uninterrupted)], rtol=1e-5)
    for g, w in zip(jax.tree_util.tree_leaves(got["adapter"]), jax.tree_util.tree_leaves(want["adapter"])):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * np.abs(w).max())


def test_resume_refuses_a_changed_config(tmp_path, uninterrupted, capsys):
    from lora_jax.cli import main

    args = [f"{k}={v}" for k, v in {"model.pretrain.steps": 0, "model.pretrain.warmup_steps": 0, "train.steps": STEPS,
                                     "data.eval_fraction": 0, "train.plot": "false", "train.checkpoint_every": 0}.items()]
    rc = main(["train"] + tiny_overrides(uninterrupted) + args + ["lora.rank=2", "--resume"])
    assert rc == 2
    assert "train.resume: the config differs from the run's saved config.yaml in: lora.rank (saved 4, now 2)" \
        in capsys.readouterr().err
    rc = main(["train"] + tiny_overrides(uninterrupted) + args)
    assert rc == 2
    assert f"already holds a run (checkpoints up to step {STEPS}); pass --resume" in capsys.readouterr().err

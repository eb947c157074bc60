"""``lora-jax train`` with ``adapters``: several adapters on one frozen base in one step, each with
its own data, rank, targets, learning rate, optimizer, batch size, evals and export. The reference
is each adapter's own run alone on the same base: its losses, evals, checkpoint and export must be
those of that run."""

import json

import jax
import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from lora_jax.train import load_config, run
from lora_jax.train.config import ConfigError
from lora_jax.train.parts import lora_tree
from lora_jax.train.runs import evaluate, eval_rows_of, load_checkpoint, load_run

from train_helpers import tiny_overrides

STEPS = 4
# two adapters that differ in everything an adapter may set
ADAPTERS = [
    {"name": "wide", "lora": {"rank": 4, "alpha": 8.0},
     "train": {"lr": 0.01, "batch_size": 12, "weight_decay": 0.01}},
    {"name": "narrow", "lora": {"rank": 2, "alpha": 2.0, "targets": ["q_proj", "v_proj"], "rslora": True},
     "data": {"train": "builtin:pretrain.txt", "eval_fraction": 0.2},
     "train": {"lr": 0.003, "batch_size": 4, "optimizer": "adam", "schedule": "constant", "clip_norm": 0.5}},
]
# the same adapters as one-adapter runs (the keys above, as overrides)
ALONE = {
    "wide": {"lora.rank": 4, "lora.alpha": 8.0, "train.lr": 0.01, "train.batch_size": 12, "train.weight_decay": 0.01},
    "narrow": {"lora.rank": 2, "lora.alpha": 2.0, "lora.targets": "[q_proj,v_proj]", "lora.rslora": True,
               "data.train": "builtin:pretrain.txt", "data.eval_fraction": 0.2, "train.lr": 0.003,
               "train.batch_size": 4, "train.optimizer": "adam", "train.schedule": "constant", "train.clip_norm": 0.5},
}
SHARED = {"train.steps": STEPS, "train.grad_accum": 2, "mesh.data": 2, "train.plot": False, "train.eval_batches": 2,
          "train.checkpoint_every": 2, "data.cache": "null"}


def _records(d, kind):
    return [r for r in map(json.loads, open(d / "metrics.jsonl")) if r["kind"] == kind and r["phase"] == "lora"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The run of both adapters (its config in a YAML file, as a user writes it) and each adapter's
    run alone on that run's base."""
    root = tmp_path_factory.mktemp("adapters")
    conf = root / "two.yaml"
    conf.write_text(yaml.safe_dump({"adapters": ADAPTERS}))
    both = root / "both"
    summary = run(load_config(str(conf), tiny_overrides(both, **SHARED)), echo=lambda *a: None)
    alone = {}
    for name, keys in ALONE.items():
        alone[name] = root / name
        run(load_config(None, tiny_overrides(alone[name], **SHARED, **keys, **{"model.path": both / "base"})),
            echo=lambda *a: None)
    return both, summary, alone


def test_each_adapter_trains_as_in_its_own_run(runs):
    both, summary, alone = runs
    for name, d in alone.items():
        mine = [r["adapters"][name] for r in _records(both, "train")]
        theirs = _records(d, "train")
        assert len(mine) == len(theirs) == STEPS
        np.testing.assert_allclose([r["loss"] for r in mine], [r["loss"] for r in theirs], rtol=1e-6)
        np.testing.assert_allclose([r["acc"] for r in mine], [r["acc"] for r in theirs], rtol=1e-6)
        np.testing.assert_allclose([r["lr"] for r in mine], [r["lr"] for r in theirs], rtol=1e-7)
        np.testing.assert_allclose([r["grad_norm"] for r in mine], [r["grad_norm"] for r in theirs], rtol=1e-5)
        ev_mine = [r["adapters"][name] for r in _records(both, "eval")]
        ev_theirs = _records(d, "eval")
        assert [r["eval_tokens"] for r in ev_mine] == [r["eval_tokens"] for r in ev_theirs] != []
        np.testing.assert_allclose([r["eval_loss"] for r in ev_mine], [r["eval_loss"] for r in ev_theirs], rtol=1e-6)
        assert summary["adapters"][name]["eval_loss_after"] == pytest.approx(ev_theirs[-1]["eval_loss"], rel=1e-6)
        # the export holds that adapter alone, as its own run exports it (same PEFT keys and config)
        got = load_file(str(both / "adapters" / name / "adapter_model.safetensors"))
        want = load_file(str(d / "adapter" / "adapter_model.safetensors"))
        assert sorted(got) == sorted(want)
        for k in want:  # float32 sums in another order; Adam turns a near-zero gradient's last bits into
            # a visible step, so compare against the tensor's scale
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5 * np.abs(want[k]).max(), err_msg=k)
        assert np.abs(got[next(k for k in got if "lora_B" in k)]).max() > 0  # it trained
        cfg_got = json.load(open(both / "adapters" / name / "adapter_config.json"))
        cfg_want = json.load(open(d / "adapter" / "adapter_config.json"))
        for k in ("r", "lora_alpha", "use_rslora", "target_modules", "rank_pattern", "alpha_pattern"):
            assert cfg_got.get(k) == cfg_want.get(k), k
    assert not (both / "adapter").exists()


def test_resume_of_several_adapters_is_bit_identical(runs, tmp_path):
    both, _, _ = runs
    conf = tmp_path / "two.yaml"
    conf.write_text(yaml.safe_dump({"adapters": ADAPTERS}))
    d = tmp_path / "run"
    over = {**SHARED, "model.path": both / "base"}  # `both`'s base, as saved: the same float32 weights
    ref = both
    s = run(load_config(str(conf), tiny_overrides(d, **over)), stop_after=2, echo=lambda *a: None)
    assert s["stopped"] and not (d / "adapters").exists()
    run(load_config(str(conf), tiny_overrides(d, **over, **{"train.resume": True})), echo=lambda *a: None)
    cfg = load_config(str(conf), tiny_overrides(d, **over))
    h = load_run(str(d), adapter="wide")
    tree = lora_tree(cfg, h.model, jax.tree_util.tree_map(lambda x: x, _base(h)))
    got, meta = load_checkpoint(str(d), cfg, tree)
    want, _ = load_checkpoint(str(ref), cfg, tree)
    assert meta["step"] == STEPS and meta["position"] == STEPS * 16
    for (kp, g), (_, w) in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                               jax.tree_util.tree_flatten_with_path(want)[0]):
        assert np.array_equal(np.asarray(g), np.asarray(w)), jax.tree_util.keystr(kp)
    assert [r["adapters"] for r in _records(d, "train")] == [
        {n: {k: v for k, v in a.items()} for n, a in r["adapters"].items()} for r in _records(ref, "train")]


def _base(h):
    from lora_jax.train.model import base_only

    return base_only(h.lora_params)


def test_a_run_of_several_adapters_loads_by_name(runs):
    both, _, alone = runs
    with pytest.raises(ConfigError, match=r"trained the adapters \['wide', 'narrow'\]; choose one with --adapter NAME"):
        load_run(str(both))
    with pytest.raises(ConfigError, match=r"not 'wid'"):
        load_run(str(both), adapter="wid")
    h = load_run(str(both), adapter="narrow")
    import lora_jax as lora

    assert lora.adapter_names(h.lora_params) == ["narrow"]
    assert h.cfg.data.train == "builtin:pretrain.txt"  # that adapter's own data
    got = evaluate(h, eval_rows_of(h))
    want = evaluate(load_run(str(alone["narrow"])), eval_rows_of(h))
    assert got["adapter"]["eval_loss"] == pytest.approx(want["adapter"]["eval_loss"], rel=1e-6)


def test_adapters_config_refusals():
    def problems(adapters, **extra):
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"adapters={json.dumps(adapters)}"] + [f"{k}={v}" for k, v in extra.items()])
        return "\n".join(e.value.problems)

    p = problems([{"name": "a", "train": {"steps": 3}, "lora": {"modules_to_save": ["x"]}}, {"name": "a"},
                  {"lora": {"rank": 2}}, {"name": "x/y"}, {"name": "frozen"}, {"name": "d", "lora": {"variant": "dora"}},
                  {"name": "e", "train": {"lr": -1}}, {"name": "f", "model": {}}, {"name": "g", "train": {"batch_size": 3}}],
                 **{"train.grad_accum": 2})
    assert "adapters[0] (a).train.steps: not set per adapter" in p
    assert "adapters[0] (a).lora.modules_to_save: not set per adapter" in p
    assert "adapters[2].name: adapters[2]: name must be a non-empty string" in p
    assert "adapters[3].name: 'x/y' cannot name an adapter of a run" in p
    assert "adapters[4].name: 'frozen' cannot name an adapter of a run" in p
    assert "adapters[5] (d).lora.variant: 'dora' cannot share a batch with other adapters" in p
    assert "adapters[6] (e): train.lr: -1.0 is out of range" in p
    assert "adapters[7] (f): unknown key 'model'" in p
    assert "adapters[8] (g): train.batch_size: 3 does not divide by train.grad_accum=2" in p
    assert "also adapters[" in problems([{"name": "a"}, {"name": "a"}])
    assert "adapters: an empty list" in problems([])
    assert "lora.modules_to_save" in problems([{"name": "a"}], **{"lora.modules_to_save": "[lm_head]"})
    with pytest.raises(ConfigError, match="adapters: expected a list of mappings"):
        load_config(None, ["adapters=3"])
    # each adapter's missing data file is named with its adapter
    assert "adapters[1] (b): data.train:" in problems([{"name": "a"}, {"name": "b", "data": {"train": "/no/such.jsonl"}}])


def test_the_cli_exports_and_merges_one_adapter_by_name(runs, tmp_path, capsys):
    """``export``/``merge`` ``--adapter NAME`` of a run of several: that adapter, as the run
    exported it (export) and folded into the base (merge); no name is a usage error naming them."""
    from lora_jax.cli import main
    from lora_jax.train.model import load_model

    both, _, alone = runs
    assert main(["export", str(both), "--adapter", "narrow", "--out", str(tmp_path / "e")]) == 0
    got = load_file(str(tmp_path / "e" / "adapter_model.safetensors"))
    want = load_file(str(both / "adapters" / "narrow" / "adapter_model.safetensors"))
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
    capsys.readouterr()
    assert main(["export", str(both)]) == 2
    assert "trained the adapters ['wide', 'narrow']; choose one with --adapter NAME" in capsys.readouterr().err
    assert main(["export", str(alone["wide"]), "--adapter", "wide", "--out", str(tmp_path / "x")]) == 2
    assert "trained one adapter" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    # merge: the run's own slot RUN/merged/NAME; equal to merging that adapter's own run
    assert main(["merge", str(both), "--adapter", "wide"]) == 0
    assert main(["merge", str(alone["wide"]), "--out", str(tmp_path / "m")]) == 0
    _, p1 = load_model(str(both / "merged" / "wide"))
    _, p2 = load_model(str(tmp_path / "m"))
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_generate_serves_the_runs_adapters_by_name_in_one_batch(runs):
    """``generate --prompts`` on a run of several adapters: each row names one of them (or null for
    the base) and equals a greedy run of that adapter alone; ``--base`` needs no adapter name."""
    from lora_jax.train.runs import generate, generate_many

    import dataclasses

    import lora_jax as lora

    def loud(h):  # B x 300: four small steps leave greedy text as the base's; this makes each adapter's its own
        def amp(x):
            return x.replace(w=amp(x.w), b=x.b * 300.0) if lora.is_lora(x) else x
        return dataclasses.replace(h, lora_params=jax.tree_util.tree_map(amp, h.lora_params, is_leaf=lora.is_lora))

    both, _, _ = runs
    prompts, names = ["the", "the", "the", "a b c", "x"], ["narrow", "wide", None, "wide", "narrow"]
    h = loud(load_run(str(both), every=True))
    got = generate_many(h, prompts, names, {}, max_new_tokens=6, temperature=0)
    assert len(set(got[:3])) == 3  # the two adapters and the base decode differently
    for p, n, text in zip(prompts, names, got):
        one = loud(load_run(str(both), adapter=n or "wide"))
        assert text == generate(one, p, max_new_tokens=6, temperature=0, use_adapter=n is not None), (p, n)
    assert generate(h, "the", max_new_tokens=6, temperature=0, use_adapter=False) == got[2]
    with pytest.raises(ValueError, match=r"no adapter named \['run'\]; adapters: \['narrow', 'wide'\]"):
        generate_many(h, ["the"], ["run"], {}, max_new_tokens=2)

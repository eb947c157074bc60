"""Exports that verify themselves (`lora_jax.hf.verify`, `save_peft`, `save_merged`) and
``merge(safe=True)``'s magnitude check (issue 14: "exports verify themselves", case 1's merge)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lora
import lora_jax.hf as hf
from lora_jax.hf import verify
from lora_jax.io._files import refuse_overlap
from lora_jax.tree import MERGE_MAGNITUDE_LIMIT

from helpers import nonzero_b, tiny_model


@pytest.fixture(scope="module")
def llama():
    t = tiny_model("llama")
    tree = nonzero_b(lora.init(t.params, lora.Rules(["q_proj", "down_proj"], rank=4, alpha=8, stack_axes=1), 0))
    return t, tree


def _leftovers(d):
    return sorted(e for e in os.listdir(d) if e.startswith("."))


# ---- merge(safe=True): values no trained weight has --------------------------------------------

def test_merge_safe_rejects_implausible_magnitudes_and_names_the_kernel():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((8, 6)) * 0.02, jnp.float32)
    tree = lora.init({"k": w, "other": w}, lora.Rules("k", rank=2), 0)
    lw = tree["k"]
    # a trained-looking delta (as large as the base itself) passes
    ok = {**tree, "k": lw.replace(b=jnp.full(lw.b.shape, 0.05, jnp.float32))}
    lora.merge(ok, safe=True)
    # the corrupt checkpoint: 8.8e30 merged weights, finite, used to pass
    bad = {**tree, "k": lw.replace(b=jnp.full(lw.b.shape, 1e30, jnp.float32))}
    with pytest.raises(ValueError, match=r"implausibly large .*\['k \(max \|merged\| .* > 1000 x 1\)"):
        lora.merge(bad, safe=True)
    # the threshold is relative to max(max|w|, 1): just under it passes, just over fails
    ones = jnp.ones((1, 1), jnp.float32)
    edge = lora.LoraWeight(ones, ones, ones * (MERGE_MAGNITUDE_LIMIT - 2), layout="io", rank=1, alpha=1)
    lora.merge({"k": edge}, safe=True)
    with pytest.raises(ValueError, match="implausibly large"):
        lora.merge({"k": edge.replace(b=ones * (MERGE_MAGNITUDE_LIMIT + 1))}, safe=True)
    lora.merge(bad)  # safe=False: no check, as documented


# ---- save_peft / save_merged read their files back ----------------------------------------------

def test_save_peft_verifies_what_it_wrote_and_leaves_nothing_when_it_differs(llama, tmp_path, monkeypatch):
    t, tree = llama
    hf.save_peft(tmp_path / "good", tree, t.module)  # verifies and passes
    import lora_jax.hf.peft as peft_mod

    real = peft_mod.write_safetensors

    def corrupt(file, tensors, metadata=None):  # the disk returns something else than was written
        tensors = dict(tensors)
        k = sorted(tensors)[0]
        tensors[k] = np.asarray(tensors[k]) + 1
        real(file, tensors, metadata)

    monkeypatch.setattr(peft_mod, "write_safetensors", corrupt)
    with pytest.raises(ValueError, match="reads back different from what was written"):
        hf.save_peft(tmp_path / "bad", tree, t.module)
    assert not (tmp_path / "bad").exists() and _leftovers(tmp_path) == []


def test_check_peft_files_calls_a_tensor_that_lands_nowhere_an_error(llama, tmp_path):
    t, tree = llama
    hf.save_peft(tmp_path / "a", tree, t.module)
    from lora_jax.io._files import read_safetensors, write_safetensors

    tensors = {k: np.array(v) for k, v in read_safetensors(tmp_path / "a" / "adapter_model.safetensors")[0].items()}
    # a factor whose module does not exist in the model: PEFT would silently ignore it
    ghost = "base_model.model.model.layers.0.self_attn.qq_proj.lora_A.weight"
    tensors[ghost] = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"][0, 0] = np.nan
    write_safetensors(str(tmp_path / "a" / "adapter_model.safetensors"), tensors)
    with pytest.raises(ValueError) as e:
        verify.check_peft_files(tmp_path / "a", t.module, tensors)
    assert f"{ghost} lands on no module" in str(e.value) and "q_proj.lora_B.weight holds NaN or Inf" in str(e.value)


def test_save_merged_verifies_the_reloaded_params_against_merge(llama, tmp_path, monkeypatch):
    t, tree = llama
    hf.save_merged(tmp_path / "good", t.module, tree)
    _, back = hf.from_pretrained(tmp_path / "good")
    want = lora.merge(tree)
    for (kp, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(back)[0],
                               jax.tree_util.tree_flatten_with_path(want)[0]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(kp))
    import lora_jax.models.checkpoint as ckpt

    real = ckpt.write_safetensors

    def drop_delta(file, tensors, metadata=None):  # one merged kernel lost on the way to disk
        tensors = dict(tensors)
        tensors["model.layers.1.mlp.down_proj.weight"] = np.zeros_like(tensors["model.layers.1.mlp.down_proj.weight"])
        real(file, tensors, metadata)

    monkeypatch.setattr(ckpt, "write_safetensors", drop_delta)
    with pytest.raises(ValueError, match="model/layers/mlp/down_proj/kernel reads back different"):
        hf.save_merged(tmp_path / "bad", t.module, tree)
    assert not (tmp_path / "bad").exists() and _leftovers(tmp_path) == []


def test_check_probe_catches_an_adapter_the_merge_dropped(llama):
    t, tree = llama
    assert verify.check_probe(t.module, tree, lora.merge(tree)) < 1e-5
    base = jax.tree_util.tree_map(lambda x: x.base if lora.is_lora(x) else x, tree, is_leaf=lora.is_lora)
    with pytest.raises(ValueError, match="factorized .* and merged disagree"):
        verify.check_probe(t.module, tree, base)
    assert verify.probe_tolerance(jnp.float32) == pytest.approx(np.sqrt(np.finfo(np.float32).eps))


def test_refuse_overlap_resolves_symlinks(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "run")
    for out, how in ((tmp_path / "run", "is"), (tmp_path / "link" / "x", "is inside"), (tmp_path, "contains")):
        with pytest.raises(ValueError, match=f"the output .* {how} the run"):
            refuse_overlap(out, {"the run": tmp_path / "run"})
    refuse_overlap(tmp_path / "elsewhere", {"the run": tmp_path / "run", "nothing": None})
    refuse_overlap(tmp_path / "run2", {"the run": tmp_path / "run"})  # a shared prefix is not containment

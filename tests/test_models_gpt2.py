"""lora_jax.models.gpt2 against transformers' PyTorch GPT-2 on the same weights.

Tiny random models (n_embd 32, 2 layers, 4 heads, vocab 97) are built in PyTorch with eager
attention, their weights spread out (std 0.2, LayerNorm weights around 1, nonzero biases) so
logits are O(1) and attention is far from uniform, saved with ``save_pretrained`` and read back
with `family.params_from_state` from the safetensors file.
"""

import functools
import json
import os

import flax.serialization
import jax
import numpy as np
import pytest
import torch
import transformers as tf
from safetensors.numpy import load_file, save_file

import lora_jax as lora
from lora_jax.models import family
from lora_jax.models import gpt2 as G
from helpers import spread_torch

V = 97
BASE = dict(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2,
            attn_implementation="eager")
VARIANTS = {
    "gpt2": {},
    # per-layer 1/(i+1) scaling (a scanned input), the reordered float32 path, another MLP width and activation
    "gpt2_layer_scaled": dict(scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True, n_inner=48,
                              activation_function="gelu"),
    "gpt2_unscaled": dict(scale_attn_weights=False, activation_function="relu"),
}
TOL = dict(rtol=1e-5, atol=1e-5)
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "flax_msgpack", "gpt2")


@functools.lru_cache(maxsize=None)
def _torch_model(variant):
    torch.manual_seed(0)
    return spread_torch(tf.GPT2LMHeadModel(tf.GPT2Config(**BASE, **VARIANTS[variant])).eval(), seed=len(variant), norm=r"(^|\.)ln_\w+\.weight$")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """variant -> checkpoint directory written by save_pretrained (plus "base": a GPT2Model one)."""
    root = tmp_path_factory.mktemp("gpt2")
    out = {}
    for v in VARIANTS:
        out[v] = root / v
        _torch_model(v).save_pretrained(out[v])
    base = tf.GPT2Model(_torch_model("gpt2").config).eval()
    base.load_state_dict(_torch_model("gpt2").transformer.state_dict(), strict=True)
    out["base"] = root / "base"
    base.save_pretrained(out["base"])
    return out


def _load(d, head=None):
    config = family.config_from_hf(d)
    head = head or family.resolve_head(config, family.read_hf_config(d).get("architectures") or ())
    model = family.build(config, head)
    return model, family.params_from_state(load_file(str(d / "model.safetensors")), model)


def _batch():
    rs = np.random.RandomState(0)
    ids = rs.randint(3, V, (3, 16))
    mask = np.ones((3, 16), np.int64)
    mask[1, :5] = 0  # left padding
    mask[2, 11:] = 0  # right padding
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    return ids, mask, pos


def _torch_out(model, ids, mask=None, pos=None):
    kw = {}
    if mask is not None:
        kw["attention_mask"] = torch.tensor(mask)
    if pos is not None:
        kw["position_ids"] = torch.tensor(pos)
    with torch.no_grad():
        out = model(torch.tensor(ids), **kw)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(saved, variant):
    model, params = _load(saved[variant])
    assert isinstance(model, G.GPT2LMHeadModel)
    ids, mask, pos = _batch()
    tm = _torch_model(variant)
    fwd = jax.jit(lambda p, ids, m, pos: model.apply({"params": p}, ids, attention_mask=m, positions=pos))

    ref = _torch_out(tm, ids)
    out = np.asarray(model.apply({"params": params}, ids))
    assert out.dtype == np.float32 and out.shape == (3, 16, V)
    assert np.abs(ref).max() > 1.0  # logits of useful size, so the tolerance means something
    np.testing.assert_allclose(out, ref, **TOL)

    ref = _torch_out(tm, ids, mask, pos)
    out = np.asarray(fwd(params, ids, mask, pos))
    keep = mask.astype(bool)
    np.testing.assert_allclose(out[keep], ref[keep], **TOL)
    # the mask must matter: the left-padded row without it differs
    plain = np.asarray(fwd(params, ids, np.ones_like(mask), pos))
    assert np.abs(plain[1][keep[1]] - ref[1][keep[1]]).max() > 1e-2


def test_variant_flags_matter(saved):
    """Each variant's flags change the logits (so their tests above can fail)."""
    ids = _batch()[0]
    model, params = _load(saved["gpt2_layer_scaled"])
    plain = model.clone(config=model.config.replace(scale_attn_by_inverse_layer_idx=False))
    diff = np.asarray(plain.apply({"params": params}, ids)) - _torch_out(_torch_model("gpt2_layer_scaled"), ids)
    assert np.abs(diff).max() > 1e-2
    model, params = _load(saved["gpt2_unscaled"])
    scaled = model.clone(config=model.config.replace(scale_attn_weights=True))
    diff = np.asarray(scaled.apply({"params": params}, ids)) - _torch_out(_torch_model("gpt2_unscaled"), ids)
    assert np.abs(diff).max() > 1e-2


def test_base_head_matches_gpt2model(saved):
    model, params = _load(saved["base"])
    assert isinstance(model, G.GPT2Model) and family.torch_class(model) == "GPT2Model"
    assert "wte" in params and "transformer" not in params
    ids, mask, pos = _batch()
    out = np.asarray(model.apply({"params": params}, ids, attention_mask=mask, positions=pos))
    assert out.dtype == np.float32 and out.shape == (3, 16, 32)
    ref = _torch_out(tf.GPT2Model.from_pretrained(saved["base"], attn_implementation="eager").eval(), ids, mask, pos)
    keep = mask.astype(bool)
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(out[keep], ref[keep], **TOL)


def test_roundtrip_exact(saved):
    """The base head (GPT2Model) round trip; the LM heads' are tests/test_hf.py's."""
    for v in ("base",):
        x = load_file(str(saved[v] / "model.safetensors"))
        model, params = _load(saved[v])
        back = family.state_from_params(params, model)
        assert set(back) == set(x), v
        for k in x:
            assert back[k].dtype == x[k].dtype and back[k].shape == x[k].shape, k
            np.testing.assert_array_equal(back[k], x[k], err_msg=k)


def test_load_is_strict_and_ignores_buffers(saved):
    model, _ = _load(saved["gpt2"])
    sd = dict(load_file(str(saved["gpt2"] / "model.safetensors")))
    # buffers of older checkpoints and a stored tied head are skipped
    extra = dict(sd, **{"transformer.h.0.attn.bias": np.ones((1, 1, 64, 64), np.float32),
                        "transformer.h.1.attn.masked_bias": np.float32(-1e4),
                        "lm_head.weight": sd["transformer.wte.weight"]})
    family.params_from_state(extra, model)
    del sd["transformer.h.1.mlp.c_fc.bias"]
    sd["transformer.h.0.attn.c_attn.weight"] = sd["transformer.h.0.attn.c_attn.weight"].T
    with pytest.raises(ValueError) as e:
        family.params_from_state(sd, model)
    msg = str(e.value)
    assert "transformer.h.1.mlp.c_fc.bias" in msg
    assert "transformer.h.0.attn.c_attn.weight: expected (32, 96), got (96, 32)" in msg


def test_flax_msgpack_fixture():
    """transformers 4.57's flax_model.msgpack gives the tree (and logits) of the same weights' safetensors."""
    with open(os.path.join(FIXTURE, "flax_model.msgpack"), "rb") as f:
        state = family.flax_msgpack_state(flax.serialization.msgpack_restore(f.read()))
    config = family.config_from_hf(FIXTURE)
    model = family.build(config, "causal_lm")
    from_msgpack = family.params_from_state(state, model)
    from_st = family.params_from_state(load_file(os.path.join(FIXTURE, "model.safetensors")), model)
    assert jax.tree.structure(from_msgpack) == jax.tree.structure(from_st)
    jax.tree.map(np.testing.assert_array_equal, from_msgpack, from_st)
    ids, mask, pos = _batch()
    ids = ids % config.vocab_size
    tm = tf.GPT2LMHeadModel.from_pretrained(FIXTURE, attn_implementation="eager").eval()
    ref = _torch_out(tm, ids, mask, pos)
    out = np.asarray(model.apply({"params": from_msgpack}, ids, attention_mask=mask, positions=pos))
    keep = mask.astype(bool)
    assert np.ptp(ref[keep], axis=-1).min() > 1e-3  # the fixture's logits are not flat
    np.testing.assert_allclose(out[keep], ref[keep], **TOL)


def test_remat_policy_same_logits(saved):
    """The remat-wrapped scanned block (per-layer scale as a scanned input) computes the same function."""
    model, params = _load(saved["gpt2_layer_scaled"])
    ids = _batch()[0]
    m = G.GPT2LMHeadModel(model.config.replace(remat_policy="nothing_saveable"))
    np.testing.assert_allclose(np.asarray(jax.jit(m.apply)({"params": params}, ids)),
                               _torch_out(_torch_model("gpt2_layer_scaled"), ids), **TOL)


def test_lora_wrap_and_merged_export(saved, tmp_path):
    """A LoRA tree through lora.wrap equals the merged params; the merged export loads into PyTorch."""
    model, params = _load(saved["gpt2"])
    assert family.family_of(model).peft_targets["gpt2"] == ("c_attn",)
    targets = ["c_attn", "c_proj", "c_fc"]
    lp = lora.init(params, lora.Rules(targets, rank=4, init=False, stack_axes=1), jax.random.key(0))
    items = dict(lora.tree.lora_items(lp))
    assert sorted(items) == sorted(f"transformer/h/{m}/kernel" for m in
                                   ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"))
    assert all(lw.a.shape[0] == 2 for lw in items.values())  # one adapter per layer
    ids, mask, pos = _batch()
    merged = jax.device_get(lora.merge(lp))

    def fwd(p, ids):
        return model.apply({"params": p}, ids, attention_mask=mask, positions=pos)

    ours = np.asarray(jax.jit(lora.wrap(fwd))(lp, ids))
    np.testing.assert_allclose(ours, np.asarray(jax.jit(fwd)(merged, ids)), **TOL)
    keep = mask.astype(bool)
    tm = _torch_model("gpt2")
    assert np.abs(ours[keep] - _torch_out(tm, ids, mask, pos)[keep]).max() > 1e-2  # the adapters changed it

    sd = family.state_from_params(merged, model)
    # strict load: PyTorch's state_dict lists the tied head under both names
    moved = tf.GPT2LMHeadModel(tm.config).eval()
    moved.load_state_dict({**{k: torch.tensor(v) for k, v in sd.items()},
                           "lm_head.weight": torch.tensor(sd["transformer.wte.weight"])}, strict=True)
    np.testing.assert_allclose(ours[keep], _torch_out(moved, ids, mask, pos)[keep], **TOL)
    # and as a checkpoint directory (config.json + model.safetensors) through from_pretrained
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(family.hf_config_dict(model)))
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(loaded).__name__ == "GPT2LMHeadModel"
    np.testing.assert_allclose(ours[keep], _torch_out(loaded, ids, mask, pos)[keep], **TOL)


def test_config_round_trip_and_unsupported_fields(saved):
    for v in VARIANTS:
        cfg = family.config_from_hf(saved[v])
        hash(cfg)  # a static jit argument
        assert G.from_hf_config(tf.GPT2Config(**cfg.to_hf_config()).to_dict()) == cfg
    cfg = family.config_from_hf(saved["gpt2_layer_scaled"])
    assert (cfg.n_inner, cfg.intermediate_size, cfg.head_dim, cfg.num_key_value_heads) == (48, 48, 8, 4)
    assert cfg.scale_attn_by_inverse_layer_idx and cfg.reorder_and_upcast_attn
    assert G.from_hf_config({"model_type": "gpt2", "hidden_size": 64, "num_attention_heads": 2,
                             "num_hidden_layers": 3}).n_embd == 64
    assert G.from_hf_config({"eos_token_id": [5, 6]}).eos_token_ids == (5, 6)
    good = tf.GPT2Config(**{k: v for k, v in BASE.items() if k != "attn_implementation"}).to_dict()
    for field, value in (("add_cross_attention", True), ("tie_word_embeddings", False),
                         ("activation_function", "quick_gelu")):
        with pytest.raises(ValueError, match=f"{field}={value!r}"):
            G.from_hf_config({**good, field: value})
    with pytest.raises(ValueError, match="model_type 'llama'"):
        G.from_hf_config({"model_type": "llama"})
    with pytest.raises(ValueError, match="remat_policy"):
        G.GPT2Config(remat_policy="bogus")
    with pytest.raises(ValueError, match="n_embd=30 is not divisible by n_head=4"):
        G.GPT2Config(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="has no 'seq_cls' head"):
        family.build(cfg, "seq_cls")

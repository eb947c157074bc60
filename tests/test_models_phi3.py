"""lora_jax.models.phi3 against transformers' PyTorch Phi3ForCausalLM / Phi3Model on the same weights.

Tiny random models (hidden 32, 2 layers, 4 heads / 2 KV heads of size 8, vocab 97) are built in
PyTorch, their weights spread out (std 0.2, norms around 1) so logits are O(1), saved with
``save_pretrained`` (safetensors) and read back with `family.params_from_state`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from safetensors.numpy import load_file

import lora_jax as lora
from lora_jax.models import family, layers, phi3
from lora_jax.models.generate import generate
from helpers import save_torch_models, spread_torch

V = 97
BASE = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=V, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            attn_implementation="eager")
VARIANTS = {
    "plain": {},
    # Phi-4-mini's shape of config: partial rotary, tied embeddings, a sliding window
    "partial_tied_window": dict(partial_rotary_factor=0.5, tie_word_embeddings=True, sliding_window=5,
                                rope_theta=250000.0),
    # longrope, old spelling, partial rotary 0.75 (rotary dim 6: 3 factors); factor = 64 / 8
    "longrope": dict(partial_rotary_factor=0.75, original_max_position_embeddings=8,
                     rope_scaling={"type": "longrope", "short_factor": [1.0, 1.7, 2.9],
                                   "long_factor": [1.3, 4.0, 11.0]}),
    # longrope, transformers 5 spelling, full rotary, explicit factor
    "longrope_full": dict(original_max_position_embeddings=8,
                          rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "factor": 4.0,
                                           "short_factor": [1.0, 1.2, 2.0, 3.5],
                                           "long_factor": [2.0, 3.0, 9.0, 30.0]}),
}
ORIG = 8  # original_max_position_embeddings of the longrope variants
TOL = dict(rtol=1e-5, atol=1e-5)


@functools.lru_cache(maxsize=None)
def _torch_model(variant):
    torch.manual_seed(0)
    return spread_torch(tf.Phi3ForCausalLM(tf.Phi3Config(**BASE, **VARIANTS[variant])).eval(), seed=len(variant))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """variant -> checkpoint directory written by save_pretrained."""
    return save_torch_models(tmp_path_factory.mktemp("phi3"), _torch_model, VARIANTS)


@functools.lru_cache(maxsize=None)
def _load(directory):
    cfg = family.config_from_hf(directory)
    model = family.build(cfg, "causal_lm")
    params = family.params_from_state(load_file(str(directory / "model.safetensors")), model)
    return model, jax.tree.map(jnp.asarray, params)


def _batch(t):
    rs = np.random.RandomState(t)
    ids = rs.randint(3, V, (3, t))
    mask = np.ones((3, t), np.int64)
    mask[1, :3] = 0  # left padding
    mask[2, t - 2:] = 0  # right padding
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    return ids, mask, pos


def _torch_logits(model, ids, mask=None, pos=None):
    kw = {}
    if mask is not None:
        kw["attention_mask"] = torch.tensor(mask)
    if pos is not None:
        kw["position_ids"] = torch.tensor(pos)
    with torch.no_grad():
        return model(torch.tensor(ids), **kw).logits.numpy()


@functools.lru_cache(maxsize=None)
def _jitted(model):
    return jax.jit(lambda p, ids, mask, pos: model.apply({"params": p}, ids, attention_mask=mask, positions=pos))


def _apply(model, params, ids, attention_mask=None, positions=None):
    """Logits (compiled once per model and shapes)."""
    return np.asarray(_jitted(model)(params, jnp.asarray(ids), attention_mask, positions))


# longrope at original_max_position_embeddings (short factors) and past it (long factors)
@pytest.mark.parametrize("variant,t", [(v, 16) for v in VARIANTS] + [("longrope", ORIG), ("longrope_full", ORIG)])
def test_logits_match_transformers(saved, variant, t):
    model, params = _load(saved[variant])
    tm = _torch_model(variant)
    ids, mask, pos = _batch(t)

    ones, arange = np.ones_like(mask), np.broadcast_to(np.arange(t), (3, t))  # the same compiled call
    ref = _torch_logits(tm, ids)
    out = _apply(model, params, ids, attention_mask=ones, positions=arange)
    assert np.abs(ref).max() > 1.0  # logits of useful size, so the tolerance means something
    np.testing.assert_allclose(out, ref, **TOL)

    ref = _torch_logits(tm, ids, mask, pos)
    out = _apply(model, params, ids, attention_mask=mask, positions=pos)
    keep = mask.astype(bool)
    np.testing.assert_allclose(out[keep], ref[keep], **TOL)
    print(f"{variant} T={t}: max |ours - torch| = {np.abs(out[keep] - ref[keep]).max():.2e}")
    # the mask matters: the left-padded row without it differs
    plain = _apply(model, params, ids, attention_mask=ones, positions=pos)
    assert np.abs(plain[1][keep[1]] - ref[1][keep[1]]).max() > 1e-2


def test_longrope_switches_on_sequence_length(saved):
    """A prefix's logits change once the call's sequence passes original_max_position_embeddings."""
    ids = _batch(ORIG)[0]
    for variant in ("longrope", "longrope_full"):
        model, params = _load(saved[variant])
        tm = _torch_model(variant)
        longer = np.concatenate([ids, ids[:, :1]], 1)
        short = _apply(model, params, ids)  # at the boundary: still the short factors
        long = _apply(model, params, longer)  # one past: the long ones
        np.testing.assert_allclose(short, _torch_logits(tm, ids), **TOL)
        np.testing.assert_allclose(long, _torch_logits(tm, longer), **TOL)
        long = long[:, :ORIG]
        assert np.abs(short - long).max() > 1e-2  # the long factors apply to the whole call


@pytest.mark.parametrize("rope", [
    {"type": "longrope"},
    {"rope_type": "longrope", "factor": 3.0, "attention_factor": 1.25},
])
def test_longrope_tables_match_transformers(rope):
    """cos/sin (frequencies, short/long choice, attention factor) equal Phi3RotaryEmbedding's."""
    pairs = 48  # head_dim 128 * 0.75 / 2
    rs = np.random.RandomState(0)
    rope = dict(rope, short_factor=list(1.0 + rs.rand(pairs) * 3), long_factor=list(1.0 + rs.rand(pairs) * 40))
    hc = tf.Phi3Config(hidden_size=256, num_attention_heads=2, partial_rotary_factor=0.75, max_position_embeddings=128,
                       original_max_position_embeddings=32, rope_scaling=rope)
    cfg = phi3.from_hf_config(hc.to_dict())
    rot = tf.models.phi3.modeling_phi3.Phi3RotaryEmbedding(hc)
    for t in (20, 32, 33, 100):
        pos = np.arange(t)[None]
        cos_t, sin_t = rot(torch.zeros(1, dtype=torch.float32), torch.tensor(pos))
        cos, sin = layers.rope_tables(cfg.rope, cfg.head_dim, cfg.max_position_embeddings, jnp.asarray(pos),
                                      jnp.float32)
        assert cos.shape == (1, t, pairs)
        np.testing.assert_allclose(np.asarray(cos), cos_t.numpy()[..., :pairs], rtol=0, atol=5e-6)
        np.testing.assert_allclose(np.asarray(sin), sin_t.numpy()[..., :pairs], rtol=0, atol=5e-6)
        np.testing.assert_array_equal(cos_t.numpy()[..., :pairs], cos_t.numpy()[..., pairs:])
    assert rot.attention_scaling != 1.0


def test_base_head_matches_phi3model(saved):
    tm = _torch_model("longrope").model
    cfg = family.config_from_hf(saved["longrope"])
    base = family.build(cfg, "base")
    assert family.torch_class(base) == "Phi3Model" and type(tm).__name__ == "Phi3Model"
    state = {k: v.numpy() for k, v in tm.state_dict().items()}
    params = family.params_from_state(state, base)
    assert set(params) == {"embed_tokens", "layers", "norm"}
    ids, mask, pos = _batch(16)
    with torch.no_grad():
        ref = tm(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
    out = _apply(base, params, ids, attention_mask=mask, positions=pos)
    keep = mask.astype(bool)
    assert out.shape == (3, 16, 32) and out.dtype == np.float32
    np.testing.assert_allclose(out[keep], ref.last_hidden_state.numpy()[keep], **TOL)
    back = family.state_from_params(params, base)
    assert set(back) == set(state) - {k for k in state if "rotary_emb" in k}


def test_state_roundtrip_exact(saved):
    for variant in VARIANTS:
        x = load_file(str(saved[variant] / "model.safetensors"))  # safetensors' own reader as the reference
        model = family.build(family.config_from_hf(saved[variant]))
        back = family.state_from_params(family.params_from_state(x, model), model)
        assert set(back) == set(x), variant
        for k in x:
            assert back[k].dtype == x[k].dtype and back[k].shape == x[k].shape, k
            np.testing.assert_array_equal(back[k], x[k], err_msg=k)
    model = family.build(family.config_from_hf(saved["partial_tied_window"]))
    assert "lm_head/kernel" not in {lf.path for lf in family.leaves_of(model)}
    assert family.hf_config_dict(model)["architectures"] == ["Phi3ForCausalLM"]


def test_config(saved):
    for variant in VARIANTS:
        cfg = family.config_from_hf(saved[variant])
        assert isinstance(cfg, phi3.Phi3Config)
        hash(cfg)  # a static jit argument
        assert phi3.from_hf_config(cfg.to_hf_config()) == cfg
        hc = tf.Phi3Config(**cfg.to_hf_config())  # transformers rebuilds the same rope
        want = _torch_model(variant).config.rope_parameters
        assert {k: v for k, v in hc.rope_parameters.items() if k != "type"} == \
               {k: v for k, v in want.items() if k != "type"}
    c = family.config_from_hf(saved["longrope"])
    assert c.rope["rope_type"] == "longrope" and c.rope["partial_rotary_factor"] == 0.75
    assert c.rope["original_max_position_embeddings"] == ORIG
    c = family.config_from_hf(saved["partial_tied_window"])
    assert c.sliding_window == 5 and c.tie_word_embeddings and c.rope["rope_theta"] == 250000.0
    # transformers takes original_max_position_embeddings from the config field, not the rope dict
    d = {"model_type": "phi3", "hidden_size": 32, "num_attention_heads": 4, "max_position_embeddings": 64,
         "rope_parameters": {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
                             "original_max_position_embeddings": 16}}
    want = tf.Phi3Config(**{k: v for k, v in d.items() if k != "model_type"}).rope_parameters
    assert phi3.from_hf_config(d).rope["original_max_position_embeddings"] == \
        want["original_max_position_embeddings"] == 4096
    # "yarn" and "su" are old names of longrope, as in transformers
    d = dict(d, rope_parameters=None, rope_scaling={"type": "yarn", "short_factor": [1.0] * 4,
                                                    "long_factor": [2.0] * 4})
    assert phi3.from_hf_config(d).rope["rope_type"] == "longrope"
    assert tf.Phi3Config(**{k: v for k, v in d.items() if k != "model_type"}).rope_parameters["rope_type"] == \
        "longrope"


def test_unsupported_config_fields_raise():
    base = {"model_type": "phi3", "hidden_size": 32, "num_attention_heads": 4}
    for kind in ("linear", "dynamic", "llama3", "ntk_by_parts"):
        with pytest.raises(ValueError, match=f"rope_type '{kind}'"):
            phi3.from_hf_config(dict(base, rope_scaling={"rope_type": kind, "factor": 2.0}))
    with pytest.raises(ValueError, match="rope_type 'linear'"):
        phi3.Phi3Config(rope_parameters={"rope_type": "linear", "factor": 2.0})
    for flag in ("attention_bias", "mlp_bias", "lm_head_bias"):
        with pytest.raises(ValueError, match=flag):
            phi3.from_hf_config(dict(base, **{flag: True}))
    phi3.from_hf_config(dict(base, attention_bias=False, mlp_bias=False, lm_head_bias=False))  # Phi-4-mini's
    with pytest.raises(ValueError, match="short_factor"):
        phi3.from_hf_config(dict(base, rope_scaling={"type": "longrope", "short_factor": [1.0] * 3,
                                                     "long_factor": [1.0] * 4}))
    with pytest.raises(ValueError, match="long_factor"):
        phi3.from_hf_config(dict(base, rope_scaling={"type": "longrope", "short_factor": [1.0] * 4}))
    with pytest.raises(ValueError, match="per-layer-type"):
        phi3.from_hf_config(dict(base, rope_parameters={"full_attention": {"rope_type": "default"}}))
    with pytest.raises(ValueError, match="model_type 'llama'"):
        phi3.from_hf_config(dict(base, model_type="llama"))
    with pytest.raises(ValueError, match="hidden_act"):
        phi3.from_hf_config(dict(base, hidden_act="swiglu_fancy"))
    with pytest.raises(ValueError, match="remat_policy"):
        phi3.Phi3Config(remat_policy="bogus")


@pytest.mark.parametrize("variant,p", [("longrope", 10)])  # plain and Phi-4-mini's shape: tests/test_hf.py
def test_greedy_generation_matches_torch(saved, variant, p):
    """KV-cache decoding equals transformers' generate (the longrope prompt is already past
    original_max_position_embeddings, so both use the long factors throughout)."""
    model, params = _load(saved[variant])
    rs = np.random.RandomState(1)
    ids = rs.randint(3, V, (2, p))
    mask = np.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # a left-padded prompt
    n = 8
    out = np.asarray(generate(model, params, ids, n, attention_mask=mask, eos_token_id=()))
    gc = tf.GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        ref = _torch_model(variant).generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                                             generation_config=gc).numpy()
    np.testing.assert_array_equal(out, ref)
    assert len(np.unique(out[:, p:])) > 2  # a non-trivial continuation


def _targets_rules(**kw):
    return lora.Rules(["qkv_proj", "gate_up_proj", "o_proj", "down_proj"], rank=4, init=False, stack_axes=1, **kw)


@pytest.mark.parametrize("variant", ["plain", "longrope", "partial_tied_window"])
def test_lora_on_fused_kernels_wrap_merge_and_torch(saved, variant):
    model, params = _load(saved[variant])
    cfg = model.config
    lp = lora.init(params, _targets_rules(), jax.random.key(0))
    items = dict(lora.tree.lora_items(lp))
    assert sorted(p.split("/")[-2] for p in items) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert all(lw.layout == "sio" and lw.a.shape[0] == cfg.num_hidden_layers for lw in items.values())
    # one adapter on the whole fused kernel, as PEFT makes it: b spans q | k | v
    qkv = items["model/layers/self_attn/qkv_proj/kernel"]
    assert qkv.b.shape == (2, 4, (4 + 2 * 2) * 8)
    ids, mask, pos = _batch(16)
    keep = mask.astype(bool)
    fwd = jax.jit(lora.wrap(lambda p, x, m, q: model.apply({"params": p}, x, attention_mask=m, positions=q)))
    ours = np.asarray(fwd(lp, jnp.asarray(ids), mask, pos))
    merged = lora.merge(lp)
    np.testing.assert_allclose(ours, _apply(model, merged, ids, attention_mask=mask, positions=pos), **TOL)
    # the merged export loads strictly into a PyTorch model rebuilt from our config
    sd = {k: torch.from_numpy(np.asarray(v)) for k, v in family.state_from_params(jax.device_get(merged),
                                                                                   model).items()}
    hc = tf.Phi3Config(**cfg.to_hf_config(), attn_implementation="eager")
    moved = tf.Phi3ForCausalLM(hc).eval()
    missing, unexpected = moved.load_state_dict(sd, strict=not cfg.tie_word_embeddings)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if cfg.tie_word_embeddings:
        moved.tie_weights()
        assert moved.lm_head.weight.data_ptr() == moved.model.embed_tokens.weight.data_ptr()
    ref = _torch_logits(moved, ids, mask, pos)
    np.testing.assert_allclose(ours[keep], ref[keep], **TOL)
    orig = _torch_logits(_torch_model(variant), ids, mask, pos)
    assert np.abs(ours[keep] - orig[keep]).max() > 1e-2  # the adapters changed the model


def test_enable_lora_q_and_v_slices_of_qkv(saved):
    """loralib's enable_lora on the fused kernel: equal output slices q | q | k | v (N*H = 2 * K*H here),
    a delta on the q and v slices only; wrap equals merge equals PyTorch on the merged weights."""
    model, params = _load(saved["plain"])
    c = model.config
    n_q = c.num_attention_heads // c.num_key_value_heads  # q spans this many K*H-wide slices
    rules = lora.Rules([lora.Rule(["qkv_proj"], enable_lora=[True] * n_q + [False, True])], rank=4, init=False,
                       stack_axes=1)
    lp = lora.init(params, rules, jax.random.key(1))
    merged = lora.merge(lp)
    w0 = np.asarray(params["model"]["layers"]["self_attn"]["qkv_proj"]["kernel"])
    w1 = np.asarray(merged["model"]["layers"]["self_attn"]["qkv_proj"]["kernel"])
    qh, kh = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    np.testing.assert_array_equal(w1[..., qh:qh + kh], w0[..., qh:qh + kh])  # k untouched
    assert np.abs(w1[..., :qh] - w0[..., :qh]).max() > 1e-2  # q changed
    assert np.abs(w1[..., qh + kh:] - w0[..., qh + kh:]).max() > 1e-2  # v changed
    ids, mask, pos = _batch(16)
    keep = mask.astype(bool)
    fwd = jax.jit(lora.wrap(lambda p, x, m, q: model.apply({"params": p}, x, attention_mask=m, positions=q)))
    ours = np.asarray(fwd(lp, jnp.asarray(ids), mask, pos))
    np.testing.assert_allclose(ours, _apply(model, merged, ids, attention_mask=mask, positions=pos), **TOL)
    moved = tf.Phi3ForCausalLM(tf.Phi3Config(**c.to_hf_config(), attn_implementation="eager")).eval()
    moved.load_state_dict({k: torch.from_numpy(np.asarray(v))
                           for k, v in family.state_from_params(jax.device_get(merged), model).items()}, strict=True)
    np.testing.assert_allclose(ours[keep], _torch_logits(moved, ids, mask, pos)[keep], **TOL)
    assert np.abs(ours - _apply(model, params, ids, attention_mask=mask, positions=pos)).max() > 1e-2


def test_remat_wrapped_scan_same_logits(saved):
    """remat_policy wraps the scanned layer in nn.remat: same parameter tree, same logits."""
    model, params = _load(saved["longrope"])
    m = phi3.Phi3ForCausalLM(model.config.replace(remat_policy="nothing_saveable"))
    ids, mask, pos = _batch(16)
    np.testing.assert_array_equal(_apply(m, params, ids, mask, pos), _apply(model, params, ids, mask, pos))

"""lora_jax.models.gemma against transformers' PyTorch Gemma 2 / Gemma 3 (text) on the same weights.

Tiny random models (hidden 32, 4 heads / 2 KV heads of size 16, vocab 97, sliding window 4 with
sequences of 14-18 tokens, so the window cuts in) are built in PyTorch with both layer types, their
weights spread out (std 0.2; Gemma's norms store ``w`` of ``1 + w``, so 0.2 noise is a scale of
1 +- 0.2) so logits are O(1), saved with ``save_pretrained`` and read back through the family's
checkpoint table. Gemma 2 runs with small soft-caps (attention 2, final 3) so capping changes the
result; Gemma 3 with q/k norms, attention biases, untied embeddings and a different rotary embedding
per layer type (linear scaling on the global layers).
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
from lora_jax.models import family
from lora_jax.models import gemma as G
from lora_jax.models.generate import generate
from lora_jax.models.layers import init_cache
from helpers import save_torch_models, spread_torch

V = 97
S, F = "sliding_attention", "full_attention"
BASE = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            vocab_size=V, max_position_embeddings=64, sliding_window=4, attn_implementation="eager")
VARIANTS = {
    # tied embeddings, layer_types from Gemma 2's every-other-layer rule: sliding, full, sliding
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, tf.Gemma2Model, dict(
        num_hidden_layers=3, query_pre_attn_scalar=12, attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, tf.Gemma3TextModel, dict(
        num_hidden_layers=4, layer_types=[S, S, F, S], query_pre_attn_scalar=20, final_logit_softcapping=5.0,
        attention_bias=True, tie_word_embeddings=False,
        rope_parameters={F: {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
                         S: {"rope_type": "default", "rope_theta": 50.0}})),
}
TOL = dict(rtol=1e-5, atol=1e-5)


@functools.lru_cache(maxsize=None)
def _torch_model(variant):
    cfg_cls, model_cls, _, extra = VARIANTS[variant]
    torch.manual_seed(0)
    return spread_torch(model_cls(cfg_cls(**BASE, **extra)).eval(), seed=len(variant), norm=None)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """variant -> checkpoint directory written by save_pretrained."""
    return save_torch_models(tmp_path_factory.mktemp("ckpt"), _torch_model, VARIANTS)


@functools.lru_cache(maxsize=None)
def _load(d, head="causal_lm"):
    """(model, params) of ``head`` from the checkpoint directory ``d``."""
    model = family.build(family.config_from_hf(d), head)
    state = load_file(str(d / "model.safetensors"))
    if head == "base":
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    return model, family.params_from_state(state, model)


@functools.lru_cache(maxsize=None)
def _fwd(config, head="causal_lm"):
    """A jitted forward of ``config``'s ``head`` taking (params, ids, mask, positions); one compile per config."""
    model = family.build(config, head)
    return jax.jit(lambda p, ids, mask, pos: model.apply({"params": p}, ids, attention_mask=mask, positions=pos))


def _batch(t=14):
    rs = np.random.RandomState(0)
    ids = rs.randint(3, V, (3, t))
    mask = np.ones((3, t), np.int64)
    mask[1, :4] = 0  # left padding
    mask[2, t - 3:] = 0  # right padding
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
    tm = _torch_model(variant)
    fwd = _fwd(model.config)
    ids, mask, pos = _batch()
    ones, arange = np.ones_like(mask), np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    ref = _torch_out(tm, ids)
    out = np.asarray(fwd(params, ids, ones, arange))
    assert out.dtype == np.float32 and np.abs(ref).max() > 1.0  # logits of useful size
    np.testing.assert_allclose(out, ref, **TOL)
    if variant == "gemma3":  # the defaults (no mask, positions 0..T-1), once: unjitted calls are slow
        np.testing.assert_allclose(np.asarray(model.apply({"params": params}, ids[:1])), out[:1], **TOL)

    ref = _torch_out(tm, ids, mask, pos)
    out = np.asarray(fwd(params, ids, mask, pos))
    keep = mask.astype(bool)
    np.testing.assert_allclose(out[keep], ref[keep], **TOL)
    # the padding mask matters, and so do the attention soft-cap (Gemma 2) and the window (Gemma 3)
    plain = np.asarray(fwd(params, ids, ones, pos))
    assert np.abs(plain[1][keep[1]] - ref[1][keep[1]]).max() > 1e-2
    change = {"attn_logit_softcapping": None} if variant == "gemma2" else {"sliding_window": 64}
    got = np.asarray(_fwd(model.config.replace(**change))(params, ids, mask, pos))
    assert np.abs(got[keep] - ref[keep]).max() > 1e-2, change


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_base_model_matches_transformers(saved, variant):
    model, params = _load(saved[variant], "base")
    assert family.torch_class(model) == VARIANTS[variant][2].__name__
    ids, mask, pos = _batch()
    ref = _torch_out(_torch_model(variant).model, ids, mask, pos)
    out = np.asarray(_fwd(model.config, "base")(params, ids, mask, pos))
    keep = mask.astype(bool)
    assert out.shape == (3, 14, 32) and np.abs(ref).max() > 1.0
    np.testing.assert_allclose(out[keep], ref[keep], **TOL)


def _cached_logits(model, params, ids, mask, new):
    """Our KV-cache path one token at a time (the prompt too, one compile), teacher-forced on ``new``:
    the logits after the last prompt token and after each of ``new[:, :-1]``."""
    c = model.config
    b, p = ids.shape
    n = new.shape[1]
    cache = init_cache(c.num_hidden_layers, b, p + n, c.num_key_value_heads, c.head_dim, c.dtype)
    kv_mask = np.concatenate([mask, np.ones((b, n), mask.dtype)], 1)
    pos = np.maximum(np.cumsum(kv_mask, 1) - 1, 0)
    seq = np.concatenate([ids, new], 1)
    step = jax.jit(lambda cache, x, q, i: model.apply({"params": params}, x, attention_mask=kv_mask, positions=q,
                                                      cache=cache, cache_index=i))
    out = []
    for i in range(p + n - 1):
        logits, cache = step(cache, seq[:, i:i + 1], pos[:, i:i + 1], jnp.int32(i))
        if i >= p - 1:
            out.append(np.asarray(logits[:, -1]))
    return np.stack(out, 1)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_generation_matches_transformers(saved, variant):
    model, params = _load(saved[variant])
    rs = np.random.RandomState(2)  # a prompt the tied Gemma 2 does not answer with one repeated token
    p, n = 10, 8
    ids = rs.randint(3, V, (2, p))
    mask = np.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # left-padded prompt
    gc = tf.GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0, eos_token_id=None,
                             return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        ref = _torch_model(variant).generate(torch.tensor(ids), attention_mask=torch.tensor(mask), generation_config=gc)
    ref_ids = ref.sequences.numpy()
    out = np.asarray(generate(model, params, ids, n, attention_mask=mask, eos_token_id=(), pad_token_id=0))
    np.testing.assert_array_equal(out, ref_ids)
    assert len(np.unique(out[:, p:])) > 3  # a non-trivial continuation
    # every step's logits through our cache (18 tokens, window 4: the sliding layers drop old slots)
    got = _cached_logits(model, params, ids, mask, out[:, p:])
    want = np.stack([x.numpy() for x in ref.logits], 1)
    np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_state_roundtrip_exact(saved, variant):
    model, params = _load(saved[variant])
    x = load_file(str(saved[variant] / "model.safetensors"))  # safetensors' own reader as the reference
    back = family.state_from_params(params, model)
    assert set(back) == set(x)
    for k in x:
        assert back[k].dtype == x[k].dtype and back[k].shape == x[k].shape, k
        np.testing.assert_array_equal(back[k], x[k], err_msg=k)
    names = {lf.hf for lf in family.leaves_of(model)}
    assert ("lm_head.weight" in names) == (variant == "gemma3")
    assert any("q_norm" in n for n in names) == (variant == "gemma3")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lora_merged_export_loads_into_torch(saved, variant):
    model, params = _load(saved[variant])
    # Gemma 2 with PEFT's default targets (q_proj, v_proj), Gemma 3 with every projection
    targets = list(family.family_of(model).peft_targets["gemma2"]) if variant == "gemma2" else [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lp = lora.init(params, lora.Rules(targets, rank=4, init=False, stack_axes=1), jax.random.key(0))
    items = dict(lora.tree.lora_items(lp))
    assert sorted(p.split("/")[-2] for p in items) == sorted(targets)
    assert all(lw.layout == "sio" and lw.a.shape[0] == model.config.num_hidden_layers for lw in items.values())
    ids, mask, pos = _batch()
    fn = _fwd(model.config)  # (params, ids, mask, positions) -> logits
    merged = lora.merge(lp)
    ours = np.asarray(jax.jit(lora.wrap(fn))(lp, ids, mask, pos))
    np.testing.assert_allclose(ours, np.asarray(fn(merged, ids, mask, pos)), **TOL)
    # a PyTorch model built from our config.json dict takes the merged export strictly
    d = family.hf_config_dict(model)
    assert d["architectures"] == [VARIANTS[variant][1].__name__]
    hc = VARIANTS[variant][0](**{k: v for k, v in d.items() if k != "model_type"}, attn_implementation="eager")
    moved = VARIANTS[variant][1](hc).eval()
    export = family.state_from_params(jax.device_get(merged), model)
    sd = {k: torch.from_numpy(np.asarray(v)) for k, v in export.items()}
    if hc.tie_word_embeddings:  # PyTorch's state_dict lists the tied alias; save_pretrained and we leave it out
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    moved.load_state_dict(sd, strict=True)
    keep = mask.astype(bool)
    np.testing.assert_allclose(_torch_out(moved, ids, mask, pos)[keep], ours[keep], **TOL)
    assert np.abs(ours - np.asarray(fn(params, ids, mask, pos)))[keep].max() > 1e-2  # the adapters changed the model


def test_config_readings_match_transformers(saved):
    c2 = family.config_from_hf(saved["gemma2"])
    assert c2.layer_types == (S, F, S) and c2.attn_logit_softcapping == 2.0 and c2.tie_word_embeddings
    assert G.from_hf_config(c2.to_hf_config()) == c2
    c3 = family.config_from_hf(saved["gemma3"])
    assert c3.layer_types == (S, S, F, S) and c3.attention_bias and not c3.tie_word_embeddings
    assert c3.rope_for(F) == {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0}
    assert G.from_hf_config(c3.to_hf_config()) == c3
    hash(c3)  # a static jit argument
    # the older Gemma 3 spelling: rope_theta (global) + rope_local_base_freq (sliding) + rope_scaling
    # (global only) + sliding_window_pattern, read as transformers reads it
    old = dict(num_hidden_layers=7, sliding_window_pattern=3, rope_theta=5000.0, rope_local_base_freq=77.0,
               rope_scaling={"rope_type": "linear", "factor": 8.0})
    hc = tf.Gemma3TextConfig(**old)
    ours = G.from_hf_config({"model_type": "gemma3_text", **old})
    assert list(ours.layer_types) == hc.layer_types and ours.layer_types.count(F) == 2
    for lt in (S, F):
        assert ours.rope_for(lt) == {k: v for k, v in hc.rope_parameters[lt].items()}, lt
    # the defaults of either model type, as transformers has them
    for mt, cls in (("gemma2", tf.Gemma2Config), ("gemma3_text", tf.Gemma3TextConfig)):
        hc, ours = cls(num_hidden_layers=8), G.from_hf_config({"model_type": mt, "num_hidden_layers": 8})
        assert list(ours.layer_types) == hc.layer_types
        for f in ("vocab_size", "head_dim", "sliding_window", "query_pre_attn_scalar", "final_logit_softcapping",
                  "attn_logit_softcapping", "max_position_embeddings", "tie_word_embeddings"):
            assert getattr(ours, f) == getattr(hc, f), (mt, f)
        for lt in (S, F):
            want = hc.rope_parameters[lt] if mt == "gemma3_text" else hc.rope_parameters
            assert ours.rope_for(lt)["rope_theta"] == want["rope_theta"], (mt, lt)


@pytest.mark.parametrize("bad, match", [
    ({"model_type": "gemma3_text", "use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"model_type": "gemma2", "use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"model_type": "gemma3_text", "rope_parameters": {F: {"rope_type": "su", "rope_theta": 1.0}}}, "rope_type 'su'"),
    ({"model_type": "gemma2", "rope_scaling": {"rope_type": "mrope", "factor": 2.0}}, "rope_type 'mrope'"),
    ({"model_type": "gemma3_text", "rope_parameters": {"rope_type": "default", "rope_theta": 3.0}},
     "keyed by layer type"),
    ({"model_type": "gemma2", "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"model_type": "gemma3_text", "num_hidden_layers": 2, "layer_types": [S, "chunked_attention"]},
     "layer_types"),
    ({"model_type": "gemma2", "num_hidden_layers": 2, "layer_types": [S]}, "layer_types"),
    ({"model_type": "gemma2", "sliding_window": None}, "sliding_window is None"),
    ({"model_type": "gemma2", "hidden_activation": "bogus"}, "hidden_activation"),
    ({"model_type": "gemma2", "is_causal": False}, "is_causal"),
    ({"model_type": "gemma"}, "model_type"),
])
def test_unsupported_config_raises(bad, match):
    with pytest.raises(ValueError, match=match):
        G.from_hf_config(bad)


def test_unsupported_config_fields_direct(saved):
    with pytest.raises(ValueError, match="remat_policy"):
        G.GemmaConfig(remat_policy="bogus")
    with pytest.raises(ValueError, match="head_dim"):
        G.GemmaConfig(head_dim=15)
    with pytest.raises(TypeError, match="dtype"):
        G.GemmaConfig(dtype="int32")
    with pytest.raises(ValueError, match="attention_mask"):
        model, params = _load(saved["gemma2"])
        model.apply({"params": params}, np.zeros((1, 5), np.int32), attention_mask=np.ones((1, 4), np.int32))


def _loss(model, params, ids):
    lp = jax.nn.log_softmax(model.apply({"params": params}, ids)[:, :-1])
    return -jnp.take_along_axis(lp, ids[:, 1:, None], -1).mean()


def test_remat_same_loss_and_grads_and_bf16_close(saved):
    model, params = _load(saved["gemma2"])
    params = jax.tree.map(jnp.asarray, params)
    ids = jnp.asarray(_batch()[0])
    ref_l, ref_g = jax.jit(jax.value_and_grad(functools.partial(_loss, model)))(params, ids)
    m = G.GemmaForCausalLM(model.config.replace(remat_policy="nothing_saveable"))
    l, g = jax.jit(jax.value_and_grad(functools.partial(_loss, m)))(params, ids)
    np.testing.assert_allclose(l, ref_l, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g, ref_g)
    # bf16 weights and compute stay close to float32 (a wrong bf16 path is off by O(1))
    mask, pos = _batch()[1:]
    f32 = np.asarray(_fwd(model.config)(params, ids, mask, pos))
    bcfg = model.config.replace(dtype="bfloat16", param_dtype="bfloat16")
    bf = _fwd(bcfg)(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), ids, mask, pos)
    assert bf.dtype == jnp.float32
    err = np.abs(np.asarray(bf) - f32).max() / np.abs(f32).max()
    assert 0 < err < 0.1, err

"""lora_jax.models.llama against transformers 5's PyTorch Llama / Qwen2 / Qwen3 / Mistral / OLMo 2 on the same weights.

Tiny random models (hidden 32, 2 layers, 4 heads / 2 KV heads, vocab 97) are built in PyTorch,
their weights spread out (std 0.2, norms around 1) so logits are O(1) and attention is far from
uniform, saved with ``save_pretrained(safe_serialization=True)`` and read back with
``lora_jax.models.load``.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from safetensors.numpy import load_file

import lora_jax as lora
import lora_jax.models as M
from lora_jax.io._files import read_safetensors
from lora_jax.models import layers
from lora_jax.models import llama as L
from helpers import save_torch_models, spread_torch

V = 97
BASE = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=V, max_position_embeddings=64, attn_implementation="eager")
VARIANTS = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
    "llama3_tied": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(
        tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})),
    "llama_bias_linear": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(
        attention_bias=True, mlp_bias=True, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(rope_theta=1000000.0)),
    "mistral_window": (tf.MistralConfig, tf.MistralForCausalLM, dict(sliding_window=5, head_dim=8)),
    # Qwen3: q/k RMSNorm, head_dim not hidden / heads, tied embeddings
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(head_dim=16, rope_theta=1000000.0, tie_word_embeddings=True)),
    # OLMo 2: RMSNorm after attention and MLP (none before), q/k RMSNorm over all heads, biases
    "olmo2": (tf.Olmo2Config, tf.Olmo2ForCausalLM, dict(attention_bias=True, rope_theta=500000.0)),
    # dynamic NTK scaling: sequences (16) longer than max_position_embeddings (8) change the frequencies
    "llama_dynamic": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(
        max_position_embeddings=8, rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
}
TOL = dict(rtol=1e-5, atol=1e-5)


@functools.lru_cache(maxsize=None)
def _torch_model(variant):
    cfg_cls, model_cls, extra = VARIANTS[variant]
    torch.manual_seed(0)
    return spread_torch(model_cls(cfg_cls(**{**BASE, **extra})).eval(), seed=len(variant))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """variant -> checkpoint directory written by save_pretrained."""
    return save_torch_models(tmp_path_factory.mktemp("ckpt"), _torch_model, VARIANTS)


def _batch():
    rs = np.random.RandomState(0)
    ids = rs.randint(3, V, (3, 16))
    mask = np.ones((3, 16), np.int64)
    mask[1, :5] = 0  # left padding
    mask[2, 11:] = 0  # right padding
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    return ids, mask, pos


def _torch_logits(model, ids, mask=None, pos=None):
    with torch.no_grad():
        kw = {}
        if mask is not None:
            kw["attention_mask"] = torch.tensor(mask)
        if pos is not None:
            kw["position_ids"] = torch.tensor(pos)
        return model(torch.tensor(ids), **kw).logits.numpy()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(saved, variant):
    model, params = M.load(saved[variant])
    ids, mask, pos = _batch()
    tm = _torch_model(variant)

    ref = _torch_logits(tm, ids)
    out = np.asarray(model.apply({"params": params}, ids))
    assert np.abs(ref).max() > 1.0  # logits of useful size, so the tolerance means something
    np.testing.assert_allclose(out, ref, **TOL)

    ref = _torch_logits(tm, ids, mask, pos)
    out = np.asarray(model.apply({"params": params}, ids, attention_mask=mask, positions=pos))
    keep = mask.astype(bool)
    np.testing.assert_allclose(out[keep], ref[keep], **TOL)
    # the mask must matter: row 1 without it differs
    plain = np.asarray(model.apply({"params": params}, ids, positions=pos))
    assert np.abs(plain[1][keep[1]] - ref[1][keep[1]]).max() > 1e-2


def test_config_fields(saved):
    assert M.config_from_hf(saved["qwen2"]).qkv_bias and not M.config_from_hf(saved["qwen2"]).o_bias
    c = M.config_from_hf(saved["llama_bias_linear"])
    assert c.qkv_bias and c.o_bias and c.mlp_bias
    assert M.config_from_hf(saved["mistral_window"]).sliding_window == 5
    assert M.config_from_hf(saved["llama3_tied"]).tie_word_embeddings
    assert M.config_from_hf(saved["qwen3"]).qk_norm and M.config_from_hf(saved["qwen3"]).head_dim == 16
    assert "lm_head" not in M.load(saved["llama3_tied"])[1]
    with pytest.raises(ValueError, match="model_type 'gpt3'"):
        M.config_from_hf({"model_type": "gpt3"})
    with pytest.raises(ValueError, match="rope_type 'su'"):
        M.config_from_hf({"model_type": "llama", "rope_scaling": {"rope_type": "su", "factor": 2.0}})
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        M.config_from_hf({"model_type": "llama", "partial_rotary_factor": 0.5})
    with pytest.raises(ValueError, match="layer_types"):
        M.config_from_hf({"model_type": "qwen2", "num_hidden_layers": 2, "sliding_window": 4,
                          "layer_types": ["sliding_attention", "full_attention"]})
    with pytest.raises(ValueError, match="remat_policy"):
        L.LlamaConfig(remat_policy="bogus")
    hash(M.config_from_hf(saved["llama3_tied"]))  # static jit argument
    # transformers 5 writes rope_parameters; both spellings read the same
    v5 = M.config_from_hf({"model_type": "llama", "rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                                       "rope_theta": 5e5}})
    v4 = M.config_from_hf({"model_type": "llama", "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert v5 == v4 and v5.rope == {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma2", "gemma3_text", "phi3", "qwen3_moe"])
@pytest.mark.parametrize("fields,names", [
    ({"rope_parameters": "linear"}, "rope_parameters must be a mapping"),
    ({"rope_scaling": [2.0]}, "rope_scaling must be a mapping"),
    ({"rope_parameters": {"rope_type": "default", "rope_thetta": 5e5}}, "rope_thetta"),
    ({"rope_parameters": {"rope_type": "default", "factr": 2.0}}, "factr"),
    ({"rope_theta": -1.0}, "rope_theta"),
    ({"rope_theta": float("nan")}, "rope_theta"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
    ({"rms_norm_eps": -1e-6}, "rms_norm_eps"),
])
def test_malformed_numbers_and_rope_fields_are_refused_not_defaulted(model_type, fields, names):
    # each of these loaded before, falling back to theta 10000 or giving NaN logits; now one error naming the field
    with pytest.raises(ValueError, match=re.escape(names)):
        M.config_from_hf({"model_type": model_type, **fields})


def test_rope_field_checks_name_the_problem():
    with pytest.raises(ValueError, match="unknown key 'rope_thetta'; did you mean 'rope_theta'"):
        layers.rope_parameters({"rope_parameters": {"rope_type": "default", "rope_thetta": 5e5}})
    with pytest.raises(ValueError, match="factor must be a finite number > 0, got nan"):
        layers.rope_parameters({"rope_scaling": {"rope_type": "linear", "factor": float("nan")}})
    with pytest.raises(ValueError, match="rope_theta must be a finite number > 0, got -1.0"):
        layers.rope_parameters({"rope_theta": -1.0})
    with pytest.raises(ValueError, match="rms_norm_eps must be finite, got nan"):
        M.config_from_hf({"model_type": "llama", "rms_norm_eps": float("nan")})
    # a key that is no misspelling of a known field is kept, as transformers keeps it
    assert layers.rope_parameters({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5, "note": 1}})["note"] == 1


@pytest.mark.parametrize("rope", [None, {"rope_type": "linear", "factor": 4.0},
                                  {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                                  {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}])
def test_rope_frequencies_match_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hc = tf.LlamaConfig(hidden_size=256, num_attention_heads=2, rope_theta=500000.0, rope_scaling=rope,
                        max_position_embeddings=128)
    kind = rope["rope_type"] if rope else "default"
    if kind == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        ref, ref_factor = LlamaRotaryEmbedding.compute_default_rope_parameters(config=hc, device="cpu")
    else:
        ref, ref_factor = ROPE_INIT_FUNCTIONS[kind](hc, "cpu")
    cfg = M.config_from_hf(hc)
    inv, factor = layers.rope_frequencies(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
    np.testing.assert_allclose(inv, ref.numpy(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(ref_factor, rel=1e-12)


def test_bf16_checkpoint_without_torch(tmp_path):
    tm = _torch_model("qwen2")
    tm.to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    tm.to(torch.float32)
    assert (tmp_path / "model.safetensors.index.json").exists()  # sharded path exercised
    model, params = M.load(tmp_path, dtype="bfloat16")
    assert params["model"]["layers"]["self_attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    back = M.state_from_params(params, model)
    sd = {k: v.to(torch.bfloat16) for k, v in tm.state_dict().items()}
    for k, t in sd.items():
        np.testing.assert_array_equal(back[k].astype(np.float32), t.float().numpy(), err_msg=k)
    # the reader agrees with safetensors on float32 files, header and bytes
    f32 = tmp_path / "f32.safetensors"
    from safetensors.numpy import save_file
    save_file({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.int64)}, str(f32))
    got, _ = read_safetensors(f32)
    np.testing.assert_array_equal(got["a"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert got["b"].dtype == np.int64


def test_load_strict(saved):
    model, _ = M.load(saved["llama"])
    sd = dict(load_file(str(saved["llama"] / "model.safetensors")))
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.0.self_attn.extra.weight"] = np.zeros(3, np.float32)
    sd["model.layers.0.self_attn.k_proj.weight"] = np.zeros((32, 16), np.float32)
    with pytest.raises(ValueError) as e:
        M.params_from_state(sd, model)
    msg = str(e.value)
    assert "model.layers.1.mlp.up_proj.weight" in msg and "model.layers.0.self_attn.extra.weight" in msg
    assert "model.layers.0.self_attn.k_proj.weight: expected (16, 32), got (32, 16)" in msg
    params = M.load(saved["llama"])[1]
    params["model"]["layers"]["mlp"]["up_proj"]["kernel"] = np.zeros((2, 3, 3), np.float32)
    with pytest.raises(ValueError, match="up_proj/kernel: expected"):
        M.state_from_params(params, model)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        M.load(saved["llama"] / "nowhere")


def test_integer_or_bool_weights_are_refused(saved, tmp_path):
    """Issue 22.4: a weight stored (or relabelled) as an integer or bool tensor is a damaged file,
    never cast into the model: the load names the tensor and its dtype, from a file and a state dict."""
    from safetensors.numpy import save_file

    model, _ = M.load(saved["llama"])
    sd = dict(load_file(str(saved["llama"] / "model.safetensors")))
    q = "model.layers.0.self_attn.q_proj.weight"
    for dt in (np.int32, np.bool_, np.uint8):
        bad = {**sd, q: sd[q].astype(dt)}
        with pytest.raises(ValueError, match=rf"{q}: dtype {np.dtype(dt).name}, expected a floating-point weight"):
            M.params_from_state(bad, model)
    d = tmp_path / "int"
    d.mkdir()
    (d / "config.json").write_text((saved["llama"] / "config.json").read_text())
    save_file({**sd, q: sd[q].astype(np.int32)}, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match="expected a floating-point weight"):
        M.load(d)


def test_flax_msgpack_fixtures_match_torch():
    """transformers 4.57's flax_model.msgpack (the old Flax ports' format) loads with PyTorch's logits."""
    import pathlib
    root = pathlib.Path(__file__).parent / "fixtures" / "flax_msgpack"
    ids = _batch()[0] % 96
    for name, cls in (("llama", tf.LlamaForCausalLM), ("mistral", tf.MistralForCausalLM)):
        model, params = M.load(root / name, prefer="flax")
        ref_model, ref_params = M.load(root / name, prefer="safetensors")
        jax.tree.map(np.testing.assert_array_equal, params, ref_params)
        ref = _torch_logits(cls.from_pretrained(root / name, attn_implementation="eager").eval(), ids)
        np.testing.assert_allclose(np.asarray(model.apply({"params": params}, ids)), ref, **TOL)


def _argmax_loop(model, params, ids, mask, n):
    """Generation without a cache: rerun the whole (fixed-length, right-filled) sequence each step."""
    b, p = ids.shape
    buf = np.concatenate([ids, np.zeros((b, n), ids.dtype)], 1)
    full_mask = np.concatenate([mask, np.ones((b, n), mask.dtype)], 1)
    pos = np.maximum(np.cumsum(full_mask, 1) - 1, 0)
    fwd = jax.jit(lambda x: model.apply({"params": params}, x, attention_mask=full_mask, positions=pos))
    for i in range(n):
        buf[:, p + i] = np.asarray(fwd(buf))[:, p + i - 1].argmax(-1)
    return buf


def test_bf16_compute_close_to_f32(saved):
    model, params = M.load(saved["llama"])
    cfg = model.config
    ids, mask, pos = _batch()
    f32 = np.asarray(L.LlamaForCausalLM(cfg).apply({"params": params}, ids))
    bcfg = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    bparams = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    bf = L.LlamaForCausalLM(bcfg).apply({"params": bparams}, ids)
    assert bf.dtype == jnp.float32
    err = np.abs(np.asarray(bf) - f32).max() / np.abs(f32).max()
    # bf16 weights and activations (8-bit mantissa, ~0.4% per rounding) through 2 layers of spread-out weights:
    # measured 0.038 of the largest logit; a wrong bf16 path (rope, norm, mask) is off by O(1).
    assert err < 0.1, err
    assert err > 0  # it really ran in bf16


def _loss(model, params, ids):
    logits = model.apply({"params": params}, ids)
    lp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.take_along_axis(lp, ids[:, 1:, None], -1).mean()


def test_remat_policies_same_loss_and_grads(saved):
    model, params = M.load(saved["llama"])
    cfg = model.config
    params = jax.tree.map(jnp.asarray, params)
    ids = jnp.asarray(_batch()[0])
    ref_l, ref_g = jax.jit(jax.value_and_grad(functools.partial(_loss, L.LlamaForCausalLM(cfg))))(params, ids)
    for policy in ("nothing_saveable", "dots_with_no_batch_dims_saveable"):
        m = L.LlamaForCausalLM(cfg.replace(remat_policy=policy))
        l, g = jax.jit(jax.value_and_grad(functools.partial(_loss, m)))(params, ids)
        np.testing.assert_allclose(l, ref_l, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g, ref_g)


def test_lora_rules_and_merged_export(saved):
    """Rules by name select the 7 stacked kernels as 'sio'; a merged export loads into PyTorch."""
    model, params = M.load(saved["qwen2"])
    cfg = model.config
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lp = lora.init(params, lora.Rules(targets, rank=4, alpha=8, init=False, stack_axes=1), jax.random.key(0))
    items = dict(lora.tree.lora_items(lp))
    assert sorted(p.split("/")[-2] for p in items) == sorted(targets)
    assert all(lw.layout == "sio" and lw.a.shape[0] == cfg.num_hidden_layers for lw in items.values())
    all_linear = lora.init(params, lora.Rules("all-linear", stack_axes=1), jax.random.key(0))
    assert len(list(lora.tree.lora_items(all_linear))) == 7
    ids = _batch()[0]
    merged = lora.merge(lp)
    model = L.LlamaForCausalLM(cfg)
    ours = np.asarray(lora.wrap(lambda p, ids: model.apply({"params": p}, ids))(lp, ids))
    np.testing.assert_allclose(ours, np.asarray(model.apply({"params": merged}, ids)), **TOL)
    tm = _torch_model("qwen2")
    sd = {k: torch.from_numpy(np.asarray(v)) for k, v in M.state_from_params(jax.device_get(merged), model).items()}
    moved = tf.Qwen2ForCausalLM(tm.config).eval()
    moved.load_state_dict(sd, strict=True)
    np.testing.assert_allclose(ours, _torch_logits(moved, ids), **TOL)
    assert np.abs(ours - _torch_logits(tm, ids)).max() > 1e-2  # the adapters changed the model


def test_a_config_claiming_more_than_the_files_hold_is_refused_at_once(saved, tmp_path):
    """Issue 22.7: num_hidden_layers far beyond what the weight files hold is refused before any
    per-layer table is built (seconds, not minutes and gigabytes)."""
    import json
    import shutil
    import time

    d = tmp_path / "huge"
    shutil.copytree(saved["llama"], d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 10**9}))
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"the config claims 1,000,000,000 layers .* but the checkpoint holds"):
        M.load(d)
    assert time.perf_counter() - t0 < 10

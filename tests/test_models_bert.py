"""lora_jax.models.bert against transformers' PyTorch BERT on the same weights.

Tiny random models (hidden 32, 2 layers, 4 heads, vocab 97, 3 labels) are built in PyTorch with
eager attention, their weights spread out (std 0.2, LayerNorm weights around 1, nonzero biases)
so the outputs are O(1) and attention is far from uniform, saved with ``save_pretrained`` and
read back with `family.params_from_state` from the safetensors file.
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
from lora_jax.models import bert as B
from lora_jax.models import family
from helpers import spread_torch

V = 97
BASE = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, type_vocab_size=3, num_labels=3, attn_implementation="eager")
VARIANTS = {
    "bert": {},
    "bert_relu": dict(hidden_act="relu", layer_norm_eps=1e-5, intermediate_size=48),
}
TOL = dict(rtol=1e-5, atol=1e-5)
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "flax_msgpack")


@functools.lru_cache(maxsize=None)
def _torch_model(variant):
    """The BertForSequenceClassification of ``variant`` (its ``.bert`` is the BertModel)."""
    torch.manual_seed(0)
    cfg = tf.BertConfig(**{**BASE, **VARIANTS[variant]})
    return spread_torch(tf.BertForSequenceClassification(cfg).eval(), seed=len(variant), norm=r"LayerNorm\.weight$")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> checkpoint directory: ``<variant>`` (sequence classification), ``<variant>_base`` (BertModel)."""
    root = tmp_path_factory.mktemp("bert")
    out = {}
    for v in VARIANTS:
        out[v] = root / v
        _torch_model(v).save_pretrained(out[v])
        out[v + "_base"] = root / (v + "_base")
        _torch_model(v).bert.save_pretrained(out[v + "_base"])
    return out


def _load(d):
    config = family.config_from_hf(d)
    model = family.build(config, family.resolve_head(config, family.read_hf_config(d).get("architectures") or ()))
    return model, family.params_from_state(load_file(str(d / "model.safetensors")), model)


def _batch():
    rs = np.random.RandomState(0)
    ids = rs.randint(3, V, (3, 12))
    mask = np.ones((3, 12), np.int64)
    mask[1, 8:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    types = np.zeros((3, 12), np.int64)
    types[:, 6:] = 1  # a second segment
    types[0, 10:] = 2
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    return ids, mask, types, pos


def _torch_out(model, ids, mask=None, types=None, pos=None):
    kw = {}
    for name, value in (("attention_mask", mask), ("token_type_ids", types), ("position_ids", pos)):
        if value is not None:
            kw[name] = torch.tensor(value)
    with torch.no_grad():
        out = model(torch.tensor(ids), **kw)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


def _apply(model):
    """The jitted forward; pass every input as an array so that one compilation serves all calls."""
    return jax.jit(lambda p, ids, mask, types, pos: model.apply(
        {"params": p}, ids, attention_mask=mask, token_type_ids=types, positions=pos))


def _defaults(ids):
    """What the model takes when attention_mask, token_type_ids and positions are left out."""
    return np.ones_like(ids), np.zeros_like(ids), np.broadcast_to(np.arange(ids.shape[1]), ids.shape)


def test_base_hidden_states_match_transformers(saved):
    model, params = _load(saved["bert_base"])
    assert isinstance(model, B.BertModel) and family.torch_class(model) == "BertModel"
    tm = _torch_model("bert").bert
    ids, mask, types, pos = _batch()
    ones, zeros, arange = _defaults(ids)
    fwd = _apply(model)
    out = np.asarray(fwd(params, ids, ones, zeros, arange))
    ref = _torch_out(tm, ids)
    assert out.dtype == np.float32 and out.shape == (3, 12, 32)
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(out, ref, **TOL)
    # padding mask and segments: every position (padded queries too) matches, as keys are what is masked
    ref = _torch_out(tm, ids, mask, types)
    np.testing.assert_allclose(np.asarray(fwd(params, ids, mask, types, arange)), ref, **TOL)
    assert np.abs(np.asarray(fwd(params, ids, ones, types, arange)) - ref)[1].max() > 1e-2  # the mask matters
    assert np.abs(np.asarray(fwd(params, ids, mask, zeros, arange)) - ref)[0].max() > 1e-2  # so do the types
    # explicit positions (left padding counted out)
    ref = _torch_out(tm, ids, mask, types, pos)
    np.testing.assert_allclose(np.asarray(fwd(params, ids, mask, types, pos)), ref, **TOL)
    assert np.abs(np.asarray(fwd(params, ids, mask, types, arange)) - ref)[2].max() > 1e-2


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_seq_cls_logits_match_transformers(saved, variant):
    model, params = _load(saved[variant])
    assert isinstance(model, B.BertForSequenceClassification) and model.config.num_labels == 3
    tm = _torch_model(variant)
    ids, mask, types, pos = _batch()
    fwd = _apply(model)
    out = np.asarray(fwd(params, ids, mask, types, _defaults(ids)[2]))
    ref = _torch_out(tm, ids, mask, types)
    assert out.dtype == np.float32 and out.shape == (3, 3)
    assert np.abs(ref).max() > 0.5 and np.ptp(ref, axis=0).min() > 1e-2  # rows and labels differ
    np.testing.assert_allclose(out, ref, **TOL)
    np.testing.assert_allclose(np.asarray(fwd(params, ids, mask, types, pos)), _torch_out(tm, ids, mask, types, pos),
                               **TOL)
    if variant == "bert":  # the defaults of the optional inputs
        out = jax.jit(model.apply)({"params": params}, ids)
        np.testing.assert_allclose(np.asarray(out), _torch_out(tm, ids), **TOL)


def test_no_pooling_layer(saved):
    """add_pooling_layer=False: the base model without ``pooler.*`` (transformers' BertModel(config, False))."""
    cfg = family.config_from_hf(saved["bert_base"], add_pooling_layer=False)
    model = family.build(cfg, "base")
    sd = load_file(str(saved["bert_base"] / "model.safetensors"))
    with pytest.raises(ValueError, match="unexpected 2: .*pooler.dense"):
        family.params_from_state(sd, model)
    params = family.params_from_state({k: v for k, v in sd.items() if not k.startswith("pooler.")}, model)
    assert "pooler" not in params
    tm = tf.BertModel(_torch_model("bert").config, add_pooling_layer=False).eval()
    tm.load_state_dict({k: torch.tensor(v) for k, v in family.state_from_params(params, model).items()}, strict=True)
    ids, mask, types, _ = _batch()
    out = _apply(model)(params, ids, mask, types, _defaults(ids)[2])
    np.testing.assert_allclose(np.asarray(out), _torch_out(tm, ids, mask, types), **TOL)
    with pytest.raises(ValueError, match="add_pooling_layer=False is for the base model only"):
        family.init_params(family.build(cfg, "seq_cls"), jax.random.key(0))


def test_roundtrip_exact_and_strict(saved):
    for name in ("bert", "bert_base", "bert_relu"):
        x = load_file(str(saved[name] / "model.safetensors"))
        model, params = _load(saved[name])
        back = family.state_from_params(params, model)
        assert set(back) == set(x), name
        for k in x:
            assert back[k].dtype == x[k].dtype and back[k].shape == x[k].shape, k
            np.testing.assert_array_equal(back[k], x[k], err_msg=k)
    model, _ = _load(saved["bert"])
    sd = dict(load_file(str(saved["bert"] / "model.safetensors")))
    # older checkpoints' index buffers and BertForPreTraining's heads are skipped
    family.params_from_state(dict(sd, **{"bert.embeddings.position_ids": np.arange(64)[None],
                                         "cls.predictions.bias": np.zeros(V, np.float32)}), model)
    del sd["classifier.bias"]
    sd["bert.encoder.layer.1.intermediate.dense.weight"] = sd["bert.encoder.layer.1.intermediate.dense.weight"].T
    with pytest.raises(ValueError) as e:
        family.params_from_state(sd, model)
    assert "classifier.bias" in str(e.value)
    assert "bert.encoder.layer.1.intermediate.dense.weight: expected (64, 32), got (32, 64)" in str(e.value)


@pytest.mark.parametrize("name", ["bert", "bert_seq_cls"])
def test_flax_msgpack_fixture(name):
    """transformers 4.57's flax_model.msgpack gives the tree (and outputs) of the same weights' safetensors."""
    d = os.path.join(FIXTURES, name)
    with open(os.path.join(d, "flax_model.msgpack"), "rb") as f:
        state = family.flax_msgpack_state(flax.serialization.msgpack_restore(f.read()))
    config = family.config_from_hf(d)
    head = "seq_cls" if name == "bert_seq_cls" else "base"
    model = family.build(config, head)
    from_msgpack = family.params_from_state(state, model)
    from_st = family.params_from_state(load_file(os.path.join(d, "model.safetensors")), model)
    assert jax.tree.structure(from_msgpack) == jax.tree.structure(from_st)
    jax.tree.map(np.testing.assert_array_equal, from_msgpack, from_st)
    ids, mask, types, _ = _batch()
    ids, types = ids % config.vocab_size, types % config.type_vocab_size
    cls = tf.BertForSequenceClassification if head == "seq_cls" else tf.BertModel
    ref = _torch_out(cls.from_pretrained(d, attn_implementation="eager").eval(), ids, mask, types)
    out = np.asarray(_apply(model)(from_msgpack, ids, mask, types, _defaults(ids)[2]))
    assert np.ptp(ref, axis=0).max() > 1e-3  # the fixture's outputs differ between rows
    np.testing.assert_allclose(out, ref, **TOL)


def test_lora_wrap_and_merged_export(saved, tmp_path):
    """A LoRA tree through lora.wrap equals the merged params; the merged export loads into PyTorch."""
    model, params = _load(saved["bert"])
    assert family.family_of(model).peft_targets["bert"] == ("query", "value")
    targets = ["query", "key", "value", "attention/output/dense", "intermediate/dense"]
    lp = lora.init(params, lora.Rules(targets, rank=4, init=False, stack_axes=1), jax.random.key(0))
    items = dict(lora.tree.lora_items(lp))
    assert len(items) == 5 and all(lw.a.shape[0] == 2 for lw in items.values())
    ids, mask, types, _ = _batch()

    def fwd(p, ids):
        return model.apply({"params": p}, ids, attention_mask=mask, token_type_ids=types)

    merged = jax.device_get(lora.merge(lp))
    ours = np.asarray(jax.jit(lora.wrap(fwd))(lp, ids))
    np.testing.assert_allclose(ours, np.asarray(jax.jit(fwd)(merged, ids)), **TOL)
    tm = _torch_model("bert")
    assert np.abs(ours - _torch_out(tm, ids, mask, types)).max() > 1e-2  # the adapters changed the model

    sd = family.state_from_params(merged, model)
    moved = tf.BertForSequenceClassification(tm.config).eval()
    moved.load_state_dict({k: torch.tensor(v) for k, v in sd.items()}, strict=True)
    np.testing.assert_allclose(ours, _torch_out(moved, ids, mask, types), **TOL)
    # and as a checkpoint directory (config.json + model.safetensors) through from_pretrained
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(family.hf_config_dict(model)))
    loaded = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(loaded).__name__ == "BertForSequenceClassification" and loaded.config.num_labels == 3
    np.testing.assert_allclose(ours, _torch_out(loaded, ids, mask, types), **TOL)


def test_config_round_trip_and_unsupported_fields(saved):
    for name in ("bert", "bert_relu", "bert_base"):
        cfg = family.config_from_hf(saved[name])
        hash(cfg)  # a static jit argument
        assert B.from_hf_config(tf.BertConfig(**cfg.to_hf_config()).to_dict()) == cfg
    cfg = B.from_hf_config({"id2label": {"1": "pos", "0": "neg"}, "problem_type": "single_label_classification"})
    assert (cfg.num_labels, cfg.labels) == (2, ("neg", "pos"))
    assert B.from_hf_config({"num_labels": 5}).labels[4] == "LABEL_4"
    assert B.BertConfig(num_labels=4).replace(num_labels=1).num_labels == 1
    with pytest.raises(ValueError, match="num_labels=3 but id2label names 2"):
        B.BertConfig(num_labels=3, id2label=("a", "b"))
    good = tf.BertConfig(**{k: v for k, v in BASE.items() if k != "attn_implementation"}).to_dict()
    assert B.from_hf_config({**good, "position_embedding_type": "absolute"}).num_labels == 3
    for field, value in (("position_embedding_type", "relative_key"), ("is_decoder", True),
                         ("add_cross_attention", True), ("hidden_act", "quick_gelu")):
        with pytest.raises(ValueError, match=f"{field}={value!r}"):
            B.from_hf_config({**good, field: value})
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        B.from_hf_config({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="problem_type"):
        B.BertConfig(problem_type="ranking")
    with pytest.raises(ValueError, match="has no 'causal_lm' head"):
        family.build(cfg, "causal_lm")
    model = family.build(cfg, "base")
    with pytest.raises(ValueError, match=r"token_type_ids must have the shape of input_ids \(1, 4\)"):
        model.init(jax.random.key(0), np.zeros((1, 4), np.int32), token_type_ids=np.zeros((1, 5), np.int32))

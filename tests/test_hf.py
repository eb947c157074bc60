"""Hugging Face interop against the real clients: PyTorch transformers and PEFT on the same weights.

Tiny models are built in PyTorch from configs (random weights), saved with ``save_pretrained``
and read back through the real file formats; nothing is downloaded.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers as tf
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.numpy import load_file, save_file

import lora_jax as lora
import lora_jax.hf as hf
from lora_jax.tree import lora_items

from helpers import nonzero_b

TOL = dict(rtol=1e-5, atol=1e-5)
IDS = np.random.RandomState(0).randint(0, 97, (2, 11))
LABELS = np.array([0, 2])

_DEC = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=97, max_position_embeddings=64)
CONFIGS = {
    "gpt2": (tf.GPT2LMHeadModel, lambda: tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=64)),
    "llama": (tf.LlamaForCausalLM, lambda: tf.LlamaConfig(**_DEC)),
    "llama_tied": (tf.LlamaForCausalLM, lambda: tf.LlamaConfig(**_DEC, tie_word_embeddings=True)),
    "qwen2": (tf.Qwen2ForCausalLM, lambda: tf.Qwen2Config(**_DEC)),
    "mistral": (tf.MistralForCausalLM, lambda: tf.MistralConfig(**_DEC)),
    "bert": (tf.BertForSequenceClassification,
             lambda: tf.BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                   vocab_size=97, max_position_embeddings=64, num_labels=3)),
}


def torch_model(name, seed=0):
    """A tiny PyTorch model with every weight (biases and norms included) moved off its init."""
    cls, cfg = CONFIGS[name]
    torch.manual_seed(seed)
    m = cls(cfg())
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> directory written by PyTorch ``save_pretrained(..., safe_serialization=True)``."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name in CONFIGS:
        d = str(root / name)
        torch_model(name).save_pretrained(d, safe_serialization=True)
        out[name] = d
    return out


def load_torch(name, d):
    return CONFIGS[name][0].from_pretrained(d).eval()


def torch_logits(m):
    with torch.no_grad():
        return m(torch.tensor(IDS), attention_mask=torch.ones(IDS.shape, dtype=torch.long)).logits.numpy()


_JITTED = {}


def jax_logits(model, params):
    """Logits of the Flax model, jitted once per class and config (op-by-op dispatch compiles hundreds
    of tiny programs on CPU). A LoRA tree runs through lora.wrap (factorized)."""
    key = (type(model).__name__, model.config.to_json_string(), str(model.dtype))
    if key not in _JITTED:
        _JITTED[key] = jax.jit(lora.wrap(lambda p, ids: model(ids, attention_mask=jnp.ones_like(ids), params=p).logits))
    return np.asarray(_JITTED[key](params, IDS))


def test_names_and_layouts():
    assert hf.torch_module_name("transformer/h/0/attn/c_attn/kernel") == "transformer.h.0.attn.c_attn"
    assert hf.torch_key("model/layers/0/self_attn/q_proj/kernel") == "model.layers.0.self_attn.q_proj.weight"
    assert hf.torch_key("transformer/ln_f/scale") == "transformer.ln_f.weight"
    assert hf.torch_key("model/norm/weight") == "model.norm.weight"
    assert hf.kernel_layout("gpt2", "transformer/h/1/mlp/c_fc/kernel") == "oi"
    assert hf.kernel_layout("gpt2", "transformer/wte/embedding") == "io"
    assert hf.kernel_layout("llama", "model/layers/0/self_attn/q_proj/kernel") == "io"
    with pytest.raises(ValueError, match="not a kernel"):
        hf.kernel_layout("llama", "model/norm/weight")


@pytest.mark.parametrize("name", ["gpt2", "llama", "llama_tied", "qwen2", "mistral", "bert"])
def test_from_pretrained_logits_match_pytorch(saved, name):
    model, params = hf.from_pretrained(saved[name])
    want = torch_logits(load_torch(name, saved[name]))
    got = jax_logits(model, params)
    np.testing.assert_allclose(got, want, **TOL)
    assert np.abs(want).max() > 0.1  # a real signal, not near-zero logits
    if name == "qwen2":  # the q/k/v biases arrive (and o_proj's Flax-only bias is zero)
        attn = params["model"]["layers"]["0"]["self_attn"]
        assert float(jnp.abs(attn["q_proj"]["bias"]).max()) > 0 and not attn["o_proj"]["bias"].any()


def test_from_pretrained_dtype_and_base_model(saved):
    model, params = hf.from_pretrained(saved["llama"], dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    want = torch_logits(load_torch("llama", saved["llama"]))
    np.testing.assert_allclose(jax_logits(model, params).astype(np.float32), want, atol=0.1, rtol=0.05)
    # a checkpoint with a head loads into the base model (the head is dropped, as transformers does)
    base, bparams = hf.from_pretrained(saved["bert"], architecture="BertModel")
    assert type(base).__name__ == "FlaxBertModel" and "classifier" not in bparams and "encoder" in bparams
    with torch.no_grad():
        want = tf.BertModel.from_pretrained(saved["bert"]).eval()(torch.tensor(IDS)).last_hidden_state.numpy()
    got = np.asarray(base(IDS, attention_mask=np.ones_like(IDS), params=bparams).last_hidden_state)
    np.testing.assert_allclose(got, want, **TOL)


def test_base_model_checkpoint_into_head_model_and_bf16_export(saved, tmp_path):
    torch.manual_seed(3)
    tf.GPT2Model(CONFIGS["gpt2"][1]()).save_pretrained(tmp_path / "base", safe_serialization=True)
    model, params = hf.from_pretrained(tmp_path / "base", architecture="GPT2LMHeadModel")  # keys lack "transformer."
    want = torch_logits(tf.GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval())
    np.testing.assert_allclose(jax_logits(model, params), want, **TOL)
    # bf16 parameters export as bf16 and say so in config.json
    model, params = hf.from_pretrained(saved["llama"], dtype=jnp.bfloat16)
    hf.save_merged(tmp_path / "bf16", model, params)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert tf.LlamaForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto").dtype == torch.bfloat16
    for prefer in ("flax", "safetensors"):
        _, back = hf.from_pretrained(tmp_path / "bf16", prefer=prefer)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a).view(np.uint16),
                                                                          np.asarray(b).view(np.uint16)), back, params)


def _copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return os.path.join(dst, "model.safetensors")


def test_strict_loading_lists_every_problem(saved, tmp_path):
    f = _copy_ckpt(saved["llama"], tmp_path / "bad")
    sd = load_file(f)
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.1.mlp.extra.weight"] = np.zeros((2, 2), np.float32)
    sd["model.layers.0.self_attn.k_proj.weight"] = np.zeros((12, 32), np.float32)
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        hf.from_pretrained(tmp_path / "bad")
    msg = str(e.value)
    assert "3 problem(s)" in msg
    assert "missing: model.layers.1.mlp.up_proj.weight (for Flax model/layers/1/mlp/up_proj/kernel" in msg
    assert "unexpected: model.layers.1.mlp.extra.weight (2, 2)" in msg
    assert "shape mismatch: model.layers.0.self_attn.k_proj.weight is (12, 32)" in msg
    f = tmp_path / "bad" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        hf.from_pretrained(tmp_path / "bad")


def test_sharded_checkpoint_and_index_escape(saved, tmp_path):
    d = tmp_path / "sharded"
    f = _copy_ckpt(saved["gpt2"], d)
    sd = load_file(f)
    os.remove(f)
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(d / name), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    model, params = hf.from_pretrained(d)
    _, ref = hf.from_pretrained(saved["gpt2"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, ref)
    index["weight_map"][keys[0]] = "../model-00001-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="outside"):
        hf.from_pretrained(d)


def test_unsupported_and_unfaithful_configs(tmp_path):
    tf.T5Config(d_model=8, num_layers=1, num_heads=1, d_kv=8, d_ff=8).save_pretrained(tmp_path / "t5")
    with pytest.raises(ValueError, match=r"'t5' is not supported.*gpt2: GPT2LMHeadModel.*bert: "):
        hf.from_pretrained(tmp_path / "t5")
    tf.LlamaConfig(**_DEC, rope_theta=500000.0).save_pretrained(tmp_path / "rope")
    with pytest.raises(ValueError, match="rope_theta is 500000.0"):
        hf.from_pretrained(tmp_path / "rope")
    tf.MistralConfig(**_DEC, sliding_window=8).save_pretrained(tmp_path / "win")
    with pytest.raises(ValueError, match="sliding_window is 8"):
        hf.from_pretrained(tmp_path / "win")
    with pytest.raises(ValueError, match="architecture 'GPT2ForTokenClassification' is not supported"):
        hf.rules_for(tf.GPT2Config(architectures=["GPT2ForTokenClassification"]))


def test_hub_id_offline_names_the_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        hf.from_pretrained("someone/tiny-llama")
    assert os.path.join(str(tmp_path), "someone/tiny-llama") in str(e.value) and "offline" in str(e.value)
    with pytest.raises(FileNotFoundError, match="no directory at"):
        hf.from_pretrained("./not/here")


def test_rules_for_presets():
    import peft.utils.constants as pc

    for mt, targets in hf.PEFT_DEFAULT_TARGETS.items():
        assert list(targets) == pc.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[mt]
    model = tf.FlaxGPT2LMHeadModel(CONFIGS["gpt2"][1](), _do_init=False)
    shapes = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), model.params_shape_tree)
    for preset, want in [("all-linear", {"c_attn", "c_proj", "c_fc"}), ("attention", {"c_attn", "c_proj"}),
                         ("peft", {"c_attn"})]:
        lp = lora.init(shapes, hf.rules_for(model, preset, rank=2), 0)
        items = dict(lora_items(lp))
        assert {p.split("/")[-2] for p in items} == want
        assert {lw.layout for lw in items.values()} == {"oi"}
        if preset == "attention":
            assert all("/attn/" in p for p in items)
    llama = hf.rules_for("llama", "attention")
    assert llama.resolve("model/layers/0/self_attn/o_proj/kernel", (32, 32)).layout == "io"
    assert llama.resolve("model/layers/0/mlp/up_proj/kernel", (32, 48)) is None
    with pytest.raises(ValueError, match="preset must be one of"):
        hf.rules_for("llama", "everything")


# -- PEFT trained in PyTorch -> lora_jax ---------------------------------------------------------

PEFT_CASES = {
    "gpt2": dict(target_modules=["c_attn", "c_fc"], rank_pattern={"c_fc": 2}, fan_in_fan_out=True,
                 alpha_pattern={"h.1.attn.c_attn": 12}, task_type="CAUSAL_LM"),
    "llama": dict(target_modules=["q_proj", "k_proj", "v_proj", "down_proj", "embed_tokens"],
                  rank_pattern={"v_proj": 2, "model.layers.1.self_attn.q_proj": 6}, alpha_pattern={"down_proj": 3},
                  task_type="CAUSAL_LM"),
    "bert": dict(target_modules=["query", "value", "dense"], rank_pattern={"value": 2},
                 alpha_pattern={"layer.1.attention.self.query": 16}, task_type="SEQ_CLS"),
}


def peft_adapter(name, base_dir, out_dir, seed=1, **over):
    torch.manual_seed(seed)
    kw = dict(PEFT_CASES[name], **over)
    pm = get_peft_model(load_torch(name, base_dir), LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                                               init_lora_weights=False, **kw)).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n or "lora_magnitude_vector" in n:  # a trained-looking head / magnitude
                p.mul_(1.5).add_(0.1)
    pm.save_pretrained(out_dir)
    return torch_logits(pm)


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`")
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_load_peft_matches_peft(saved, tmp_path, name):
    want = peft_adapter(name, saved[name], tmp_path / "ad")
    base = torch_logits(load_torch(name, saved[name]))
    assert np.abs(want - base).max() > 0.1  # the adapter really changes the model
    model, params = hf.from_pretrained(saved[name])
    before = jax.tree_util.tree_map(np.asarray, params)
    tree = hf.load_peft(tmp_path / "ad", params, model)
    got = jax_logits(model, tree)
    np.testing.assert_allclose(got, want, **TOL)
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, jax.tree_util.tree_map(np.asarray, params))
    items = dict(lora_items(tree))
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    if name == "llama":
        assert items["model/layers/0/self_attn/v_proj/kernel"].rank == 2
        assert items["model/layers/1/self_attn/q_proj/kernel"].rank == 6
        assert items["model/layers/0/mlp/down_proj/kernel"].alpha == 3
        assert items["model/embed_tokens/embedding"].a.shape == (97, 4)
        assert all(lw.rslora for lw in items.values())
    if name == "gpt2":
        assert cfg["fan_in_fan_out"] is True and items["transformer/h/0/attn/c_attn/kernel"].layout == "oi"
        assert items["transformer/h/1/attn/c_attn/kernel"].alpha == 12


def test_load_peft_dora(saved, tmp_path):
    want = peft_adapter("llama", saved["llama"], tmp_path / "ad", target_modules=["q_proj", "o_proj", "up_proj"],
                        use_dora=True, rank_pattern={}, alpha_pattern={})
    model, params = hf.from_pretrained(saved["llama"])
    tree = hf.load_peft(tmp_path / "ad", params, model)
    assert all(lw.m is not None for _, lw in lora_items(tree))
    np.testing.assert_allclose(jax_logits(model, tree), want, **TOL)
    hf.save_peft(tmp_path / "back", tree, model)
    pm = PeftModel.from_pretrained(load_torch("llama", saved["llama"]), tmp_path / "back").eval()
    np.testing.assert_allclose(torch_logits(pm), want, **TOL)


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`")
def test_load_peft_lists_every_problem(saved, tmp_path):
    peft_adapter("llama", saved["llama"], tmp_path / "ad")
    model, params = hf.from_pretrained(saved["llama"])
    f = str(tmp_path / "ad" / "adapter_model.safetensors")
    sd = load_file(f)
    p = "base_model.model.model.layers."
    del sd[p + "0.self_attn.k_proj.lora_B.weight"]                   # half an adapter
    del sd[p + "1.mlp.down_proj.lora_A.weight"], sd[p + "1.mlp.down_proj.lora_B.weight"]  # a targeted module gone
    sd[p + "0.self_attn.q_proj.lora_A.weight"] = np.zeros((3, 32), np.float32)  # rank 3, config says 4
    sd[p + "0.self_attn.nope.lora_A.weight"] = np.zeros((4, 32), np.float32)   # no such module
    sd[p + "0.mlp.up_proj.weight"] = np.zeros((48, 32), np.float32)            # a full weight, not modules_to_save
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        hf.load_peft(tmp_path / "ad", params, model)
    msg = str(e.value)
    assert "5 problem(s)" in msg
    assert "incomplete: model.layers.0.self_attn.k_proj has only ['A']" in msg
    assert "missing: base_model.model.model.layers.1.mlp.down_proj.lora_A/lora_B" in msg
    assert "shape mismatch: model.layers.0.self_attn.q_proj lora_A is (3, 32), expected (4, 32)" in msg
    assert "no kernel or embedding module 'model.layers.0.self_attn.nope'" in msg
    assert "full weight of 'model.layers.0.mlp.up_proj', which is not in modules_to_save" in msg
    # allow_missing forgives the absent module, and only that
    with pytest.raises(ValueError) as e:
        hf.load_peft(tmp_path / "ad", params, model, allow_missing=True)
    assert "4 problem(s)" in str(e.value) and "missing:" not in str(e.value)
    for k in [k for k in sd if "0.self_attn" in k or "up_proj" in k]:
        del sd[k]
    save_file(sd, f, metadata={"format": "pt"})
    tree = hf.load_peft(tmp_path / "ad", params, model, allow_missing=True)
    assert "model/layers/1/mlp/down_proj/kernel" not in dict(lora_items(tree))
    with pytest.raises(ValueError, match=r"missing: .*layers.0.self_attn.q_proj"):
        hf.load_peft(tmp_path / "ad", params, model)
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    cfg.update(lora_bias=True, peft_type="LOHA")
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"peft_type is 'LOHA'.*lora_bias=True is not supported"):
        hf.load_peft(tmp_path / "ad", params, model)


# -- lora_jax training -> PEFT in PyTorch ----------------------------------------------------------

TRAIN_CASES = {
    "gpt2": ("attention", dict(rank_pattern={"attn/c_proj": 2}, alpha_pattern={"h/1/attn/c_attn": 12})),
    "llama": ("all-linear", dict(rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 4})),
    "bert": ("peft", dict(rank_pattern={"value": 2})),
}


def train(model, lp, name, steps=3):
    trainable, frozen = lora.split(lp)
    tx = lora.freeze(optax.adam(3e-2), trainable)
    ids = jnp.asarray(IDS)

    def loss_fn(t):
        logits = lora.wrap(lambda p: model(ids, attention_mask=jnp.ones_like(ids), params=p).logits)(
            lora.combine(t, frozen))
        if name == "bert":
            return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean()
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    @jax.jit
    def step(t, s):
        loss, g = jax.value_and_grad(loss_fn)(t)
        u, s = tx.update(g, s, t)
        return optax.apply_updates(t, u), s, loss

    state, losses = tx.init(trainable), []
    for _ in range(steps):
        trainable, state, loss = step(trainable, state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    return lora.combine(trainable, frozen)


def load_peft_head(d, params, model):
    head = hf.load_peft(d, params, model)["classifier"]["kernel"]
    assert isinstance(head, lora.Trainable)  # modules_to_save come back trainable, as in PEFT
    return head.value


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_trained_in_lora_jax_loads_in_peft(saved, tmp_path, name):
    model, params = hf.from_pretrained(saved[name])
    preset, kw = TRAIN_CASES[name]
    lp = lora.init(params, hf.rules_for(model, preset, rank=4, alpha=8, use_rslora=True, **kw), 0)
    if name == "llama":  # an embedding adapter too
        lp = lora.init(lp, lora.Rules("embed_tokens", rank=4, alpha=8, use_rslora=True), 1, add=True)
    lp = train(model, lp, name)
    if name == "bert":  # an adapter on the classifier head is exported merged, as PEFT's modules_to_save
        lp = lora.init(lp, lora.Rules("classifier", rank=2, init=False), 2, add=True)
    want = jax_logits(model, lp)
    assert np.abs(want - jax_logits(model, params)).max() > 1e-2
    hf.save_peft(tmp_path / "ad", lp, model)
    pm = PeftModel.from_pretrained(load_torch(name, saved[name]), tmp_path / "ad").eval()
    np.testing.assert_allclose(torch_logits(pm), want, **TOL)
    back = dict(lora_items(hf.load_peft(tmp_path / "ad", params, model)))  # and back into JAX, exactly
    for p, lw in lora_items(lp):
        if p.startswith("classifier/"):
            np.testing.assert_array_equal(load_peft_head(tmp_path / "ad", params, model), lw.merge())
            continue
        assert (back[p].rank, back[p].alpha, back[p].rslora, back[p].layout) == (lw.rank, lw.alpha, True, lw.layout)
        np.testing.assert_array_equal(back[p].a, lw.a)
        np.testing.assert_array_equal(back[p].b, lw.b)
    assert set(back) == {p for p, _ in lora_items(lp) if not p.startswith("classifier/")}
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["use_rslora"] is True
    assert cfg["base_model_name_or_path"] == saved[name] and cfg["bias"] == "none"
    if name == "gpt2":
        assert cfg["task_type"] == "CAUSAL_LM" and cfg["fan_in_fan_out"] is True
        # c_attn everywhere -> its short name; c_proj only in attention (not the MLP) -> full names
        assert cfg["target_modules"] == ["c_attn", "transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]
        assert cfg["rank_pattern"] == {f"transformer.h.{i}.attn.c_proj": 2 for i in range(2)}
        assert cfg["alpha_pattern"] == {"transformer.h.1.attn.c_attn": 12}
    if name == "llama":
        assert cfg["target_modules"] == ["down_proj", "embed_tokens", "gate_proj", "k_proj", "o_proj", "q_proj",
                                         "up_proj", "v_proj"]
        assert cfg["rank_pattern"] == {f"model.layers.{i}.self_attn.v_proj": 2 for i in range(2)}
    if name == "bert":
        assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["classifier"]
        assert cfg["target_modules"] == ["query", "value"]


def test_save_peft_refuses_what_peft_cannot_express(saved, tmp_path):
    model, params = hf.from_pretrained(saved["gpt2"])
    wrong = lora.init(params, lora.Rules(["c_attn"], rank=2), 0)  # Dense layout on GPT-2's (out, in) kernels
    with pytest.raises(ValueError, match=r"layout 'io', but this Flax kernel is 'oi'; use lora_jax.hf.rules_for"):
        hf.save_peft(tmp_path / "ad", wrong, model)
    tied = lora.init(params, lora.Rules(["wte"], rank=2), 0)
    with pytest.raises(ValueError, match="tied input embedding"):
        hf.save_peft(tmp_path / "ad", tied, model)
    mixed = lora.init(params, lora.Rules([lora.Rule(["attn/c_attn"], layout="out_in", use_rslora=True),
                                          lora.Rule(["mlp/c_fc"], layout="out_in")], rank=2), 0)
    with pytest.raises(ValueError, match="use_rslora differs between targets"):
        hf.save_peft(tmp_path / "ad", mixed, model)
    assert not os.path.exists(tmp_path / "ad")


# -- merged checkpoints -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpt2", "llama_tied", "qwen2", "bert"])
def test_save_merged_loads_in_pytorch_and_flax(saved, tmp_path, name):
    model, params = hf.from_pretrained(saved[name])
    lp = lora.init(params, hf.rules_for(model, "all-linear", rank=2, alpha=4), 0)
    if name == "llama_tied":  # an adapter on the tied embedding unties the head on export
        lp = lora.init(lp, lora.Rules("embed_tokens", rank=2, init=False), 1, add=True)  # a and b random
    lp = nonzero_b(lp, scale=0.3)
    want = jax_logits(model, lp)
    assert np.abs(want - jax_logits(model, params)).max() > 1e-2
    out = tmp_path / "merged"
    hf.save_merged(out, model, lp)
    assert sorted(os.listdir(out)) == ["config.json", "flax_model.msgpack", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["merged"]  # no temporary directory left behind
    np.testing.assert_allclose(torch_logits(load_torch(name, out)), want, **TOL)
    _, back = hf.from_pretrained(out, prefer="flax")
    np.testing.assert_allclose(jax_logits(model, back), want, **TOL)
    sd = load_file(str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    if name == "llama_tied":
        assert "lm_head.weight" in sd and cfg.get("tie_word_embeddings", False) is False
    if name == "qwen2":
        assert not any("o_proj.bias" in k for k in sd) and "attention_bias" not in cfg
        assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["model_type"] == "qwen2"
    if name in ("gpt2", "bert"):  # transformers' own Flax loader reads the msgpack
        flax_cls = tf.FlaxGPT2LMHeadModel if name == "gpt2" else tf.FlaxBertForSequenceClassification
        fm, fparams = flax_cls.from_pretrained(out, _do_init=False)
        np.testing.assert_allclose(jax_logits(fm, fparams), want, **TOL)
        fm.save_pretrained(tmp_path / "by_transformers", params=fparams)  # and transformers' msgpack reads here
        _, again = hf.from_pretrained(tmp_path / "by_transformers")
        jax.tree_util.tree_map(np.testing.assert_array_equal, again, back)
        assert "lm_head.weight" not in sd  # GPT-2's head stays tied


def test_save_merged_keeps_a_tied_head_tied(saved, tmp_path):
    model, params = hf.from_pretrained(saved["llama_tied"])
    hf.save_merged(tmp_path / "m", model, params)
    assert "lm_head.weight" not in load_file(str(tmp_path / "m" / "model.safetensors"))
    assert json.loads((tmp_path / "m" / "config.json").read_text())["tie_word_embeddings"] is True


def test_save_merged_is_atomic_and_refuses_overwrite(saved, tmp_path):
    model, params = hf.from_pretrained(saved["llama"])
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        hf.save_merged(out, model, params)
    lp = lora.init(params, hf.rules_for(model, "peft", rank=2), 0)
    k = "model/layers/0/self_attn/q_proj/kernel"
    bad = jax.tree_util.tree_map(lambda x: x, lp, is_leaf=lora.is_lora)
    bad["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"] = dict(lora_items(lp))[k].replace(
        b=jnp.full((2, 32), jnp.nan))
    with pytest.raises(ValueError, match="non-finite"):
        hf.save_merged(out, model, bad, overwrite=True)
    assert os.listdir(out) == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["m"]
    broken = dict(params, lm_head={"kernel": jnp.zeros((32, 5))})
    with pytest.raises(ValueError, match=r"shape mismatch: lm_head/kernel is \(32, 5\)"):
        hf.save_merged(out, model, broken, overwrite=True)
    hf.save_merged(out, model, lp, overwrite=True)
    assert "keep.txt" not in os.listdir(out)


def test_example_hf_finetune_demo(tmp_path, capsys):
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "hf_finetune.py")
    spec = importlib.util.spec_from_file_location("hf_finetune", path)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    assert ex.main(["--demo", "--steps", "3", "--batch", "2", "--seq-len", "32", "--verify",
                    "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(" in out
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    err = float(out.split("max |JAX - PyTorch PEFT| logits = ")[1].split()[0])
    assert err < 1e-5


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_trainable_biases_and_modules_to_save_round_trip_with_peft(saved, tmp_path, bias):
    """bias='lora_only'/'all' and a modules_to_save module (not the head) written as PEFT reads them."""
    model, params = hf.from_pretrained(saved["bert"])
    rules = lora.Rules(["query", "value"], rank=2, alpha=4, bias=bias, modules_to_save=["pooler"])
    lp = nonzero_b(lora.init(params, rules, 0), scale=0.3)
    lp = jax.tree_util.tree_map(lambda x: lora.Trainable(x.value + 0.05) if isinstance(x, lora.Trainable) else x, lp,
                                is_leaf=lambda x: isinstance(x, lora.Trainable))  # as if they had trained
    want = jax_logits(model, lp)
    hf.save_peft(tmp_path / "ad", lp, model)
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["bias"] == bias and "bert.pooler.dense" in cfg["modules_to_save"]
    pm = PeftModel.from_pretrained(load_torch("bert", saved["bert"]), tmp_path / "ad").eval()
    np.testing.assert_allclose(torch_logits(pm), want, **TOL)
    back = hf.load_peft(tmp_path / "ad", params, model)
    assert isinstance(back["bert"]["pooler"]["dense"]["kernel"], lora.Trainable)
    np.testing.assert_allclose(jax_logits(model, back), want, **TOL)


def test_save_peft_picks_one_adapter_of_several(saved, tmp_path):
    model, params = hf.from_pretrained(saved["llama"])
    lp = nonzero_b(lora.init(params, hf.rules_for(model, "attention", rank=2, alpha=4), 0), scale=0.3)
    lp = nonzero_b(lora.add(lp, "other", lora.Rules(["q_proj"], rank=3, alpha=3), 1), seed=2, scale=0.3)
    with pytest.raises(ValueError, match=r"holds adapters \['default', 'other'\].*pass adapter=<name>"):
        hf.save_peft(tmp_path / "x", lp, model)
    hf.save_peft(tmp_path / "ad", lp, model, adapter="other")
    pm = PeftModel.from_pretrained(load_torch("llama", saved["llama"]), tmp_path / "ad").eval()
    np.testing.assert_allclose(torch_logits(pm), jax_logits(model, lora.select(lp, "other")), **TOL)

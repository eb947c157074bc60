"""lora_jax's mixture-of-experts families (Qwen3-MoE, Mixtral, GPT-OSS) against PyTorch transformers 5 and PEFT.

Tiny random models (hidden 32, 2 layers, 4 experts, top-2, vocab 97), weights spread to std 0.2
(norms 1 +- 0.2) so logits are O(1) and the router's choices are far from ties, saved with
``save_pretrained`` (which writes the experts per expert: ``mlp.experts.{j}.gate_proj.weight``,
Mixtral's ``block_sparse_moe.experts.{j}.w1.weight``; GPT-OSS's fused ``(E, in, out)`` with biases)
and read back through the real files. GPT-OSS's GLU limit is 0.5 (its 7.0 would never clamp values
this small), its window 4 on every other layer, and its sinks spread like every weight. Both
expert computations (``ragged``: ``jax.lax.ragged_dot`` over tokens sorted by expert; ``dense``)
are checked; float32, rtol = atol = 1e-5 on the real tokens.
"""

import functools
import json
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.numpy import load_file, save_file

import lora_jax as lora
import lora_jax.hf as hf
import lora_jax.models as M
from lora_jax.models import layers
from lora_jax.tree import lora_items
from helpers import save_torch_models, spread_torch

V = 97
TOL = dict(rtol=1e-5, atol=1e-5)
BASE = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=V, max_position_embeddings=64, num_experts_per_tok=2, attn_implementation="eager")
VARIANTS = {
    "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM,
                  dict(num_experts=4, moe_intermediate_size=16, head_dim=16, norm_topk_prob=False)),
    # renormalized top-k weights, tied embeddings
    "qwen3_moe_norm": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM,
                       dict(num_experts=4, moe_intermediate_size=16, norm_topk_prob=True, tie_word_embeddings=True)),
    "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM, dict(num_local_experts=4, sliding_window=6)),
    # sinks, biases everywhere, clamped interleaved GLU, sliding (window 4) / full layers, yarn rope
    "gpt_oss": (tf.GptOssConfig, tf.GptOssForCausalLM,
                dict(num_local_experts=4, intermediate_size=16, head_dim=8, sliding_window=4, swiglu_limit=0.5,
                     rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                                      "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 16})),
}
IMPLS = ("ragged", "dense")


@functools.lru_cache(maxsize=None)
def _torch_model(variant):
    cfg_cls, model_cls, extra = VARIANTS[variant]
    torch.manual_seed(0)
    return spread_torch(model_cls(cfg_cls(**{**BASE, **extra})).eval(), seed=len(variant))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """variant -> checkpoint directory written by save_pretrained."""
    return save_torch_models(tmp_path_factory.mktemp("moe"), _torch_model, VARIANTS)


def _batch():
    rs = np.random.RandomState(0)
    ids = rs.randint(3, V, (3, 12))
    mask = np.ones((3, 12), np.int64)
    mask[1, :4] = 0  # left padding
    mask[2, 9:] = 0  # right padding
    return ids, mask, np.maximum(np.cumsum(mask, 1) - 1, 0)


def _torch_logits(model, ids, mask=None, pos=None):
    kw = {}
    if mask is not None:
        kw = dict(attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
    with torch.no_grad():
        return model(torch.tensor(ids), **kw).logits.numpy()


def _load(d, impl="dense"):
    return M.load(d, moe_impl=impl)


@pytest.mark.parametrize("variant,impl", [("qwen3_moe", "ragged"), ("qwen3_moe_norm", "dense"), ("mixtral", "ragged"),
                                          ("mixtral", "dense"), ("gpt_oss", "ragged"), ("gpt_oss", "dense")])
def test_logits_match_transformers(saved, variant, impl):
    model, params = _load(saved[variant], impl)
    ids, mask, pos = _batch()
    tm = _torch_model(variant)
    ref = _torch_logits(tm, ids)
    assert np.abs(ref).max() > 1.0
    fwd = jax.jit(lambda p, ids, m, pos: model.apply({"params": p}, ids, attention_mask=m, positions=pos))
    np.testing.assert_allclose(np.asarray(fwd(params, ids, None, None)), ref, **TOL)
    ref = _torch_logits(tm, ids, mask, pos)
    out = np.asarray(fwd(params, ids, mask, pos))
    keep = mask.astype(bool)
    np.testing.assert_allclose(out[keep], ref[keep], **TOL)


@pytest.mark.parametrize("variant", ["qwen3_moe", "gpt_oss"])
def test_router_logits_and_load_balancing_loss_match_transformers(saved, variant):
    """The sown router logits are PyTorch's ``output_router_logits`` (GPT-OSS's with the router's
    bias); the auxiliary loss is transformers' ``load_balancing_loss_func``, with and without a
    padding mask."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    model, params = _load(saved[variant])
    ids, mask, pos = _batch()
    _, state = model.apply({"params": params}, ids, mutable=["intermediates"])
    ours = np.asarray(state["intermediates"]["model"]["layers"]["mlp"]["router_logits"][0])
    with torch.no_grad():
        out = _torch_model(variant)(torch.tensor(ids), output_router_logits=True)
    theirs = np.stack([r.numpy() for r in out.router_logits])
    np.testing.assert_allclose(ours, theirs, **TOL)
    for m in (None, mask):
        want = load_balancing_loss_func(tuple(torch.tensor(r) for r in theirs), 4, 2,
                                        None if m is None else torch.tensor(m)).item()
        got = float(layers.load_balancing_loss(jnp.asarray(ours), 2, None if m is None else jnp.asarray(m)))
        assert got == pytest.approx(want, rel=1e-6)
    assert want > 1.0  # an unbalanced router (1.0 is a perfectly balanced one)


def test_expert_forms_on_disk(saved, tmp_path):
    """save writes what save_pretrained writes (per expert), exactly; the fused form (transformers 5's
    in-memory names) loads too; an incomplete per-expert set is reported, not half-loaded."""
    for v in ("qwen3_moe", "mixtral"):
        model, params = _load(saved[v])
        M.save(tmp_path / v, model, params)
        ref = load_file(str(saved[v] / "model.safetensors"))
        back = load_file(str(tmp_path / v / "model.safetensors"))
        assert set(back) == set(ref)
        for k in ref:
            np.testing.assert_array_equal(back[k], ref[k], err_msg=k)
        fused = M.state_from_params(params, model)
        assert set(fused) == set(_torch_model(v).state_dict())
        (tmp_path / f"{v}_fused").mkdir()
        save_file(fused, str(tmp_path / f"{v}_fused" / "model.safetensors"))
        (tmp_path / f"{v}_fused" / "config.json").write_text((saved[v] / "config.json").read_text())
        _, p2 = _load(tmp_path / f"{v}_fused")
        jax.tree.map(np.testing.assert_array_equal, p2, params)
    sd = load_file(str(saved["qwen3_moe"] / "model.safetensors"))
    del sd["model.layers.1.mlp.experts.3.up_proj.weight"]
    model, _ = _load(saved["qwen3_moe"])
    with pytest.raises(ValueError) as e:
        M.params_from_state(sd, model)
    assert "missing 1: ['model.layers.1.mlp.experts.gate_up_proj']" in str(e.value)
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in str(e.value)  # left unconsumed: unexpected


def test_config_fields_and_refusals(saved):
    c = M.config_from_hf(saved["qwen3_moe"])
    assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.norm_topk_prob, c.qk_norm) == \
        (4, 2, 16, False, True)
    m = M.config_from_hf(saved["mixtral"])
    assert (m.num_experts, m.moe_intermediate_size, m.norm_topk_prob, m.sliding_window) == (4, 48, True, 6)
    hash(c)
    for mt, field, value in (("qwen3_moe", "decoder_sparse_step", 2), ("qwen3_moe", "mlp_only_layers", [0]),
                             ("mixtral", "router_jitter_noise", 0.1)):
        with pytest.raises(ValueError, match=re.escape(f"{field}={value!r}")):
            M.config_from_hf({"model_type": mt, "num_hidden_layers": 2, field: value})
    with pytest.raises(ValueError, match="moe_impl"):
        M.config_from_hf(saved["mixtral"], moe_impl="sparse")
    g = M.config_from_hf(saved["gpt_oss"])
    assert (g.layer_types, g.layer_windows, g.attention_sinks, g.moe_bias, g.swiglu_limit, g.qkv_bias, g.o_bias) == \
        (("sliding_attention", "full_attention"), (4, 0), True, True, 0.5, True, True)
    with pytest.raises(ValueError, match="quantization_config"):
        M.config_from_hf({"model_type": "gpt_oss", "num_hidden_layers": 2, "quantization_config": {"quant_method": "mxfp4"}})
    with pytest.raises(ValueError, match="layer_types must list one of"):
        M.config_from_hf(saved["gpt_oss"], layer_types=("sliding_attention",))
    # the exported config round-trips through transformers
    for v in ("qwen3_moe", "mixtral", "gpt_oss"):
        model, _ = _load(saved[v])
        d = M.hf_config_dict(model)
        back = M.config_from_hf(tf.AutoConfig.for_model(**d).to_dict())
        assert back == model.config.replace(moe_impl=None) or back.replace(moe_impl="dense") == model.config


@pytest.mark.parametrize("impl", IMPLS)
def test_wrap_keeps_expert_lora_factorized(saved, impl):
    """LoRA on the experts (one adapter per layer and expert, 'ssio') through lora.wrap, in either
    expert computation: no MaterializeWarning, the merged model's logits and the
    merged gradients for every expert's factors through the scanned layers (the ragged_dot rule's own
    tests are tests/test_interpreter_moe.py's)."""
    model, params = _load(saved["mixtral"], impl)
    items = dict(lora_items(jax.eval_shape(lambda p: lora.init(p, hf.rules_for(model, "all-linear", rank=2), 0),
                                           params)))
    assert items["model/layers/mlp/experts/gate_up_proj"].layout == "ssio"
    assert items["model/layers/mlp/experts/gate_up_proj"].a.shape == (2, 4, 32, 2)
    assert "model/layers/mlp/gate/kernel" not in items  # the router is no nn.Linear in PyTorch: not all-linear
    lp = lora.init(params, hf.rules_for(model, "experts", rank=2, init=False), jax.random.key(0))
    ids = _batch()[0]
    fwd = jax.jit(lora.wrap(lambda p: model.apply({"params": p}, ids)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", lora.MaterializeWarning)
        ours = np.asarray(fwd(lp))
        assert ("ragged_dot" in str(jax.make_jaxpr(fwd)(lp))) == (impl == "ragged")
    plain = jax.jit(lambda p: model.apply({"params": p}, ids))
    ref = np.asarray(plain(lora.merge(lp)))
    np.testing.assert_allclose(ours, ref, **TOL)
    assert np.abs(ref - np.asarray(plain(params))).max() > 0.1

    # gradients for every expert's (A, B) through the scanned layers: factorized = merged
    train, frozen = lora.split(lp)

    def loss(t, merged):
        p = lora.combine(t, frozen)
        f = (lambda p: model.apply({"params": lora.merge(p)}, ids)) if merged else \
            lora.wrap(lambda p: model.apply({"params": p}, ids))
        return jnp.sum(jnp.sin(f(p)))

    with warnings.catch_warnings():
        warnings.simplefilter("error", lora.MaterializeWarning)
        v, g = jax.jit(jax.value_and_grad(loss), static_argnums=1)(train, False)
    v_ref, g_ref = jax.jit(jax.value_and_grad(loss), static_argnums=1)(train, True)
    np.testing.assert_allclose(v, v_ref, rtol=1e-5)
    leaves, ref_leaves = jax.tree.leaves(g), jax.tree.leaves(g_ref)
    assert len(leaves) == 4 and all(np.abs(b).max() > 0 for b in ref_leaves)
    for a, b in zip(leaves, ref_leaves):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())
    assert all(np.abs(a).max() > 0 for a in jax.tree.leaves(g))


def _experts_and_attention(**kw):
    return LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], **kw)


def _perturb(pm, seed=1, scale=0.1):
    """PEFT's init with B = 0 made non-trivial: every lora_B random (std ``scale``)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return pm


@pytest.mark.parametrize("variant", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_peft_target_parameters_both_ways(saved, tmp_path, variant):
    """(1) PEFT's adapter on the experts (target_parameters, a per-layer rank_pattern) and attention
    loads with PeftModel's logits through lora.wrap; (2) save_peft of it loads in PeftModel with
    lora_jax's logits and back exactly; (3) save_merged loads in transformers with the same logits."""
    d = saved[variant]
    base = tf.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    cfg = _experts_and_attention(rank_pattern={"model.layers.1.mlp.experts.down_proj": 3})
    torch.manual_seed(1)
    pm = _perturb(get_peft_model(base, cfg).eval())
    pm.save_pretrained(tmp_path / "theirs")
    ids, mask, pos = _batch()
    keep = mask.astype(bool)
    ref = _torch_logits(pm, ids, mask, pos)
    with pm.disable_adapter():
        plain = _torch_logits(pm, ids, mask, pos)
    assert np.abs(ref - plain)[keep].max() > 0.1  # the adapter matters

    model, params = _load(d, "ragged")
    tree = hf.load_peft(tmp_path / "theirs", params, model)
    items = dict(lora_items(tree))
    assert items["model/layers/mlp/experts/down_proj"].rank == 3 and len(items) == 4
    fwd = lora.wrap(lambda p, ids, m, pos: model.apply({"params": p}, ids, attention_mask=m, positions=pos))
    ours = np.asarray(jax.jit(fwd)(tree, ids, mask, pos))
    np.testing.assert_allclose(ours[keep], ref[keep], **TOL)

    hf.save_peft(tmp_path / "ours", tree, model)
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    again = PeftModel.from_pretrained(
        tf.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager"), tmp_path / "ours").eval()
    np.testing.assert_allclose(_torch_logits(again, ids, mask, pos)[keep], ours[keep], **TOL)
    back = hf.load_peft(tmp_path / "ours", params, model)
    jax.tree.map(np.testing.assert_array_equal, lora.split(back)[0], lora.split(tree)[0])

    hf.save_merged(tmp_path / "merged", model, tree)
    merged = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    np.testing.assert_allclose(_torch_logits(merged, ids, mask, pos)[keep], ours[keep], **TOL)


def test_trained_expert_adapter_loads_in_peft(saved, tmp_path):
    """An adapter made here (the experts of one layer, the router of every layer, non-zero B) is
    PeftModel's too."""
    model, params = _load(saved["qwen3_moe"])
    rules = lora.Rules([lora.Rule(["gate_up_proj", "down_proj"], stack_axes=2), lora.Rule(["mlp/gate"])],
                       rank=2, alpha=4, init=False, stack_axes=1, layers=[1])
    lp = lora.init(params, rules, jax.random.key(3))
    hf.save_peft(tmp_path / "ad", lp, model)
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == [] and cfg["target_parameters"] == [
        "model.layers.1.mlp.experts.down_proj", "model.layers.1.mlp.experts.gate_up_proj",
        "model.layers.1.mlp.gate.weight"]
    keys = set(load_file(str(tmp_path / "ad" / "adapter_model.safetensors")))
    assert keys == {f"base_model.model.model.layers.1.mlp.{m}lora_{f}.weight"
                    for m in ("experts.", "experts.base_layer.", "gate.") for f in "AB"}
    ids = _batch()[0]
    ours = np.asarray(lora.wrap(lambda p: model.apply({"params": p}, ids))(lp))
    pm = PeftModel.from_pretrained(
        tf.AutoModelForCausalLM.from_pretrained(saved["qwen3_moe"], attn_implementation="eager"), tmp_path / "ad")
    np.testing.assert_allclose(_torch_logits(pm.eval(), ids), ours, **TOL)
    assert np.abs(ours - _torch_logits(_torch_model("qwen3_moe"), ids)).max() > 0.1


def test_expert_rules_that_match_nothing_are_errors(saved, tmp_path):
    """Never a silent no-op: the experts preset on a dense model, PEFT target_parameters that match
    no parameter, and expert factors PEFT cannot express are all errors naming the cause."""
    dense = tf.LlamaForCausalLM(tf.LlamaConfig(**{k: v for k, v in BASE.items() if k != "num_experts_per_tok"}))
    dense.save_pretrained(tmp_path / "llama")
    lmodel, lparams = M.load(tmp_path / "llama")
    with pytest.raises(ValueError, match="'experts' preset .* has none"):
        hf.rules_for(lmodel, "experts")

    model, params = _load(saved["qwen3_moe"])
    lp = lora.init(params, hf.rules_for(model, "experts", rank=2, init=False), jax.random.key(0))
    hf.save_peft(tmp_path / "ad", lp, model)
    cfg_file = tmp_path / "ad" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["target_parameters"] = ["mlp.experts.gate_up"]
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        hf.load_peft(tmp_path / "ad", params, model)
    msg = str(e.value)
    assert "target_parameters ['mlp.experts.gate_up'] match no parameter" in msg
    assert "unexpected: base_model.model.model.layers.0.mlp.experts.lora_A.weight" in msg  # listed together

    cfg["target_parameters"] = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    cfg_file.write_text(json.dumps(cfg))
    sd = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    del sd["base_model.model.model.layers.1.mlp.experts.lora_B.weight"]
    sd["base_model.model.model.layers.0.mlp.experts.lora_A.weight"] = np.zeros((3, 16), np.float32)
    save_file(sd, str(tmp_path / "ad" / "adapter_model.safetensors"))
    with pytest.raises(ValueError) as e:
        hf.load_peft(tmp_path / "ad", params, model)
    msg = str(e.value)
    assert "2 problem(s)" in msg and "incomplete: model.layers.1.mlp.experts.down_proj" in msg
    assert "model.layers.0.mlp.experts.down_proj lora_A is (3, 16), expected (8, 16)" in msg

    wrong = lora.init(params, lora.Rules(["gate_up_proj"], rank=2, stack_axes=1), jax.random.key(0))
    dropout = lora.init(params, hf.rules_for(model, "experts", rank=2, dropout=0.1), jax.random.key(0))
    for tree, why in ((wrong, "layout 'siio', but this leaf is 'ssio'"), (dropout, "refuses lora_dropout")):
        with pytest.raises(ValueError, match=why):
            hf.save_peft(tmp_path / "bad", tree, model)
    assert not (tmp_path / "bad").exists()


def test_peft_all_linear_adapter_with_the_router_matches_peft(saved, tmp_path):
    """PEFT 0.21's "all-linear" on an MoE model adapts attention, the experts and the router
    (``target_parameters`` ``gate.weight``, a 2-D ParamWrapper); it loads here with its logits."""
    d = saved["mixtral"]
    torch.manual_seed(2)
    pm = _perturb(get_peft_model(tf.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval(),
                                 LoraConfig(r=2, lora_alpha=4, target_modules="all-linear")).eval(), seed=2)
    pm.save_pretrained(tmp_path / "all")
    assert sorted(json.loads((tmp_path / "all" / "adapter_config.json").read_text())["target_parameters"]) == [
        "down_proj", "gate.weight", "gate_up_proj"]
    model, params = _load(d)
    tree = hf.load_peft(tmp_path / "all", params, model)
    assert "model/layers/mlp/gate/kernel" in dict(lora_items(tree))
    ids = _batch()[0]
    ours = np.asarray(jax.jit(lora.wrap(lambda p: model.apply({"params": p}, ids)))(tree))
    np.testing.assert_allclose(ours, _torch_logits(pm, ids), **TOL)


def test_moe_step_benchmark_tiny(capsys):
    """benchmarks/moe_step.py runs and prints its JSON; wrap and merged take the same steps."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "moe_step.py")
    spec = importlib.util.spec_from_file_location("moe_step", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--dim", "16", "--ffn", "8", "--experts", "4", "--tokens", "32", "--seq", "16", "--rank", "2",
                "--steps", "2", "--impls", "dense"])  # the ragged path's wrap is test_wrap_keeps_...'s
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(r["step_ms"]) == {f"dense/{k}" for k in ("wrap", "merged", "frozen")}
    assert r["loss_last"]["dense/wrap"] == pytest.approx(r["loss_last"]["dense/merged"], rel=1e-4)
    assert r["ratios"]["dense/merged_over_wrap"] > 0


def test_transformers4_per_expert_adapter_loads_as_peft_fuses_it(saved, tmp_path):
    """An adapter of transformers 4's per-expert modules (Mixtral's ``experts.{j}.w1/w3/w2``, as PEFT
    saved them then) loads with the logits PeftModel gives after its own v4 -> v5 fusion (w1|w3 into
    gate_up_proj at twice the rank); a missing expert is reported."""
    d = saved["mixtral"]
    rs = np.random.RandomState(0)
    sd = {}
    for i in range(2):
        for j in range(4):
            for w, (n_in, n_out) in (("w1", (32, 48)), ("w3", (32, 48)), ("w2", (48, 32))):
                k = f"base_model.model.model.layers.{i}.block_sparse_moe.experts.{j}.{w}"
                sd[k + ".lora_A.weight"] = (0.3 * rs.randn(2, n_in)).astype(np.float32)
                sd[k + ".lora_B.weight"] = (0.3 * rs.randn(n_out, 2)).astype(np.float32)
    (tmp_path / "v4").mkdir()
    save_file(sd, str(tmp_path / "v4" / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "v4" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4, "target_modules": ["w1", "w2", "w3"],
         "lora_dropout": 0.0, "bias": "none"}))
    pm = PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager"),
                                   tmp_path / "v4").eval()
    ids = _batch()[0]
    ref = _torch_logits(pm, ids)
    model, params = _load(d)
    tree = hf.load_peft(tmp_path / "v4", params, model)
    assert dict(lora_items(tree))["model/layers/mlp/experts/gate_up_proj"].rank == 4
    ours = np.asarray(jax.jit(lora.wrap(lambda p: model.apply({"params": p}, ids)))(tree))
    np.testing.assert_allclose(ours, ref, **TOL)
    assert np.abs(ref - _torch_logits(_torch_model("mixtral"), ids)).max() > 0.1
    del sd["base_model.model.model.layers.1.block_sparse_moe.experts.2.w3.lora_B.weight"]
    save_file(sd, str(tmp_path / "v4" / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"incomplete: model.layers.1.mlp.experts.gate_up_proj per expert.*"
                                         r"experts.2.w3"):
        hf.load_peft(tmp_path / "v4", params, model)

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lora
import lora_jax.hf
from lora_jax.rules import path_str

from helpers import nonzero_b, per_layer_tree, tiny_model


def selected(params, rules):
    lp = lora.init(params, rules, 0)
    return {p: lw for p, lw in lora.tree.lora_items(lp)}


def test_names_suffix_match_on_llama():
    # an unrolled model (one subtree per layer, as Equinox / plain-JAX models): one adapter per layer's kernel
    params = per_layer_tree("llama")
    got = selected(params, lora.Rules(["q_proj", "v_proj"], rank=4))
    assert sorted(got) == [f"model/layers/{i}/self_attn/{n}/kernel" for i in range(2) for n in ("q_proj", "v_proj")]
    # Flax Dense kernels are (in, out): a is (in, r), b is (r, out)
    lw = got["model/layers/0/self_attn/v_proj/kernel"]
    assert lw.layout == "io" and lw.a.shape == (32, 4) and lw.b.shape == (4, 16)
    # our Llama stacks its layers under nn.scan: one kernel per module, an adapter per layer index
    model = tiny_model("llama")
    got = selected(model.params, lora.Rules(["q_proj", "v_proj"], rank=4, stack_axes=1))
    assert sorted(got) == [f"model/layers/self_attn/{n}/kernel" for n in ("q_proj", "v_proj")]
    lw = got["model/layers/self_attn/v_proj/kernel"]
    assert lw.layout == "sio" and lw.a.shape == (2, 32, 4) and lw.b.shape == (2, 4, 16) and lw.layer_mask is None
    # PEFT's default Llama targets (q_proj, v_proj) select the same kernels
    assert sorted(selected(model.params, lora_jax.hf.rules_for(model.module, "peft", rank=4))) == sorted(got)


def test_dotted_and_slashed_names():
    params = per_layer_tree("llama")
    got = selected(params, lora.Rules(["self_attn.q_proj", "mlp/up_proj"], rank=2))
    assert len(got) == 4 and all(("q_proj" in p) or ("up_proj" in p) for p in got)
    got = selected(tiny_model("llama").params, lora.Rules(["self_attn.q_proj", "mlp/up_proj"], rank=2, stack_axes=1))
    assert sorted(got) == ["model/layers/mlp/up_proj/kernel", "model/layers/self_attn/q_proj/kernel"]


def test_regex_full_match_on_module_or_leaf_path():
    stacked = tiny_model("llama").params
    got = selected(stacked, lora.Rules(r"model/layers/self_attn/(q|k)_proj", rank=2, stack_axes=1))
    assert sorted(got) == ["model/layers/self_attn/k_proj/kernel", "model/layers/self_attn/q_proj/kernel"]
    params = per_layer_tree("llama")
    got = selected(params, lora.Rules(r"model/layers/1/self_attn/(q|k)_proj", rank=2))
    assert sorted(got) == ["model/layers/1/self_attn/k_proj/kernel", "model/layers/1/self_attn/q_proj/kernel"]
    got = selected(params, lora.Rules(r".*o_proj/kernel", rank=2))
    assert sorted(got) == [f"model/layers/{i}/self_attn/o_proj/kernel" for i in range(2)]
    # full match: a partial regex selects nothing
    with pytest.raises(ValueError, match="matched no kernel"):
        lora.init(params, lora.Rules(r"q_pro.", rank=2), 0)
    # a plain name in a string is a module name
    assert len(selected(params, lora.Rules("q_proj", rank=2))) == 2


def test_all_linear_skips_head_and_embeddings():
    params = per_layer_tree("llama")
    got = selected(params, lora.Rules("all-linear", rank=2))
    assert len(got) == 2 * 7
    assert not any("lm_head" in p or "embed" in p for p in got)
    got = selected(params, lora.Rules("all-linear", rank=2, include_head=True))
    assert "lm_head/kernel" in got and len(got) == 15
    bert = selected(per_layer_tree("bert"), lora.Rules("all-linear", rank=2))
    assert not any("classifier" in p or "embeddings" in p for p in bert)
    assert "bert/pooler/dense/kernel" in bert and len(bert) == 2 * 6 + 1
    # the stacked trees: the 7 layer kernels of our Llama, stacked
    got = selected(tiny_model("llama").params, lora.Rules("all-linear", rank=2, stack_axes=1))
    assert len(got) == 7 and all(p.startswith("model/layers/") and lw.layout == "sio" for p, lw in got.items())
    # BERT's pooler is not stacked: rules_for gives it its own rule (stack_axes=0)
    bert_model = tiny_model("bert")
    bert = selected(bert_model.params, lora_jax.hf.rules_for(bert_model.module, "all-linear", rank=2))
    assert not any("classifier" in p or "embeddings" in p for p in bert)
    assert bert["bert/pooler/dense/kernel"].layout == "io" and len(bert) == 6 + 1
    assert sum(lw.layout == "sio" for lw in bert.values()) == 6


def test_gpt2_out_in_layout():
    # GPT-2 unrolled with its Conv1D kernels stored (out, in), one subtree per layer
    params = per_layer_tree("gpt2")
    got = selected(params, lora.Rules([lora.Rule(["c_attn", "c_fc"], layout="out_in")], rank=4))
    assert len(got) == 2 * 2
    lw = got["transformer/h/0/attn/c_attn/kernel"]
    assert lw.w.shape == (96, 32) and lw.layout == "oi"
    assert lw.a.shape == (32, 4) and lw.b.shape == (4, 96)
    # Kaiming bound uses fan-in = in features = 32
    assert float(jnp.abs(lw.a).max()) <= 1 / np.sqrt(32)
    # our GPT-2 keeps (in, out) kernels stacked over layers: same factors, one per layer
    got = selected(tiny_model("gpt2").params, lora.Rules(["c_attn", "c_fc"], rank=4, stack_axes=1))
    lw = got["transformer/h/attn/c_attn/kernel"]
    assert lw.w.shape == (2, 32, 96) and lw.layout == "sio"
    assert lw.a.shape == (2, 32, 4) and lw.b.shape == (2, 4, 96)
    assert float(jnp.abs(lw.a).max()) <= 1 / np.sqrt(32)


def test_exclude_layers_and_patterns():
    params = per_layer_tree("llama")
    rules = lora.Rules(["q_proj", "k_proj", "v_proj"], rank=4, alpha=8, exclude=["k_proj"], layers=[1],
                       rank_pattern={"v_proj": 2}, alpha_pattern={r".*q_proj": 16})
    got = selected(params, rules)
    assert sorted(got) == ["model/layers/1/self_attn/q_proj/kernel", "model/layers/1/self_attn/v_proj/kernel"]
    assert got["model/layers/1/self_attn/v_proj/kernel"].rank == 2
    assert got["model/layers/1/self_attn/q_proj/kernel"].alpha == 16
    assert got["model/layers/1/self_attn/q_proj/kernel"].rank == 4
    # on stacked kernels layers= selects stack indices: the other layers get no delta
    stacked = tiny_model("llama").params
    rules = lora.Rules(["q_proj", "k_proj", "v_proj"], rank=4, alpha=8, exclude=["k_proj"], layers=[1], stack_axes=1,
                       rank_pattern={"v_proj": 2}, alpha_pattern={r".*q_proj": 16})
    lp = nonzero_b(lora.init(stacked, rules, 0))
    got = dict(lora.tree.lora_items(lp))
    assert sorted(got) == ["model/layers/self_attn/q_proj/kernel", "model/layers/self_attn/v_proj/kernel"]
    v, q = got["model/layers/self_attn/v_proj/kernel"], got["model/layers/self_attn/q_proj/kernel"]
    assert v.rank == 2 and q.alpha == 16 and q.rank == 4 and v.alpha == 8
    assert q.layer_mask == v.layer_mask == (False, True)
    for lw in (q, v):
        delta = np.asarray(lw.delta())
        assert np.all(delta[0] == 0) and np.abs(delta[1]).min() > 0
    with pytest.raises(ValueError, match="matched no kernel"):
        lora.init(stacked, lora.Rules(["q_proj"], layers=[5], stack_axes=1), 0)


def test_linen_style_layer_names_and_rules_order():
    params = {"layers_0": {"proj": {"kernel": jnp.ones((4, 6))}}, "layers_3": {"proj": {"kernel": jnp.ones((4, 6))}}}
    got = selected(params, lora.Rules(["proj"], rank=2, layers=3))
    assert list(got) == ["layers_3/proj/kernel"]
    # first matching rule wins
    rules = lora.Rules([lora.Rule("layers_0/proj", rank=1), lora.Rule(["proj"], rank=3)])
    got = selected(params, rules)
    assert got["layers_0/proj/kernel"].rank == 1 and got["layers_3/proj/kernel"].rank == 3


def test_stacked_and_nd_kernels():
    params = {"scan": {"q": {"kernel": jnp.ones((3, 16, 4, 8))}, "o": {"kernel": jnp.ones((3, 4, 8, 16))}}}
    rules = lora.Rules([lora.Rule("q", layout="ioo"), lora.Rule("o", in_axes=(0, 1))], rank=4, stack_axes=1,
                       layers=[0, 2])
    got = selected(params, rules)
    q, o = got["scan/q/kernel"], got["scan/o/kernel"]
    assert q.layout == "sioo" and q.a.shape == (3, 16, 4) and q.b.shape == (3, 4, 4, 8)
    assert o.layout == "siio" and o.a.shape == (3, 4, 8, 4) and o.b.shape == (3, 4, 16)
    assert q.layer_mask == (True, False, True)


def test_nnx_state_paths():
    from flax import nnx

    class M(nnx.Module):
        def __init__(self):
            self.up = nnx.Linear(4, 8, rngs=nnx.Rngs(0))
            self.down = nnx.Linear(8, 4, rngs=nnx.Rngs(1))

    _, state = nnx.split(M())
    got = selected(state, lora.Rules(["up"], rank=2))
    assert list(got) == ["up/kernel"]
    assert path_str(jax.tree_util.tree_flatten_with_path(state)[0][0][0]) == "down/bias"


def test_errors_name_what_was_given():
    stacked = tiny_model("llama").params
    with pytest.raises(ValueError, match=r"model/layers/self_attn/k_proj/kernel: rank 64 is larger than "
                                         r"min\(in=32, out=16\) for a kernel of shape \(2, 32, 16\) with layout 'sio'"):
        lora.init(stacked, lora.Rules(["k_proj"], rank=64, stack_axes=1), 0)
    params = per_layer_tree("llama")
    with pytest.raises(ValueError) as e:
        lora.init(params, lora.Rules(["query", "value"], rank=4), 0)
    msg = str(e.value)
    assert "['query', 'value']" in msg and "model/layers/0/self_attn/q_proj/kernel" in msg
    with pytest.raises(ValueError, match=r"model/layers/0/self_attn/k_proj/kernel: rank 64 is larger than "
                                         r"min\(in=32, out=16\)"):
        lora.init(params, lora.Rules(["k_proj"], rank=64), 0)
    with pytest.raises(ValueError, match="alpha must be a positive"):
        lora.Rules(["q_proj"], alpha=0)
    with pytest.raises(ValueError, match="alpha must be a positive"):
        lora.Rules(["q_proj"], alpha=-1.0)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        lora.Rules(["q_proj"], rank=0)
    with pytest.raises(ValueError, match=r"model/layers/0/self_attn/q_proj/kernel: unknown init 'xavier'"):
        lora.init(params, lora.Rules(["q_proj"], init="xavier"), 0)
    with pytest.raises(ValueError, match=r"layout 'iio' has 3 letters but the kernel has shape \(32, 32\)"):
        lora.init(params, lora.Rules(["q_proj"], layout="iio"), 0)
    with pytest.raises(ValueError, match=r"'\(\[' is not a valid regular expression"):
        lora.Rules("([")
    with pytest.raises(ValueError, match="dropout must be"):
        lora.Rules(["q_proj"], dropout=1.0)
    with pytest.raises(TypeError, match="module names must be non-empty strings"):
        lora.Rules(["q_proj", 3])

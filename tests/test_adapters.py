"""Several adapters in one tree, per-example routing, fused-slice adapters, fully trained leaves."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lora

from helpers import f64, nonzero_b, peft_linear, per_layer_tree, rand, tiny_model
from test_interpreter import _rel_close, check_equivalence


def two_adapters(params, targets=("l1", "l2")):
    lp = nonzero_b(lora.init(params, lora.Rules(list(targets), rank=2, alpha=4), 0), seed=1)
    lp = lora.add(lp, "b", lora.Rules([targets[0]], rank=3, alpha=3), 1)
    return jax.tree_util.tree_map(  # give the new adapter a non-zero b too
        lambda x: x.replace(b=rand(7, x.b.shape, scale=0.2)) if lora.is_lora(x) and x.name == "b" else x, lp,
        is_leaf=lora.is_lora)


def mlp(p, x):
    return jnp.tanh(x @ p["l1"]) @ p["l2"]


PARAMS = {"l1": rand(0, (8, 16)), "l2": rand(1, (16, 4))}


def test_add_select_delete_and_sum_of_active_deltas():
    lp = two_adapters(PARAMS)
    assert lora.adapter_names(lp) == ["default", "b"]
    l1 = lp["l1"]
    assert [n.name for n in l1.chain()] == ["default", "b"] and l1.base is PARAMS["l1"]
    x = rand(2, (5, 8))
    d_default = l1.chain()[0].lora_delta()
    d_b = l1.lora_delta()
    both = {"l1": PARAMS["l1"] + d_default + d_b, "l2": lp["l2"].merge()}
    _rel_close(lora.wrap(mlp)(lp, x), mlp(both, x), 2e-6)  # both active: deltas add up
    _rel_close(lora.merge(lp)["l1"], both["l1"], 1e-6)
    only_b = lora.select(lp, "b")
    _rel_close(lora.wrap(mlp)(only_b, x), mlp({"l1": PARAMS["l1"] + d_b, "l2": PARAMS["l2"]}, x), 2e-6)
    none = lora.select(lp, [])
    np.testing.assert_array_equal(lora.wrap(mlp)(none, x), mlp(PARAMS, x))
    check_equivalence(mlp, lp, x)
    gone = lora.delete(lp, "b")
    assert lora.adapter_names(gone) == ["default"] and gone["l1"].chain()[0].name == "default"
    assert not lora.is_lora(lora.delete(gone, "default")["l1"])
    with pytest.raises(ValueError, match=r"no adapter named \['c'\]; the tree has \['default', 'b'\]"):
        lora.select(lp, "c")
    with pytest.raises(ValueError, match="already holds an adapter named 'b'"):
        lora.add(lp, "b", lora.Rules(["l1"], rank=1), 2)
    back = lora.unmerge(lora.merge(lp), lp)
    _rel_close(back["l1"], PARAMS["l1"], 1e-6)


def test_freeze_trains_only_selected_adapters():
    lp = lora.select(two_adapters(PARAMS), "b")
    tx = lora.freeze(optax.adamw(1e-2, weight_decay=0.1), lp)
    trainable, frozen = lora.split(lp)
    state = tx.init(trainable)
    n_state = sum(x.size for x in jax.tree_util.tree_leaves(state) if x.ndim)
    assert n_state == 2 * (8 * 3 + 3 * 16)  # moments for adapter "b" only
    g = jax.grad(lambda t: jnp.sum(lora.wrap(mlp)(lora.combine(t, frozen), rand(3, (4, 8))) ** 2))(trainable)
    u, _ = tx.update(g, state, trainable)
    new = optax.apply_updates(trainable, u)
    # "default" is inactive: its factors lie in the frozen half, out of reach of the update (and weight decay)
    assert new["l1"].w.a is None and new["l2"].a is None and frozen["l2"].a is lp["l2"].a
    assert not np.array_equal(new["l1"].a, trainable["l1"].a)


@pytest.mark.parametrize("jit", [False, True])
def test_routing_equals_each_example_alone(jit):
    lp = two_adapters(PARAMS)
    x = rand(4, (6, 8))
    ids = jnp.array([0, 1, -1, 1, 0, -1])
    f = lambda ids, x: lora.wrap(mlp, adapter_ids=ids)(lp, x)  # noqa: E731
    got = jax.jit(f)(ids, x) if jit else f(ids, x)
    names = lora.adapter_names(lp)
    for e, k in enumerate(np.asarray(ids)):
        sel = lora.select(lp, [] if k < 0 else [names[k]])
        _rel_close(got[e], mlp(lora.merge(sel), x[e:e + 1])[0], 2e-6, f"example {e}")


def test_routing_through_a_llama_model_and_gradients():
    model = tiny_model("llama")  # layers under nn.scan: stacked kernels, sliced per scan step
    rules = lora.Rules([lora.Rule(["q_proj", "v_proj"], stack_axes=1), lora.Rule(["embed_tokens"])], rank=2)
    lp = nonzero_b(lora.init(model.params, rules, 0), seed=2)
    lp = nonzero_b(lora.add(lp, "other", lora.Rules(["q_proj", "o_proj"], rank=4, stack_axes=1), 1), seed=3)
    assert [n.name for n in lp["model"]["layers"]["self_attn"]["q_proj"]["kernel"].chain()] == ["default", "other"]
    ids = (jnp.arange(15).reshape(3, 5) * 11) % 90
    route = jnp.array([1, -1, 0])
    f = model.apply
    got = jax.jit(lambda p, r, ids: lora.wrap(f, adapter_ids=r)(p, ids))(lp, route, ids)
    for e, k in enumerate([1, -1, 0]):
        sel = lora.select(lp, [] if k < 0 else [lora.adapter_names(lp)[k]])
        _rel_close(got[e], f(lora.merge(sel), ids[e:e + 1])[0], 2e-6, f"example {e}")
    # a routed batch trains each adapter on its own examples only
    t, fr = lora.split(lp)
    g = jax.grad(lambda t: jnp.sum(lora.wrap(f, adapter_ids=jnp.array([0, 0, 0]))(lora.combine(t, fr), ids)))(t)
    assert np.all(np.asarray(g["model"]["layers"]["self_attn"]["o_proj"]["kernel"].b) == 0)
    assert np.abs(np.asarray(g["model"]["layers"]["self_attn"]["v_proj"]["kernel"].b)).max() > 0


def test_routing_needs_factorized_uses():
    lp = two_adapters(PARAMS)
    with pytest.raises(ValueError, match="per-example routing"):
        lora.wrap(lambda p, x: x @ jnp.cumsum(p["l1"], 0), adapter_ids=jnp.array([0, 1]))(lp, rand(1, (2, 8)))


@pytest.mark.parametrize("method", ["cat", "svd", "linear"])
def test_combine_adapters_like_peft(method):
    from peft import LoraConfig

    w = rand(0, (12, 10))
    lp = nonzero_b(lora.init({"lin": {"kernel": w}}, lora.Rules(["lin"], rank=3, alpha=6), 0), seed=4)
    lp = nonzero_b(lora.add(lp, "two", lora.Rules(["lin"], rank=3 if method == "linear" else 2, alpha=2), 1), seed=5)
    combined = lora.combine_adapters(lp, ["default", "two"], [0.7, -1.3], method, rank=4 if method == "svd" else None)
    lw = combined["lin"]["kernel"]
    assert lw.name == "combined" and not lw.active
    a_def, a_two = lp["lin"]["kernel"].chain()
    pm, layer = peft_linear(w, LoraConfig(r=3, lora_alpha=6, target_modules=["lin"]), (a_def, None),
                            (a_two, LoraConfig(r=a_two.rank, lora_alpha=2, target_modules=["lin"])))
    pm.add_weighted_adapter(["default", "two"], [0.7, -1.3], "combined", combination_type=method,
                            svd_rank=4 if method == "svd" else None)
    peft_delta = layer.get_delta_weight("combined").detach().numpy().T  # back to (in, out)
    ours = f64(lora.select(combined, "combined")["lin"]["kernel"].merge()) - f64(w)
    np.testing.assert_allclose(ours, peft_delta, rtol=1e-4, atol=1e-5)
    if method == "cat":  # exact: the weighted sum of the deltas
        np.testing.assert_allclose(ours, 0.7 * f64(a_def.lora_delta()) - 1.3 * f64(a_two.lora_delta()), atol=1e-5)


def test_fused_qkv_slices_on_gpt2():
    # our GPT-2: c_attn (L, in=32, out=96), q | k | v along the last axis, stacked over 2 layers
    model = tiny_model("gpt2")
    rules = lora.Rules([lora.Rule(["c_attn"], enable_lora=[True, False, True])], rank=4, stack_axes=1)
    lp = nonzero_b(lora.init(model.params, rules, 0))
    lw = lp["transformer"]["h"]["attn"]["c_attn"]["kernel"]
    delta = np.asarray(lw.delta())  # (L=2, in=32, out=96)
    assert delta.shape == (2, 32, 96)
    assert np.all(delta[..., 32:64] == 0)
    assert np.all(np.abs(delta[..., :32]) > 0) and np.all(np.abs(delta[..., 64:]) > 0)
    assert lora.count(lp).trainable == 2 * (32 * 4 + 4 * 96 * 2 // 3)
    check_equivalence(model.apply, lp, (jnp.arange(12).reshape(2, 6) * 5) % 90)
    with pytest.raises(ValueError, match="enable_lora has 5 slices but the kernel has 96 output features"):
        lora.init(model.params, lora.Rules([lora.Rule(["c_attn"], enable_lora=[True] * 5)], stack_axes=1), 0)

    # GPT-2 unrolled: one subtree per layer, c_attn stored (out=96, in=32)
    params = per_layer_tree("gpt2")
    rules = lora.Rules([lora.Rule(["c_attn"], layout="out_in", enable_lora=[True, False, True])], rank=4)
    lp = nonzero_b(lora.init(params, rules, 0))
    lw = lp["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]
    delta = np.asarray(lw.delta())  # (out=96, in=32): q | k | v along the output axis
    assert np.all(delta[32:64] == 0) and np.all(np.abs(delta[:32]) > 0) and np.all(np.abs(delta[64:]) > 0)
    assert lora.count(lp).trainable == 2 * (32 * 4 + 4 * 96 * 2 // 3)

    def attention(p, x):  # GPT-2's causal self-attention (4 heads) on the (out, in) kernels, layer by layer
        t = x.shape[1]
        for i in range(2):
            attn = p["transformer"]["h"][str(i)]["attn"]
            qkv = x @ attn["c_attn"]["kernel"].T + attn["c_attn"]["bias"]
            q, k, v = (z.reshape(x.shape[0], t, 4, 8) for z in jnp.split(qkv, 3, axis=-1))
            s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8.0)
            s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e9)
            h = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v).reshape(x.shape)
            x = x + h @ attn["c_proj"]["kernel"].T + attn["c_proj"]["bias"]
        return x

    check_equivalence(attention, lp, rand(3, (2, 6, 32)))
    with pytest.raises(ValueError, match="enable_lora has 5 slices but the kernel has 96 output features"):
        lora.init(params, lora.Rules([lora.Rule(["c_attn"], layout="out_in", enable_lora=[True] * 5)]), 0)


class Classifier(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(16, name="body")(x))
        return nn.Dense(3, name="classifier")(h)


def test_modules_to_save_and_bias_train_in_full():
    m = Classifier()
    x = rand(1, (4, 8))
    params = m.init(jax.random.key(0), x)["params"]
    rules = lora.Rules(["body"], rank=2, modules_to_save=["classifier"], bias="lora_only")
    lp = nonzero_b(lora.init(params, rules, 0))
    assert isinstance(lp["classifier"]["kernel"], lora.Trainable) and isinstance(lp["classifier"]["bias"], lora.Trainable)
    assert isinstance(lp["body"]["bias"], lora.Trainable) and lora.is_lora(lp["body"]["kernel"])
    c = lora.count(lp)
    assert c.trainable == (8 * 2 + 2 * 16) + 16 + (16 * 3 + 3)
    fn = lambda p, x: m.apply({"params": p}, x)  # noqa: E731
    check_equivalence(fn, lp, x)
    trainable, frozen = lora.split(lp)
    assert len(jax.tree_util.tree_leaves(trainable)) == 5
    g = jax.grad(lambda t: jnp.sum(lora.wrap(fn)(lora.combine(t, frozen), x) ** 2))(trainable)
    plain = lora.merge(lp)
    g_ref = jax.grad(lambda p: jnp.sum(fn(p, x) ** 2))(plain)
    _rel_close(g["classifier"]["kernel"].value, g_ref["classifier"]["kernel"], 1e-6)
    _rel_close(g["body"]["bias"].value, g_ref["body"]["bias"], 1e-6)
    tx = lora.freeze(optax.sgd(0.1), lp)
    new = optax.apply_updates(lp, tx.update(jax.grad(lambda p: jnp.sum(lora.wrap(fn)(p, x) ** 2))(lp),
                                            tx.init(lp), lp)[0])
    assert not np.array_equal(new["classifier"]["kernel"].value, lp["classifier"]["kernel"].value)
    np.testing.assert_array_equal(new["body"]["kernel"].w, lp["body"]["kernel"].w)
    with pytest.raises(TypeError, match="used as an array"):
        fn(lp, x)
    with pytest.raises(TypeError, match="lora.Trainable leaf"):
        jnp.asarray(lp["classifier"]["kernel"])
    with pytest.raises(ValueError, match="modules_to_save names \\['head'\\] matched no leaf"):
        lora.init(params, lora.Rules(["body"], modules_to_save=["head"]), 0)
    with pytest.raises(ValueError, match="both a LoRA target and in modules_to_save"):
        lora.init(params, lora.Rules(["body"], modules_to_save=["body"]), 0)

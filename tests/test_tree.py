import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import lora_jax as lora
from lora_jax.tree import lora_items

from helpers import f64, nonzero_b, per_layer_tree, rand, tiny_model


def mlp_params(dtype=jnp.float32):
    return {"l1": {"kernel": rand(0, (16, 32), dtype), "bias": rand(1, (32,), dtype)},
            "l2": {"kernel": rand(2, (32, 8), dtype), "bias": rand(3, (8,), dtype)}}


def test_kaiming_init_matches_peft():
    torch = pytest.importorskip("torch")
    lp = lora.init({"k": jnp.ones((256, 64))}, lora.Rules("k", rank=32), 0)
    a = np.asarray(lp["k"].a)
    bound = 1 / np.sqrt(256)
    # the same bound PyTorch's kaiming_uniform_(a=sqrt(5)) uses on lora_A.weight (r, in)
    t = torch.empty(32, 256)
    torch.nn.init.kaiming_uniform_(t, a=np.sqrt(5))
    assert abs(float(t.abs().max()) - bound) < 0.02 * bound
    assert a.max() <= bound and a.min() >= -bound
    assert abs(a.std() - bound / np.sqrt(3)) < 0.05 * bound  # uniform on [-bound, bound]
    assert np.all(np.asarray(lp["k"].b) == 0)
    assert lp["k"].a.dtype == jnp.float32


def test_gaussian_init_and_dtypes():
    lp = lora.init({"k": jnp.ones((256, 128), jnp.bfloat16)}, lora.Rules("k", rank=16, init="gaussian"), 0)
    a = np.asarray(lp["k"].a)
    assert lp["k"].a.dtype == jnp.float32 and lp["k"].b.dtype == jnp.float32  # f32 factors for a bf16 base
    assert abs(a.std() - 1 / 16) < 0.05 / 16 and abs(a.mean()) < 0.01
    lp = lora.init({"k": jnp.ones((8, 8), jnp.bfloat16)}, lora.Rules("k", rank=2, a_dtype="base"), 0)
    assert lp["k"].a.dtype == jnp.bfloat16


def test_init_is_deterministic_per_path():
    p = mlp_params()
    one = lora.init(p, lora.Rules(["l1"], rank=2), 7)
    both = lora.init(p, lora.Rules(["l1", "l2"], rank=2), 7)
    np.testing.assert_array_equal(one["l1"]["kernel"].a, both["l1"]["kernel"].a)
    other = lora.init(p, lora.Rules(["l1"], rank=2), 8)
    assert not np.array_equal(one["l1"]["kernel"].a, other["l1"]["kernel"].a)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_merge_at_init_is_bit_exact(dtype):
    p = mlp_params(dtype)
    merged = lora.merge(lora.init(p, lora.Rules(["l1", "l2"], rank=4), 0))
    for x, y in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(merged)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_merge_matches_numpy_float64(dtype, tol):
    p = mlp_params(dtype)
    lp = nonzero_b(lora.init(p, lora.Rules(["l1", "l2"], rank=4, alpha=12, use_rslora=True), 0))
    merged = lora.merge(lp)
    for name in ("l1", "l2"):
        lw = lp[name]["kernel"]
        ref = f64(lw.w) + 12 / np.sqrt(4) * f64(lw.a) @ f64(lw.b)
        assert merged[name]["kernel"].dtype == dtype
        np.testing.assert_allclose(f64(merged[name]["kernel"]), ref, rtol=tol, atol=tol)
    np.testing.assert_array_equal(merged["l1"]["bias"], p["l1"]["bias"])
    back = lora.unmerge(merged, lp)
    for x, y in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(back)):
        np.testing.assert_allclose(f64(x), f64(y), rtol=tol, atol=tol * 4)


def test_merge_safe_raises_and_names_kernel():
    lp = lora.init(mlp_params(), lora.Rules(["l1", "l2"], rank=2), 0)
    lp["l2"]["kernel"] = lp["l2"]["kernel"].replace(b=lp["l2"]["kernel"].b.at[0, 0].set(jnp.nan))
    assert np.isnan(np.asarray(lora.merge(lp)["l2"]["kernel"])).any()  # unsafe merge just computes
    with pytest.raises(ValueError, match=r"non-finite values in 1 merged kernel\(s\): \['l2/kernel'\]"):
        lora.merge(lp, safe=True)
    with pytest.raises(TypeError, match="outside jit"):
        jax.jit(lambda t: lora.merge(t, safe=True))(lp)


@pytest.mark.parametrize("stacked", [False, True])
def test_split_combine_round_trip_exact(stacked):
    if stacked:  # our GPT-2: (in, out) kernels stacked over its 2 layers, one LoraWeight holds both
        params, rules, n_nodes = tiny_model("gpt2").params, lora.Rules(["c_attn"], rank=2, stack_axes=1), 1
    else:  # GPT-2 unrolled: one subtree per layer, (out, in) kernels
        params, rules, n_nodes = per_layer_tree("gpt2"), lora.Rules([lora.Rule(["c_attn"], layout="out_in")], rank=2), 2
    lp = nonzero_b(lora.init(params, rules, 0))
    trainable, frozen = lora.split(lp)
    t_leaves = jax.tree_util.tree_leaves(trainable)
    assert len(t_leaves) == 2 * n_nodes  # a and b of the two layers' c_attn, nothing else
    assert sum(x.size for x in t_leaves) == 2 * (32 * 2 + 2 * 96)
    back = lora.combine(trainable, frozen)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(lp)
    for x, y in zip(jax.tree_util.tree_leaves(lp), jax.tree_util.tree_leaves(back)):
        assert x is y


def test_init_on_lora_tree_needs_add():
    lp = lora.init(mlp_params(), lora.Rules(["l1"], rank=2), 0)
    with pytest.raises(ValueError, match="already hold 1 LoRA weight"):
        lora.init(lp, lora.Rules(["l2"], rank=2), 0)
    lp2 = lora.init(lp, lora.Rules(["l1", "l2"], rank=3), 0, add=True)
    assert lp2["l1"]["kernel"] is lp["l1"]["kernel"] and lp2["l2"]["kernel"].rank == 3


def test_count_and_summary():
    lp = lora.init(mlp_params(), lora.Rules(["l1", "l2"], rank=4), 0)
    c = lora.count(lp)
    assert c.trainable == (16 + 32) * 4 + (32 + 8) * 4
    assert c.total == 16 * 32 + 32 + 32 * 8 + 8 + c.trainable
    s = lora.summary(lp)
    assert "l1/kernel" in s and "16x32" in s and f"{c.trainable:,}" in s and "trainable%" in s


def test_freeze_trains_only_adapters():
    p = mlp_params()
    lp = nonzero_b(lora.init(p, lora.Rules(["l1", "l2"], rank=4), 0))
    tx = lora.freeze(optax.adam(1e-2), lp)
    state = tx.init(lp)
    # optimizer state holds adam moments for a/b only: count bytes
    adapter_bytes = sum(x.nbytes for _, lw in lora_items(lp) for x in (lw.a, lw.b))
    state_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state) if x.ndim > 0)
    assert state_bytes == 2 * adapter_bytes

    def loss(t, x):
        m = lora.merge(t)
        h = jnp.tanh(x @ m["l1"]["kernel"] + m["l1"]["bias"])
        return jnp.sum((h @ m["l2"]["kernel"] + m["l2"]["bias"]) ** 2)

    g = jax.grad(loss)(lp, rand(5, (3, 16)))
    assert np.any(np.asarray(g["l1"]["kernel"].w) != 0)  # the raw gradient does reach w ...
    updates, state = tx.update(g, state, lp)
    new = optax.apply_updates(lp, updates)
    # ... but the update for every frozen leaf is exactly zero
    for path in ("l1", "l2"):
        np.testing.assert_array_equal(new[path]["kernel"].w, lp[path]["kernel"].w)
        np.testing.assert_array_equal(new[path]["bias"], lp[path]["bias"])
        assert not np.array_equal(new[path]["kernel"].a, lp[path]["kernel"].a)
        assert not np.array_equal(new[path]["kernel"].b, lp[path]["kernel"].b)
    # the same transformation works on the trainable half from split
    trainable, frozen = lora.split(lp)
    st2 = tx.init(trainable)
    g2 = jax.grad(lambda t: loss(lora.combine(t, frozen), rand(5, (3, 16))))(trainable)
    assert len(jax.tree_util.tree_leaves(g2)) == 4  # no gradient buffer for the base at all
    u2, _ = tx.update(g2, st2, trainable)
    np.testing.assert_allclose(u2["l1"]["kernel"].a, updates["l1"]["kernel"].a, rtol=1e-6)


def test_freeze_needs_lora():
    with pytest.raises(ValueError, match="holds no LoraWeight"):
        lora.freeze(optax.sgd(0.1), mlp_params())


# -- property test over random trees and rules ------------------------------------------------

names = st.sampled_from(["q", "k", "v", "proj", "dense", "head", "emb", "x"])


@st.composite
def trees(draw):
    n = draw(st.integers(1, 5))
    tree = {}
    for j in range(n):
        name = f"{draw(names)}{j}"
        ndim = draw(st.integers(1, 3))
        shape = tuple(draw(st.integers(1, 6)) for _ in range(ndim))
        tree[name] = {"kernel": jnp.full(shape, 0.5 + j, jnp.float32)}
    return tree


@settings(max_examples=40, deadline=None)
@given(trees(), st.lists(names, min_size=1, max_size=3), st.integers(1, 4))
def test_random_trees_and_rules(tree, targets, rank):
    rules = lora.Rules(targets, rank=rank)
    try:
        lp = lora.init(tree, rules, 0)
    except ValueError as e:  # the only documented failures: nothing matched, or rank too large
        assert "matched no kernel" in str(e) or "is larger than min" in str(e)
        return
    for path, lw in lora_items(lp):
        assert lw.w.ndim >= 2 and any(path.startswith(t) for t in targets)
        assert lw.rank == rank
    merged = lora.merge(lp)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(tree)
    for x, y in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(merged)):
        np.testing.assert_array_equal(x, y)  # identity at init
    t, f = lora.split(lp)
    assert jax.tree_util.tree_structure(lora.combine(t, f), is_leaf=lora.is_lora) == \
        jax.tree_util.tree_structure(lp, is_leaf=lora.is_lora)


def test_split_labels_and_freeze_agree_on_inactive_adapters():
    # two adapters on l1, one on l2; only "second" is active: "default"'s factors must be frozen everywhere
    p = {"l1": rand(0, (8, 16)), "l2": rand(1, (16, 4)), "bias": rand(2, (4,))}
    lp = lora.init(p, lora.Rules(["l1", "l2"], rank=2), 0)
    lp = lora.select(lora.add(lp, "second", lora.Rules(["l1"], rank=3), 1), "second")
    mask = lora.trainable_mask(lp)
    labels = lora.labels(lp)
    trainable, frozen = lora.split(lp)
    is_none = lambda x: x is None  # noqa: E731
    flat = lambda t: jax.tree_util.tree_leaves(t, is_leaf=is_none)  # noqa: E731
    assert len(flat(mask)) == len(flat(labels)) == len(flat(trainable)) == len(flat(frozen))
    for on, lab, t, f in zip(flat(mask), flat(labels), flat(trainable), flat(frozen)):
        if on is None:  # a None child (no DoRA magnitude) is None everywhere
            assert lab is None and t is None and f is None
            continue
        assert lab == (lora.optim.TRAIN if on else lora.optim.FROZEN)
        assert (t is not None) == on and (f is not None) == (not on)
    default, second = lp["l1"].chain()
    assert (mask["l1"].w.a, mask["l1"].a, mask["l2"].a) == (False, True, False)  # l2 holds "default" only
    assert trainable["l1"].w.a is None and frozen["l1"].w.a is default.a and trainable["l1"].a is second.a
    assert trainable["l2"].a is None and frozen["l2"].a is lp["l2"].a
    back = lora.combine(trainable, frozen)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(lp)
    for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(lp)):
        assert x is y
    # freeze trains exactly what split puts on the trainable side: moments for "second" alone
    tx = lora.freeze(optax.adam(1e-3), lp)
    assert sum(x.size for x in jax.tree_util.tree_leaves(tx.init(lp)) if x.ndim) == 2 * (8 * 3 + 3 * 16)
    assert sum(x.size for x in jax.tree_util.tree_leaves(tx.init(trainable)) if x.ndim) == 2 * (8 * 3 + 3 * 16)
    with pytest.raises(ValueError, match="halves of lora.split"):
        lora.combine(trainable, {"l1": 1})


def test_quantized_base_is_one_frozen_leaf_of_the_mask():
    lp = lora.quantize(lora.init({"k": rand(0, (16, 16))}, lora.Rules("k", rank=2), 0), "int8", block=16)
    assert lora.trainable_mask(lp)["k"].w is False and lora.labels(lp)["k"].w == lora.optim.FROZEN
    trainable, frozen = lora.split(lp)
    assert trainable["k"].w is None and isinstance(frozen["k"].w, lora.QuantizedArray)
    assert isinstance(lora.combine(trainable, frozen)["k"].w, lora.QuantizedArray)

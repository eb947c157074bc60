import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lora
from lora_jax.layout import check_layout, delta_from_factors, factor_shapes, from_matrix, to_matrix

from helpers import f64, rand


@pytest.mark.parametrize("shape,layout", [((6, 5), "io"), ((6, 5), "oi"), ((3, 6, 5), "sio"), ((4, 3, 5), "ioo"),
                                          ((3, 3, 4, 5), "iiio"), ((2, 4, 3, 5), "soii")])
def test_delta_matches_float64_reference(shape, layout):
    r = 2
    a_shape, b_shape = factor_shapes(shape, layout, r)
    a, b = rand(0, a_shape), rand(1, b_shape)
    got = np.asarray(delta_from_factors(a, b, layout, precision="highest"))
    # reference: build the (stack, in, out) product in float64, then put axes back in the layout's order
    s = [d for d, k in zip(shape, layout) if k == "s"]
    i = [d for d, k in zip(shape, layout) if k == "i"]
    o = [d for d, k in zip(shape, layout) if k == "o"]
    A = f64(a).reshape(int(np.prod(s)), int(np.prod(i)), r)
    B = f64(b).reshape(int(np.prod(s)), r, int(np.prod(o)))
    ref = np.einsum("sir,sro->sio", A, B).reshape(s + i + o)
    order = [j for k in "sio" for j, c in enumerate(layout) if c == k]
    ref = np.transpose(ref, np.argsort(order))
    assert got.shape == tuple(shape)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_matrix_view_round_trip():
    w = rand(0, (2, 4, 3, 5))
    m = to_matrix(w, "soii")
    assert m.shape == (2, 15, 4)
    np.testing.assert_array_equal(from_matrix(m, w.shape, "soii"), w)
    # the matrix view is the kernel as x @ W sees it: the delta of (a, b) in matrix form is a @ b
    a, b = rand(1, (2, 3, 5, 2)), rand(2, (2, 2, 4))
    d = delta_from_factors(a, b, "soii", precision="highest")
    np.testing.assert_allclose(to_matrix(d, "soii"), jnp.einsum("sir,sro->sio", a.reshape(2, 15, 2), b), rtol=1e-6)


def test_check_layout_errors():
    with pytest.raises(ValueError, match=r"layout 'io' has 2 axes but the kernel has shape \(2, 3, 4\)"):
        check_layout("io", (2, 3, 4))
    with pytest.raises(ValueError, match="at least one input"):
        check_layout("oo", (2, 3))
    with pytest.raises(ValueError, match="letters"):
        check_layout("ix", (2, 3))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_merge_unmerge_round_trip(dtype):
    w = rand(0, (16, 8), dtype)
    lw = lora.LoraWeight(w, rand(1, (16, 4)), rand(2, (4, 8), scale=0.1), layout="io", rank=4, alpha=8.0)
    merged = lw.merge()
    assert merged.dtype == dtype
    ref = f64(w) + 2.0 * f64(lw.a) @ f64(lw.b)
    tol = 1e-6 if dtype == jnp.float32 else 8e-3
    np.testing.assert_allclose(f64(merged), ref, rtol=tol, atol=tol)
    back = lw.unmerge(merged)
    np.testing.assert_allclose(f64(back), f64(w), rtol=tol, atol=tol * 4)


def test_scale_and_rslora():
    lw = lora.LoraWeight(None, None, None, layout="io", rank=16, alpha=32)
    assert lw.scale == 2.0
    assert lw.replace(rslora=True).scale == 8.0


def test_layer_mask_zeroes_masked_layers():
    w = jnp.zeros((3, 4, 5))
    lw = lora.LoraWeight(w, rand(1, (3, 4, 2)), rand(2, (3, 2, 5)), layout="sio", rank=2, alpha=2.0,
                         layer_mask=(True, False, True))
    d = np.asarray(lw.delta())
    assert np.all(d[1] == 0) and np.any(d[0] != 0) and np.any(d[2] != 0)


def test_lora_weight_is_not_an_array():
    lw = lora.LoraWeight(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)), layout="io", rank=2, alpha=2)
    with pytest.raises(TypeError, match="lora.wrap"):
        jnp.asarray(lw)
    with pytest.raises(TypeError, match="lora.wrap"):
        np.asarray(lw)


def test_pytree_keys_and_replace():
    lw = lora.LoraWeight(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)), layout="io", rank=2, alpha=2)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(lw)[0]]
    assert paths == [".w", ".a", ".b"]
    lw2 = jax.tree_util.tree_map(lambda x: x * 2, lw)
    assert lw2.layout == "io" and lw2.rank == 2 and float(lw2.w[0, 0]) == 2.0
    with pytest.raises(TypeError, match="unknown fields"):
        lw.replace(c=1)


def test_adapter_settings_validate_every_field_at_once():
    with pytest.raises(ValueError) as e:
        lora.AdapterSettings(rank=0, alpha=-1.0, dropout=1.0, out_slices=[False, False], name="")
    msg = str(e.value)
    for part in ("rank must be a positive integer, got 0", "alpha must be a positive finite number, got -1.0",
                 "dropout must be a number in [0, 1), got 1.0", "out_slices must be None or a non-empty list of "
                 "booleans with at least one True, got [False, False]", "name must be a non-empty string, got ''"):
        assert part in msg
    s = lora.AdapterSettings(rank=np.int64(4), alpha=8, layer_mask=[True, np.bool_(False)])
    assert (type(s.rank), type(s.alpha), s.layer_mask, s.scale) == (int, float, (True, False), 2.0)
    assert hash(s) == hash(lora.AdapterSettings(rank=4, alpha=8.0, layer_mask=(True, False)))
    # the older PEFT/loralib spellings are read, and a setting may not be given twice
    assert lora.AdapterSettings.of({"use_rslora": True, "enable_lora": [True, False]}) == \
        lora.AdapterSettings(rslora=True, out_slices=(True, False))
    _, problems = lora.AdapterSettings.parse({"rslora": True, "use_rslora": False, "rnak": 2, "enable_lora": [1]},
                                             where="x")
    assert problems == ["x: rslora is given twice (also as 'use_rslora')",
                        "x: unknown adapter setting 'rnak'; expected one of " + str(list(lora.AdapterSettings.names())),
                        "x: enable_lora must be None or a non-empty list of booleans with at least one True, got [1]"]
    # a LoraWeight validates its settings too; its fields read through
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        lora.LoraWeight(None, None, None, layout="io", rank=0, alpha=1.0)
    lw = lora.LoraWeight(None, None, None, layout="io", settings=s)
    assert (lw.rank, lw.alpha, lw.layer_mask, lw.name, lw.active) == (4, 8.0, (True, False), "default", True)


def test_rules_and_trainer_take_their_settings_from_one_place():
    from lora_jax.train.config import LoraConfig

    default = lora.AdapterSettings()
    assert lora.Rules().settings == default
    assert (LoraConfig().rank, LoraConfig().alpha, LoraConfig().dropout, LoraConfig().rslora) == \
        (default.rank, default.alpha, default.dropout, default.rslora)
    old = lora.Rules([lora.Rule("k", enable_lora=[True, False])], use_rslora=True, rank=2)
    new = lora.Rules([lora.Rule("k", out_slices=[True, False])], rslora=True, rank=2)
    assert old.resolve("k", (4, 4)) == new.resolve("k", (4, 4))
    assert new.resolve("k", (4, 4)).settings == lora.AdapterSettings(rank=2, rslora=True, out_slices=(True, False))
    with pytest.raises(TypeError, match="unknown option"):
        lora.Rules("k", rnak=2)
    with pytest.raises(TypeError, match="cannot be given to rules"):
        lora.Rules("k", name="x")
    with pytest.raises(ValueError, match="enable_lora must be None or a non-empty list"):
        lora.Rule("k", enable_lora="tft")


def test_nodes_are_declared_dataclass_pytrees():
    lw = lora.LoraWeight(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)), layout="io", rank=2, alpha=2)
    same = lora.LoraWeight(jnp.zeros((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)), layout="io", rank=2, alpha=2)
    other = lw.replace(alpha=4.0)
    td = jax.tree_util.tree_structure
    assert td(lw) == td(same) and td(lw) != td(other) and other.settings.alpha == 4.0 and lw.alpha == 2.0
    # static data is a jit cache key: a new alpha recompiles, new values do not
    traces = []
    f = jax.jit(lambda lw: (traces.append(1), lw.scale * lw.a.sum())[1])
    assert float(f(lw)) == 8.0 and float(f(same)) == 8.0 and float(f(other)) == 16.0 and len(traces) == 2
    t = lora.Trainable(jnp.ones(3))
    assert [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(t)[0]] == [".value"]
    with pytest.raises(TypeError, match="lora.Trainable leaf"):
        jnp.asarray(t)

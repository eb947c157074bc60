"""`lora_jax.extend`: the names extension authors build on, proven by a storage form written only
against them (int8 rows with one scale each) going through init, wrap (plain and scanned), merge
and requantizing merge, compared with float64 arithmetic on the dequantized kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lora
from lora_jax import extend


@jax.tree_util.register_pytree_node_class
class Int8Rows(extend.StoredArray):
    """int8 codes ``(*stack, in, out)`` and one float32 scale per input row."""

    def __init__(self, codes, scale, shape, dtype, stack=0):
        self.codes, self.scale = codes, scale
        self.shape, self.dtype, self.stack = tuple(shape), jnp.dtype(dtype), int(stack)

    @classmethod
    def of(cls, x, stack=0):
        x = jnp.asarray(x, jnp.float32)
        scale = jnp.maximum(jnp.abs(x).max(-1), 1e-12) / 127.0
        return cls(jnp.round(x / scale[..., None]).astype(jnp.int8), scale, x.shape, x.dtype, stack)

    def tree_flatten(self):
        return (self.codes, self.scale), (self.shape, self.dtype, self.stack)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    def dequantize(self, dtype=None):
        return (self.codes.astype(jnp.float32) * self.scale[..., None]).astype(dtype or self.dtype)

    def unstacked(self):
        return Int8Rows(self.codes, self.scale, self.shape[1:], self.dtype, self.stack - 1)

    def requantize(self, x):
        return Int8Rows.of(x, self.stack)


def test_every_name_of_the_public_line_resolves():
    assert set(extend.__all__) == {"register_rule", "layout_rule", "fallback", "bind", "primitive", "Lazy", "is_lazy",
                                   "dense", "Ctx", "MaterializeWarning", "Variant", "Lora", "Dora", "register_variant", "get_variant", "StoredArray",
                                   "is_stored", "dense_base"}
    assert all(getattr(extend, n) is not None for n in extend.__all__)


def _stored(lp, stack=0, cls=Int8Rows):
    """Each adapted kernel's base in the user's storage form (as `lora.quantize` does for its own)."""
    return jax.tree_util.tree_map(lambda lw: lw.replace(w=cls.of(lw.w, stack)) if lora.is_lora(lw) else lw, lp,
                                  is_leaf=lora.is_lora)


def _delta(lw):
    a, b = np.asarray(lw.a, np.float64), np.asarray(lw.b, np.float64)
    return lw.scale * np.einsum("...ir,...ro->...io", a, b)


def test_a_storage_form_written_against_extend_trains_and_merges():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 8)).astype(np.float32)
    stored = Int8Rows.of(w)
    assert extend.is_stored(stored) and np.abs(np.asarray(extend.dense_base(stored)) - w).max() < 0.05
    lp = _stored(lora.init({"dense": {"kernel": w}}, lora.Rules(["dense"], rank=2, alpha=4, init=False), 0))
    lw = lp["dense"]["kernel"]
    x = rng.normal(size=(3, 16)).astype(np.float32)
    ref = x.astype(np.float64) @ (np.asarray(stored.dequantize(), np.float64) + _delta(lw))
    got = lora.wrap(lambda p, x: x @ p["dense"]["kernel"])(lp, x)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)
    assert np.abs(ref - x @ w).max() > 1e-2  # the adapter matters

    # the gradient reaches the factors, not the stored base
    g = jax.grad(lambda t: lora.wrap(lambda p, x: (x @ p["dense"]["kernel"]).sum())(lora.combine(t, f), x))
    t, f = lora.split(lp)
    grads = g(t)["dense"]["kernel"]
    assert float(jnp.abs(grads.b).max()) > 0

    merged = lora.merge(lp)["dense"]["kernel"]
    np.testing.assert_allclose(np.asarray(merged, np.float64), np.asarray(stored.dequantize(), np.float64) + _delta(lw),
                               rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="rounded"):
        again = lora.merge(lp, requantize=True)["dense"]["kernel"]
    assert isinstance(again, Int8Rows)
    np.testing.assert_allclose(np.asarray(again.dequantize()), np.asarray(merged), atol=float(again.scale.max()))


def test_a_scanned_stack_of_a_user_storage_form():
    """``lax.scan`` over stacked stored kernels slices them through ``unstacked``."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(3, 8, 8)).astype(np.float32) / 3
    stored = Int8Rows.of(w, stack=1)
    lp = _stored(lora.init({"k": w}, lora.Rules(["k"], rank=2, alpha=2, stack_axes=1, init=False), 0), stack=1)
    f = lambda p, x: jax.lax.scan(lambda h, k: (jnp.tanh(h @ k), None), x, p["k"])[0]  # noqa: E731
    x = rng.normal(size=(2, 8)).astype(np.float32)
    dense = np.asarray(stored.dequantize(), np.float64) + _delta(lp["k"])
    ref = x.astype(np.float64)
    for k in dense:
        ref = np.tanh(ref @ k)
    np.testing.assert_allclose(np.asarray(lora.wrap(f)(lp, x)), ref, rtol=1e-5, atol=1e-5)


def test_a_storage_form_without_requantize_says_so():
    class Plain(Int8Rows):
        requantize = extend.StoredArray.requantize

    jax.tree_util.register_pytree_node_class(Plain)
    lp = _stored(lora.init({"k": np.ones((4, 4), np.float32)}, lora.Rules(["k"], rank=1, init=False), 0), cls=Plain)
    with pytest.raises(NotImplementedError, match="Plain does not implement requantize"):
        lora.merge(lp, requantize=True)

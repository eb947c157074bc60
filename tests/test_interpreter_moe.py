"""Experts (a stacked 'sio' kernel, one adapter per expert) through `lora.wrap`: `jax.lax.ragged_dot`
over tokens sorted by expert and the dense one-hot form stay factorized, values and gradients equal
to the merged computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lora

from helpers import nonzero_b, rand
from test_interpreter import _rel_close, check_equivalence

E, K, N, R = 4, 16, 12, 3


def experts(dtype=jnp.float32, layers=None, seed=0):
    """``{"up": (E, K, N)}`` (or ``(L, E, K, N)`` stacked by layer) with one rank-R adapter per expert."""
    shape = (E, K, N) if layers is None else (layers, E, K, N)
    params = {"up": rand(seed, shape, dtype, scale=0.3)}
    layout = "sio" if layers is None else "ssio"
    return nonzero_b(lora.init(params, lora.Rules([lora.Rule("up", layout=layout)], rank=R, alpha=2 * R), seed))


GROUPS = {
    "all_rows": [3, 5, 1, 7],          # sum == m
    "zeros_and_tail": [0, 6, 0, 5],    # empty experts, sum < m: the tail rows meet no expert (zeros)
    "one_expert": [0, 0, 16, 0],
}


@pytest.mark.parametrize("groups", list(GROUPS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ragged_dot_equals_merged(groups, dtype):
    lp = experts(dtype)
    x = rand(1, (16, K), dtype)
    gs = jnp.asarray(GROUPS[groups], jnp.int32)
    fn = lambda p, x: jnp.tanh(jax.lax.ragged_dot(x, p["up"], gs))  # noqa: E731
    got = check_equivalence(fn, lp, x, dtype=dtype, tol=1e-6 if dtype == jnp.float32 else None)  # measured 3e-7
    if dtype == jnp.float32:  # an independent float64 reference: each row block times its expert's W + s A B
        w = np.asarray(lora.merge(lp)["up"], np.float64)
        xs, ref, start = np.asarray(x, np.float64), np.zeros((16, N)), 0
        for g, n in enumerate(GROUPS[groups]):
            ref[start:start + n] = xs[start:start + n] @ w[g]
            start += n
        _rel_close(got, np.tanh(ref), 1e-6, "float64 reference")


def test_ragged_dot_never_forms_the_merged_experts():
    lp = experts()
    gs = jnp.asarray(GROUPS["all_rows"], jnp.int32)
    fn = lambda p, x: jax.lax.ragged_dot(x, p["up"], gs)  # noqa: E731
    jaxpr = jax.make_jaxpr(lora.wrap(fn))(lp, rand(1, (16, K)))
    shapes = [tuple(v.aval.shape) for e in jaxpr.jaxpr.eqns for v in e.outvars]
    assert (E, K, N) not in shapes  # no W + s*A@B
    ragged = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "ragged_dot_general"]
    assert len(ragged) == 3  # x.W, x.A, (x.A).B


def test_ragged_dot_under_scan_over_layers():
    """Experts stacked by layer (nn.scan's layout): the scan rule slices the layer axis, the
    ragged_dot rule takes the expert axis."""
    lp = experts(layers=3)
    gs = jnp.asarray(GROUPS["zeros_and_tail"], jnp.int32)

    def fn(p, x):
        def layer(h, w):
            return h + jnp.tanh(jax.lax.ragged_dot(h, w, gs)) @ jnp.ones((N, K), h.dtype) / N, None
        return jax.lax.scan(layer, x, p["up"])[0]

    check_equivalence(fn, lp, rand(1, (16, K)))


def test_ragged_dot_with_dropout_is_the_same_mask_as_dense():
    """Dropout on the adapter input only: with rate ~1 the adapter path vanishes (base only)."""
    lp = jax.tree_util.tree_map(lambda v: v.replace(dropout=0.999999) if lora.is_lora(v) else v, experts(),
                                is_leaf=lora.is_lora)
    gs = jnp.asarray(GROUPS["all_rows"], jnp.int32)
    x = rand(1, (16, K))
    fn = lambda p, x: jax.lax.ragged_dot(x, p["up"], gs)  # noqa: E731
    got = lora.wrap(fn, rng=jax.random.key(3))(lp, x)
    base = jax.lax.ragged_dot(x, lp["up"].w, gs)
    assert not np.allclose(lora.wrap(fn)(lp, x), base, atol=1e-3)  # without dropout the delta shows
    _rel_close(got, base, 1e-6, "dropout ~1")


def test_ragged_dot_two_active_adapters():
    lp = experts()
    lp = nonzero_b(lora.add(lp, "second", lora.Rules([lora.Rule("up", layout="sio")], rank=2, alpha=4), 5), seed=7)
    assert len(lp["up"].chain()) == 2
    lp = lora.select(lp, ["default", "second"])
    gs = jnp.asarray(GROUPS["zeros_and_tail"], jnp.int32)
    check_equivalence(lambda p, x: jax.lax.ragged_dot(x, p["up"], gs), lp, rand(1, (16, K)))


def test_ragged_dot_lora_as_lhs_is_merged_with_a_warning():
    """A LoRA weight on the ragged side is not the experts form: merged, exact, with a warning."""
    w = rand(0, (16, K))
    lp = nonzero_b(lora.init({"w": w}, lora.Rules("w", rank=2), 0))
    rhs = rand(1, (E, K, N))
    gs = jnp.asarray(GROUPS["all_rows"], jnp.int32)
    fn = lambda p: jax.lax.ragged_dot(p["w"], rhs, gs)  # noqa: E731
    with pytest.warns(lora.MaterializeWarning, match="ragged_dot"):
        got = lora.wrap(fn)(lp)
    _rel_close(got, fn(lora.merge(lp)), 1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_one_hot_experts_stay_factorized(dtype):
    """The dense MoE form: every token through every expert (batch dim on the expert axis), then
    combined with the router's one-hot weights."""
    lp = experts(dtype)
    x = rand(1, (10, K), dtype)
    route = jax.nn.one_hot(jnp.arange(10) % E, E, dtype=dtype) * rand(2, (10, 1), dtype)

    def fn(p, x):
        h = jnp.einsum("tk,ekn->etn", x, p["up"])
        return jnp.einsum("etn,te->tn", jnp.tanh(h), route)

    check_equivalence(fn, lp, x, dtype=dtype)

    def fn_batched(p, x):  # experts' inputs already gathered: (E, T, K) batched against (E, K, N)
        return jnp.tanh(jnp.einsum("etk,ekn->etn", x, p["up"]))

    check_equivalence(fn_batched, lp, rand(3, (E, 5, K), dtype), dtype=dtype)


def dora_experts(seed=0):
    params = {"up": rand(seed, (E, K, N), scale=0.3)}
    lp = nonzero_b(lora.init(params, lora.Rules([lora.Rule("up", layout="sio")], rank=R, alpha=2 * R,
                                                 use_dora=True), seed), scale=0.2)
    m = lp["up"].m
    return {"up": lp["up"].replace(m=m * (1 + 0.3 * jax.random.uniform(jax.random.key(9), m.shape, minval=-1)))}


@pytest.mark.parametrize("groups", ["all_rows", "zeros_and_tail"])
def test_ragged_dot_dora_stays_factorized(groups):
    """DoRA's per-(expert, output) magnitude reaches each row through its group."""
    lp = dora_experts()
    gs = jnp.asarray(GROUPS[groups], jnp.int32)
    check_equivalence(lambda p, x: jnp.tanh(jax.lax.ragged_dot(x, p["up"], gs)), lp, rand(1, (16, K)))


def test_ragged_dot_dora_under_full_dropout_is_the_base():
    """PEFT's DoRA under dropout: x.w + (m0 - 1) drop(x).w + m1 drop(x).a.b; all dropped: x.w."""
    lp = dora_experts()
    lp = {"up": lp["up"].replace(dropout=0.999999)}
    gs = jnp.asarray(GROUPS["zeros_and_tail"], jnp.int32)
    x = rand(1, (16, K))
    fn = lambda p, x: jax.lax.ragged_dot(x, p["up"], gs)  # noqa: E731
    _rel_close(lora.wrap(fn, rng=jax.random.key(0))(lp, x), jax.lax.ragged_dot(x, lp["up"].w, gs), 1e-6)


def test_ragged_dot_general_on_experts_stored_out_in():
    """transformers' down_proj layout (E, out, in): ragged_dot_general contracting the last axis."""
    params = {"down": rand(0, (E, N, K), scale=0.3)}
    lp = nonzero_b(lora.init(params, lora.Rules([lora.Rule("down", layout="soi")], rank=R), 0))
    gs = jnp.asarray(GROUPS["zeros_and_tail"], jnp.int32)
    dn = jax.lax.RaggedDotDimensionNumbers((((1,), (2,)), ((), ())), (0,), (0,))
    fn = lambda p, x: jax.lax.ragged_dot_general(x, p["down"], gs, dn)  # noqa: E731
    check_equivalence(fn, lp, rand(1, (16, K)))

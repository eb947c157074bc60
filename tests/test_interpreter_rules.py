"""The interpreter's open rule table: `lora.register_rule` keeps a primitive the library does not
know factorized; the built-in table is keyed by primitive objects that exist in the installed JAX."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lora
from lora_jax import evaluator

from helpers import nonzero_b, rand
from test_interpreter import _rel_close, check_equivalence


@pytest.fixture
def table(monkeypatch):
    """A private copy of the rule table for one test (registrations vanish afterwards)."""
    monkeypatch.setattr(evaluator, "_RULES", evaluator.rule_table())


def _lp(shape=(6, 5), seed=0):
    return nonzero_b(lora.init({"w": rand(seed, shape)}, lora.Rules("w", rank=2, alpha=4), seed))


def _cumsum_factors(lz, eqn, others):
    """cumsum along an input axis acts on a, along an output axis on b; a stack axis mixes adapters."""
    j = eqn.params["axis"]
    s, i, o = lz.axes("s"), lz.axes("i"), lz.axes("o")
    if lz.kinds[j] == "s" or lz.variant is not None:  # a variant's per-output state cannot follow a mix
        return None
    if lz.kinds[j] == "i":
        return {"a": jax.lax.cumsum(lz.a, len(s) + i.index(j), reverse=eqn.params["reverse"])}
    return lz.b_like(lambda x, _: jax.lax.cumsum(x, len(s) + 1 + o.index(j), reverse=eqn.params["reverse"]))


@pytest.mark.parametrize("axis", [0, 1])
def test_register_rule_for_an_existing_primitive_not_in_the_table(table, axis):
    lp = _lp()
    fn = lambda p, x: jnp.tanh(x @ jax.lax.cumsum(p["w"], axis=axis, reverse=axis == 1))  # noqa: E731
    x = rand(1, (3, 6))
    cumsum_p = jax.extend.core.primitives.cumsum_p
    assert cumsum_p not in evaluator.rule_table()
    with pytest.warns(lora.MaterializeWarning, match="cumsum"):  # before: merged, exact
        got = lora.wrap(fn)(lp, x)
    _rel_close(got, fn(lora.merge(lp), x), 1e-6)

    evaluator.layout_rule(cumsum_p, _cumsum_factors)
    check_equivalence(fn, lp, x)  # after: no MaterializeWarning (an error there), values and gradients


def test_register_rule_for_a_user_primitive(table):
    """A primitive made with jax.extend.core.Primitive: ``double(x) = 2x``."""
    double_p = jax.extend.core.Primitive("double_for_test")
    double_p.def_impl(lambda x: 2 * x)
    double_p.def_abstract_eval(lambda x: x)
    lp = _lp()
    fn = lambda p, x: x @ double_p.bind(p["w"])  # noqa: E731
    x = rand(1, (3, 6))
    want = np.asarray(x, np.float64) @ (2 * np.asarray(lora.merge(lp)["w"], np.float64))
    with pytest.warns(lora.MaterializeWarning, match="double_for_test"):
        _rel_close(lora.wrap(fn)(lp, x), want, 1e-6)

    calls = []

    def double_rule(ctx, eqn, invals):
        (lz,) = invals
        calls.append(eqn.primitive)
        return [lz.with_(w=2 * lz.wd, a=2 * lz.a)]

    assert lora.register_rule(double_p, double_rule) is double_rule
    with warnings.catch_warnings():
        warnings.simplefilter("error", lora.MaterializeWarning)
        got = jax.jit(lora.wrap(fn))(lp, x)
    _rel_close(got, want, 1e-6)
    assert calls == [double_p]
    jaxpr = jax.make_jaxpr(lora.wrap(fn))(lp, x)
    assert (6, 5) not in [tuple(v.aval.shape) for e in jaxpr.jaxpr.eqns if e.primitive.name == "add" for v in
                          e.outvars]  # never w + a@b


def test_register_rule_rejects_names_and_non_callables(table):
    with pytest.raises(TypeError, match="Primitive.*got str 'cumsum'"):
        lora.register_rule("cumsum", lambda ctx, eqn, invals: invals)
    with pytest.raises(TypeError, match="callable"):
        lora.register_rule(jax.extend.core.primitives.cumsum_p, None)


def test_a_primitive_missing_from_jax_fails_loudly():
    with pytest.raises(RuntimeError, match="no primitive 'not_a_primitive_p'"):
        evaluator.primitive("not_a_primitive_p")
    # what the built-in table holds: primitive objects, each the one its public function binds
    table = evaluator.rule_table()
    for f, args in [(jax.lax.ragged_dot, (jnp.ones((2, 3)), jnp.ones((1, 3, 4)), jnp.array([2]))),
                    (jax.checkpoint(jnp.sin), (1.0,)), (jax.jit(jnp.sin), (1.0,)),
                    (lambda w: jnp.ones((1, 4)) @ w, (jnp.ones((4, 2)),))]:
        prim = jax.make_jaxpr(f)(*args).eqns[0].primitive
        assert prim in table, prim
    assert all(isinstance(p, jax.extend.core.Primitive) for p in table)

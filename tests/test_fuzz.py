"""Hypothesis fuzzing: random rules, patterns and trees raise only the documented exceptions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import lora_jax as lora

DOCUMENTED = (ValueError, TypeError)

text = st.text(alphabet=st.sampled_from(list("abqkv_.*/[]()+?|^$\\{}0123-x")), min_size=0, max_size=12)
pattern = st.one_of(text, st.lists(text, max_size=3), st.just("all-linear"), st.integers(), st.none())
option = st.one_of(st.none(), st.integers(-2, 70), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                   st.text(max_size=4))


@st.composite
def trees(draw):
    tree = {}
    for j in range(draw(st.integers(0, 4))):
        shape = tuple(draw(st.integers(1, 5)) for _ in range(draw(st.integers(0, 4))))
        dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16, jnp.int32]))
        tree[draw(st.sampled_from(["q", "k", "v", "proj", "head", "emb"])) + str(j)] = {
            draw(st.sampled_from(["kernel", "bias", "embedding", "w"])): jnp.ones(shape, dtype)}
    return tree


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees(), pattern, option, option, option, option, st.one_of(st.none(), pattern),
       st.sampled_from(["in_out", "out_in", "io", "oio", "xx", ""]), st.integers(-1, 3))
def test_rules_and_init_raise_only_documented_errors(tree, targets, rank, alpha, dropout, init, exclude, layout,
                                                      stack):
    kwargs = {k: v for k, v in dict(rank=rank, alpha=alpha, dropout=dropout, init=init).items() if v is not None}
    try:
        rules = lora.Rules(targets, exclude=exclude, layout=layout, stack_axes=stack, **kwargs)
        lp = lora.init(tree, rules, 0)
    except DOCUMENTED:
        return
    # whatever was built is a well-formed LoRA tree: merge at init is the identity
    merged = lora.merge(lp)
    for x, y in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(merged)):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(max_size=6), st.one_of(st.integers(-3, 9), st.floats(allow_nan=True), st.text(max_size=3),
                                                        st.booleans(), st.none()), max_size=4))
def test_rule_keyword_garbage(kw):
    try:
        lora.Rules(["q"], **kw)
    except DOCUMENTED:
        pass


regexish = st.one_of(st.text(alphabet=st.sampled_from(list("abq_.*+?|^$\\()[]{}<>=!-,:0123456789P#")), max_size=10),
                     st.text(max_size=8))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # re's "possible nested set" on some patterns
@settings(max_examples=300, deadline=None)
@given(regexish, st.sampled_from(["targets", "exclude", "rank_pattern", "alpha_pattern"]))
def test_an_invalid_regex_raises_value_error_naming_it(pattern, where):
    import re

    kw = {"targets": pattern} if where == "targets" else \
        {"targets": "q", "exclude": pattern} if where == "exclude" else {"targets": "q", where: {pattern: 2}}
    try:
        re.compile(pattern)
        valid = True
    except re.error:
        valid = False
    try:
        lora.Rules(**kw)
    except ValueError as e:
        assert not valid or "regular expression" not in str(e), str(e)
        if not valid:
            assert repr(pattern) in str(e) and "is not a valid regular expression" in str(e), str(e)
        return
    except TypeError:
        assert valid  # (an empty name, say): never the error for a broken regex
        return
    assert valid, f"Rules accepted the invalid regular expression {pattern!r} as {where}"

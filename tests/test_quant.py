"""QLoRA: NF4 / int8 frozen kernels, double quantization, on-the-fly dequantization in wrap."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.stats import norm

import lora_jax as lora
from lora_jax.quant import NF4_LEVELS, quantize_array, nbytes

from helpers import f64, nonzero_b, rand, tiny_model
from test_interpreter import _rel_close, check_equivalence


def test_nf4_levels_are_the_papers_normal_quantiles():
    offset = 0.9677083  # QLoRA / bitsandbytes: (1 - 1/(2*15) + 1 - 1/(2*16)) / 2
    pos = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    levels = np.sort(np.concatenate([pos, neg, [0.0]]))
    levels /= levels.max()
    assert len(NF4_LEVELS) == 16
    np.testing.assert_allclose(NF4_LEVELS, levels, atol=2e-7)


@pytest.mark.parametrize("dq", [False, True])
def test_nf4_round_trip_error_bound(dq):
    x = rand(0, (3, 1000), jnp.float32)  # 3000 values: the last block of 64 is padded
    q = quantize_array(x, "nf4", 64, dq, 0)
    assert q.codes.dtype == jnp.uint8 and q.codes.size == 3008 // 2
    y = np.asarray(q.dequantize())
    xb = np.pad(f64(x).ravel(), (0, 8)).reshape(-1, 64)
    absmax = np.abs(xb).max(1, keepdims=True)
    half_gap = np.max(np.diff(NF4_LEVELS)) / 2
    err = np.abs(np.pad(y.ravel(), (0, 8)).reshape(-1, 64) - xb)
    # nearest level: error <= half the widest gap times the block scale (+ the 8-bit scale error under DQ)
    scale_err = 0 if not dq else (absmax.max() - absmax.min()) / 254 + 1e-6
    assert np.all(err <= half_gap * absmax + scale_err + 1e-6)
    # and the codes are the nearest levels (without DQ): nothing closer exists
    if not dq:
        normed = xb / absmax
        nearest = NF4_LEVELS[np.abs(normed[..., None] - NF4_LEVELS).argmin(-1)] * absmax
        np.testing.assert_allclose(np.pad(y.ravel(), (0, 8)).reshape(-1, 64), nearest, atol=1e-6)


def test_int8_round_trip_and_memory():
    x = rand(1, (256, 512), jnp.bfloat16)
    q8 = quantize_array(x, "int8", 64, False, 0)
    err = np.abs(f64(q8.dequantize()) - f64(x))
    absmax = np.abs(f64(x)).reshape(-1, 64).max(1).repeat(64).reshape(x.shape)
    assert np.all(err <= absmax / 254 + absmax * 2 ** -8)  # rounding to 1/127 of the scale, then to bf16
    q4 = quantize_array(x, "nf4", 64, True, 0)
    dense = x.size * 2
    packed = sum(v.nbytes for v in jax.tree_util.tree_leaves(q4))
    assert 3.8 < dense / packed < 3.9  # 4 bits + 8/64 + 32/(64*256) bits per value vs 16


def test_quantized_lora_wrap_equals_dequantized_and_merge():
    model = tiny_model("llama")  # layers under nn.scan: stacked (L, in, out) kernels
    lp = nonzero_b(lora.init(model.params, lora.Rules(["q_proj", "v_proj", "up_proj"], rank=4, stack_axes=1), 0))
    q = lora.quantize(lp, "nf4", block=32)
    qw = q["model"]["layers"]["self_attn"]["q_proj"]["kernel"].base
    assert isinstance(qw, lora.QuantizedArray) and qw.stack == 1
    deq = lora.dequantize(q)
    ids = (jnp.arange(12).reshape(2, 6) * 7) % 90
    f = model.apply
    got = check_equivalence(f, q, ids)  # values and grads: wrap(quantized) == f(merge(quantized))
    _rel_close(got, lora.wrap(f)(deq, ids), 1e-6)
    merged = lora.merge(q)
    assert not any(isinstance(x, lora.QuantizedArray) for x in
                   jax.tree_util.tree_leaves(merged, is_leaf=lambda x: isinstance(x, lora.QuantizedArray)))
    with pytest.warns(UserWarning, match="rounded to nf4"):
        rq = lora.merge(q, requantize=True)
    assert isinstance(rq["model"]["layers"]["self_attn"]["q_proj"]["kernel"], lora.QuantizedArray)
    # the whole NF4 model stays close to the full-precision one
    full = np.asarray(lora.wrap(f)(lp, ids))
    err = np.abs(np.asarray(got) - full).max()
    assert 0 < err < 0.1 * np.abs(full).max()


class _Layer(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return jnp.tanh(nn.Dense(16, name="proj")(h)), None


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        scanned = nn.scan(_Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        h, _ = scanned(name="layers")(x, None)
        return nn.Dense(4, name="head")(h)


def test_quantized_scan_stack_and_every_kernel():
    m = Stack()
    x = rand(0, (2, 16))
    params = m.init(jax.random.key(0), x)["params"]
    lp = nonzero_b(lora.init(params, lora.Rules(["proj"], rank=2, stack_axes=1), 0))
    q = lora.quantize(lp, "int8", block=16, rules=lora.Rules(".*"))
    assert q["layers"]["proj"]["kernel"].base.stack == 1 and isinstance(q["head"]["kernel"], lora.QuantizedArray)
    fn = lambda p, x: m.apply({"params": p}, x)  # noqa: E731
    check_equivalence(fn, q, x)
    trainable, frozen = lora.split(q)
    tx = lora.freeze(optax.adam(1e-3), q)
    state = tx.init(trainable)
    assert sum(v.size for v in jax.tree_util.tree_leaves(state) if v.ndim) == 2 * 3 * (16 * 2 + 2 * 16)
    assert nbytes(q) < nbytes(lp) / 3


def test_quantize_errors():
    lp = lora.init({"k": jnp.ones((8, 8))}, lora.Rules("k", rank=2), 0)
    with pytest.raises(ValueError, match="scheme must be one of"):
        lora.quantize(lp, "fp4")
    with pytest.raises(ValueError, match="even for nf4"):
        lora.quantize(lp, "nf4", block=63)


def test_quantize_selects_extra_kernels_with_rules():
    params = {"emb": {"embedding": rand(0, (32, 16))}, "proj": {"kernel": rand(1, (16, 16))},
              "head": {"kernel": rand(2, (16, 32)), "bias": rand(3, (32,))}}
    lp = lora.init(params, lora.Rules(["proj"], rank=2), 0)
    q = lora.quantize(lp, "int8", block=16, rules=lora.Rules(["head"]))
    assert isinstance(q["proj"]["kernel"].base, lora.QuantizedArray)  # LoRA bases: always
    assert isinstance(q["head"]["kernel"], lora.QuantizedArray)       # selected by the rules
    assert not isinstance(q["emb"]["embedding"], lora.QuantizedArray) and q["head"]["bias"] is lp["head"]["bias"]
    with pytest.warns(DeprecationWarning, match=r"rules=lora.Rules\('.\*'\)"):
        old = lora.quantize(lp, "int8", block=16, which="all")
    new = lora.quantize(lp, "int8", block=16, rules=lora.Rules(".*"))
    assert jax.tree_util.tree_structure(old) == jax.tree_util.tree_structure(new)
    assert isinstance(new["emb"]["embedding"], lora.QuantizedArray)
    for x, y in zip(jax.tree_util.tree_leaves(old), jax.tree_util.tree_leaves(new)):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="which is deprecated"):
        lora.quantize(lp, "int8", which="some")

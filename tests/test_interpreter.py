"""wrap(fn)(lp, x) == fn(merge(lp), x), values and gradients, for every supported primitive."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lora

from helpers import nonzero_b, rand, tiny_model

# Both sides round in float32 (the merged kernel itself is rounded), so the bound is a few ulps of
# accumulated error in the 2-norm; bf16 bases are compared at bf16 resolution.
TOL = {jnp.float32: 2e-6, jnp.bfloat16: 2e-2}


def _rel_close(got, want, tol, what=""):
    """Relative error in the 2-norm: ||got - want|| / ||want|| <= tol."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    scale = max(np.linalg.norm(want), 1e-30)
    err = np.linalg.norm(got - want) / scale
    assert err <= tol, f"{what}: relative error {err:.3g} (||ref|| = {scale:.3g}) > {tol}"


def check_equivalence(fn, lp, *xs, dtype=jnp.float32, argnums_x=True, tol=None):
    """Values and gradients w.r.t. a, b and the inputs of wrap(fn) vs fn on the merged weights."""
    tol = TOL[dtype] if tol is None else tol
    trainable, frozen = lora.split(lp)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lora.MaterializeWarning)
        got = lora.wrap(fn)(lp, *xs)
        want = fn(lora.merge(lp), *xs)
        for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            _rel_close(g, w, tol, "value")
        cot = jax.tree_util.tree_map(lambda o: rand(99, o.shape, jnp.float32), want)

        def loss(t, xs, wrapped):
            p = lora.combine(t, frozen)
            out = lora.wrap(fn)(p, *xs) if wrapped else fn(lora.merge(p), *xs)
            return sum(jnp.vdot(o.astype(jnp.float32), c) for o, c in
                       zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(cot)))

        float_xs = tuple(x for x in xs)
        argnums = (0, 1) if argnums_x and all(jnp.issubdtype(x.dtype, jnp.floating) for x in xs) else (0,)
        g1 = jax.jit(jax.grad(lambda t, xs: loss(t, xs, True), argnums=argnums))(trainable, float_xs)
        g2 = jax.jit(jax.grad(lambda t, xs: loss(t, xs, False), argnums=argnums))(trainable, float_xs)
    for (kp, a), b in zip(jax.tree_util.tree_flatten_with_path(g1)[0], jax.tree_util.tree_leaves(g2)):
        _rel_close(a, b, tol, "grad " + jax.tree_util.keystr(kp))
    return got


def linen_lp(module, x, rules, dtype=jnp.float32, seed=0):
    params = module.init(jax.random.key(seed), x)["params"]
    params = jax.tree_util.tree_map(lambda p: p.astype(dtype), params)
    return nonzero_b(lora.init(params, rules, seed))


def apply_fn(module):
    return lambda p, *xs: module.apply({"params": p}, *xs)


# ------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------


class MLP(nn.Module):
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(32, dtype=self.dtype, param_dtype=self.dtype, name="up")(x))
        return nn.Dense(8, dtype=self.dtype, param_dtype=self.dtype, name="down")(x)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense(dtype):
    m = MLP(dtype)
    x = rand(1, (2, 5, 16), dtype)
    lp = linen_lp(m, x, lora.Rules(["up", "down"], rank=4, alpha=8), dtype)
    check_equivalence(apply_fn(m), lp, x, dtype=dtype)


class Attn(nn.Module):
    """DenseGeneral with N-d kernels: (in, heads, head_dim) and (heads, head_dim, out)."""

    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((4, 8), name="q")(x)
        return nn.DenseGeneral(16, axis=(-2, -1), name="o")(jnp.tanh(q))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_general_nd_kernels(dtype):
    m = Attn()
    x = rand(1, (2, 3, 16), dtype)
    rules = lora.Rules([lora.Rule("q", layout="ioo"), lora.Rule("o", in_axes=(0, 1))], rank=4, alpha=4)
    lp = linen_lp(m, x.astype(jnp.float32), rules, dtype)
    assert lp["q"]["kernel"].b.shape == (4, 4, 8) and lp["o"]["kernel"].a.shape == (4, 8, 4)
    check_equivalence(apply_fn(m), lp, x, dtype=dtype)


def test_einsum_and_out_in_plain_jax():
    params = {"wqkv": rand(0, (3, 4, 16, 8)), "out": rand(1, (16, 32))}  # out stored (out, in)

    def fn(p, x):
        qkv = jnp.einsum("btd,khdf->kbthf", x, p["wqkv"])  # stacked N-d kernel, batch-free einsum
        h = jnp.tanh(qkv.sum(0)).reshape(x.shape[0], x.shape[1], 32)
        return h @ p["out"].T

    rules = lora.Rules([lora.Rule("wqkv", layout="oioo"), lora.Rule("out", layout="out_in")], rank=3, alpha=6)
    lp = nonzero_b(lora.init(params, rules, 0))
    check_equivalence(fn, lp, rand(2, (2, 3, 16)))


@pytest.mark.parametrize("dims,kernel,strides,padding", [
    (1, (3,), (1,), "SAME"), (2, (3, 3), (2, 1), "VALID"), (2, (3, 3), (1, 1), ((1, 2), (0, 1))),
    (3, (2, 2, 2), (1, 1, 1), "SAME")])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_conv(dims, kernel, strides, padding, dtype):
    m = nn.Conv(6, kernel, strides=strides, padding=padding, dtype=dtype, param_dtype=dtype, name="conv")
    x = rand(1, (2,) + (7,) * dims + (5,), dtype)
    params = m.init(jax.random.key(0), x)["params"]
    lp = nonzero_b(lora.init({"conv": params}, lora.Rules(["conv"], rank=3, alpha=6), 0))
    assert lp["conv"]["kernel"].layout == "i" * (dims + 1) + "o"  # PEFT's conv LoRA: A spans window x in
    check_equivalence(lambda p, x: m.apply({"params": p["conv"]}, x), lp, x, dtype=dtype)


def test_conv_dilated_nchw():
    w = rand(0, (6, 5, 3, 3))  # OIHW

    def fn(p, x):
        return jax.lax.conv_general_dilated(x, p["w"], (1, 1), "SAME", rhs_dilation=(2, 2),
                                            dimension_numbers=("NCHW", "OIHW", "NCHW"))

    lp = nonzero_b(lora.init({"w": w}, lora.Rules("w", layout="oiii", rank=2), 0))
    check_equivalence(fn, lp, rand(1, (2, 5, 9, 9)))


def test_grouped_conv_materializes_with_a_warning():
    m = nn.Conv(6, (3, 3), feature_group_count=2, name="conv")
    x = rand(1, (1, 6, 6, 4))
    lp = nonzero_b(lora.init({"conv": m.init(jax.random.key(0), x)["params"]}, lora.Rules(["conv"], rank=2), 0))
    fn = lambda p, x: m.apply({"params": p["conv"]}, x)  # noqa: E731
    with pytest.warns(lora.MaterializeWarning, match="conv_general_dilated"):
        got = lora.wrap(fn)(lp, x)
    _rel_close(got, fn(lora.merge(lp), x), 1e-6)


class EmbedLM(nn.Module):
    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(50, 16, name="emb")
        h = jnp.tanh(nn.Dense(16, name="mix")(emb(ids)))
        return emb.attend(h)  # tied head: h @ E.T


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_embedding_lookup_and_tied_head(dtype):
    m = EmbedLM()
    ids = jnp.array([[1, 4, 49, 0], [7, 7, 3, 2]])
    params = jax.tree_util.tree_map(lambda p: p.astype(dtype), m.init(jax.random.key(0), ids)["params"])
    lp = nonzero_b(lora.init(params, lora.Rules(["emb", "mix"], rank=4, alpha=8), 0))
    assert lp["emb"]["embedding"].a.shape == (50, 4)
    check_equivalence(apply_fn(m), lp, ids, dtype=dtype)


class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return h + nn.Dense(16, name="proj")(jnp.tanh(nn.Dense(24, name="up")(h)) @ jnp.ones((24, 16), h.dtype) / 24), None


class Stack(nn.Module):
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        block = nn.remat(Block, prevent_cse=False) if self.remat else Block
        scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        h, _ = scanned(name="layers")(x, None)
        return h


@pytest.mark.parametrize("remat", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_nn_scan_stack_and_remat(remat, dtype):
    m = Stack(remat)
    x = rand(1, (2, 16), dtype)
    lp = linen_lp(m, x.astype(jnp.float32), lora.Rules(["up", "proj"], rank=4, alpha=8, stack_axes=1), dtype)
    assert lp["layers"]["up"]["kernel"].layout == "sio" and lp["layers"]["up"]["kernel"].a.shape == (3, 16, 4)
    check_equivalence(apply_fn(m), lp, x, dtype=dtype)


def test_remat_policy_is_kept():
    x = rand(1, (4, 16))
    lp = nonzero_b(lora.init({"w": rand(0, (16, 16))}, lora.Rules("w", rank=2), 0))
    pol = jax.checkpoint_policies.dots_with_no_batch_dims_saveable

    def fn(p, x):
        return jax.checkpoint(lambda x: jnp.sin(jnp.sin(x @ p["w"]) @ p["w"]), policy=pol)(x)

    # two chained matmuls through sin: jax 0.12's XLA rounds the merged reference 2.3e-6 away (19 ulp)
    check_equivalence(fn, lp, x, tol=4e-6)
    t, f = lora.split(lp)
    jaxpr = jax.make_jaxpr(jax.grad(lambda t: lora.wrap(fn)(lora.combine(t, f), x).sum()))(t)
    remats = [e for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name.startswith("remat") or
              e.primitive.name == "checkpoint"]
    assert remats and all(e.params["policy"] is pol for e in remats)


def test_stacked_layers_mask():
    params = {"layers": {"w": rand(0, (3, 8, 8))}}
    lp = nonzero_b(lora.init(params, lora.Rules(["layers"], rank=2, stack_axes=1, layers=[0, 2]), 0))

    def fn(p, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["layers"]["w"])[0]

    check_equivalence(fn, lp, rand(1, (2, 8)))


def test_python_loop_over_stacked_kernel_slices_stays_factorized():
    params = {"w": rand(0, (3, 8, 8))}
    lp = nonzero_b(lora.init(params, lora.Rules("w", rank=2, stack_axes=1), 0))

    def fn(p, x):
        for i in range(3):
            x = jnp.tanh(x @ p["w"][i])
        return x

    check_equivalence(fn, lp, rand(1, (2, 8)))


@jax.custom_vjp
def _cdense(x, w):
    return x @ w


def _cdense_fwd(x, w):
    return x @ w, (x, w)


def _cdense_bwd(res, g):
    x, w = res
    return g @ w.T, x.T @ g


_cdense.defvjp(_cdense_fwd, _cdense_bwd)


def test_custom_vjp_layer():
    lp = nonzero_b(lora.init({"w": rand(0, (8, 6))}, lora.Rules("w", rank=2), 0))
    check_equivalence(lambda p, x: jnp.tanh(_cdense(x, p["w"])), lp, rand(1, (3, 8)))


def test_cond_and_while():
    lp = nonzero_b(lora.init({"w": rand(0, (8, 8)) / 3, "v": rand(1, (8, 8)) / 3}, lora.Rules(["w", "v"], rank=2), 0))

    def fn(p, x):
        y = jax.lax.cond(x.sum() > 0, lambda x: x @ p["w"], lambda x: -(x @ p["v"].T), x)
        return jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["w"]), y)

    check_equivalence(fn, lp, rand(2, (3, 8)))
    check_equivalence(fn, lp, -jnp.abs(rand(2, (3, 8))))


def test_plain_jax_mlp_and_vmap():
    params = {"l1": rand(0, (16, 32)), "l2": rand(1, (32, 4))}

    def mlp(p, x):
        return jax.nn.relu(x @ p["l1"]) @ p["l2"]

    lp = nonzero_b(lora.init(params, lora.Rules(["l1", "l2"], rank=4), 0))
    check_equivalence(mlp, lp, rand(2, (5, 16)))
    xs = rand(3, (7, 5, 16))
    got = jax.vmap(lora.wrap(mlp), in_axes=(None, 0))(lp, xs)
    _rel_close(got, jax.vmap(mlp, in_axes=(None, 0))(lora.merge(lp), xs), 1e-6)


def test_nnx_model_via_split():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(12, 20, rngs=rngs)
            self.b = nnx.Linear(20, 6, rngs=rngs)

        def __call__(self, x):
            return self.b(nnx.relu(self.a(x)))

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    lp = nonzero_b(lora.init(state, lora.Rules(["a", "b"], rank=3), 0))
    fn = lambda st, x: nnx.merge(graphdef, st)(x)  # noqa: E731
    check_equivalence(fn, lp, rand(1, (4, 12)))


def test_equinox_model_via_partition():
    """An Equinox MLP (weights stored (out, in)) through eqx.partition, vmapped inside the function."""
    import equinox as eqx

    mlp = eqx.nn.MLP(12, 6, 20, 2, key=jax.random.key(0))
    params, static = eqx.partition(mlp, eqx.is_array)
    lp = nonzero_b(lora.init(params, lora.Rules(r"layers/\d+/weight", rank=3, layout="out_in"), 0))
    assert len(list(lora.tree.lora_items(lp))) == 3
    fn = lambda p, x: jax.vmap(eqx.combine(p, static))(x)  # noqa: E731
    check_equivalence(fn, lp, rand(1, (4, 12)))


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_lora_jax_models(arch):
    """Our own models (lora_jax.models): layers under nn.scan with stacked kernels, embeddings
    (GPT-2's tied to its head), BERT's unstacked pooler next to its stacked layers."""
    model = tiny_model(arch)
    llama = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    rules = {
        "gpt2": lora.Rules([lora.Rule(["c_attn", "c_proj", "c_fc"], stack_axes=1), lora.Rule(["wte"])], rank=4),
        "llama": lora.Rules([lora.Rule(llama, stack_axes=1), lora.Rule(["embed_tokens"])], rank=4, alpha=8),
        "bert": lora.Rules([lora.Rule("pooler/dense"), lora.Rule(["query", "value", "dense"], stack_axes=1),
                            lora.Rule(["word_embeddings"])], rank=4),
    }[arch]
    lp = nonzero_b(lora.init(model.params, rules, 0))
    n_stacked = {"gpt2": 4, "llama": 7, "bert": 5}[arch]  # gpt2: c_attn, attn/c_proj, c_fc, mlp/c_proj
    assert sum(lw.layout == "sio" for _, lw in lora.tree.lora_items(lp)) == n_stacked
    ids = (jnp.arange(14).reshape(2, 7) * 7) % 90
    got = check_equivalence(model.apply, lp, ids)
    assert np.abs(np.asarray(got - model.apply(model.params, ids))).max() > 1e-3  # the adapters change the logits


# ------------------------------------------------------------------------------------------
# Invariants
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_at_init_output_is_base_bit_for_bit(arch):
    model = tiny_model(arch)
    lp = lora.init(model.params, lora.Rules("all-linear", rank=4, stack_axes=1), 0)
    assert len(list(lora.tree.lora_items(lp))) == {"gpt2": 4, "llama": 7}[arch]
    ids = jnp.arange(12).reshape(2, 6)
    f = model.eager  # not jitted
    # op by op the base path runs the very same kernels and adds an exact zero
    np.testing.assert_array_equal(np.asarray(lora.wrap(f)(lp, ids)), np.asarray(f(model.params, ids)))
    # under jit XLA compiles a different program (fusion, layouts), so only rounding-level agreement
    np.testing.assert_allclose(jax.jit(lora.wrap(f))(lp, ids), jax.jit(f)(model.params, ids), rtol=1e-6, atol=1e-7)


def test_scale_zero_is_exactly_base_and_scale_is_traceable():
    model = tiny_model("llama")
    lp = nonzero_b(lora.init(model.params, lora.Rules(["q_proj", "v_proj"], rank=4, stack_axes=1), 0), scale=1.0)
    ids = jnp.arange(12).reshape(2, 6)
    f = model.apply
    base = f(model.params, ids)
    np.testing.assert_array_equal(lora.wrap(f, scale=0.0)(lp, ids), base)
    on = lora.wrap(f)(lp, ids)
    assert np.abs(np.asarray(on - base)).max() > 1e-3
    g = jax.jit(lambda s: lora.wrap(f, scale=s)(lp, ids))
    np.testing.assert_allclose(g(0.0), base, atol=1e-6)
    np.testing.assert_allclose(g(1.0), on, atol=1e-6)
    # half the scale is the model with half the delta
    half = jax.tree_util.tree_map(lambda x: x.replace(alpha=x.alpha / 2) if lora.is_lora(x) else x, lp,
                                  is_leaf=lora.is_lora)
    np.testing.assert_allclose(g(0.5), f(lora.merge(half), ids), rtol=1e-5, atol=1e-5)


def _all_eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for v in e.params.values():
            for j in (v if isinstance(v, (tuple, list)) else (v,)):
                if isinstance(j, jax.extend.core.ClosedJaxpr):
                    yield from _all_eqns(j.jaxpr)
                elif isinstance(j, jax.extend.core.Jaxpr):
                    yield from _all_eqns(j)


def _kernel_sized_adapter_products(jaxpr, tainted, limit):
    """Eqns fed (transitively) by a or b whose output has >= limit elements."""
    bad = []
    tainted = set(tainted)
    for e in jaxpr.eqns:
        hit = any(not isinstance(v, jax.extend.core.Literal) and v in tainted for v in e.invars)
        if not hit:
            continue
        for o in e.outvars:
            tainted.add(o)
            if np.prod(o.aval.shape) >= limit:
                bad.append((e.primitive.name, o.aval.shape))
        # enter sub-jaxprs, tainting every input (conservative)
        for v in e.params.values():
            for j in (v if isinstance(v, (tuple, list)) else (v,)):
                sub = j.jaxpr if isinstance(j, jax.extend.core.ClosedJaxpr) else j
                if isinstance(sub, jax.extend.core.Jaxpr):
                    bad += _kernel_sized_adapter_products(sub, list(sub.invars) + list(sub.constvars), limit)
    return bad


@pytest.mark.parametrize("case", ["dense", "conv", "embed", "scan", "tied"])
def test_no_densification_forward_and_backward(case):
    n_in, n_out = 64, 48
    if case == "dense":
        params, fn, x = {"w": rand(0, (n_in, n_out))}, lambda p, x: jnp.tanh(x @ p["w"]), rand(1, (2, 2, n_in))
        rules = lora.Rules("w", rank=4)
    elif case == "conv":
        params = {"w": rand(0, (2, 2, 16, n_out))}
        fn = lambda p, x: jax.lax.conv_general_dilated(x, p["w"], (1, 1), "VALID",  # noqa: E731
                                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
        x, rules = rand(1, (1, 2, 2, 16)), lora.Rules("w", rank=4)
    elif case == "embed":
        params = {"e": rand(0, (n_in, n_out))}
        fn, x, rules = lambda p, ids: jnp.take(p["e"], ids, axis=0), jnp.array([[1, 5, 9]]), lora.Rules("e", rank=4)
    elif case == "tied":
        params = {"e": rand(0, (n_in, n_out))}
        fn, x, rules = lambda p, h: h @ p["e"].T, rand(1, (3, n_out)), lora.Rules("e", rank=4)
    else:
        params = {"w": rand(0, (3, n_in, n_in))}
        fn = lambda p, x: jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0]  # noqa: E731
        x, rules, n_out = rand(1, (2, n_in)), lora.Rules("w", rank=4, stack_axes=1), n_in
    lp = nonzero_b(lora.init(params, rules, 0))
    trainable, frozen = lora.split(lp)
    grad_fn = jax.grad(lambda t, x: jnp.sum(lora.wrap(fn)(lora.combine(t, frozen), x) ** 2), argnums=(0,))
    closed = jax.make_jaxpr(grad_fn)(trainable, x)
    n_t = len(jax.tree_util.tree_leaves(trainable))
    bad = _kernel_sized_adapter_products(closed.jaxpr, closed.jaxpr.invars[:n_t], n_in * n_out)
    assert not bad, f"kernel-sized products built from the adapter: {bad}"
    # and the check itself can fail: merging inside the function is caught
    closed = jax.make_jaxpr(jax.grad(lambda t, x: jnp.sum(fn(lora.merge(lora.combine(t, frozen)), x) ** 2)))(
        trainable, x)
    assert _kernel_sized_adapter_products(closed.jaxpr, closed.jaxpr.invars[:n_t], n_in * n_out)


def test_dropout_semantics():
    params = {"w": rand(0, (32, 16))}
    lp = nonzero_b(lora.init(params, lora.Rules("w", rank=4, dropout=0.5), 0), scale=1.0)
    fn = lambda p, x: x @ p["w"]  # noqa: E731
    x = rand(1, (4000, 32))
    k1, k2 = jax.random.key(1), jax.random.key(2)
    y1 = lora.wrap(fn, rng=k1)(lp, x)
    np.testing.assert_array_equal(y1, lora.wrap(fn, rng=k1)(lp, x))  # same rng, same result
    assert not np.array_equal(y1, lora.wrap(fn, rng=k2)(lp, x))  # different rng, different result
    no = lora.wrap(fn)(lp, x)  # no rng: deterministic, no dropout
    _rel_close(no, fn(lora.merge(lp), x), 1e-6)
    # mean-preserving: averaging the delta over many masks gives the undropped delta
    base = x @ params["w"]
    deltas = jnp.stack([lora.wrap(fn, rng=jax.random.key(s))(lp, x) - base for s in range(64)])
    mean = np.asarray(deltas.mean(0)).ravel()
    want = np.asarray(no - base).ravel()
    assert abs(np.dot(mean, want) / np.dot(want, want) - 1) < 0.02
    # the base path is never dropped: with scale 0 the rng changes nothing
    np.testing.assert_array_equal(lora.wrap(fn, rng=k1, scale=0.0)(lp, x), base)


def test_dropout_differs_per_scan_step_and_layer():
    params = {"w": jnp.tile(jnp.eye(8)[None], (2, 1, 1))}
    lp = lora.init(params, lora.Rules("w", rank=2, dropout=0.5, init=False, stack_axes=1), 0)
    fn = lambda p, x: jax.lax.scan(lambda h, w: (h @ w, h @ w), x, p["w"])[1]  # noqa: E731
    ys = lora.wrap(fn, rng=jax.random.key(0))(lp, jnp.ones((64, 8)))
    assert ys.shape == (2, 64, 8) and np.isfinite(np.asarray(ys)).all()


def test_unwrapped_use_is_an_error_and_bad_args():
    model = tiny_model("llama")
    lp = lora.init(model.params, lora.Rules(["q_proj"], rank=2, stack_axes=1), 0)
    ids = jnp.arange(6).reshape(1, 6)
    with pytest.raises(TypeError, match="LoraWeight"):
        model.eager(lp, ids)
    with pytest.raises(TypeError, match="LoraWeight"):
        model.apply(lp, ids)  # under jit too
    f = model.apply
    with pytest.raises(TypeError, match="argument 1 holds LoraWeight nodes but argnums=0"):
        lora.wrap(lambda x, p: f(p, x))(ids, lp)
    t, _ = lora.split(lp)
    with pytest.raises(TypeError, match="lora.combine"):
        lora.wrap(f)(t, ids)


def test_unsupported_primitive_materializes_warns_and_can_be_an_error():
    lp = nonzero_b(lora.init({"w": rand(0, (6, 6))}, lora.Rules("w", rank=2), 0))
    fn = lambda p, x: x @ jnp.cumsum(p["w"], axis=0)  # noqa: E731
    x = rand(1, (2, 6))
    with pytest.warns(lora.MaterializeWarning, match="cumsum"):
        got = lora.wrap(fn)(lp, x)
    _rel_close(got, fn(lora.merge(lp), x), 1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lora.MaterializeWarning)
        with pytest.raises(lora.MaterializeWarning):
            lora.wrap(fn)(lp, x)


def test_sharded_inputs_under_jit():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as PS

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    params = {"w": rand(0, (16, 32))}
    lp = nonzero_b(lora.init(params, lora.Rules("w", rank=4), 0))
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    lw = lp["w"]
    lp_s = {"w": lw.replace(w=put(lw.w, PS(None, "model")), a=put(lw.a, PS()), b=put(lw.b, PS(None, "model")))}
    x = put(rand(1, (8, 16)), PS("data", None))
    fn = lambda p, x: jnp.tanh(x @ p["w"])  # noqa: E731
    got = jax.jit(lora.wrap(fn))(lp_s, x)
    _rel_close(got, fn(lora.merge(lp), x), 1e-6)
    assert got.sharding.spec == PS("data", "model")


def test_closure_over_outer_tracers_and_kwargs():
    lp = nonzero_b(lora.init({"w": rand(0, (6, 6))}, lora.Rules("w", rank=2), 0))

    @jax.jit
    def outer(lp, x, y):
        return lora.wrap(lambda p, *, bias: jnp.tanh(x @ p["w"] + bias + y))(lp, bias=y * 2)

    x, y = rand(1, (2, 6)), rand(2, (2, 6))
    _rel_close(outer(lp, x, y), jnp.tanh(x @ lora.merge(lp)["w"] + 3 * y), 1e-6)


def test_wrap_inside_checkpoint_value_and_grad_and_vmapped_adapters():
    params = {"l1": rand(0, (8, 16)), "l2": rand(1, (16, 4))}
    mlp = lambda p, x: jnp.tanh(x @ p["l1"]) @ p["l2"]  # noqa: E731
    lp = nonzero_b(lora.init(params, lora.Rules(["l1", "l2"], rank=2), 0))
    x = rand(2, (3, 8))
    f = jax.checkpoint(lambda p, x: jnp.sum(lora.wrap(mlp)(p, x) ** 2))
    v1, g1 = jax.value_and_grad(f)(lp, x)
    v2, g2 = jax.value_and_grad(lambda p, x: jnp.sum(mlp(lora.merge(p), x) ** 2))(lp, x)
    _rel_close(v1, v2, 2e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        _rel_close(a, b, 2e-6)
    # an ensemble of adapters on one base: vmap over the adapter factors only
    members = [nonzero_b(lp, seed=s) for s in range(3)]
    stacked = jax.tree_util.tree_map(
        lambda l, *ms: l.replace(a=jnp.stack([m.a for m in ms]), b=jnp.stack([m.b for m in ms])), lp, *members,
        is_leaf=lora.is_lora)
    axes = jax.tree_util.tree_map(lambda l: l.replace(w=None, a=0, b=0), lp, is_leaf=lora.is_lora)
    ys = jax.vmap(lora.wrap(mlp), in_axes=(axes, None))(stacked, x)
    for s in range(3):
        _rel_close(ys[s], mlp(lora.merge(members[s]), x), 2e-6)


class SharedBody(nn.Module):
    @nn.compact
    def __call__(self, h, mask):
        return jnp.tanh(nn.Dense(16, use_bias=False, name="shared")(h)) * mask, None


class SharedScan(nn.Module):
    """nn.scan with broadcast parameters (one kernel used at every step) and a broadcast input."""

    @nn.compact
    def __call__(self, x, mask):
        scanned = nn.scan(SharedBody, variable_broadcast="params", split_rngs={"params": False},
                          in_axes=nn.broadcast, length=4)
        h, _ = scanned(name="body")(x, mask)
        return h


def test_nn_scan_with_broadcast_params_and_inputs():
    m = SharedScan()
    x, mask = rand(1, (3, 16)), (rand(2, (3, 16)) > 0).astype(jnp.float32)
    params = m.init(jax.random.key(0), x, mask)["params"]
    lp = nonzero_b(lora.init(params, lora.Rules(["shared"], rank=2), 0))
    assert lp["body"]["shared"]["kernel"].layout == "io"  # not stacked: a scan const
    check_equivalence(lambda p, x: m.apply({"params": p}, x, mask), lp, x)
    # dropout on a const inside scan draws a fresh mask per step (the step index is folded in)
    lpd = jax.tree_util.tree_map(lambda l: l.replace(dropout=0.5) if lora.is_lora(l) else l, lp, is_leaf=lora.is_lora)
    y1 = lora.wrap(lambda p, x: m.apply({"params": p}, x, mask), rng=jax.random.key(0))(lpd, x)
    assert np.isfinite(np.asarray(y1)).all()

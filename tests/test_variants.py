"""LoRA variants against independent references: DoRA, rsLoRA (and PEFT on the same weights)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import lora_jax as lora

from helpers import f64, nonzero_b, peft_linear, rand
from test_interpreter import check_equivalence, _rel_close


def perturb(tree, seed=3):
    """Random non-zero b and a magnitude m away from ||w|| (a trained-looking DoRA adapter)."""
    tree = nonzero_b(tree, seed=seed, scale=0.2)
    keys = iter(jax.random.split(jax.random.key(seed + 1), 100))

    def f(x):
        if lora.is_lora(x) and x.m is not None:
            return x.replace(m=x.m * (1 + 0.3 * jax.random.uniform(next(keys), x.m.shape, minval=-1)))
        return x

    return jax.tree_util.tree_map(f, tree, is_leaf=lora.is_lora)


def dora_reference(w, a, b, m, s, layout):
    """float64 DoRA kernel from the formula, on NumPy (stack, in, out) matrix views."""
    order = [j for k in "sio" for j, c in enumerate(layout) if c == k]
    dims = {k: [w.shape[j] for j, c in enumerate(layout) if c == k] for k in "sio"}
    S, I, O = (int(np.prod(dims[k])) for k in "sio")
    W = np.transpose(f64(w), order).reshape(S, I, O)
    A, B, M = f64(a).reshape(S, I, -1), f64(b).reshape(S, -1, O), f64(m).reshape(S, 1, O)
    V = W + s * A @ B
    out = M / np.sqrt((V ** 2).sum(1, keepdims=True)) * V
    return np.transpose(out.reshape(dims["s"] + dims["i"] + dims["o"]), np.argsort(order))


@pytest.mark.parametrize("layout_case", ["io", "oi", "sio", "ioo"])
def test_dora_merge_matches_float64_formula(layout_case):
    shapes = {"io": (12, 10), "oi": (10, 12), "sio": (3, 12, 10), "ioo": (12, 2, 5)}
    rules = {"io": lora.Rules("k", rank=3, alpha=6, use_dora=True),
             "oi": lora.Rules("k", rank=3, alpha=6, use_dora=True, layout="out_in"),
             "sio": lora.Rules("k", rank=3, alpha=6, use_dora=True, stack_axes=1),
             "ioo": lora.Rules("k", rank=3, alpha=6, use_dora=True, layout="ioo")}[layout_case]
    lp = lora.init({"k": rand(0, shapes[layout_case])}, rules, 0)
    lw = lp["k"]
    assert lw.m.shape == {"io": (10,), "oi": (10,), "sio": (3, 10), "ioo": (2, 5)}[layout_case]
    np.testing.assert_array_equal(lora.merge(lp)["k"], lw.w)  # identity at init
    lw = perturb(lp)["k"]
    ref = dora_reference(lw.w, lw.a, lw.b, lw.m, lw.scale, lw.layout)
    np.testing.assert_allclose(f64(lw.merge()), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f64(lw.unmerge(lw.merge())), f64(lw.w), rtol=1e-5, atol=1e-5)


class DoraNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Conv(6, (3, 3), name="conv")(x)
        h = nn.Dense(16, name="dense")(jnp.tanh(h).reshape(x.shape[0], -1))
        return nn.Dense(4, name="out")(jnp.tanh(h))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dora_wrap_equals_merge_values_and_grads(dtype):
    m = DoraNet()
    x = rand(1, (2, 5, 5, 3), dtype)
    params = jax.tree_util.tree_map(lambda p: p.astype(dtype), m.init(jax.random.key(0), x)["params"])
    lp = perturb(lora.init(params, lora.Rules(["conv", "dense", "out"], rank=2, alpha=4, use_dora=True), 0))
    check_equivalence(lambda p, x: m.apply({"params": p}, x), lp, x, dtype=dtype)


def test_dora_scan_stack_and_embedding():
    params = {"layers": {"w": rand(0, (3, 8, 8)) / 3}, "emb": {"embedding": rand(1, (20, 8))}}
    rules = lora.Rules([lora.Rule(["layers"], stack_axes=1), lora.Rule(["emb"])], rank=2, use_dora=True)
    lp = perturb(lora.init(params, rules, 0))

    def fn(p, ids):
        h = jnp.take(p["emb"]["embedding"], ids, axis=0)
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, p["layers"]["w"])[0]

    check_equivalence(fn, lp, jnp.array([[1, 2, 19], [0, 5, 5]]))


def test_dora_runtime_scale_interpolates_and_zero_is_base():
    params = {"w": rand(0, (8, 6))}
    lp = perturb(lora.init(params, lora.Rules("w", rank=2, use_dora=True), 0))
    fn = lambda p, x: x @ p["w"]  # noqa: E731
    x = rand(1, (3, 8))
    base, full = x @ params["w"], fn(lora.merge(lp), x)
    np.testing.assert_array_equal(lora.wrap(fn, scale=0.0)(lp, x), base)
    g = jax.jit(lambda t: lora.wrap(fn, scale=t)(lp, x))
    _rel_close(g(0.0), base, 1e-6)
    _rel_close(g(1.0), full, 2e-6)
    _rel_close(g(0.25), base + 0.25 * (full - base), 2e-6)  # scale multiplies the whole DoRA delta


def test_dora_same_as_peft_linear():
    from peft import LoraConfig

    w = rand(0, (12, 10))  # Flax (in, out)
    lp = perturb(lora.init({"lin": {"kernel": w}}, lora.Rules(["lin"], rank=3, alpha=6, use_dora=True), 0))
    lw = lp["lin"]["kernel"]
    _, layer = peft_linear(w, LoraConfig(r=3, lora_alpha=6, target_modules=["lin"], use_dora=True), (lw, None))
    x = rand(1, (4, 12))
    xt = torch.tensor(np.asarray(x), requires_grad=True)
    yt = layer(xt)
    yt.square().sum().backward()
    fn = lambda p, x: x @ p["lin"]["kernel"]  # noqa: E731
    y, (g_p, g_x) = jax.value_and_grad(lambda p, x: jnp.sum(lora.wrap(fn)(p, x) ** 2), argnums=(0, 1))(lp, x)
    out = lora.wrap(fn)(lp, x)
    np.testing.assert_allclose(np.asarray(out), yt.detach().numpy(), rtol=1e-5, atol=1e-5)
    gl = g_p["lin"]["kernel"]
    np.testing.assert_allclose(np.asarray(gl.a).T, layer.lora_A["default"].weight.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gl.b).T, layer.lora_B["default"].weight.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gl.m), layer.lora_magnitude_vector["default"].weight.grad.numpy(),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(g_x), xt.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_rslora_scale_matches_peft():
    from peft import LoraConfig

    w = rand(0, (16, 8))
    lp = nonzero_b(lora.init({"lin": {"kernel": w}}, lora.Rules(["lin"], rank=4, alpha=6, use_rslora=True), 0))
    lw = lp["lin"]["kernel"]
    assert lw.scale == 3.0
    _, layer = peft_linear(w, LoraConfig(r=4, lora_alpha=6, target_modules=["lin"], use_rslora=True), (lw, None))
    x = rand(1, (3, 16))
    np.testing.assert_allclose(np.asarray(lora.wrap(lambda p, x: x @ p["lin"]["kernel"])(lp, x)),
                               layer(torch.tensor(np.asarray(x))).detach().numpy(), rtol=1e-5, atol=1e-6)


# -- a new variant is one class and one registration ---------------------------------------------------------

from lora_jax import extend  # noqa: E402
from lora_jax.layout import in_w_layout  # noqa: E402


class Gate(extend.Variant):
    """A test variant: a trainable gate ``g`` per output feature on the delta, ``w + g * s a@b``
    (starts at 1: plain LoRA). No factorized form: `lora.wrap` merges it inside the function."""

    name = "gate"
    has_m = True
    combines = False

    def init_m(self, node):
        return jnp.ones(node.b.shape[:node.layout.count("s")] + node.b.shape[node.layout.count("s") + 1:],
                        node.a.dtype)

    def apply(self, node, w, ct):
        return w.astype(ct) + in_w_layout(node.m.astype(ct), w.shape, node.layout) * node.lora_delta(ct)

    def remove(self, node, merged, ct):
        return merged - in_w_layout(node.m.astype(ct), merged.shape, node.layout) * node.lora_delta(ct)


@pytest.fixture
def gate():
    from lora_jax import variants

    v = extend.register_variant(Gate())
    yield v
    variants._VARIANTS.pop("gate")


def _gated(lp, seed=5):
    lp = nonzero_b(lp, seed=seed, scale=0.3)
    return jax.tree_util.tree_map(
        lambda x: x.replace(m=x.m * (1 + 0.5 * rand(seed, x.m.shape))) if lora.is_lora(x) else x, lp,
        is_leaf=lora.is_lora)


def test_new_variant_merge_wrap_grads_and_file(gate, tmp_path):
    params = {"layers": {"w": rand(0, (3, 6, 6)) / 3}, "head": {"kernel": rand(1, (6, 4))}}
    rules = lora.Rules([lora.Rule(["layers"], stack_axes=1), lora.Rule(["head"])], rank=2, alpha=4, variant="gate")
    lp = lora.init(params, rules, 0)
    assert lp["layers"]["w"].m.shape == (3, 6) and lp["head"]["kernel"].m.shape == (4,)
    assert lp["head"]["kernel"].kind is gate and "variant='gate'" in repr(lp["head"]["kernel"])
    np.testing.assert_array_equal(lora.merge(lp)["head"]["kernel"], params["head"]["kernel"])  # b = 0 at init
    lp = _gated(lp)
    kernels = (("layers", "w"), ("head", "kernel"))

    def net(p, x):
        h = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["layers"]["w"])[0]
        return h @ p["head"]["kernel"]

    def reference(lp, xp):  # the variant's definition, w + g * s a@b, with xp = numpy (float64) or jnp
        out = {}
        for k, leaf in kernels:
            lw = lp[k][leaf]
            d = xp.einsum("...ir,...ro->...io", lw.a, lw.b) * lw.scale
            out[k] = {leaf: lw.w + lw.m[..., None, :] * d}
        return out

    merged = lora.merge(lp)
    ref = reference(jax.tree_util.tree_map(f64, lp), np)
    for k, leaf in kernels:
        np.testing.assert_allclose(f64(merged[k][leaf]), ref[k][leaf], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(f64(lp[k][leaf].unmerge(merged[k][leaf])), f64(params[k][leaf]), atol=1e-6)
    # lora.wrap: value and gradients (to a, b and the variant's m) equal those of the formula
    x = rand(2, (5, 6))
    wy, wg = jax.value_and_grad(lambda lp: jnp.sum(lora.wrap(net)(lp, x) ** 2))(lp)
    ry, rg = jax.value_and_grad(lambda lp: jnp.sum(net(reference(lp, jnp), x) ** 2))(lp)
    np.testing.assert_allclose(wy, ry, rtol=1e-6)
    for k, leaf in kernels:
        for part in ("a", "b", "m"):
            got, want = getattr(wg[k][leaf], part), getattr(rg[k][leaf], part)
            assert np.abs(np.asarray(want)).max() > 0
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # the file keeps the variant's name and its array, bit for bit
    lora.save_adapter(tmp_path / "gate", lp)
    back = lora.load_adapter(tmp_path / "gate", params)
    assert back["head"]["kernel"].variant == "gate"
    np.testing.assert_array_equal(back["layers"]["w"].m, lp["layers"]["w"].m)
    np.testing.assert_array_equal(lora.merge(back)["head"]["kernel"], merged["head"]["kernel"])


def test_new_variant_refusals(gate):
    params = {"w": rand(0, (8, 6))}
    lp = _gated(lora.init(params, lora.Rules("w", rank=2, variant="gate", dropout=0.1), 0))
    fn = lambda p, x: x @ p["w"]  # noqa: E731
    lora.wrap(fn)(lp, jnp.ones((1, 8)))  # no rng: no dropout, fine
    with pytest.raises(ValueError, match="gate variant has no factorized form"):
        lora.wrap(fn, rng=jax.random.key(0))(lp, jnp.ones((1, 8)))
    with pytest.raises(ValueError, match="holds a gate adapter, which cannot share a kernel"):
        lora.add(lp, "second", lora.Rules("w", rank=2), 0)
    with pytest.raises(ValueError, match=r"variant must be one of the registered variants \['lora', 'dora', 'gate'\], "
                                         "got 'nope'"):
        lora.Rules("w", variant="nope")
    with pytest.raises(ValueError, match="routing does not support gate"):
        lora.wrap(fn, adapter_ids=jnp.zeros((1,), jnp.int32))(lp, jnp.ones((1, 8)))


def test_use_dora_is_the_dora_variant_and_old_files_read(tmp_path):
    import json

    params = {"w": rand(0, (8, 6))}
    a = lora.init(params, lora.Rules("w", rank=2, use_dora=True), 0)
    b = lora.init(params, lora.Rules("w", rank=2, variant="dora"), 0)
    assert a["w"].variant == b["w"].variant == "dora" and a["w"].settings == b["w"].settings
    with pytest.raises(ValueError, match="variant is given twice"):
        lora.Rules("w", use_dora=True, variant="dora")
    assert lora.Rules("w", rank=2, use_dora=None).settings.variant == "lora"  # None: not given, as before
    with pytest.raises(ValueError, match=r"an m \(6,\) is given but the adapter's variant 'lora' has none"):
        lora.LoraWeight(params["w"], a["w"].a, a["w"].b, m=a["w"].m, layout="io", rank=2)
    with pytest.raises(ValueError, match="combines plain LoRA adapters only, got dora"):
        lora.combine_adapters(a, ["default"], [1.0])
    lp = perturb(a)
    lora.save_adapter(tmp_path / "d", lp)
    meta = json.loads((tmp_path / "d" / "adapter.json").read_text())
    assert meta["weights"]["w"]["variant"] == "dora"
    del meta["weights"]["w"]["variant"]  # a file written before variants had names: its m says DoRA
    (tmp_path / "d" / "adapter.json").write_text(json.dumps(meta))
    back = lora.load_adapter(tmp_path / "d", params)
    assert back["w"].variant == "dora"
    np.testing.assert_array_equal(lora.merge(back)["w"], lora.merge(lp)["w"])
    plain = lora.init(params, lora.Rules("w", rank=2), 0)
    lora.save_adapter(tmp_path / "p", plain)
    assert "variant" not in json.loads((tmp_path / "p" / "adapter.json").read_text())["weights"]["w"]

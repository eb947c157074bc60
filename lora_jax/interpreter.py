"""`wrap(fn)`: run any JAX function with LoRA weights kept factorized.

``wrap`` traces ``fn`` with plain arrays standing in for each `LoraWeight` (``jax.make_jaxpr``)
and evaluates the jaxpr with an interpreter in which each LoRA weight is a *lazy* value
``w + a @ b`` (the scale folded into ``a``). Lazy values stay lazy through layout-only ops
(``convert_element_type``, ``transpose``, ``reshape``/``squeeze``/``expand_dims`` that keep the
stack/input/output axis groups apart, ``slice``, ``dynamic_slice``, ``rev``, ``copy``, sharding
constraints, multiplication by a scalar) and are consumed factorized by:

* ``dot_general`` (any contracting/batch dims, either side): ``x.w + (x.a).b`` — or ``(x.b).a``
  when ``x`` contracts with the output axes, as a tied LM head ``h @ E.T`` does;
* ``conv_general_dilated`` (groups=1): a conv with ``a`` as a rank-r kernel, then a 1x1 conv with ``b``;
* ``gather`` of rows (embedding lookups): ``w[ids] + a[ids] @ b``.

``jit``, ``remat``/``checkpoint`` (its policy kept), ``scan`` (a stacked LoRA weight in ``xs`` is
sliced per step and stays factorized), ``cond`` and ``while`` are entered and re-expressed with
their public functions. ``custom_jvp``/``custom_vjp`` calls get the merged weight (their rules need
it). Any other primitive that meets a LoRA weight gets ``w + a @ b`` for that use only, with a
`MaterializeWarning` once per primitive. Only public JAX API is used.
"""

from __future__ import annotations

import functools
import math
import string
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore
from jax.extend.core import primitives as P

from .weight import LoraWeight, column_norm, delta_from_factors, in_w_layout, is_lora, is_node, is_trainable

__all__ = ["wrap", "MaterializeWarning"]


class MaterializeWarning(UserWarning):
    """A LoRA weight met a primitive with no factorized rule and was merged for that use.

    The result is still exact; only the cost differs. Turn it into an error in tests with
    ``warnings.simplefilter("error", lora.MaterializeWarning)``.
    """


# ------------------------------------------------------------------------------------------
# The lazy value
# ------------------------------------------------------------------------------------------


@jax.tree_util.register_pytree_node_class
class _Lazy:
    """``w + a @ b`` in the layout ``kinds`` (scale already folded into ``a``).

    ``a``: ``(*s, *i, r)``, ``b``: ``(*s, r, *o)`` with each group in ``w``'s axis order.
    ``key``: the dropout key (None: no dropout).
    ``mag``: DoRA's per-output-feature factor ``m / ||w + a@b||`` (gradient stopped at the norm),
    shaped like ``b`` with a rank of 1 so that every layout op treats it as it treats ``b``; the
    weight is then ``mag * (w + a @ b)``. None without DoRA.
    """

    __slots__ = ("w", "a", "b", "key", "mag", "kinds", "dropout", "routed")

    def __init__(self, w, a, b, key, kinds: str, dropout: float, mag=None, routed: bool = False):
        self.w, self.a, self.b, self.key, self.mag = w, a, b, key, mag
        self.kinds, self.dropout, self.routed = kinds, dropout, routed

    def tree_flatten(self):
        return (self.w, self.a, self.b, self.key, self.mag), (self.kinds, self.dropout, self.routed)

    @classmethod
    def tree_unflatten(cls, aux, children):
        w, a, b, key, mag = children
        kinds, dropout, routed = aux
        return cls(w, a, b, key, kinds, dropout, mag=mag, routed=routed)

    @property
    def wd(self):
        """The base as a dense array (a quantized base is dequantized here, at its use)."""
        return self.w.dequantize() if hasattr(self.w, "dequantize") else self.w

    @property
    def dtype(self):
        return self.w.dtype

    @property
    def shape(self):
        return self.w.shape

    def with_(self, **kw):
        d = dict(w=self.w, a=self.a, b=self.b, key=self.key, kinds=self.kinds, dropout=self.dropout, mag=self.mag,
                 routed=self.routed)
        d.update(kw)
        return _Lazy(**d)

    def axes(self, kind: str) -> list[int]:
        return [j for j, k in enumerate(self.kinds) if k == kind]

    def b_like(self, f):
        """Apply ``f(array, rank)`` to ``b`` and to the DoRA factor (whose rank axis has size 1)."""
        return dict(b=f(self.b, self.b.shape[len(self.axes("s"))]),
                    mag=None if self.mag is None else f(self.mag, 1))

    def materialize(self):
        if self.routed:
            raise ValueError("lora.wrap(adapter_ids=...): a LoRA weight reached an operation with no factorized rule "
                             "(it would have to be merged), which per-example routing cannot do; route only models "
                             "whose LoRA weights feed matmuls, convolutions and embedding lookups")
        ct = jnp.promote_types(self.w.dtype, jnp.float32)
        with jax.named_scope("lora_materialize"):
            d = delta_from_factors(self.a.astype(ct), self.b.astype(ct), self.kinds)
            if self.mag is None:
                return (self.wd.astype(ct) + d).astype(self.w.dtype)
            m0, m1 = (in_w_layout(m.astype(ct), self.w.shape, self.kinds) for m in _mags(self))
            return (m0 * self.wd.astype(ct) + m1 * d).astype(self.w.dtype)


def _is_lazy(x) -> bool:
    return isinstance(x, _Lazy)


def _dense(x):
    return x.materialize() if _is_lazy(x) else x


# ------------------------------------------------------------------------------------------
# Evaluation context
# ------------------------------------------------------------------------------------------


class _Ctx:
    """Per-call state: dropout salts (loop iteration counters) and a counter of LoRA uses."""

    def __init__(self, salts=(), route=None):
        self.salts = tuple(salts)
        self.uses = [0]
        self.route = route  # (examples, n_adapters * r) 0/1 mask of each example's rank columns

    def child(self, salt):
        c = _Ctx(self.salts + (salt,), self.route)
        c.uses = self.uses
        return c

    def routed(self, t, example_axis: int, rank_axis: int):
        """Keep, for each example (along ``example_axis``), only its adapter's rank columns."""
        if self.route is None:
            return t
        n_ex, width = self.route.shape
        rows = t.shape[example_axis]
        if t.shape[rank_axis] != width:
            raise ValueError(f"internal: routed rank width {t.shape[rank_axis]} != {width}")
        if rows % n_ex:
            raise ValueError(f"lora.wrap(adapter_ids=...): {n_ex} adapter ids but a LoRA input has {rows} rows on its "
                             f"leading axis (shape {tuple(t.shape)}); the leading axis must be the examples (or "
                             "examples x tokens, flattened)")
        mask = jnp.repeat(self.route, rows // n_ex, axis=0) if rows != n_ex else self.route
        shape = [1] * t.ndim
        shape[example_axis], shape[rank_axis] = rows, width
        if example_axis > rank_axis:
            mask = mask.T
        return t * mask.reshape(shape).astype(t.dtype)

    def dropout(self, x, lz: _Lazy):
        """Inverted dropout on the adapter's input ``x`` (identity when ``lz`` has no key)."""
        if lz.key is None or lz.dropout <= 0.0:
            return x
        self.uses[0] += 1
        k = jax.random.fold_in(lz.key, self.uses[0])
        for s in self.salts:
            k = jax.random.fold_in(k, s)
        keep = 1.0 - lz.dropout
        mask = jax.random.bernoulli(k, keep, x.shape)
        return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype)).astype(x.dtype)


def _bind(eqn, invals):
    bp = eqn.primitive.get_bind_params(eqn.params)
    # jax < 0.7 returns (subfuns, params); newer releases return params alone
    subfuns, params = bp if isinstance(bp, tuple) else ((), bp)
    out = eqn.primitive.bind(*subfuns, *invals, **params)
    return out if eqn.primitive.multiple_results else [out]


def _read(env, v):
    return v.val if isinstance(v, jcore.Literal) else env[v]


def _eval_jaxpr(jaxpr, consts, args, ctx: _Ctx):
    env = {}

    def write(v, val):
        if not isinstance(v, jcore.DropVar):
            env[v] = val

    for v, val in zip(jaxpr.constvars, consts):
        write(v, val)
    if len(args) != len(jaxpr.invars):
        raise TypeError(f"internal: jaxpr takes {len(jaxpr.invars)} inputs, got {len(args)}")
    for v, val in zip(jaxpr.invars, args):
        write(v, val)
    for eqn in jaxpr.eqns:
        invals = [_read(env, v) for v in eqn.invars]
        if any(_is_lazy(x) for x in invals):
            rule = _RULES.get(eqn.primitive, _fallback)
            outvals = rule(ctx, eqn, invals)
        else:
            outvals = _bind(eqn, invals)
        for v, val in zip(eqn.outvars, outvals):
            write(v, val)
    return [_read(env, v) for v in jaxpr.outvars]


def _eval_closed(closed, args, ctx):
    return _eval_jaxpr(closed.jaxpr, closed.consts, args, ctx)


# ------------------------------------------------------------------------------------------
# Fallback
# ------------------------------------------------------------------------------------------


def _fallback(ctx, eqn, invals):
    dense = [_dense(x) for x in invals]  # raises first if this use cannot be merged (routing)
    warnings.warn(
        f"lora_jax.wrap: primitive '{eqn.primitive.name}' has no factorized LoRA rule; the LoRA weight "
        f"was merged (w + s*A@B) for this use. Results are exact; only the cost differs.",
        MaterializeWarning, stacklevel=2)
    return _bind(eqn, dense)


def _dense_call(ctx, eqn, invals):
    """Custom-derivative calls: their rules need the dense weight, so give it to them."""
    return _bind(eqn, [_dense(x) for x in invals])


# ------------------------------------------------------------------------------------------
# Layout-only ops: stay lazy
# ------------------------------------------------------------------------------------------


def _w_only(ctx, eqn, invals):
    """Ops that change only how w is stored (copy, sharding constraints): apply to w."""
    (lz,) = invals
    (w,) = _bind(eqn, [lz.wd])
    return [lz.with_(w=w)]


def _convert(ctx, eqn, invals):
    (lz,) = invals
    if not jnp.issubdtype(eqn.params["new_dtype"], jnp.inexact):
        return _fallback(ctx, eqn, invals)
    (w,) = _bind(eqn, [lz.wd])
    return [lz.with_(w=w)]


def _factor_axes(lz: _Lazy):
    """For each w axis: its position in a (or None) and in b (or None)."""
    s, i, o = lz.axes("s"), lz.axes("i"), lz.axes("o")
    in_a, in_b = {}, {}
    for p, j in enumerate(s):
        in_a[j] = p
        in_b[j] = p
    for p, j in enumerate(i):
        in_a[j] = len(s) + p
    for p, j in enumerate(o):
        in_b[j] = len(s) + 1 + p
    return in_a, in_b


def _transpose(ctx, eqn, invals):
    (lz,) = invals
    perm = tuple(eqn.params["permutation"])
    (w,) = _bind(eqn, [lz.wd])
    kinds = "".join(lz.kinds[p] for p in perm)
    s_old, i_old, o_old = lz.axes("s"), lz.axes("i"), lz.axes("o")
    s_new = [p for p in perm if lz.kinds[p] == "s"]
    i_new = [p for p in perm if lz.kinds[p] == "i"]
    o_new = [p for p in perm if lz.kinds[p] == "o"]
    ns = len(s_old)
    pa = [s_old.index(j) for j in s_new] + [ns + i_old.index(j) for j in i_new] + [ns + len(i_old)]
    pb = [s_old.index(j) for j in s_new] + [ns] + [ns + 1 + o_old.index(j) for j in o_new]
    return [lz.with_(w=w, a=jnp.transpose(lz.a, pa), kinds=kinds, **lz.b_like(lambda x, _: jnp.transpose(x, pb)))]


def _reshape_kinds(kinds: str, old: Sequence[int], new: Sequence[int]) -> Optional[str]:
    """Kinds of the new axes if the reshape keeps stack/in/out groups apart, else None."""
    if 0 in old or 0 in new:
        return None
    old_nu = [k for k, d in enumerate(old) if d != 1]
    new_nu = [k for k, d in enumerate(new) if d != 1]
    out = ["s"] * len(new)  # unit axes become unit stack axes (present in a and b)
    p = q = 0
    while p < len(old_nu) and q < len(new_nu):
        go, gn = [old_nu[p]], [new_nu[q]]
        po, pn = old[old_nu[p]], new[new_nu[q]]
        p, q = p + 1, q + 1
        while po != pn:
            if po < pn:
                if p >= len(old_nu):
                    return None
                go.append(old_nu[p])
                po *= old[old_nu[p]]
                p += 1
            else:
                if q >= len(new_nu):
                    return None
                gn.append(new_nu[q])
                pn *= new[new_nu[q]]
                q += 1
        ks = {kinds[a] for a in go}
        if len(ks) != 1:
            return None
        k = ks.pop()
        for b in gn:
            out[b] = k
    if p != len(old_nu) or q != len(new_nu):
        return None
    kinds_new = "".join(out)
    if "i" not in kinds_new and "i" in kinds or "o" not in kinds_new and "o" in kinds:
        return None
    return kinds_new


def _reshape_to(lz: _Lazy, w, new_shape) -> Optional[_Lazy]:
    kinds = _reshape_kinds(lz.kinds, lz.w.shape, new_shape)
    if kinds is None:
        return None
    r = lz.a.shape[-1]
    part = lambda k: tuple(d for d, c in zip(new_shape, kinds) if c == k)  # noqa: E731
    a = lz.a.reshape(part("s") + part("i") + (r,))
    return lz.with_(w=w, a=a, kinds=kinds, **lz.b_like(lambda x, n: x.reshape(part("s") + (n,) + part("o"))))


def _reshape(ctx, eqn, invals):
    lz = invals[0]
    if eqn.params.get("dimensions") is not None or len(invals) != 1:
        return _fallback(ctx, eqn, invals)
    new_shape = tuple(eqn.outvars[0].aval.shape)
    (w,) = _bind(eqn, [lz.wd])
    out = _reshape_to(lz, w, new_shape)
    return [out] if out is not None else _fallback(ctx, eqn, invals)


def _squeeze(ctx, eqn, invals):
    (lz,) = invals
    (w,) = _bind(eqn, [lz.wd])
    out = _reshape_to(lz, w, tuple(eqn.outvars[0].aval.shape))
    return [out] if out is not None else _fallback(ctx, eqn, invals)


def _broadcast_in_dim(ctx, eqn, invals):
    lz = invals[0]
    shape, bdims = tuple(eqn.params["shape"]), tuple(eqn.params["broadcast_dimensions"])
    ok = (len(invals) == 1 and list(bdims) == sorted(bdims)
          and all(shape[d] == lz.shape[k] for k, d in enumerate(bdims))
          and all(shape[d] == 1 for d in range(len(shape)) if d not in bdims))
    if not ok:
        return _fallback(ctx, eqn, invals)
    (w,) = _bind(eqn, [lz.wd])
    out = _reshape_to(lz, w, shape)
    return [out] if out is not None else _fallback(ctx, eqn, invals)


def _factor_index(lz: _Lazy, per_axis, r_value):
    """Map a per-w-axis list of values to a's and b's axes (the rank axis gets ``r_value``)."""
    in_a, in_b = _factor_axes(lz)
    va = [r_value] * lz.a.ndim
    vb = [r_value] * lz.b.ndim
    for j, v in enumerate(per_axis):
        if j in in_a:
            va[in_a[j]] = v
        if j in in_b:
            vb[in_b[j]] = v
    return va, vb


def _slice(ctx, eqn, invals):
    (lz,) = invals
    p = eqn.params
    (w,) = _bind(eqn, [lz.wd])
    strides = p["strides"] or (1,) * lz.w.ndim
    r = lz.a.shape[-1]
    sa, sb = _factor_index(lz, p["start_indices"], 0)
    la, lb = _factor_index(lz, p["limit_indices"], None)
    ta, tb = _factor_index(lz, strides, 1)
    la[la.index(None)] = r
    ri = lb.index(None)

    def cut(x, n):
        lim = list(lb)
        lim[ri] = n
        return jax.lax.slice(x, sb, lim, tb)

    a = jax.lax.slice(lz.a, sa, la, ta)
    return [lz.with_(w=w, a=a, **lz.b_like(cut))]


def _dynamic_slice(ctx, eqn, invals):
    lz, starts = invals[0], invals[1:]
    if any(_is_lazy(s) for s in starts) or len(starts) != lz.w.ndim:
        return _fallback(ctx, eqn, invals)
    (w,) = _bind(eqn, [lz.wd, *starts])
    sizes = eqn.params["slice_sizes"]
    r = lz.a.shape[-1]
    zero = jnp.zeros((), jnp.asarray(starts[0]).dtype) if starts else 0
    sa, sb = _factor_index(lz, starts, zero)
    za, zb = _factor_index(lz, sizes, None)
    za[za.index(None)] = r
    ri = zb.index(None)

    def cut(x, n):
        sz = list(zb)
        sz[ri] = n
        return jax.lax.dynamic_slice(x, sb, sz)

    a = jax.lax.dynamic_slice(lz.a, sa, za)
    return [lz.with_(w=w, a=a, **lz.b_like(cut))]


def _rev(ctx, eqn, invals):
    (lz,) = invals
    (w,) = _bind(eqn, [lz.wd])
    in_a, in_b = _factor_axes(lz)
    dims = eqn.params["dimensions"]
    a = jax.lax.rev(lz.a, tuple(in_a[d] for d in dims if d in in_a))
    return [lz.with_(w=w, a=a, **lz.b_like(lambda x, _: jax.lax.rev(x, tuple(in_b[d] for d in dims if d in in_b))))]


def _scalar_mul(ctx, eqn, invals):
    x, y = invals
    if _is_lazy(x) and not _is_lazy(y) and jnp.ndim(y) == 0:
        lz, c = x, y
    elif _is_lazy(y) and not _is_lazy(x) and jnp.ndim(x) == 0:
        lz, c = y, x
    else:
        return _fallback(ctx, eqn, invals)
    (w,) = _bind(eqn, [x if x is not lz else lz.wd, y if y is not lz else lz.wd])
    return [lz.with_(w=w, a=lz.a * jnp.asarray(c).astype(lz.a.dtype))]


def _neg(ctx, eqn, invals):
    (lz,) = invals
    (w,) = _bind(eqn, [lz.wd])
    return [lz.with_(w=w, a=-lz.a)]


# ------------------------------------------------------------------------------------------
# Consumers: dot_general, conv, gather
# ------------------------------------------------------------------------------------------


def _rank_first_grads() -> bool:
    # asked at trace time, never at import (importing must not initialize a backend)
    return jax.default_backend() == "cpu"


def _mags(lz: _Lazy):
    """DoRA's (base, adapter) output factors, each ``(*s, *o)``."""
    ns = len(lz.axes("s"))
    return jnp.take(lz.mag, 0, axis=ns), jnp.take(lz.mag, 1, axis=ns)


def _expand(m, letters, out):
    """Arrange ``m`` (axes named by ``letters``, all in ``out``) to broadcast against ``out``."""
    order = sorted(range(len(letters)), key=lambda k: out.index(letters[k]))
    m = jnp.transpose(m, order)
    shape = [1] * len(out)
    for k in order:
        shape[out.index(letters[k])] = m.shape[order.index(k)]
    return m.reshape(shape)


def _apply_dora(ctx_eqn, base, d, m0, m1, dropped_base, out_dtype):
    """``m0 * base + m1 * d`` (or ``base + (m0-1) * dropped_base + m1 * d`` under dropout)."""
    ct = jnp.promote_types(out_dtype, jnp.float32)
    if dropped_base is None:
        y = m0.astype(ct) * base.astype(ct) + m1.astype(ct) * d.astype(ct)
    else:
        y = base.astype(ct) + (m0.astype(ct) - 1) * dropped_base.astype(ct) + m1.astype(ct) * d.astype(ct)
    return y.astype(out_dtype)


def _letters(n, start=0):
    return list(string.ascii_letters[start:start + n])


def _dot_general(ctx, eqn, invals):
    lhs, rhs = invals
    if _is_lazy(lhs) and _is_lazy(rhs):
        lhs = lhs.materialize()
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lazy_is_rhs = _is_lazy(rhs)
    lz, x = (rhs, lhs) if lazy_is_rhs else (lhs, rhs)
    xc, wc, xb, wb = (lc, rc, lb, rb) if lazy_is_rhs else (rc, lc, rb, lb)

    # einsum letters: x's axes, then w's; contracted/batched pairs share one
    xl = _letters(x.ndim)
    wl = _letters(lz.w.ndim, x.ndim)
    for a, b in zip(xc, wc):
        wl[b] = xl[a]
    for a, b in zip(xb, wb):
        wl[b] = xl[a]
    batch = [xl[a] for a in xb]
    x_free = [xl[a] for a in range(x.ndim) if a not in xc and a not in xb]
    w_free = [wl[b] for b in range(lz.w.ndim) if b not in wc and b not in wb]
    out = batch + (x_free + w_free if lazy_is_rhs else w_free + x_free)
    per_out = [wl[j] for j in lz.axes("s")] + [wl[j] for j in lz.axes("o")]
    if lz.mag is not None and not set(per_out) <= set(out):
        return _fallback(ctx, eqn, invals)  # DoRA's output scaling needs the output axes kept
    base = _bind(eqn, [lhs, lz.wd] if lazy_is_rhs else [lz.wd, rhs])[0]
    r = "Z"
    s = [wl[j] for j in lz.axes("s")]
    a_spec = s + [wl[j] for j in lz.axes("i")] + [r]
    b_spec = s + [r] + [wl[j] for j in lz.axes("o")]

    shared = set(xl)
    first_is_a = bool(shared & {wl[j] for j in lz.axes("i")}) or not (shared & {wl[j] for j in lz.axes("o")})
    (f_spec, f_val), (g_spec, g_val) = ((a_spec, lz.a), (b_spec, lz.b)) if first_is_a else ((b_spec, lz.b),
                                                                                          (a_spec, lz.a))
    keep = set(out) | set(g_spec)
    inter = []
    for c in xl + f_spec:
        if c in keep and c not in inter:
            inter.append(c)
    cd = lz.dtype
    prec = eqn.params.get("precision")
    pet = eqn.params.get("preferred_element_type")
    out_dtype = eqn.outvars[0].aval.dtype
    with jax.named_scope("lora"):
        xd = ctx.dropout(x, lz)
        f_val = f_val.astype(cd)
        if first_is_a and _rank_first_grads():
            # XLA:CPU computes the gradient of a factor 10x faster as (r, in) than as (in, r); the
            # barrier keeps it from folding the transpose back into that dot. Identity otherwise.
            f_val = jax.lax.optimization_barrier(jnp.moveaxis(f_val, -1, 0))
            f_spec = [f_spec[-1]] + f_spec[:-1]
        t = jnp.einsum(f"{''.join(xl)},{''.join(f_spec)}->{''.join(inter)}", xd, f_val, precision=prec,
                       preferred_element_type=pet)
        t = t.astype(jnp.result_type(x.dtype, cd))
        if ctx.route is not None:
            if xl[0] not in inter:
                raise ValueError("lora.wrap(adapter_ids=...): a LoRA matmul contracts its input's leading (example) "
                                 "axis, so examples cannot be routed to different adapters")
            t = ctx.routed(t, inter.index(xl[0]), inter.index(r))
        d = jnp.einsum(f"{''.join(inter)},{''.join(g_spec)}->{''.join(out)}", t, g_val.astype(cd), precision=prec,
                       preferred_element_type=pet)
        if lz.mag is not None:
            m0, m1 = (_expand(m, per_out, out) for m in _mags(lz))
            dropped = None if xd is x else _bind(eqn, [xd, lz.wd] if lazy_is_rhs else [lz.wd, xd])[0]
            return [_apply_dora(eqn, base, d, m0, m1, dropped, out_dtype)]
    return [base + d.astype(out_dtype)]


def _conv(ctx, eqn, invals):
    lhs, rhs = invals
    p = eqn.params
    if _is_lazy(lhs) or p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        return _fallback(ctx, eqn, invals)
    lz = rhs
    dn = p["dimension_numbers"]
    out_dim, in_dim = dn.rhs_spec[0], dn.rhs_spec[1]
    if "s" in lz.kinds or lz.kinds[out_dim] != "o" or lz.kinds.count("o") != 1:
        return _fallback(ctx, eqn, invals)
    base = _bind(eqn, [lhs, lz.wd])[0]
    cd = lz.dtype
    r = lz.a.shape[-1]
    nd = lz.w.ndim
    # a as a kernel in w's layout with the output-feature axis replaced by the rank
    a_k = jnp.moveaxis(lz.a.astype(cd), -1, out_dim)
    # b as a 1x1 kernel: rank on the input-feature axis, outputs on the output axis
    b_k = lz.b.astype(cd).reshape((r, lz.b.shape[-1]) + (1,) * (nd - 2))
    src = [in_dim, out_dim] + [d for d in dn.rhs_spec[2:]]
    b_k = jnp.transpose(b_k, np.argsort(src))
    common = dict(precision=p["precision"], preferred_element_type=p["preferred_element_type"])
    with jax.named_scope("lora"):
        xd = ctx.dropout(lhs, lz)
        t = jax.lax.conv_general_dilated(xd, a_k, p["window_strides"], p["padding"], p["lhs_dilation"],
                                         p["rhs_dilation"], dn, **common)
        t = t.astype(jnp.result_type(lhs.dtype, cd))
        t = ctx.routed(t, dn.out_spec[0], dn.out_spec[1])
        dn2 = jax.lax.ConvDimensionNumbers(lhs_spec=dn.out_spec, rhs_spec=dn.rhs_spec, out_spec=dn.out_spec)
        nsp = nd - 2
        d = jax.lax.conv_general_dilated(t, b_k, (1,) * nsp, [(0, 0)] * nsp, (1,) * nsp, (1,) * nsp, dn2, **common)
        if lz.mag is not None:
            shape = [1] * nd
            shape[dn.out_spec[1]] = lz.w.shape[out_dim]
            m0, m1 = (m.reshape(shape) for m in _mags(lz))
            dropped = None if xd is lhs else _bind(eqn, [xd, lz.wd])[0]
            return [_apply_dora(eqn, base, d, m0, m1, dropped, eqn.outvars[0].aval.dtype)]
    return [base + d.astype(eqn.outvars[0].aval.dtype)]


def _gather(ctx, eqn, invals):
    lz, idx = invals
    if _is_lazy(idx) or not _is_lazy(lz):
        return _fallback(ctx, eqn, invals)
    p = eqn.params
    dn = p["dimension_numbers"]
    kinds = lz.kinds
    n_o = kinds.count("o")
    nd = lz.w.ndim
    o_axes = list(range(nd - n_o, nd))
    out_nd = eqn.outvars[0].aval.ndim
    ok = ("s" not in kinds and kinds == "i" * (nd - n_o) + "o" * n_o
          and not set(o_axes) & set(dn.collapsed_slice_dims) and not set(o_axes) & set(dn.start_index_map)
          and not set(o_axes) & set(dn.operand_batching_dims)
          and all(p["slice_sizes"][j] == lz.w.shape[j] for j in o_axes)
          and tuple(dn.offset_dims[-n_o:]) == tuple(range(out_nd - n_o, out_nd)))
    if not ok:
        return _fallback(ctx, eqn, invals)
    base = _bind(eqn, [lz.wd, idx])[0]
    r = lz.a.shape[-1]
    dn_a = jax.lax.GatherDimensionNumbers(
        offset_dims=tuple(dn.offset_dims[:-n_o]) + (out_nd - n_o,), collapsed_slice_dims=dn.collapsed_slice_dims,
        start_index_map=dn.start_index_map, operand_batching_dims=dn.operand_batching_dims,
        start_indices_batching_dims=dn.start_indices_batching_dims)
    with jax.named_scope("lora"):
        rows = jax.lax.gather(lz.a.astype(lz.dtype), idx, dn_a, tuple(p["slice_sizes"][:nd - n_o]) + (r,),
                              indices_are_sorted=p["indices_are_sorted"], unique_indices=p["unique_indices"],
                              mode=p["mode"], fill_value=p["fill_value"])
        rows = ctx.routed(rows, 0, rows.ndim - 1)
        d = jnp.tensordot(rows, lz.b.astype(lz.dtype), axes=1)
        if lz.mag is not None:
            m0, m1 = _mags(lz)
            return [_apply_dora(eqn, base, d, m0, m1, None, eqn.outvars[0].aval.dtype)]
    return [base + d.astype(eqn.outvars[0].aval.dtype)]


# ------------------------------------------------------------------------------------------
# Higher-order primitives: entered, re-expressed through their public functions
# ------------------------------------------------------------------------------------------


def _inline(ctx, eqn, invals):
    closed = eqn.params["jaxpr"]
    return _eval_closed(closed, invals, ctx)


def _call(ctx, eqn, invals):
    call = eqn.params["call_jaxpr"]
    if isinstance(call, jcore.ClosedJaxpr):
        return _eval_closed(call, invals, ctx)
    return _eval_jaxpr(call, [], invals, ctx)


def _remat(ctx, eqn, invals):
    p = eqn.params
    jaxpr = p["jaxpr"]

    def body(*args):
        return [_dense(o) for o in _eval_jaxpr(jaxpr, [], list(args), ctx)]

    return jax.checkpoint(body, prevent_cse=p["prevent_cse"], policy=p["policy"])(*invals)


def _scan_split(eqn) -> tuple[int, int]:
    """``(num_consts, num_carry)`` of a scan equation: explicit params up to jax 0.11; from jax 0.12
    the input tree ``ft_in`` = (consts, carry, xs), each part listing its leaves in ``vals``."""
    p = eqn.params
    if "num_consts" in p:
        return p["num_consts"], p["num_carry"]
    ft = p.get("ft_in")
    parts = getattr(ft, "elts", None)
    if parts is None or len(parts) != 3 or not all(hasattr(x, "vals") for x in parts):
        raise NotImplementedError(f"lora.wrap: this jax version's scan parameters are not understood "
                                  f"(keys {sorted(p)}); please report it with the jax version {jax.__version__}")
    nc, ncar, nx = (len(list(x.vals)) for x in parts)
    if nc + ncar + nx != len(eqn.invars):
        raise NotImplementedError(f"lora.wrap: scan input tree of {nc}+{ncar}+{nx} leaves does not match its "
                                  f"{len(eqn.invars)} operands (jax {jax.__version__})")
    return nc, ncar


def _scan(ctx, eqn, invals):
    p = eqn.params
    nc, ncar = _scan_split(eqn)
    consts, init, xs = list(invals[:nc]), [_dense(v) for v in invals[nc:nc + ncar]], list(invals[nc + ncar:])
    length = p["length"]
    xs_in = []
    for v in xs:
        if _is_lazy(v):
            if v.kinds[0] == "s" and v.a.shape[0] == length:
                key = None if v.key is None else jax.random.split(v.key, length)
                w = v.w.unstacked() if hasattr(v.w, "unstacked") else v.w  # a quantized stack stays quantized
                v = _Lazy(w, v.a, v.b, key, v.kinds[1:], v.dropout, mag=v.mag, routed=v.routed)
            else:
                v = v.materialize()
        xs_in.append(v)
    salted = any(_is_lazy(c) and c.key is not None for c in consts)
    body_jaxpr = p["jaxpr"]

    def body(carry, x):
        sub = ctx
        if salted:
            x, it = x[:-1], x[-1]
            sub = ctx.child(it)
        outs = [_dense(o) for o in _eval_closed(body_jaxpr, consts + list(carry) + list(x), sub)]
        return outs[:ncar], outs[ncar:]

    extra = [jnp.arange(length, dtype=jnp.uint32)] if salted else []
    carry, ys = jax.lax.scan(body, init, xs_in + extra, length=length, reverse=p["reverse"], unroll=p["unroll"])
    return list(carry) + list(ys)


def _cond(ctx, eqn, invals):
    index, ops = invals[0], list(invals[1:])
    if _is_lazy(index):
        return _fallback(ctx, eqn, invals)

    def branch(closed):
        return lambda *args: [_dense(o) for o in _eval_closed(closed, list(args), ctx)]

    return jax.lax.switch(index, [branch(b) for b in eqn.params["branches"]], *ops)


def _while(ctx, eqn, invals):
    p = eqn.params
    cc, bc = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts = list(invals[:cc]), list(invals[cc:cc + bc])
    init = [_dense(v) for v in invals[cc + bc:]]

    def cond_fun(carry):
        return _dense(_eval_closed(p["cond_jaxpr"], cconsts + list(carry), ctx)[0])

    def body_fun(carry):
        return [_dense(o) for o in _eval_closed(p["body_jaxpr"], bconsts + list(carry), ctx)]

    return list(jax.lax.while_loop(cond_fun, body_fun, init))


def _prim(name):
    return getattr(P, name, None)


_RULES: dict[Any, Callable] = {}
for _name, _rule in [
    ("dot_general_p", _dot_general), ("conv_general_dilated_p", _conv), ("gather_p", _gather),
    ("convert_element_type_p", _convert), ("transpose_p", _transpose), ("reshape_p", _reshape),
    ("squeeze_p", _squeeze), ("broadcast_in_dim_p", _broadcast_in_dim), ("slice_p", _slice),
    ("dynamic_slice_p", _dynamic_slice), ("rev_p", _rev), ("copy_p", _w_only), ("copy_p_", _w_only),
    ("sharding_constraint_p", _w_only), ("mul_p", _scalar_mul), ("neg_p", _neg),
    ("jit_p", _inline), ("pjit_p", _inline), ("closed_call_p", _call), ("call_p", _call), ("remat_p", _remat),
    ("checkpoint_p", _remat), ("scan_p", _scan), ("cond_p", _cond), ("while_p", _while),
    ("custom_jvp_call_p", _dense_call), ("custom_vjp_call_p", _dense_call), ("custom_vjp_call_jaxpr_p", _dense_call),
]:
    _p = _prim(_name)
    if _p is not None:
        _RULES[_p] = _rule


# ------------------------------------------------------------------------------------------
# wrap
# ------------------------------------------------------------------------------------------


def _is_dynamic(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _as_key(rng):
    if rng is None:
        return None
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return rng
    if rng.dtype == jnp.uint32 and rng.shape[-1:] == (2,):
        return jax.random.wrap_key_data(rng)
    raise TypeError(f"lora.wrap: rng must be a jax.random key, got an array of {rng.dtype}{list(rng.shape)}")


def _static_zero(scale) -> bool:
    return isinstance(scale, (int, float, np.number)) and not isinstance(scale, bool) and float(scale) == 0.0


def _quantized(x) -> bool:
    return hasattr(x, "dequantize") and hasattr(x, "scheme")


def _quantized_lazy(q):
    """A quantized frozen kernel without an adapter: a rank-0 lazy, dequantized where it is used."""
    kinds = "s" * q.stack + "i" * (q.ndim - q.stack - 1) + "o"
    a_shape = tuple(d for d, k in zip(q.shape, kinds) if k in "si") + (0,)
    b_shape = tuple(d for d, k in zip(q.shape, kinds) if k == "s") + (0,) + (q.shape[-1],)
    return _Lazy(q, jnp.zeros(a_shape, jnp.float32), jnp.zeros(b_shape, jnp.float32), None, kinds, 0.0)


def _adapter_order(loras) -> list[str]:
    """Every adapter name in the LoRA weights, in order of first appearance (oldest first)."""
    names = []
    for v in loras:
        for node in v.chain():
            if node.name not in names:
                names.append(node.name)
    return names


def _lazy_from(v: LoraWeight, n: int, t, rng_key, route_names=None, r_block=0):
    """The lazy value for a LoRA weight: its active adapters (or, when routing, every adapter in
    ``route_names`` order, each padded to ``r_block`` rank columns) as one concatenated rank."""
    base, chain = v.base, v.chain()
    layouts = {node.layout for node in chain}
    if len(layouts) != 1:
        raise ValueError(f"lora.wrap: adapters on one kernel disagree on its layout: {sorted(layouts)}")
    ns = v.layout.count("s")
    if route_names is None:
        nodes = [node for node in chain if node.active]
        if not nodes:
            return base
        if len(nodes) > 1 and any(node.m is not None for node in nodes):
            raise ValueError(f"lora.wrap: {len(nodes)} adapters are active on one kernel and one of them is DoRA; "
                             f"activate one ({[node.name for node in nodes]}) with lora.select")
        a_parts = [node.effective_a() * jnp.asarray(node.scale, node.a.dtype) for node in nodes]
        b_parts = [node.effective_b() for node in nodes]
    else:
        if any(node.m is not None for node in chain):
            raise ValueError("lora.wrap(adapter_ids=...): per-example routing does not support DoRA adapters")
        by_name = {node.name: node for node in chain}
        nodes = list(chain)
        a_shape, b_shape = v.a.shape[:-1], v.b.shape[:ns] + v.b.shape[ns + 1:]
        a_parts, b_parts = [], []
        for name in route_names:
            node = by_name.get(name)
            pad = r_block - (node.rank if node is not None else 0)
            if node is None:
                a_parts.append(jnp.zeros(a_shape + (r_block,), jnp.float32))
                b_parts.append(jnp.zeros(b_shape[:ns] + (r_block,) + b_shape[ns:], jnp.float32))
                continue
            a = node.effective_a() * jnp.asarray(node.scale, node.a.dtype)
            a_parts.append(jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)]))
            b = node.effective_b()
            b_parts.append(jnp.pad(b, [(0, 0)] * ns + [(0, pad)] + [(0, 0)] * (b.ndim - ns - 1)))
    a = jnp.concatenate(a_parts, axis=-1) if len(a_parts) > 1 else a_parts[0]
    b = jnp.concatenate(b_parts, axis=ns) if len(b_parts) > 1 else b_parts[0]
    t = jnp.asarray(t).astype(a.dtype)
    mag = None
    if route_names is None and nodes[0].m is not None:  # DoRA: the norm is a constant, as in the paper and PEFT
        dense = base.dequantize() if hasattr(base, "dequantize") else base
        ratio = nodes[0].m.astype(jnp.float32) / jax.lax.stop_gradient(column_norm(dense, a, b, v.layout))
        mag = jnp.stack([1.0 + t * (ratio - 1.0), ratio], axis=ns)
    dropout = max(node.dropout for node in nodes)
    key = jax.random.fold_in(rng_key, n) if rng_key is not None and dropout > 0 else None
    return _Lazy(base, a * t, b, key, v.layout, dropout, mag=mag, routed=route_names is not None)


def wrap(fn: Callable, argnums: Union[int, Sequence[int]] = 0, *, rng=None, scale=1.0, adapter_ids=None) -> Callable:
    """Transform ``fn`` so that its arguments at ``argnums`` may hold `LoraWeight` nodes.

    The returned function has ``fn``'s signature and computes ``fn(merge(lora_params), ...)``
    without ever forming ``w + s*a@b``: each LoRA weight enters its matmul, conv or embedding
    lookup factorized, ``x@w + s*(x@a)@b``. It composes with ``jit``, ``grad``, ``vmap``,
    ``jax.checkpoint`` and sharding, and works on any function of a parameter pytree
    (``model.apply``, transformers' Flax models, ``nnx`` via ``nnx.split``, plain JAX).
    Several active adapters on one kernel (`lora.add`, `lora.select`) act as their sum.

    Args:
      fn: the function to transform.
      argnums: which positional argument(s) may hold LoRA weights.
      rng: a ``jax.random`` key that drives LoRA dropout (each weight's ``dropout`` rate); None
        means no dropout (evaluation).
      scale: multiplies every delta at run time; ``0.0`` runs exactly the base model (the adapter
        disabled). May be a traced value.
      adapter_ids: per-example routing: an int array, one entry per example (the leading axis of
        the inputs), indexing `lora.adapter_names` of the tree; ``-1`` runs the base model. All
        adapters run in one batched computation (each example keeps only its adapter's rank
        columns), whatever their ``active`` flags. May be traced.

    Returns:
      The transformed function.

    Raises:
      TypeError: if a `LoraWeight` appears outside ``argnums`` or has no base weight.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lora
      >>> params = {"w": jnp.ones((4, 3))}
      >>> lp = lora.init(params, lora.Rules("w", rank=2, init=False), 0)
      >>> f = lambda p, x: jnp.tanh(x @ p["w"])
      >>> x = jnp.ones((2, 4))
      >>> bool(jnp.allclose(lora.wrap(f)(lp, x), f(lora.merge(lp), x), atol=1e-6))
      True
    """
    argnums_t = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    rng_key = _as_key(rng)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        for j, arg in enumerate(args):
            if j not in argnums_t and any(is_node(v) for v in jax.tree_util.tree_leaves(arg, is_leaf=is_node)):
                raise TypeError(f"lora.wrap: argument {j} holds LoraWeight nodes but argnums={argnums!r}")
        if any(is_node(v) for v in jax.tree_util.tree_leaves(kwargs, is_leaf=is_node)):
            raise TypeError("lora.wrap: LoraWeight nodes must be passed positionally (at argnums), not as keywords")
        for j in argnums_t:
            if j >= len(args):
                raise TypeError(f"lora.wrap: argnums={argnums!r} but only {len(args)} positional arguments were given")
        flat, in_tree = jax.tree_util.tree_flatten((args, kwargs), is_leaf=lambda x: is_node(x) or _quantized(x))
        flat = [v.value if is_trainable(v) else v for v in flat]  # fully trained leaves are plain arrays to fn
        loras = [j for j, v in enumerate(flat) if is_lora(v)]
        quants = [j for j, v in enumerate(flat) if _quantized(v)]
        for j in loras:
            if any(x is None for node in flat[j].chain() for x in (node.a, node.b)) or flat[j].base is None:
                raise TypeError("lora.wrap: a LoraWeight without its base, a or b (a lora.split half?); pass "
                                "lora.combine(trainable, frozen)")
        if not loras and not quants:
            return fn(*args, **kwargs)
        if _static_zero(scale) and adapter_ids is None and not quants and \
                not any(_quantized(flat[j].base) for j in loras):
            plain = [v.base if is_lora(v) else v for v in flat]
            a, k = jax.tree_util.tree_unflatten(in_tree, plain)
            return fn(*a, **k)
        dyn = [j for j, v in enumerate(flat) if is_lora(v) or _quantized(v) or _is_dynamic(v)]

        def flat_fn(*dyn_vals):
            leaves = list(flat)
            for j, v in zip(dyn, dyn_vals):
                leaves[j] = v
            a, k = jax.tree_util.tree_unflatten(in_tree, leaves)
            return fn(*a, **k)

        standins = [jax.ShapeDtypeStruct(flat[j].shape, flat[j].dtype) if is_lora(flat[j]) or _quantized(flat[j])
                    else flat[j] for j in dyn]
        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*standins)
        route_names, r_block, ctx = None, 0, _Ctx()
        if adapter_ids is not None:
            route_names = _adapter_order([flat[j] for j in loras])
            r_block = max(node.rank for j in loras for node in flat[j].chain())
            ids = jnp.asarray(adapter_ids)
            if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
                raise TypeError(f"lora.wrap: adapter_ids must be a 1-D integer array (one id per example), got "
                                f"{ids.dtype}{list(ids.shape)}")
            onehot = (ids[:, None] == jnp.arange(len(route_names))[None, :]).astype(jnp.float32)
            ctx = _Ctx(route=jnp.repeat(onehot, r_block, axis=1))
        invals = []
        for n, j in enumerate(dyn):
            v = flat[j]
            if is_lora(v):
                v = _lazy_from(v, n, scale, rng_key, route_names, r_block)
            elif _quantized(v):
                v = _quantized_lazy(v)
            invals.append(v)
        outs = _eval_closed(closed, invals, ctx)
        outs = [_dense(o) for o in outs]
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    return wrapped

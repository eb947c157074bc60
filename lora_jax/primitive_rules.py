"""The built-in rules of `lora.wrap`'s interpreter, one per primitive (the table: `lora_jax.evaluator`).

A lazy LoRA weight ``w + a @ b`` stays lazy through layout-only ops (``convert_element_type``,
``transpose``, ``reshape``/``squeeze``/``broadcast_in_dim`` that keep the stack/input/output axis
groups apart, ``slice``, ``dynamic_slice``, ``rev``, ``copy``, sharding constraints, ``neg`` and
multiplication by a scalar) and is consumed factorized by:

* ``dot_general`` (any contracting/batch dims, either side): ``x.w + (x.a).b``, or ``(x.b).a``
  when ``x`` contracts with the output axes, as a tied LM head ``h @ E.T`` does;
* ``conv_general_dilated`` (groups=1): a conv with ``a`` as a rank-r kernel, then a 1x1 conv with ``b``;
* ``gather`` of rows (embedding lookups): ``w[ids] + a[ids] @ b``;
* ``ragged_dot`` (mixture-of-experts, rows sorted by expert, the kernel's stack axis the experts):
  ``ragged_dot(x, w) + ragged_dot(ragged_dot(x, a), b)``.

``jit``, ``remat``/``checkpoint`` (its policy kept), ``scan`` (a stacked LoRA weight in ``xs`` is
sliced per step and stays factorized), ``cond`` and ``while`` are entered and re-expressed with
their public functions. ``custom_jvp``/``custom_vjp`` calls get the merged weight (their rules need
it). Every primitive here is looked up when this module is imported: one missing from the
installed JAX raises there, never degrades silently to merging.
"""

from __future__ import annotations

import string
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from .evaluator import Lazy, bind, dense, eval_jaxpr, fallback, finish, is_lazy, layout_rule, primitive, register_rule
from .weight import unstacked

__all__: list[str] = []  # everything here registers itself; nothing to import


# ------------------------------------------------------------------------------------------
# Layout-only ops: stay lazy. Each is `layout_rule(primitive, factors)`, where ``factors(lz, eqn,
# others)`` returns the factor changes (or None to merge); the primitive itself runs on w.
# ------------------------------------------------------------------------------------------


def _factor_axes(lz: Lazy):
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


def _factor_index(lz: Lazy, per_axis, r_value):
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


def _convert(lz, eqn, others):
    return {} if jnp.issubdtype(eqn.params["new_dtype"], jnp.inexact) else None


def _transpose(lz, eqn, others):
    perm = tuple(eqn.params["permutation"])
    s_old, i_old, o_old = lz.axes("s"), lz.axes("i"), lz.axes("o")
    s_new = [p for p in perm if lz.kinds[p] == "s"]
    i_new = [p for p in perm if lz.kinds[p] == "i"]
    o_new = [p for p in perm if lz.kinds[p] == "o"]
    ns = len(s_old)
    pa = [s_old.index(j) for j in s_new] + [ns + i_old.index(j) for j in i_new] + [ns + len(i_old)]
    pb = [s_old.index(j) for j in s_new] + [ns] + [ns + 1 + o_old.index(j) for j in o_new]
    return dict(a=jnp.transpose(lz.a, pa), kinds="".join(lz.kinds[p] for p in perm),
                **lz.b_like(lambda x, _: jnp.transpose(x, pb)))


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


def _reshape_to(lz: Lazy, new_shape) -> Optional[dict]:
    """The factor changes for ``w.reshape(new_shape)``, or None if it mixes axis groups."""
    kinds = _reshape_kinds(lz.kinds, lz.w.shape, new_shape)
    if kinds is None:
        return None
    r = lz.a.shape[-1]
    part = lambda k: tuple(d for d, c in zip(new_shape, kinds) if c == k)  # noqa: E731
    a = lz.a.reshape(part("s") + part("i") + (r,))
    return dict(a=a, kinds=kinds, **lz.b_like(lambda x, n: x.reshape(part("s") + (n,) + part("o"))))


def _reshape(lz, eqn, others):
    if eqn.params.get("dimensions") is not None or others:
        return None
    return _reshape_to(lz, tuple(eqn.outvars[0].aval.shape))


def _squeeze(lz, eqn, others):
    return _reshape_to(lz, tuple(eqn.outvars[0].aval.shape))


def _broadcast_in_dim(lz, eqn, others):
    """Only broadcasts that add unit axes (a reshape in disguise)."""
    shape, bdims = tuple(eqn.params["shape"]), tuple(eqn.params["broadcast_dimensions"])
    ok = (not others and list(bdims) == sorted(bdims)
          and all(shape[d] == lz.shape[k] for k, d in enumerate(bdims))
          and all(shape[d] == 1 for d in range(len(shape)) if d not in bdims))
    return _reshape_to(lz, shape) if ok else None


def _slice(lz, eqn, others):
    p = eqn.params
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

    return dict(a=jax.lax.slice(lz.a, sa, la, ta), **lz.b_like(cut))


def _dynamic_slice(lz, eqn, starts):
    if len(starts) != lz.w.ndim:
        return None
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

    return dict(a=jax.lax.dynamic_slice(lz.a, sa, za), **lz.b_like(cut))


def _rev(lz, eqn, others):
    in_a, in_b = _factor_axes(lz)
    dims = eqn.params["dimensions"]
    a = jax.lax.rev(lz.a, tuple(in_a[d] for d in dims if d in in_a))
    return dict(a=a, **lz.b_like(lambda x, _: jax.lax.rev(x, tuple(in_b[d] for d in dims if d in in_b))))


def _scalar_mul(lz, eqn, others):
    (c,) = others
    return dict(a=lz.a * jnp.asarray(c).astype(lz.a.dtype)) if jnp.ndim(c) == 0 else None


# ------------------------------------------------------------------------------------------
# Consumers: dot_general, conv, gather, ragged_dot
# ------------------------------------------------------------------------------------------


def _rank_first_grads() -> bool:
    # asked at trace time, never at import (importing must not initialize a backend)
    return jax.default_backend() == "cpu"


def _expand(m, letters, out):
    """Arrange ``m`` (axes named by ``letters``, all in ``out``) to broadcast against ``out``."""
    order = sorted(range(len(letters)), key=lambda k: out.index(letters[k]))
    m = jnp.transpose(m, order)
    shape = [1] * len(out)
    for k in order:
        shape[out.index(letters[k])] = m.shape[order.index(k)]
    return m.reshape(shape)


def _letters(n, start=0):
    return list(string.ascii_letters[start:start + n])


def _dot_general(ctx, eqn, invals):
    lhs, rhs = invals
    if is_lazy(lhs) and is_lazy(rhs):
        lhs = lhs.materialize()
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lazy_is_rhs = is_lazy(rhs)
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
    if lz.variant is not None and not set(per_out) <= set(out):
        return fallback(ctx, eqn, invals)  # a variant's per-output state needs the output axes kept
    base = bind(eqn, [lhs, lz.wd] if lazy_is_rhs else [lz.wd, rhs])[0]
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
    dropped = None if xd is x else lambda: bind(eqn, [xd, lz.wd] if lazy_is_rhs else [lz.wd, xd])[0]
    return [finish(lz, base, d, out_dtype, lambda m: _expand(m, per_out, out), dropped)]


def _conv(ctx, eqn, invals):
    lhs, rhs = invals
    p = eqn.params
    if is_lazy(lhs) or p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        return fallback(ctx, eqn, invals)
    lz = rhs
    dn = p["dimension_numbers"]
    out_dim, in_dim = dn.rhs_spec[0], dn.rhs_spec[1]
    if "s" in lz.kinds or lz.kinds[out_dim] != "o" or lz.kinds.count("o") != 1:
        return fallback(ctx, eqn, invals)
    base = bind(eqn, [lhs, lz.wd])[0]
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
    shape = [1] * nd
    shape[dn.out_spec[1]] = lz.w.shape[out_dim]
    dropped = None if xd is lhs else lambda: bind(eqn, [xd, lz.wd])[0]
    return [finish(lz, base, d, eqn.outvars[0].aval.dtype, lambda m: m.reshape(shape), dropped)]


def _gather(ctx, eqn, invals):
    lz, idx = invals
    if is_lazy(idx) or not is_lazy(lz):
        return fallback(ctx, eqn, invals)
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
        return fallback(ctx, eqn, invals)
    base = bind(eqn, [lz.wd, idx])[0]
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
    return [finish(lz, base, d, eqn.outvars[0].aval.dtype, lambda m: m)]


def _ragged_dims(dn):
    """``((lhs_contract, rhs_contract), (lhs_batch, rhs_batch)), lhs_ragged, rhs_group`` of a
    ``ragged_dot_dimension_numbers`` param (a ``RaggedDotDimensionNumbers``)."""
    return (tuple(map(tuple, dn.dot_dimension_numbers[0])), tuple(map(tuple, dn.dot_dimension_numbers[1]))), \
        tuple(dn.lhs_ragged_dimensions), tuple(dn.rhs_group_dimensions)


def _ragged_dot(ctx, eqn, invals):
    """``ragged_dot(x, w) + ragged_dot(ragged_dot(x, a), b)``: each group (expert) of rows meets its
    own ``w_g + a_g @ b_g``, never merged. Handles a stacked LoRA kernel as ``rhs`` whose group axis
    is its one stack axis, contracted over all its input axes, with the lhs ragged along a
    non-contracted axis (the form `jax.lax.ragged_dot` binds: ``(m, k) x (g, k, n)``); any other form
    is merged."""
    p = eqn.params
    if len(invals) != 3 or p.get("group_offset") is not None:
        return fallback(ctx, eqn, invals)
    x, lz, sizes = invals
    if is_lazy(x) or is_lazy(sizes) or not is_lazy(lz) or ctx.route is not None:
        return fallback(ctx, eqn, invals)
    ((xc, wc), (xb, wb)), x_ragged, w_group = _ragged_dims(p["ragged_dot_dimension_numbers"])
    s_axes, i_axes = lz.axes("s"), lz.axes("i")
    ok = (not xb and not wb and len(x_ragged) == 1 and x_ragged[0] not in xc and w_group == tuple(s_axes)
          and len(s_axes) == 1 and sorted(wc) == i_axes)
    if not ok:
        return fallback(ctx, eqn, invals)
    base = bind(eqn, [x, lz.wd, sizes])[0]
    cd = lz.dtype
    # a is (g, *i, r) with the input axes in w's order; b is (g, r, *o)
    a_contract = tuple(1 + i_axes.index(j) for j in wc)
    x_free = [j for j in range(x.ndim) if j not in xc]
    t_ragged = x_free.index(x_ragged[0])
    RD = jax.lax.RaggedDotDimensionNumbers
    common = dict(precision=p.get("precision"), preferred_element_type=p.get("preferred_element_type"))
    with jax.named_scope("lora"):
        xd = ctx.dropout(x, lz)
        t = jax.lax.ragged_dot_general(xd, lz.a.astype(cd), sizes, RD(((tuple(xc), a_contract), ((), ())),
                                                                       (x_ragged[0],), (0,)), **common)
        t = t.astype(jnp.result_type(x.dtype, cd))
        d = jax.lax.ragged_dot_general(t, lz.b.astype(cd), sizes, RD((((t.ndim - 1,), (1,)), ((), ())),
                                                                      (t_ragged,), (0,)), **common)

    def place(m):
        """A per-(expert, output) array ``(g, *o)`` as one row per token: each row its group's."""
        rows = x.shape[x_ragged[0]]
        group = jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(rows), side="right")
        m = jnp.take(m, group, axis=0, mode="clip")  # rows past every group: base and d are 0 there
        shape = [1] * len(x_free) + list(m.shape[1:])
        shape[t_ragged] = rows
        return m.reshape(shape)

    dropped = None if xd is x else lambda: bind(eqn, [xd, lz.wd, sizes])[0]
    return [finish(lz, base, d, eqn.outvars[0].aval.dtype, place, dropped)]


# ------------------------------------------------------------------------------------------
# Higher-order primitives: entered, re-expressed through their public functions
# ------------------------------------------------------------------------------------------


def _inline(ctx, eqn, invals):
    closed = eqn.params["jaxpr"]
    return ctx.eval(closed, invals)


def _call(ctx, eqn, invals):
    call = eqn.params["call_jaxpr"]
    if isinstance(call, jcore.ClosedJaxpr):
        return ctx.eval(call, invals)
    return eval_jaxpr(call, [], invals, ctx)


def _remat(ctx, eqn, invals):
    p = eqn.params
    jaxpr = p["jaxpr"]

    def body(*args):
        return [dense(o) for o in eval_jaxpr(jaxpr, [], list(args), ctx)]

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
    consts, init, xs = list(invals[:nc]), [dense(v) for v in invals[nc:nc + ncar]], list(invals[nc + ncar:])
    length = p["length"]
    xs_in = []
    for v in xs:
        if is_lazy(v):
            if v.kinds[0] == "s" and v.a.shape[0] == length:
                key = None if v.key is None else jax.random.split(v.key, length)
                w = unstacked(v.w)  # a quantized stack stays quantized
                v = v.with_(w=w, key=key, kinds=v.kinds[1:])
            else:
                v = v.materialize()
        xs_in.append(v)
    salted = any(is_lazy(c) and c.key is not None for c in consts)
    body_jaxpr = p["jaxpr"]

    def body(carry, x):
        sub = ctx
        if salted:
            x, it = x[:-1], x[-1]
            sub = ctx.child(it)
        outs = [dense(o) for o in sub.eval(body_jaxpr, consts + list(carry) + list(x))]
        return outs[:ncar], outs[ncar:]

    extra = [jnp.arange(length, dtype=jnp.uint32)] if salted else []
    carry, ys = jax.lax.scan(body, init, xs_in + extra, length=length, reverse=p["reverse"], unroll=p["unroll"])
    return list(carry) + list(ys)


def _dense_call(ctx, eqn, invals):
    """Custom-derivative calls: their rules need the dense weight, so give it to them."""
    return bind(eqn, [dense(x) for x in invals])


def _cond(ctx, eqn, invals):
    index, ops = invals[0], list(invals[1:])
    if is_lazy(index):
        return fallback(ctx, eqn, invals)

    def branch(closed):
        return lambda *args: [dense(o) for o in ctx.eval(closed, list(args))]

    return jax.lax.switch(index, [branch(b) for b in eqn.params["branches"]], *ops)


def _while(ctx, eqn, invals):
    p = eqn.params
    cc, bc = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts = list(invals[:cc]), list(invals[cc:cc + bc])
    init = [dense(v) for v in invals[cc + bc:]]

    def cond_fun(carry):
        return dense(ctx.eval(p["cond_jaxpr"], cconsts + list(carry))[0])

    def body_fun(carry):
        return [dense(o) for o in ctx.eval(p["body_jaxpr"], bconsts + list(carry))]

    return list(jax.lax.while_loop(cond_fun, body_fun, init))


# ------------------------------------------------------------------------------------------
# The table: primitive objects, looked up now (a missing one raises at import)
# ------------------------------------------------------------------------------------------

# abstract operands for the traces that find a primitive JAX does not export (no backend is touched)
_f32, _i32 = (jax.ShapeDtypeStruct((1,), t) for t in (jnp.float32, jnp.int32))

layout_rule(primitive("copy_p"))
layout_rule(primitive("sharding_constraint_p"))
layout_rule(primitive("convert_element_type_p"), _convert)
layout_rule(primitive("transpose_p"), _transpose)
layout_rule(primitive("reshape_p"), _reshape)
layout_rule(primitive("squeeze_p"), _squeeze)
layout_rule(primitive("broadcast_in_dim_p"), _broadcast_in_dim)
layout_rule(primitive("slice_p"), _slice)
layout_rule(primitive("dynamic_slice_p"), _dynamic_slice)
layout_rule(primitive("rev_p"), _rev)
layout_rule(primitive("mul_p"), _scalar_mul)
layout_rule(primitive("neg_p"), lambda lz, eqn, others: {"a": -lz.a})

register_rule(primitive("dot_general_p"), _dot_general)
register_rule(primitive("conv_general_dilated_p"), _conv)
register_rule(primitive("gather_p"), _gather)
register_rule(primitive("ragged_dot_general_p", trace=lambda: jax.make_jaxpr(jax.lax.ragged_dot)(
    jax.ShapeDtypeStruct((1, 1), jnp.float32), jax.ShapeDtypeStruct((1, 1, 1), jnp.float32), _i32)), _ragged_dot)

register_rule(primitive("jit_p", trace=lambda: jax.make_jaxpr(jax.jit(lambda x: x * 2))(_f32)), _inline)
register_rule(primitive("closed_call_p"), _call)
register_rule(primitive("call_p"), _call)
register_rule(primitive("remat_p", trace=lambda: jax.make_jaxpr(jax.checkpoint(lambda x: x * 2))(_f32)), _remat)
register_rule(primitive("scan_p"), _scan)
register_rule(primitive("cond_p"), _cond)
register_rule(primitive("while_p"), _while)
register_rule(primitive("custom_jvp_call_p"), _dense_call)
register_rule(primitive("custom_vjp_call_p"), _dense_call)

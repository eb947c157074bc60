"""`wrap(fn)`: run any JAX function with LoRA weights kept factorized.

``wrap`` traces ``fn`` with plain arrays standing in for each `LoraWeight` (``jax.make_jaxpr``)
and evaluates the jaxpr with the interpreter of `lora_jax.evaluator`, in which each LoRA weight is
a lazy value ``w + a @ b`` (the scale folded into ``a``) that primitive rules
(`lora_jax.primitive_rules`) keep factorized: ``x@w + s*(x@a)@b`` through matmuls, convolutions,
embedding lookups, ``ragged_dot``, layout-only ops and control flow. Any other primitive that
meets a LoRA weight gets ``w + a @ b`` for that use only, with a `MaterializeWarning` once per
primitive; `register_rule` adds a rule for it. Variants (DoRA) live in `lora_jax.variants`. Only
public JAX API is used.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from . import primitive_rules  # noqa: F401  (registers the built-in rules)
from .evaluator import Ctx, Lazy, MaterializeWarning, dense, eval_jaxpr, register_rule
from .layout import pad_rank
from .variants import variant_of
from .weight import LoraWeight, dense_base, is_lora, is_node, is_stored, is_trainable

__all__ = ["wrap", "MaterializeWarning", "register_rule"]


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


def _quantized_lazy(q):
    """A quantized frozen kernel without an adapter: a rank-0 lazy, dequantized where it is used."""
    kinds = "s" * q.stack + "i" * (q.ndim - q.stack - 1) + "o"
    a_shape = tuple(d for d, k in zip(q.shape, kinds) if k in "si") + (0,)
    b_shape = tuple(d for d, k in zip(q.shape, kinds) if k == "s") + (0,) + (q.shape[-1],)
    return Lazy(q, jnp.zeros(a_shape, jnp.float32), jnp.zeros(b_shape, jnp.float32), None, kinds, 0.0)


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
    routed = route_names is not None
    nodes = list(chain) if routed else [node for node in chain if node.active]
    if not nodes:
        return base
    variant = variant_of(nodes, routed=routed)
    if variant is not None and not variant.factorized:
        return _merged_in(v, nodes, t, rng_key)
    if not routed:
        a_parts = [node.effective_a() * jnp.asarray(node.scale, node.a.dtype) for node in nodes]
        b_parts = [node.effective_b() for node in nodes]
    else:
        by_name = {node.name: node for node in chain}
        a_shape, b_shape = v.a.shape[:-1], v.b.shape[:ns] + v.b.shape[ns + 1:]
        a_parts, b_parts = [], []
        for name in route_names:
            node = by_name.get(name)
            if node is None:
                a_parts.append(jnp.zeros(a_shape + (r_block,), jnp.float32))
                b_parts.append(jnp.zeros(b_shape[:ns] + (r_block,) + b_shape[ns:], jnp.float32))
                continue
            a, b = pad_rank(node.effective_a() * jnp.asarray(node.scale, node.a.dtype), node.effective_b(),
                            v.layout, r_block)
            a_parts.append(a)
            b_parts.append(b)
    a = jnp.concatenate(a_parts, axis=-1) if len(a_parts) > 1 else a_parts[0]
    b = jnp.concatenate(b_parts, axis=ns) if len(b_parts) > 1 else b_parts[0]
    t = jnp.asarray(t).astype(a.dtype)
    state = None
    if variant is not None:
        state = variant.state(nodes, dense_base(base), a, b, t)
    dropout = max(node.dropout for node in nodes)
    key = jax.random.fold_in(rng_key, n) if rng_key is not None and dropout > 0 else None
    return Lazy(base, a * t, b, key, v.layout, dropout, state=state, variant=variant, routed=routed)


def _merged_in(v: LoraWeight, nodes, t, rng_key):
    """A variant without a factorized form: its kernel ``w + t * (merged - w)``, computed from the
    factors inside the function (so gradients reach them)."""
    if rng_key is not None and any(node.dropout > 0 for node in nodes):
        raise ValueError(f"lora.wrap: the {variant_of(nodes, routed=False).name} variant has no factorized form, "
                         "so its LoRA dropout cannot be applied; set dropout=0 or call without rng")
    w = dense_base(v.base)
    ct = jnp.promote_types(w.dtype, jnp.float32)
    merged = w.astype(ct)
    for node in v.chain():
        if node.active:
            merged = node.kind.apply(node, merged, ct)
    return (w.astype(ct) + jnp.asarray(t, ct) * (merged - w.astype(ct))).astype(w.dtype)


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
    rng_key = _as_key(rng)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        _check_arguments(args, kwargs, argnums)
        flat, in_tree = jax.tree_util.tree_flatten((args, kwargs), is_leaf=lambda x: is_node(x) or is_stored(x))
        flat = [v.value if is_trainable(v) else v for v in flat]  # fully trained leaves are plain arrays to fn
        plain = _fast_path(flat, scale, adapter_ids)
        if plain is not None:
            a, k = jax.tree_util.tree_unflatten(in_tree, plain)
            return fn(*a, **k)
        ctx, route_names, r_block = _routing(flat, adapter_ids)
        closed, out_tree, dyn = _trace(fn, flat, in_tree)
        invals = [_lazy_from(flat[j], n, scale, rng_key, route_names, r_block) if is_lora(flat[j])
                  else _quantized_lazy(flat[j]) if is_stored(flat[j]) else flat[j] for n, j in enumerate(dyn)]
        outs = [dense(o) for o in eval_jaxpr(closed.jaxpr, closed.consts, invals, ctx)]
        return jax.tree_util.tree_unflatten(out_tree, outs)

    return wrapped


def _check_arguments(args, kwargs, argnums) -> None:
    """LoRA nodes only at ``argnums``, positionally, each whole (a base, ``a`` and ``b``)."""
    at = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    for j, arg in enumerate(args):
        if j not in at and any(is_node(v) for v in jax.tree_util.tree_leaves(arg, is_leaf=is_node)):
            raise TypeError(f"lora.wrap: argument {j} holds LoraWeight nodes but argnums={argnums!r}")
    if any(is_node(v) for v in jax.tree_util.tree_leaves(kwargs, is_leaf=is_node)):
        raise TypeError("lora.wrap: LoraWeight nodes must be passed positionally (at argnums), not as keywords")
    for j in at:
        if j >= len(args):
            raise TypeError(f"lora.wrap: argnums={argnums!r} but only {len(args)} positional arguments were given")
    for v in jax.tree_util.tree_leaves([args[j] for j in at], is_leaf=is_lora):
        if is_lora(v) and (v.base is None or any(x is None for node in v.chain() for x in (node.a, node.b))):
            raise TypeError("lora.wrap: a LoraWeight without its base, a or b (a lora.split half?); pass "
                            "lora.combine(trainable, frozen)")


def _fast_path(flat: list, scale, adapter_ids):
    """The leaves to call ``fn`` on directly when no interpreter is needed (no LoRA or quantized
    leaves, or a static ``scale=0`` without routing and quantization: the bases), else None."""
    if not any(is_lora(v) or is_stored(v) for v in flat):
        return flat
    if _static_zero(scale) and adapter_ids is None and not any(is_stored(v.base if is_lora(v) else v) for v in flat):
        return [v.base if is_lora(v) else v for v in flat]
    return None


def _routing(flat: list, adapter_ids):
    """The evaluation context; with ``adapter_ids``, its per-example mask of rank columns, every
    adapter's name in column order and the columns each adapter gets (its block)."""
    if adapter_ids is None:
        return Ctx(), None, 0
    loras = [v for v in flat if is_lora(v)]
    route_names = _adapter_order(loras)
    r_block = max(node.rank for v in loras for node in v.chain())
    ids = jnp.asarray(adapter_ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"lora.wrap: adapter_ids must be a 1-D integer array (one id per example), got "
                        f"{ids.dtype}{list(ids.shape)}")
    onehot = (ids[:, None] == jnp.arange(len(route_names))[None, :]).astype(jnp.float32)
    return Ctx(route=jnp.repeat(onehot, r_block, axis=1)), route_names, r_block


def _trace(fn, flat: list, in_tree):
    """``fn``'s jaxpr with array stand-ins for the LoRA and quantized leaves; the other array
    leaves are inputs too, everything else stays static. Returns the closed jaxpr, the output
    tree and the positions in ``flat`` of the jaxpr's inputs."""
    dyn = [j for j, v in enumerate(flat) if is_lora(v) or is_stored(v) or _is_dynamic(v)]

    def flat_fn(*dyn_vals):
        leaves = list(flat)
        for j, v in zip(dyn, dyn_vals):
            leaves[j] = v
        a, k = jax.tree_util.tree_unflatten(in_tree, leaves)
        return fn(*a, **k)

    standins = [jax.ShapeDtypeStruct(flat[j].shape, flat[j].dtype) if is_lora(flat[j]) or is_stored(flat[j])
                else flat[j] for j in dyn]
    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*standins)
    return closed, jax.tree_util.tree_structure(out_shape), dyn

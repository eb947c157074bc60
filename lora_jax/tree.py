"""The pytree half of LoRA: `init`, `merge`, `unmerge`, `split`, `combine`, `count`, `summary`.

A *LoRA tree* is any parameter pytree in which some leaves are `LoraWeight` nodes. Nothing else
is needed to describe it: merging, freezing, saving and sharding read the nodes' static data.
"""

from __future__ import annotations

import dataclasses
import warnings
import zlib
from typing import Any, Iterator, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from . import initializers
from .rules import Rules, Target, path_str
from .weight import LoraWeight, Trainable, column_norm, factor_shapes, is_lora, is_node, is_trainable, map_chain

__all__ = ["init", "make_weight", "merge", "unmerge", "split", "combine", "count", "summary", "lora_items", "Count"]


def _as_key(key):
    if isinstance(key, (int, np.integer)):
        return jax.random.key(int(key))
    if not hasattr(key, "dtype"):
        raise TypeError(f"key must be a jax.random key or an int seed, got {type(key).__name__}")
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    if key.dtype == jnp.uint32 and key.shape[-1:] == (2,):
        return jax.random.wrap_key_data(key)
    raise TypeError(f"key must be a jax.random key or an int seed, got an array of {key.dtype}{list(key.shape)}")


def _path_key(key, path: str):
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _is_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and not is_node(x)


def lora_items(tree) -> Iterator[tuple[str, LoraWeight]]:
    """``(path, LoraWeight)`` for every LoRA node of ``tree``, in flattening order."""
    for kp, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_lora)[0]:
        if is_lora(leaf):
            yield path_str(kp), leaf


def _a_dtype(target: Target, w_dtype):
    if target.a_dtype == "base":
        return w_dtype
    if target.a_dtype == "float32":
        return jnp.promote_types(w_dtype, jnp.float32)
    return target.a_dtype


def init(params, rules: Union[Rules, Any], key, *, add: bool = False):
    """Put a LoRA adapter beside every kernel the rules select.

    Each selected leaf ``w`` becomes ``LoraWeight(w, a, b)`` with ``a``, ``b`` from the rule's init
    (by default ``a`` Kaiming-uniform, ``b`` zero, so the model is unchanged). The key for each
    leaf is derived from ``key`` and the leaf's path, so adding or removing other targets does not
    change it. ``a``/``b`` are float32 (or wider, if the base is) unless ``a_dtype="base"``.

    Args:
      params: any pytree of arrays (linen params, ``nnx.State``, Equinox modules, tuples...).
      rules: a `Rules`; anything else is passed to ``Rules(...)`` as its targets.
      key: a ``jax.random`` key or an int seed.
      add: allow ``params`` to already hold LoRA weights; only plain leaves get new adapters.

    Returns:
      The same pytree with the selected leaves replaced by `LoraWeight` nodes.

    Raises:
      ValueError: if the rules select nothing (patterns and existing paths are listed), if an
        option does not fit a leaf (the leaf is named), or if ``params`` already holds LoRA
        weights and ``add`` is False.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lora
      >>> params = {"dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
      >>> lp = lora.init(params, lora.Rules(["dense"], rank=2), jax.random.key(0))
      >>> lp["dense"]["kernel"].a.shape, lp["dense"]["kernel"].b.shape
      ((8, 2), (2, 4))
    """
    if not isinstance(rules, Rules):
        rules = Rules(rules)
    key = _as_key(key)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_node)
    existing = [path_str(kp) for kp, leaf in flat if is_node(leaf)]
    if existing and not add:
        raise ValueError(f"params already hold {len(existing)} LoRA weight(s) (e.g. {existing[:3]}); "
                         "pass add=True to put adapters on further leaves, or lora.merge() first")
    paths = [path_str(kp) for kp, _ in flat]
    candidates = [(p, tuple(leaf.shape), leaf.dtype) for p, (kp, leaf) in zip(paths, flat) if _is_array(leaf)]
    targets = rules.select(candidates)
    full = rules.fully_trained(candidates, set(targets))
    out = []
    for p, (kp, leaf) in zip(paths, flat):
        t = targets.get(p) if _is_array(leaf) else None
        if t is not None:
            leaf = make_weight(leaf, t, _path_key(key, p), p)
        elif p in full and _is_array(leaf):
            leaf = Trainable(leaf)
        out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


def make_weight(leaf, t: Target, key, path: str, *, name: str = "default", active: bool = True, inner=None):
    """One `LoraWeight` for the array ``leaf`` from resolved options ``t`` (on top of ``inner``, an
    existing chain of adapters on the same kernel, when given)."""
    fn = initializers.get(t.init, where=path)
    scale = t.alpha / (np.sqrt(t.rank) if t.rslora else t.rank)
    a, b, w = fn(key, leaf, t.layout, t.rank, _a_dtype(t, leaf.dtype), scale)
    want_a, want_b = factor_shapes(leaf.shape, t.layout, t.rank)
    if tuple(a.shape) != want_a or tuple(b.shape) != want_b or tuple(w.shape) != tuple(leaf.shape):
        raise ValueError(f"{path}: init {t.init!r} returned a{list(a.shape)}, b{list(b.shape)}, w{list(w.shape)}; "
                         f"expected a{list(want_a)}, b{list(want_b)}, w{list(leaf.shape)}")
    if inner is not None and w is not leaf:
        raise ValueError(f"{path}: init {t.init!r} rewrites the base kernel, which the adapters already on it "
                         f"({[n.name for n in inner.chain()]}) were trained against; use it on a kernel without adapters")
    lw = LoraWeight(w if inner is None else inner, a, b, layout=t.layout, rank=t.rank, alpha=t.alpha,
                    rslora=t.rslora, dropout=t.dropout, layer_mask=t.layer_mask, out_slices=t.out_slices, name=name,
                    active=active)
    if t.dora:  # magnitude = ||w + s a@b|| per output feature: the adapted kernel starts as w
        if inner is not None:
            raise ValueError(f"{path}: DoRA adapters cannot share a kernel with other adapters")
        m = column_norm(w, lw.scale * lw.effective_a(), lw.effective_b(), t.layout).astype(a.dtype)
        lw = lw.replace(m=m)
    return lw


def _quantized(x) -> bool:
    return hasattr(x, "dequantize") and hasattr(x, "scheme")


def _merge_leaf(x, requantize: bool):
    if is_trainable(x):
        return x.value
    if _quantized(x):
        return x.dequantize()
    if not is_lora(x):
        return x
    merged = x.merge()
    if requantize and _quantized(x.base):
        warnings.warn(f"merge(requantize=True): the merged kernel {x.base.shape} is rounded to {x.base.scheme} again; "
                      "the adapter's effect is only kept to that precision", stacklevel=3)
        return x.base.requantize(merged)
    return merged


def merge(tree, *, safe: bool = False, requantize: bool = False):
    """Fold every adapter into its kernel: ``w + scale * a @ b`` in ``w``'s dtype (float32 math).

    Args:
      tree: a LoRA tree.
      safe: check that every merged kernel is finite and raise otherwise (needs concrete arrays,
        i.e. outside ``jit``). Nothing is modified either way: the result is a new tree.
      requantize: store kernels whose base was quantized (`lora.quantize`) quantized again, with a
        warning (the merge is rounded); by default they come back dense in full precision.

    Raises:
      ValueError: with ``safe=True``, naming every kernel whose merge holds NaN or Inf.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lora
      >>> lp = lora.init({"k": jnp.ones((4, 4))}, lora.Rules("k", rank=1), 0)
      >>> bool((lora.merge(lp)["k"] == 1).all())
      True
    """
    is_leaf = lambda x: is_node(x) or _quantized(x)  # noqa: E731
    merged = jax.tree_util.tree_map(lambda x: _merge_leaf(x, requantize), tree, is_leaf=is_leaf)
    if safe:
        bad = []
        for (kp, leaf), (_, orig) in zip(jax.tree_util.tree_flatten_with_path(merged, is_leaf=_quantized)[0],
                                         jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]):
            if not is_node(orig) or _quantized(leaf):
                continue
            try:
                finite = bool(jnp.all(jnp.isfinite(leaf)))
            except jax.errors.ConcretizationTypeError:
                raise TypeError("merge(safe=True) checks values and needs concrete arrays; call it outside jit "
                                "or pass safe=False") from None
            if not finite:
                bad.append(path_str(kp))
        if bad:
            raise ValueError(f"merge(safe=True): non-finite values in {len(bad)} merged kernel(s): {bad}")
    return merged


def unmerge(merged, tree):
    """The base parameters back from ``merged`` (as returned by `merge`) and the LoRA tree.

    Leaves where ``tree`` holds a `LoraWeight` become ``merged - scale * a @ b``; every other leaf
    (fully trained ones included: they have no base) is taken from ``merged``.
    """
    return jax.tree_util.tree_map(lambda t, m: t.unmerge(m) if is_lora(t) else m, tree, merged, is_leaf=is_node)


def split(tree):
    """Partition a LoRA tree into ``(trainable, frozen)`` with the same structure.

    ``trainable`` keeps each `LoraWeight` with ``w=None`` (and each `Trainable` leaf) and every other
    leaf as None; ``frozen`` keeps every other leaf and each `LoraWeight` with ``a``, ``b``, ``m``
    set to None.
    Differentiate with respect to ``trainable`` only and no gradient buffer for the base exists.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lora
      >>> lp = lora.init({"k": jnp.ones((4, 4)), "bias": jnp.zeros(4)}, lora.Rules("k", rank=1), 0)
      >>> trainable, frozen = lora.split(lp)
      >>> len(jax.tree_util.tree_leaves(trainable)), len(jax.tree_util.tree_leaves(frozen))
      (2, 2)
    """
    def train(x):
        if is_lora(x):
            return map_chain(x, lambda n, w: n.replace(w=w), lambda base: None)
        return x if is_trainable(x) else None

    def freeze(x):
        if is_lora(x):
            return map_chain(x, lambda n, w: n.replace(w=w, a=None, b=None, m=None), lambda base: base)
        return None if is_trainable(x) else x

    trainable = jax.tree_util.tree_map(train, tree, is_leaf=is_node)
    frozen = jax.tree_util.tree_map(freeze, tree, is_leaf=is_node)
    return trainable, frozen


def combine(trainable, frozen):
    """Inverse of `split`: ``combine(*split(tree))`` is ``tree``, leaf for leaf."""

    def join(f, t):
        if is_lora(f):
            if not is_lora(t):
                raise TypeError(f"combine: frozen holds a LoraWeight where trainable holds {type(t).__name__}")
            return f.replace(w=join(f.w, t.w), a=t.a, b=t.b, m=t.m)
        return f if t is None else t

    return jax.tree_util.tree_map(join, frozen, trainable, is_leaf=lambda x: is_lora(x) or x is None)


def _size(x) -> int:
    return 0 if x is None else int(np.prod(x.shape))


@dataclasses.dataclass(frozen=True)
class Count:
    """Parameter counts of a LoRA tree (as PEFT's ``print_trainable_parameters``)."""

    trainable: int
    total: int
    per_target: tuple  # (path, shape, layout, rank, alpha, trainable)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                f"trainable%: {self.percent:.4f}")


def _node_trainable(lw: LoraWeight) -> int:
    if not lw.active:
        return 0
    n = _size(lw.a) + _size(lw.b) + _size(lw.m)
    if lw.layer_mask is not None and n:
        n = n * sum(lw.layer_mask) // len(lw.layer_mask)
    if lw.out_slices is not None and lw.b is not None:
        n -= _size(lw.b) * (len(lw.out_slices) - sum(lw.out_slices)) // len(lw.out_slices)
    return n


def count(tree) -> Count:
    """Trainable (adapter) and total parameter counts, with a row per LoRA target.

    Total counts every array (base, adapters, everything else), as PEFT does.
    """
    total = 0
    rows = []
    for kp, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)[0]:
        if is_trainable(leaf):
            total += _size(leaf.value)
            rows.append((path_str(kp) + " (full)", tuple(leaf.value.shape) if leaf.value is not None else None, "-",
                         0, 0.0, _size(leaf.value)))
        elif is_lora(leaf):
            total += _size(leaf.base)
            shape = tuple(leaf.base.shape) if leaf.base is not None else None
            for node in leaf.chain():
                total += _size(node.a) + _size(node.b) + _size(node.m)
                name = "" if node.name == "default" else f" [{node.name}]"
                rows.append((path_str(kp) + name, shape, node.layout, node.rank, node.alpha, _node_trainable(node)))
        elif hasattr(leaf, "shape"):
            total += _size(leaf)
    return Count(trainable=sum(r[-1] for r in rows), total=total, per_target=tuple(rows))


def summary(tree) -> str:
    """A text table: one row per LoRA target (path, shape, layout, rank, alpha, trainable), then totals."""
    c = count(tree)
    header = ("path", "shape", "layout", "rank", "alpha", "trainable")
    rows = [(p, "x".join(map(str, s)) if s else "?", lay, str(r), f"{a:g}", f"{n:,}") for p, s, lay, r, a, n in
            c.per_target]
    widths = [max(len(h), *(len(row[j]) for row in rows)) if rows else len(h) for j, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" if j < 3 else f"{{:>{w}}}" for j, w in enumerate(widths))
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    lines.append(str(c))
    return "\n".join(lines)

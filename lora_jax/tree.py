"""The pytree half of LoRA: `init`, `merge`, `unmerge`, `split`, `combine`, `count`, `summary`.

A *LoRA tree* is any parameter pytree in which some leaves are `LoraWeight` nodes. Nothing else
is needed to describe it: merging, freezing, saving and sharding read the nodes' static data.
"""

from __future__ import annotations

import dataclasses
import warnings
import zlib
from typing import Any, Iterator, Union

import jax
import jax.numpy as jnp
import numpy as np

from . import initializers
from .rules import Rules, Target, path_str
from .layout import factor_shapes
from .weight import LoraWeight, Trainable, dense_base, is_lora, is_node, is_stored, is_trainable, is_unit, map_chain

__all__ = ["init", "make_weight", "merge", "unmerge", "trainable_mask", "split", "combine", "count", "summary",
           "lora_items", "Count", "as_key", "path_key", "is_array", "MERGE_MAGNITUDE_LIMIT"]


def as_key(key):
    """A ``jax.random`` key from a key, raw ``uint32[2]`` key data or an int seed."""
    if isinstance(key, (int, np.integer)):
        return jax.random.key(int(key))
    if not hasattr(key, "dtype"):
        raise TypeError(f"key must be a jax.random key or an int seed, got {type(key).__name__}")
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    if key.dtype == jnp.uint32 and key.shape[-1:] == (2,):
        return jax.random.wrap_key_data(key)
    raise TypeError(f"key must be a jax.random key or an int seed, got an array of {key.dtype}{list(key.shape)}")


def path_key(key, path: str):
    """The key of the leaf at ``path``: ``key`` folded with the path's CRC, so it does not depend on
    which other leaves are selected."""
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def is_array(x) -> bool:
    """True for a plain array leaf (anything with a shape and a dtype that is not a lora_jax node)."""
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
    key = as_key(key)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_node)
    existing = [path_str(kp) for kp, leaf in flat if is_node(leaf)]
    if existing and not add:
        raise ValueError(f"params already hold {len(existing)} LoRA weight(s) (e.g. {existing[:3]}); "
                         "pass add=True to put adapters on further leaves, or lora.merge() first")
    paths = [path_str(kp) for kp, _ in flat]
    candidates = [(p, tuple(leaf.shape), leaf.dtype) for p, (kp, leaf) in zip(paths, flat) if is_array(leaf)]
    targets = rules.resolve_all(candidates)
    full = rules.fully_trained(candidates, set(targets))
    out = []
    for p, (kp, leaf) in zip(paths, flat):
        t = targets.get(p) if is_array(leaf) else None
        if t is not None:
            leaf = make_weight(leaf, t, path_key(key, p))
        elif p in full and is_array(leaf):
            leaf = Trainable(leaf)
        out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


def make_weight(leaf, t: Target, key, *, inner=None):
    """One `LoraWeight` for the array ``leaf`` from resolved options ``t`` (on top of ``inner``, an
    existing chain of adapters on the same kernel, when given)."""
    fn = initializers.get(t.init, where=t.path)
    s = t.settings
    a, b, w = fn(key, leaf, t.layout, s.rank, _a_dtype(t, leaf.dtype), s.scale)
    want_a, want_b = factor_shapes(leaf.shape, t.layout, s.rank)
    if tuple(a.shape) != want_a or tuple(b.shape) != want_b or tuple(w.shape) != tuple(leaf.shape):
        raise ValueError(f"{t.path}: init {t.init!r} returned a{list(a.shape)}, b{list(b.shape)}, w{list(w.shape)}; "
                         f"expected a{list(want_a)}, b{list(want_b)}, w{list(leaf.shape)}")
    if inner is not None and w is not leaf:
        raise ValueError(f"{t.path}: init {t.init!r} rewrites the base kernel, which the adapters already on it "
                         f"({[n.name for n in inner.chain()]}) were trained against; use it on a kernel without adapters")
    lw = LoraWeight(w if inner is None else inner, a, b, layout=t.layout, settings=s)
    kind = lw.kind
    if inner is not None and not kind.combines:
        raise ValueError(f"{t.path}: {kind.name} adapters cannot share a kernel with other adapters "
                         f"({[n.name for n in inner.chain()]})")
    alone = [] if inner is None else [n for n in inner.chain() if not n.kind.combines]
    if alone:
        raise ValueError(f"{t.path}: holds a {alone[0].kind.name} adapter, which cannot share a kernel with other "
                         "adapters")
    if kind.has_m:
        lw = lw.replace(m=kind.init_m(lw))
    return lw


def _merge_leaf(x, requantize: bool):
    if is_trainable(x):
        return x.value
    if not is_lora(x):
        return dense_base(x)
    merged = x.merge()
    if requantize and is_stored(x.base):
        form = getattr(x.base, "scheme", type(x.base).__name__)
        warnings.warn(f"merge(requantize=True): the merged kernel {x.base.shape} is rounded to {form} again; "
                      "the adapter's effect is only kept to that precision", stacklevel=3)
        return x.base.requantize(merged)
    return merged


MERGE_MAGNITUDE_LIMIT = 1e3
"""``merge(safe=True)`` rejects a merged kernel with ``max|merged| > MERGE_MAGNITUDE_LIMIT * max(max|w|, 1)``:
fine-tuning moves weights by a small fraction of their scale, so a thousandfold growth over both the
base's largest entry and 1 is a corrupt or diverged adapter, not training."""


def merge(tree, *, safe: bool = False, requantize: bool = False):
    """Fold every adapter into its kernel: ``w + scale * a @ b`` in ``w``'s dtype (float32 math).

    Args:
      tree: a LoRA tree.
      safe: check that every merged kernel is finite and raise otherwise (needs concrete arrays,
        i.e. outside ``jit``). Nothing is modified either way: the result is a new tree.
      requantize: store kernels whose base was quantized (`lora.quantize`) quantized again, with a
        warning (the merge is rounded); by default they come back dense in full precision.

    Raises:
      ValueError: with ``safe=True``, naming every kernel whose merge holds NaN or Inf, or values
        no trained weight has: ``max|merged| > MERGE_MAGNITUDE_LIMIT * max(max|w|, 1)`` (1e3).

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lora
      >>> lp = lora.init({"k": jnp.ones((4, 4))}, lora.Rules("k", rank=1), 0)
      >>> bool((lora.merge(lp)["k"] == 1).all())
      True
    """
    merged = jax.tree_util.tree_map(lambda x: _merge_leaf(x, requantize), tree, is_leaf=is_unit)
    if safe:
        bad, big = [], []
        for (kp, leaf), (_, orig) in zip(jax.tree_util.tree_flatten_with_path(merged, is_leaf=is_stored)[0],
                                         jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_unit)[0]):
            if not is_node(orig) or is_stored(leaf):
                continue
            try:
                finite = bool(jnp.all(jnp.isfinite(leaf)))
            except jax.errors.ConcretizationTypeError:
                raise TypeError("merge(safe=True) checks values and needs concrete arrays; call it outside jit "
                                "or pass safe=False") from None
            if not finite:
                bad.append(path_str(kp))
            elif is_lora(orig):  # no trained weight is MERGE_MAGNITUDE_LIMIT x larger than its base (or than 1)
                w = dense_base(orig.base)
                top, ref = float(jnp.max(jnp.abs(leaf))), max(float(jnp.max(jnp.abs(w))), 1.0)
                if top > MERGE_MAGNITUDE_LIMIT * ref:
                    big.append(f"{path_str(kp)} (max |merged| {top:.3g} > {MERGE_MAGNITUDE_LIMIT:g} x {ref:.3g})")
        if bad:
            raise ValueError(f"merge(safe=True): non-finite values in {len(bad)} merged kernel(s): {bad}")
        if big:
            raise ValueError(f"merge(safe=True): implausibly large values in {len(big)} merged kernel(s) (a corrupt "
                             f"adapter?): {big}")
    return merged


def unmerge(merged, tree):
    """The base parameters back from ``merged`` (as returned by `merge`) and the LoRA tree.

    Leaves where ``tree`` holds a `LoraWeight` become ``merged - scale * a @ b``; every other leaf
    (fully trained ones included: they have no base) is taken from ``merged``.
    """
    return jax.tree_util.tree_map(lambda t, m: t.unmerge(m) if is_lora(t) else m, tree, merged, is_leaf=is_node)


def trainable_mask(tree):
    """What trains: the one definition `split`, `combine`, `lora.labels` and `lora.freeze` share.

    The same tree with ``True`` on each ``a``, ``b`` (and a variant's ``m``) of every *active* adapter and
    on each `Trainable` value, ``False`` on every other leaf (bases, inactive adapters' factors,
    plain leaves; a `lora.quantize`-d base is one ``False``), None where the tree holds None. It
    works on full trees, `split` halves and gradient trees; as a mask it suits ``optax.masked``.

    Example:
      >>> import jax.numpy as jnp, lora_jax as lora
      >>> lp = lora.init({"k": jnp.ones((4, 4)), "bias": jnp.zeros(4)}, lora.Rules("k", rank=1), 0)
      >>> m = lora.trainable_mask(lp)
      >>> m["bias"], m["k"].w, m["k"].a
      (False, False, True)
    """
    def flag(x, on):
        return None if x is None else on

    def node(n, w):
        return n.replace(w=w, a=flag(n.a, n.active), b=flag(n.b, n.active), m=flag(n.m, n.active))

    def one(x):
        if is_lora(x):
            return map_chain(x, node, lambda base: flag(base, False))
        if is_trainable(x):
            return Trainable(flag(x.value, True))
        return False

    return jax.tree_util.tree_map(one, tree, is_leaf=is_unit)


def split(tree):
    """Partition a LoRA tree into ``(trainable, frozen)`` by `trainable_mask` (as equinox's
    ``partition``): two trees of the tree's structure, each holding None where the other holds a leaf.

    ``trainable`` holds the factors of every active adapter (``w=None`` in each `LoraWeight`) and
    every `Trainable` value; ``frozen`` holds the rest: the bases, the other leaves and the factors
    of inactive adapters (which do not train: `lora.freeze` agrees).
    Differentiate with respect to ``trainable`` only and no gradient buffer for the base exists.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lora
      >>> lp = lora.init({"k": jnp.ones((4, 4)), "bias": jnp.zeros(4)}, lora.Rules("k", rank=1), 0)
      >>> trainable, frozen = lora.split(lp)
      >>> len(jax.tree_util.tree_leaves(trainable)), len(jax.tree_util.tree_leaves(frozen))
      (2, 2)
    """
    mask = trainable_mask(tree)
    trainable = jax.tree_util.tree_map(lambda on, x: x if on else None, mask, tree)
    frozen = jax.tree_util.tree_map(lambda on, x: None if on else x, mask, tree)
    return trainable, frozen


def combine(*trees):
    """Inverse of `split`: each leaf from the first tree that holds one there (``combine(*split(tree))``
    is ``tree``, leaf for leaf).

    Raises:
      ValueError: when the trees do not have one structure (not the halves of one `split`).
    """
    try:
        return jax.tree_util.tree_map(lambda *xs: next((x for x in xs if x is not None), None), *trees,
                                      is_leaf=lambda x: x is None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"combine: the trees do not have one structure; expected the halves of lora.split ({e})") \
            from None


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

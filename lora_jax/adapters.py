"""Several named adapters in one tree: `add`, `select`, `delete`, `adapter_names`, `combine_adapters`.

Adapters on the same kernel form a chain of `LoraWeight` nodes (each node's ``w`` is the node
added before it, down to the base array). Each node has a ``name`` and an ``active`` flag:
`lora.wrap` and `lora.merge` apply the active ones (their deltas add up), `lora.freeze` trains only
the active ones, and ``lora.wrap(fn, adapter_ids=ids)`` routes each example to any of them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence, Union

import jax
import jax.numpy as jnp

from .rules import Rules, Target, path_str
from .tree import as_key, is_array, make_weight, path_key
from .layout import to_matrix
from .weight import AdapterSettings, LoraWeight, is_lora, is_node, map_chain

__all__ = ["add", "select", "delete", "adapter_names", "combine_adapters"]


def adapter_names(tree) -> list[str]:
    """Every adapter name in the tree, in order of first appearance (oldest first). This is the
    order ``lora.wrap(fn, adapter_ids=...)`` indexes."""
    names = []
    for leaf in jax.tree_util.tree_leaves(tree, is_leaf=is_lora):
        if is_lora(leaf):
            for node in leaf.chain():
                if node.name not in names:
                    names.append(node.name)
    return names


def add(tree, name: str, rules: Union[Rules, Any], key, *, active: bool = True, same_init: bool = False):
    """Add the adapter ``name`` beside any existing ones, on the leaves ``rules`` selects.

    A selected plain leaf gets its first adapter; a selected `LoraWeight` gets one more on the
    same base kernel (same layout). Existing adapters keep their ``active`` flags; pass
    ``active=False`` to add the new one switched off. Each leaf's key comes from ``key`` and its
    path (folded once more on a kernel that already holds adapters, so two adapters added with one
    key differ); with ``same_init`` the new adapter's factors are exactly those of
    ``lora.init(params, rules, key)``, wherever it lands (several adapters trained together, each
    starting as its own run would).

    Raises:
      ValueError: if ``name`` already exists on a selected kernel, if the rules select nothing,
        or if the new adapter's layout differs from the kernel's existing adapters.

    Example:
      >>> import jax.numpy as jnp, lora_jax as lora
      >>> lp = lora.init({"k": jnp.ones((4, 4))}, lora.Rules("k", rank=2), 0)
      >>> lp = lora.add(lp, "task2", lora.Rules("k", rank=1), 1)
      >>> lora.adapter_names(lp)
      ['default', 'task2']
    """
    AdapterSettings.of({"name": name, "active": active}, where="add")
    if not isinstance(rules, Rules):
        rules = Rules(rules)
    key = as_key(key)
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)
    paths = [path_str(kp) for kp, _ in flat]
    candidates = [(p, tuple(leaf.base.shape if is_lora(leaf) else leaf.shape),
                   leaf.base.dtype if is_lora(leaf) else leaf.dtype)
                  for p, (_, leaf) in zip(paths, flat) if is_lora(leaf) or is_array(leaf)]
    targets = rules.resolve_all(candidates)
    out = []
    for p, (_, leaf) in zip(paths, flat):
        t: Target = targets.get(p)
        if t is None:
            out.append(leaf)
            continue
        t = dataclasses.replace(t, settings=dataclasses.replace(t.settings, name=name, active=active))
        if is_lora(leaf):
            if name in [n.name for n in leaf.chain()]:
                raise ValueError(f"{p}: already holds an adapter named {name!r}; delete it first or pick another name")
            if t.layout != leaf.layout:
                raise ValueError(f"{p}: the new adapter's layout {t.layout!r} differs from the layout {leaf.layout!r} of "
                                 f"the adapters already on this kernel")
            out.append(make_weight(leaf.base, t, path_key(key if same_init else jax.random.fold_in(key, 1), p),
                                   inner=leaf))
        else:
            out.append(make_weight(leaf, t, path_key(key, p)))
    return jax.tree_util.tree_unflatten(treedef, out)


def _name_list(names) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


def _check_known(tree, names, what):
    known = adapter_names(tree)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{what}: no adapter named {unknown}; the tree has {known}")


def select(tree, names: Union[str, Sequence[str]]):
    """Make exactly the adapters ``names`` active (the others stay in the tree, switched off).

    Active adapters are what `lora.wrap` and `lora.merge` apply (their deltas add up) and what
    `lora.freeze` trains. ``select(tree, [])`` switches every adapter off (the base model).
    """
    names = _name_list(names)
    _check_known(tree, names, "select")
    return jax.tree_util.tree_map(
        lambda x: map_chain(x, lambda n, w: n.replace(w=w, active=n.name in names), lambda b: b) if is_lora(x) else x,
        tree, is_leaf=is_lora)


def delete(tree, name: str):
    """Remove the adapter ``name`` everywhere; a kernel left with no adapter becomes a plain array."""
    _check_known(tree, [name], "delete")
    return jax.tree_util.tree_map(
        lambda x: map_chain(x, lambda n, w: w if n.name == name else n.replace(w=w), lambda b: b) if is_lora(x) else x,
        tree, is_leaf=is_lora)


def combine_adapters(tree, names: Sequence[str], weights: Sequence[float], method: str = "cat", *,
                     rank: int = None, name: str = "combined", active: bool = False):
    """A new adapter ``name`` from a weighted combination of existing ones (PEFT's
    ``add_weighted_adapter``), on every kernel that holds at least one of ``names``.

    With scales ``s_k`` and weights ``w_k``, the new adapter has ``alpha = rank`` (scale 1) and:

    * ``"cat"``: ``a = [w_1 s_1 a_1 | w_2 s_2 a_2 | ...]``, ``b = [b_1; b_2; ...]``: exactly the sum
      ``sum_k w_k s_k a_k b_k`` of the weighted deltas, at rank ``sum r_k``;
    * ``"linear"``: ``a = sum sign_k sqrt(|w_k s_k|) a_k``, ``b = sum sqrt(|w_k s_k|) b_k`` (same ranks
      only; a cheap approximation);
    * ``"svd"``: the truncated SVD of ``sum_k w_k s_k a_k b_k`` at ``rank`` (default: the largest rank).

    Like PEFT, the new adapter is added inactive; `select` it to use it.

    Raises:
      ValueError: on unknown names, mismatched lengths, an unknown method, variants that do not combine (DoRA), or
        different ranks with ``"linear"``.
    """
    names = _name_list(names)
    weights = [float(w) for w in weights]
    if len(names) != len(weights) or not names:
        raise ValueError(f"combine_adapters: {len(names)} names and {len(weights)} weights; give one weight per name")
    if method not in ("cat", "linear", "svd"):
        raise ValueError(f"combine_adapters: method must be 'cat', 'linear' or 'svd', got {method!r}")
    _check_known(tree, names, "combine_adapters")
    if name in adapter_names(tree):
        raise ValueError(f"combine_adapters: an adapter named {name!r} exists already")

    def one(x):
        if not is_lora(x):
            return x
        nodes = {n.name: n for n in x.chain()}
        parts = [(nodes[n], w) for n, w in zip(names, weights) if n in nodes]
        if not parts:
            return x
        odd = sorted({n.variant for n, _ in parts if n.variant != "lora"})
        if odd:  # a combination is a plain (a, b); a variant's own array and kernel would be lost
            raise ValueError(f"combine_adapters: combines plain LoRA adapters only, got {', '.join(odd)} adapters")
        layout = parts[0][0].layout
        ns = layout.count("s")
        if method == "cat":
            a = jnp.concatenate([n.effective_a().astype(jnp.float32) * (w * n.scale) for n, w in parts], axis=-1)
            b = jnp.concatenate([n.effective_b().astype(jnp.float32) for n, _ in parts], axis=ns)
        elif method == "linear":
            ranks = {n.rank for n, _ in parts}
            if len(ranks) != 1:
                raise ValueError(f"combine_adapters: 'linear' needs equal ranks, got {sorted(ranks)}")
            a = sum(math.copysign(math.sqrt(abs(w * n.scale)), w * n.scale) * n.effective_a().astype(jnp.float32)
                    for n, w in parts)
            b = sum(math.sqrt(abs(w * n.scale)) * n.effective_b().astype(jnp.float32) for n, w in parts)
        else:
            r = rank or max(n.rank for n, _ in parts)
            delta = sum(w * n.lora_delta(jnp.float32) for n, w in parts)
            m = to_matrix(delta, layout)
            if r > min(m.shape[-2:]):
                raise ValueError(f"combine_adapters: svd rank {r} exceeds min(in, out) = {min(m.shape[-2:])}")
            u, sv, vt = jnp.linalg.svd(m, full_matrices=False)
            a_m, b_m = u[..., :r], sv[..., :r, None] * vt[..., :r, :]
            shape = x.base.shape
            i_shape = tuple(d for d, k in zip(shape, layout) if k == "i")
            o_shape = tuple(d for d, k in zip(shape, layout) if k == "o")
            a = a_m.reshape(a_m.shape[:-2] + i_shape + (r,))
            b = b_m.reshape(b_m.shape[:-2] + (r,) + o_shape)
        new_rank = a.shape[-1]
        first = parts[0][0]
        return LoraWeight(x, a.astype(first.a.dtype), b.astype(first.b.dtype), layout=layout, rank=new_rank,
                          alpha=float(new_rank), dropout=first.dropout, name=name, active=active)

    return jax.tree_util.tree_map(one, tree, is_leaf=is_lora)

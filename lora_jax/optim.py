"""Optimizers that train only the adapters: `freeze` and `labels`."""

from __future__ import annotations

from typing import Mapping, Union

import jax
import optax

from .adapters import adapter_names
from .tree import trainable_mask
from .weight import is_lora, is_node, is_trainable, is_unit, map_chain

__all__ = ["freeze", "labels", "adapter_labels", "TRAIN", "FROZEN"]

TRAIN = "lora"
FROZEN = "frozen"


def labels(tree):
    """`lora.trainable_mask` as optax labels: ``"lora"`` on each ``a``, ``b`` (and a variant's ``m``, DoRA's magnitude) of
    every active adapter and on each `lora.Trainable` value, ``"frozen"`` on every other leaf.
    Works on full trees, `lora.split` halves and gradient trees."""
    return jax.tree_util.tree_map(lambda on: TRAIN if on else FROZEN, trainable_mask(tree))


def adapter_labels(tree):
    """Optax labels by adapter: each active adapter's ``a``, ``b`` (and ``m``) carry its name, every
    other leaf ``"frozen"``. The labels of `freeze` with one optimizer per adapter.

    Raises:
      ValueError: for `lora.Trainable` leaves (they belong to no one adapter).
    """
    def lab(x, n):
        return None if x is None else (n.name if n.active else FROZEN)

    def one(x):
        if is_lora(x):
            return map_chain(x, lambda n, w: n.replace(w=w, a=lab(n.a, n), b=lab(n.b, n), m=lab(n.m, n)),
                             lambda base: None if base is None else FROZEN)
        if is_trainable(x):
            raise ValueError("freeze: fully trained leaves (lora.Trainable, modules_to_save) belong to no one adapter; "
                             "train them with a single optimizer")
        return FROZEN

    return jax.tree_util.tree_map(one, tree, is_leaf=is_unit)


def freeze(tx: Union[optax.GradientTransformation, Mapping[str, optax.GradientTransformation]],
           tree=None) -> optax.GradientTransformation:
    """``tx`` on the adapters only; everything else gets a zero update and no optimizer state.

    With a mapping ``{adapter name: tx}`` each adapter (`lora.add`) trains with its own optimizer,
    learning rate and state, as if alone: K adapters on one frozen base in one step, each example
    routed to its adapter with ``lora.wrap(fn, adapter_ids=...)`` (the loss a sum of per-adapter
    means, so each adapter's gradient is its own loss's).

    Built on ``optax.multi_transform`` with ``optax.set_to_zero()`` for the frozen group, so the
    state holds moments for ``a``/``b`` alone. The labels are computed from the tree given to
    ``init``/``update``, so the same transformation serves a full LoRA tree or the trainable half
    from `lora.split`.

    Args:
      tx: the optimizer for the adapters.
      tree: optional; when given it must hold at least one `LoraWeight`.

    Raises:
      ValueError: if ``tree`` is given and holds no LoRA weight (nothing would train); with a
        mapping, for an adapter of ``tree`` it does not name, a name ``"frozen"``, or
        `lora.Trainable` leaves.

    Example:
      >>> import jax, jax.numpy as jnp, optax, lora_jax as lora
      >>> lp = lora.init({"k": jnp.ones((4, 4))}, lora.Rules("k", rank=2), 0)
      >>> tx = lora.freeze(optax.adam(1e-3), lp)
      >>> state = tx.init(lp)
    """
    if tree is not None and not any(is_node(x) for x in jax.tree_util.tree_leaves(tree, is_leaf=is_node)):
        raise ValueError("freeze: the tree holds no LoraWeight, so nothing would train; call lora.init first")
    if not isinstance(tx, Mapping):
        return optax.multi_transform({TRAIN: tx, FROZEN: optax.set_to_zero()}, labels)
    if FROZEN in tx:
        raise ValueError(f"freeze: {FROZEN!r} cannot name an adapter's optimizer (it labels the frozen leaves)")
    if tree is not None:
        adapter_labels(tree)  # raises on lora.Trainable leaves
        active = {n.name for x in jax.tree_util.tree_leaves(tree, is_leaf=is_lora) if is_lora(x)
                  for n in x.chain() if n.active}
        missing = [n for n in adapter_names(tree) if n in active and n not in tx]
        if missing:
            raise ValueError(f"freeze: no optimizer for the adapters {missing}; give one per active adapter "
                             f"({sorted(tx)} given)")
        idle = sorted(set(tx) & (set(adapter_names(tree)) - active))
        if idle:
            raise ValueError(f"freeze: the adapters {idle} are inactive, so they would not train (yet rows routed to "
                             "them by lora.wrap(adapter_ids=...) run); activate them with lora.select")
    return optax.multi_transform({**tx, FROZEN: optax.set_to_zero()}, adapter_labels)

"""Optimizers that train only the adapters: `freeze` and `labels`."""

from __future__ import annotations

import jax
import optax

from .tree import trainable_mask
from .weight import is_node

__all__ = ["freeze", "labels", "TRAIN", "FROZEN"]

TRAIN = "lora"
FROZEN = "frozen"


def labels(tree):
    """`lora.trainable_mask` as optax labels: ``"lora"`` on each ``a``, ``b`` (and a variant's ``m``, DoRA's magnitude) of
    every active adapter and on each `lora.Trainable` value, ``"frozen"`` on every other leaf.
    Works on full trees, `lora.split` halves and gradient trees."""
    return jax.tree_util.tree_map(lambda on: TRAIN if on else FROZEN, trainable_mask(tree))


def freeze(tx: optax.GradientTransformation, tree=None) -> optax.GradientTransformation:
    """``tx`` on the adapters only; everything else gets a zero update and no optimizer state.

    Built on ``optax.multi_transform`` with ``optax.set_to_zero()`` for the frozen group, so the
    state holds moments for ``a``/``b`` alone. The labels are computed from the tree given to
    ``init``/``update``, so the same transformation serves a full LoRA tree or the trainable half
    from `lora.split`.

    Args:
      tx: the optimizer for the adapters.
      tree: optional; when given it must hold at least one `LoraWeight`.

    Raises:
      ValueError: if ``tree`` is given and holds no LoRA weight (nothing would train).

    Example:
      >>> import jax, jax.numpy as jnp, optax, lora_jax as lora
      >>> lp = lora.init({"k": jnp.ones((4, 4))}, lora.Rules("k", rank=2), 0)
      >>> tx = lora.freeze(optax.adam(1e-3), lp)
      >>> state = tx.init(lp)
    """
    if tree is not None and not any(is_node(x) for x in jax.tree_util.tree_leaves(tree, is_leaf=is_node)):
        raise ValueError("freeze: the tree holds no LoraWeight, so nothing would train; call lora.init first")
    return optax.multi_transform({TRAIN: tx, FROZEN: optax.set_to_zero()}, labels)

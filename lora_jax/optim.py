"""Optimizers that train only the adapters: `freeze` and `labels`."""

from __future__ import annotations

import jax
import optax

from .weight import Trainable, is_lora, is_node, is_trainable, map_chain

__all__ = ["freeze", "labels", "TRAIN", "FROZEN"]

TRAIN = "lora"
FROZEN = "frozen"


def labels(tree):
    """A tree of the same structure with ``"lora"`` on each ``a``, ``b`` (and DoRA ``m``) of every
    active adapter and ``"frozen"`` on every other leaf. Works on full trees, `lora.split` halves
    and gradient trees."""

    def node(n, w):
        on = TRAIN if n.active else FROZEN  # only the selected adapters train
        return n.replace(w=w, a=None if n.a is None else on, b=None if n.b is None else on,
                         m=None if n.m is None else on)

    def lab(x):
        if is_lora(x):
            return map_chain(x, node, lambda base: None if base is None else FROZEN)
        if is_trainable(x):
            return Trainable(TRAIN)
        return FROZEN

    return jax.tree_util.tree_map(lab, tree, is_leaf=is_node)


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

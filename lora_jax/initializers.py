"""Adapter initializers: how ``a`` and ``b`` start (and, for PiSSA-like inits, what ``w`` becomes).

Every initializer has the signature ``(key, w, layout, rank, dtype) -> (a, b, w)`` where the shapes
follow `lora_jax.weight.factor_shapes` and the returned ``w`` is the (possibly rewritten) frozen base.
Identity at init means ``merge`` returns the original ``w``:

* ``kaiming`` (PEFT's default): ``a ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` — Kaiming-uniform with
  a=sqrt(5), fan-in = the product of the input axes — and ``b = 0``.
* ``gaussian``: ``a ~ N(0, (1/r)^2)``, ``b = 0`` (PEFT's ``init_lora_weights="gaussian"``).
* ``False``: both random as PyTorch's ``nn.Linear`` would leave them (``b`` bound ``1/sqrt(r)``):
  not identity, for tests (PEFT's ``init_lora_weights=False``).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from .weight import factor_shapes

__all__ = ["kaiming", "gaussian", "random_both", "get", "INITIALIZERS"]


def _fan_in(shape, layout) -> int:
    return int(np.prod([d for d, k in zip(shape, layout) if k == "i"]))


def kaiming(key, w, layout, rank, dtype):
    """``a`` Kaiming-uniform (a=sqrt(5)), ``b`` zeros: PEFT's default."""
    a_shape, b_shape = factor_shapes(w.shape, layout, rank)
    bound = 1.0 / np.sqrt(_fan_in(w.shape, layout))
    a = jax.random.uniform(key, a_shape, jnp.float32, -bound, bound).astype(dtype)
    return a, jnp.zeros(b_shape, dtype), w


def gaussian(key, w, layout, rank, dtype):
    """``a`` normal with std ``1/r``, ``b`` zeros."""
    a_shape, b_shape = factor_shapes(w.shape, layout, rank)
    a = (jax.random.normal(key, a_shape, jnp.float32) / rank).astype(dtype)
    return a, jnp.zeros(b_shape, dtype), w


def random_both(key, w, layout, rank, dtype):
    """Both factors random (``b`` Kaiming-uniform with fan-in ``r``): not identity at init."""
    ka, kb = jax.random.split(key)
    a, _, _ = kaiming(ka, w, layout, rank, dtype)
    _, b_shape = factor_shapes(w.shape, layout, rank)
    bound = 1.0 / np.sqrt(rank)
    b = jax.random.uniform(kb, b_shape, jnp.float32, -bound, bound).astype(dtype)
    return a, b, w


INITIALIZERS: dict[str, Callable] = {
    "kaiming": kaiming,
    "default": kaiming,
    "gaussian": gaussian,
}


def get(init: Any, where: str = "") -> Callable:
    """The initializer for a name, ``True``/``False`` (PEFT's ``init_lora_weights``) or a callable."""
    if init is True:
        return kaiming
    if init is False:
        return random_both
    if callable(init):
        return init
    if isinstance(init, str) and init.lower() in INITIALIZERS:
        return INITIALIZERS[init.lower()]
    raise ValueError(f"{where + ': ' if where else ''}unknown init {init!r}; expected one of "
                     f"{sorted(INITIALIZERS)}, True, False or a callable (key, w, layout, rank, dtype) -> (a, b, w)")

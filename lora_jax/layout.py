"""Kernel layouts and the math of one adapter, stated once for the whole package.

A kernel ``w`` has each axis labelled by a *layout* string, one letter per axis:

* ``i`` an input axis (contracted with the activation in ``x @ w``),
* ``o`` an output axis,
* ``s`` a stack axis (layers stacked by ``nn.scan``: one independent adapter per index).

The adapter factors keep the stack axes first and the input/output axes in the kernel's order::

    a: (*stack, *in, r)        b: (*stack, r, *out)
    delta[s, i, o] = scale * sum_r a[s, i, r] * b[s, r, o]     (transposed into w's axis order)
    scale = alpha / r          (rsLoRA: alpha / sqrt(r))

so for a Flax ``Dense`` kernel ``(in, out)`` (layout ``"io"``) ``a`` is ``(in, r)``, ``b`` is
``(r, out)`` and ``y = x @ w + scale * (x @ a) @ b``. PEFT stores the same factors transposed:
``lora_A.weight = a.T`` ``(r, in)`` and ``lora_B.weight = b.T`` ``(out, r)``.

This module is arrays only: layouts, factor shapes, matrix views, ``a @ b`` and per-output norms in a
kernel's axis order. `lora_jax.weight` builds the adapter node on it.
"""

from __future__ import annotations

import string
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_layout", "factor_shapes", "to_matrix", "from_matrix", "delta_from_factors", "column_norm",
           "in_w_layout", "pad_rank"]

_KINDS = frozenset("sio")


def check_layout(layout: str, shape: Sequence[int], *, where: str = "kernel") -> str:
    """Validate a layout string against a kernel shape and return it.

    Args:
      layout: one letter per axis, each of ``s`` (stack), ``i`` (input), ``o`` (output); stack
        axes may appear anywhere, at least one ``i`` and one ``o`` are required.
      shape: the kernel's shape.
      where: a name for the kernel, used in error messages.

    Raises:
      ValueError: when the layout does not fit the shape.
    """
    if not isinstance(layout, str) or set(layout) - _KINDS:
        raise ValueError(f"{where}: layout must be letters 's'/'i'/'o', one per axis, got {layout!r}")
    if len(layout) != len(shape):
        raise ValueError(
            f"{where}: layout {layout!r} has {len(layout)} axes but the kernel has shape {tuple(shape)} "
            f"({len(shape)} axes)"
        )
    if "i" not in layout or "o" not in layout:
        raise ValueError(f"{where}: layout {layout!r} needs at least one input ('i') and one output ('o') axis")
    return layout


def _parts(shape: Sequence[int], layout: str, kind: str) -> tuple[int, ...]:
    return tuple(int(d) for d, k in zip(shape, layout) if k == kind)


def factor_shapes(shape: Sequence[int], layout: str, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of ``(a, b)`` for a kernel of ``shape`` and ``layout`` at ``rank``.

    >>> factor_shapes((3, 16, 32), "sio", 4)
    ((3, 16, 4), (3, 4, 32))
    """
    s, i, o = (_parts(shape, layout, k) for k in "sio")
    return s + i + (rank,), s + (rank,) + o


def to_matrix(w: jax.Array, layout: str) -> jax.Array:
    """View a kernel as ``(*stack, prod(in), prod(out))`` (axes reordered, then flattened).

    >>> import jax.numpy as jnp
    >>> to_matrix(jnp.zeros((5, 3, 2)), "oii").shape
    (6, 5)
    """
    order = [j for k in "sio" for j, c in enumerate(layout) if c == k]
    s, i, o = (_parts(w.shape, layout, k) for k in "sio")
    return jnp.transpose(w, order).reshape(s + (int(np.prod(i)), int(np.prod(o))))


def from_matrix(m: jax.Array, shape: Sequence[int], layout: str) -> jax.Array:
    """Inverse of `to_matrix`: a ``(*stack, in, out)`` matrix back to the kernel's shape and layout."""
    order = [j for k in "sio" for j, c in enumerate(layout) if c == k]
    s, i, o = (_parts(shape, layout, k) for k in "sio")
    return jnp.transpose(m.reshape(s + i + o), np.argsort(order))


def _einsum_specs(layout: str) -> tuple[str, str, str]:
    letters = string.ascii_letters[: len(layout)]
    r = "Z" if "Z" not in letters else "z"
    s = "".join(c for c, k in zip(letters, layout) if k == "s")
    i = "".join(c for c, k in zip(letters, layout) if k == "i")
    o = "".join(c for c, k in zip(letters, layout) if k == "o")
    return s + i + r, s + r + o, letters


def delta_from_factors(a: jax.Array, b: jax.Array, layout: str, *, precision=None,
                       preferred_element_type=None) -> jax.Array:
    """``sum_r a[s, i, r] b[s, r, o]`` arranged in the kernel's axis order (no scale applied)."""
    sa, sb, out = _einsum_specs(layout)
    return jnp.einsum(f"{sa},{sb}->{out}", a, b, precision=precision,
                      preferred_element_type=preferred_element_type)


def column_norm(w: jax.Array, a: jax.Array, b: jax.Array, layout: str) -> jax.Array:
    """``||w + a @ b||`` over the input axes: one norm per (stack, output) index, shape ``(*s, *o)``.

    Computed without forming ``a @ b``: ``||w||^2 + 2 <w, a b> + ||a b||^2`` with ``a^T w`` (``r`` x
    out) and ``a^T a`` (``r`` x ``r``). This is DoRA's weight norm (PEFT: ``||W + s B A||`` per output
    row of the ``(out, in)`` weight); pass ``a`` already scaled.
    """
    letters = string.ascii_letters[: len(layout)]
    s = "".join(c for c, k in zip(letters, layout) if k == "s")
    i = "".join(c for c, k in zip(letters, layout) if k == "i")
    o = "".join(c for c, k in zip(letters, layout) if k == "o")
    ct = jnp.promote_types(w.dtype, jnp.float32)
    w, a, b = w.astype(ct), a.astype(ct), b.astype(ct)
    hp = jax.lax.Precision.HIGHEST
    ww = jnp.einsum(f"{letters},{letters}->{s}{o}", w, w, precision=hp)
    aw = jnp.einsum(f"{s}{i}Y,{letters}->{s}Y{o}", a, w, precision=hp)
    cross = jnp.einsum(f"{s}Y{o},{s}Y{o}->{s}{o}", b, aw, precision=hp)
    gram = jnp.einsum(f"{s}{i}Y,{s}{i}Z->{s}YZ", a, a, precision=hp)
    quad = jnp.einsum(f"{s}Y{o},{s}YZ,{s}Z{o}->{s}{o}", b, gram, b, precision=hp)
    return jnp.sqrt(jnp.maximum(ww + 2.0 * cross + quad, 0.0))


def in_w_layout(v: jax.Array, shape: Sequence[int], layout: str) -> jax.Array:
    """A ``(*s, *o)`` per-output vector arranged to broadcast against a kernel of ``shape``."""
    order = [j for j, k in enumerate(layout) if k == "s"] + [j for j, k in enumerate(layout) if k == "o"]
    target = [1] * len(shape)
    for j in order:
        target[j] = shape[j]
    return jnp.transpose(v, np.argsort(np.argsort(order))).reshape(target)


def pad_rank(a: jax.Array, b: jax.Array, layout: str, rank: int) -> tuple[jax.Array, jax.Array]:
    """``(a, b)`` zero-padded to ``rank`` along their rank axes (``a``'s last, ``b``'s after the stack
    axes), so ``a @ b`` is unchanged.

    >>> import jax.numpy as jnp
    >>> [x.shape for x in pad_rank(jnp.ones((3, 5, 2)), jnp.ones((3, 2, 4)), "sio", 6)]
    [(3, 5, 6), (3, 6, 4)]
    """
    pad, ns = rank - a.shape[-1], layout.count("s")
    return (jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)]),
            jnp.pad(b, [(0, 0)] * ns + [(0, pad)] + [(0, 0)] * (b.ndim - ns - 1)))

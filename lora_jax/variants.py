"""Adapter variants inside `lora.wrap`: the one seam through which a variant changes ``w + a @ b``.

A variant keeps the factorized form and adds a per-output *state*: an array shaped like ``b``
with a small "rank" axis of its own (``(*s, k, *o)``), so the interpreter's layout rules move it
exactly as they move ``b``, and no rule needs to know which variant it carries. A variant says:

* `Variant.state`: its state for one kernel, at the start of `lora.wrap`;
* `Variant.weight`: the merged kernel, given ``w``, the delta ``d = a @ b`` and its state parts
  arranged against ``w`` (used when a weight must be merged);
* `Variant.output`: a consumer's output (a matmul, conv, lookup) from its base term ``x . w``, its
  adapter term ``x . a . b`` and its state parts arranged against the output.

`variant_of` picks the variant for the active adapters of a kernel. DoRA is today's one variant; a
new one is a class here and a line in `variant_of`.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from .weight import column_norm

__all__ = ["Variant", "Dora", "variant_of"]


class Variant:
    """The interface; instances are hashable, stateless singletons (a static part of the lazy weight)."""

    name = "variant"

    def state(self, nodes: Sequence, base, a, b, t) -> jax.Array:
        """The state ``(*s, k, *o)`` for the active adapters ``nodes`` on the dense base ``base``;
        ``a`` is already scaled (``scale * a``), ``t`` is `lora.wrap`'s run-time scale."""
        raise NotImplementedError

    def weight(self, w, d, parts: Sequence) -> jax.Array:
        """The kernel from ``w``, ``d = a @ b`` and the state parts (each broadcasting against ``w``)."""
        raise NotImplementedError

    def output(self, base, d, parts: Sequence, dropped: Optional[Callable], out_dtype) -> jax.Array:
        """A consumer's output from its base term, its adapter term and the state parts (each
        broadcasting against the output); ``dropped()`` is the base term on the dropped-out input
        (None without dropout)."""
        raise NotImplementedError

    def __repr__(self):
        return self.name


class Dora(Variant):
    """DoRA: the kernel ``m / ||w + s a@b|| * (w + s a@b)``, the norm per output feature over the
    input axes and a constant (gradient stopped), as in the DoRA paper (sec. 4.3) and PEFT.

    State: ``(m0, m1)`` with ``m1 = m / norm`` and ``m0 = 1 + t (m1 - 1)`` (so the run-time scale
    ``t = 0`` gives the base), and the output ``m0 * x.w + m1 * x.a.b``. Under dropout PEFT applies
    the magnitude to the base term on the clean input and to the adapter term on the dropped one:
    ``x.w + (m0 - 1) * drop(x).w + m1 * drop(x).a.b``.
    """

    name = "dora"

    def state(self, nodes, base, a, b, t):
        (node,) = nodes
        ns = node.layout.count("s")
        ratio = node.m.astype(jnp.float32) / jax.lax.stop_gradient(column_norm(base, a, b, node.layout))
        return jnp.stack([1.0 + t * (ratio - 1.0), ratio], axis=ns)

    def weight(self, w, d, parts):
        m0, m1 = parts
        return m0 * w + m1 * d

    def output(self, base, d, parts, dropped, out_dtype):
        m0, m1 = parts
        ct = jnp.promote_types(out_dtype, jnp.float32)
        if dropped is None:
            y = m0.astype(ct) * base.astype(ct) + m1.astype(ct) * d.astype(ct)
        else:
            y = base.astype(ct) + (m0.astype(ct) - 1) * dropped().astype(ct) + m1.astype(ct) * d.astype(ct)
        return y.astype(out_dtype)


DORA = Dora()


def variant_of(nodes: Sequence, *, routed: bool) -> Optional[Variant]:
    """The variant of a kernel's active adapters ``nodes`` (None: plain LoRA).

    Raises:
      ValueError: for variants that cannot be combined with other active adapters or routed.
    """
    if not any(node.m is not None for node in nodes):
        return None
    if routed:
        raise ValueError("lora.wrap(adapter_ids=...): per-example routing does not support DoRA adapters")
    if len(nodes) > 1:
        raise ValueError(f"lora.wrap: {len(nodes)} adapters are active on one kernel and one of them is DoRA; "
                         f"activate one ({[node.name for node in nodes]}) with lora.select")
    return DORA

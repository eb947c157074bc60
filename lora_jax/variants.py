"""Adapter variants: how one adapter changes its kernel, in a merge and inside `lora.wrap`.

An adapter's `AdapterSettings.variant` names its variant (``"lora"``: plain LoRA, ``"dora"``); the
`Variant` registered under that name owns everything that differs from plain LoRA, so a new variant
is one class here (or in user code) and one `register_variant` call:

* its own trainable array ``m`` beside ``a``, ``b`` (`Variant.has_m`; always per output feature,
  shaped ``(*stack, *out)``, so files, PEFT, sharding and optimizers treat it generically) and its
  start (`Variant.init_m`);
* the kernel one adapter makes of the kernel below it (`Variant.apply`), and the way back
  (`Variant.remove`), which `LoraWeight.merge` / `unmerge` / `delta` use;
* its names in files: PEFT's config flag and tensor suffix (`Variant.peft`; None: no PEFT form,
  export refused), lora_jax's file stores the name in the adapter's settings;
* whether it shares a kernel with other adapters, is combined or routed per example (`combines`);
* inside `lora.wrap`, a per-output *state*: an array shaped like ``b`` with a small "rank" axis of
  its own (``(*s, k, *o)``), so the interpreter's layout rules move it exactly as they move ``b``
  and no rule needs to know which variant it carries. `Variant.state` makes it at the start of
  `lora.wrap`; `Variant.weight` gives the merged kernel from ``w``, the delta ``d = a @ b`` and the
  state parts arranged against ``w``; `Variant.output` a consumer's output (a matmul, conv, lookup)
  from its base term ``x . w``, its adapter term ``x . a . b`` and the state parts arranged against
  the output. Plain LoRA has no state: `lora.wrap` keeps its fast path.

Example (a variant that doubles every adapter's delta, registered and used by name)::

    class Twice(Variant):
        name = "twice"
        def apply(self, node, w, ct):
            return w.astype(ct) + 2 * node.lora_delta(ct)
        def remove(self, node, merged, ct):
            return merged - 2 * node.lora_delta(ct)
    register_variant(Twice())
    lora.Rules(["dense"], rank=4, variant="twice")
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from .layout import column_norm, in_w_layout

__all__ = ["Variant", "Lora", "Dora", "register_variant", "get_variant", "variant_names", "peft_variants",
           "variant_of"]


class Variant:
    """The interface; instances are hashable, stateless singletons (a static part of the lazy weight).

    Attributes:
      name: the `AdapterSettings.variant` value that selects it; ``label`` its name in messages.
      has_m: whether the adapter has its own array ``m`` (per output feature, ``(*stack, *out)``).
      combines: whether it may share a kernel with other adapters or be routed per example
        (``lora.wrap(adapter_ids=...)``); `lora.combine_adapters` combines plain LoRA only.
      peft: ``(config flag, tensor suffix)`` of its PEFT form (DoRA: ``("use_dora",
        "lora_magnitude_vector")``; the suffix names ``m``), ``()`` for plain LoRA (no flag), None
        when PEFT has none (export refused).
    """

    name = "variant"
    label = ""
    has_m = False
    combines = False
    peft: Optional[tuple] = None

    # -- one weight (merge, unmerge, init) -------------------------------------------------
    def init_m(self, node) -> Optional[jax.Array]:
        """``m`` for a freshly initialised ``node`` (its ``a``, ``b`` drawn; None without ``m``)."""
        return None

    def apply(self, node, w: jax.Array, ct) -> jax.Array:
        """The kernel ``node`` makes of the kernel ``w`` below it, computed in ``ct``."""
        raise NotImplementedError

    def remove(self, node, merged: jax.Array, ct) -> jax.Array:
        """The kernel below ``node`` from the kernel it made (the inverse of `apply`), in ``ct``."""
        raise NotImplementedError

    def delta(self, node, dtype) -> jax.Array:
        """What ``node`` adds to the kernel below it, in ``dtype``."""
        w = node.inner().astype(dtype)
        return self.apply(node, w, dtype) - w

    # -- inside lora.wrap ------------------------------------------------------------------
    @property
    def factorized(self) -> bool:
        """Whether `lora.wrap` keeps it factorized (it defines `state`, `weight`, `output`); a variant
        that does not is merged into its kernel inside the function (`apply`): the same numbers,
        gradients through ``a``, ``b``, ``m``, without the factorized speed, dropout or routing."""
        return type(self).state is not Variant.state

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

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if not cls.__dict__.get("label"):
            cls.label = cls.__dict__.get("name", cls.name)

    def __repr__(self):
        return self.name


class Lora(Variant):
    """Plain LoRA: the kernel ``w + scale * a @ b``; no state, so `lora.wrap` takes its fast path."""

    name = "lora"
    label = "LoRA"
    combines = True
    peft = ()

    def apply(self, node, w, ct):
        return w.astype(ct) + node.lora_delta(ct)

    def remove(self, node, merged, ct):
        return merged - node.lora_delta(ct)

    def delta(self, node, dtype):
        return node.lora_delta(dtype)


class Dora(Variant):
    """DoRA: the kernel ``m / ||w + s a@b|| * (w + s a@b)``, the norm per output feature over the
    input axes and a constant (gradient stopped), as in the DoRA paper (sec. 4.3) and PEFT.

    State: ``(m0, m1)`` with ``m1 = m / norm`` and ``m0 = 1 + t (m1 - 1)`` (so the run-time scale
    ``t = 0`` gives the base), and the output ``m0 * x.w + m1 * x.a.b``. Under dropout PEFT applies
    the magnitude to the base term on the clean input and to the adapter term on the dropped one:
    ``x.w + (m0 - 1) * drop(x).w + m1 * drop(x).a.b``.
    """

    name = "dora"
    label = "DoRA"
    has_m = True
    peft = ("use_dora", "lora_magnitude_vector")

    @staticmethod
    def factor(node, ct, w) -> jax.Array:
        """``m / ||w + scale a@b||`` per output feature (a constant norm), arranged against ``w``."""
        norm = column_norm(w.astype(ct), node.scale * node.effective_a().astype(ct), node.effective_b().astype(ct),
                           node.layout)
        norm = jax.lax.stop_gradient(norm)  # a constant, as in the DoRA paper (sec. 4.3) and PEFT
        return in_w_layout(node.m.astype(ct) / norm, w.shape, node.layout)

    def init_m(self, node):
        """``||w + scale a@b||`` per output feature: the adapted kernel starts as ``w``."""
        w = node.inner()
        return column_norm(w, node.scale * node.effective_a(), node.effective_b(), node.layout).astype(node.a.dtype)

    def apply(self, node, w, ct):
        return self.factor(node, ct, w) * (w.astype(ct) + node.lora_delta(ct))

    def remove(self, node, merged, ct):
        # the norm is taken from the kernel below the adapter, which `factor` reads from the chain
        return merged / self.factor(node, ct, node.inner().astype(ct)) - node.lora_delta(ct)

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


_VARIANTS: dict[str, Variant] = {}


def register_variant(variant: Variant) -> Variant:
    """Make ``variant`` selectable as ``AdapterSettings(variant=variant.name)`` (and in `lora.Rules`,
    adapter files and the trainer's ``lora.variant``). Re-registering a name replaces it.

    Raises:
      TypeError: when ``variant`` is not a `Variant` instance.
    """
    if not isinstance(variant, Variant) or not isinstance(getattr(variant, "name", None), str):
        raise TypeError(f"register_variant: expected a Variant instance with a str name, got {variant!r}")
    _VARIANTS[variant.name] = variant
    return variant


def variant_names() -> tuple[str, ...]:
    """The registered variant names."""
    return tuple(_VARIANTS)


def get_variant(name: str) -> Variant:
    """The registered variant called ``name``.

    Raises:
      ValueError: naming the registered variants, when none is called ``name``.
    """
    try:
        return _VARIANTS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown adapter variant {name!r}; registered: {list(_VARIANTS)}") from None


def peft_variants() -> list:
    """The registered variants that PEFT has a config flag for (DoRA: ``use_dora``)."""
    return [v for v in _VARIANTS.values() if v.peft]


LORA = register_variant(Lora())
DORA = register_variant(Dora())


def variant_of(nodes: Sequence, *, routed: bool) -> Optional[Variant]:
    """The variant `lora.wrap` evaluates for a kernel's active adapters ``nodes`` (None: plain LoRA).

    Raises:
      ValueError: for variants that cannot be combined with other active adapters or routed.
    """
    kinds = [get_variant(node.variant) for node in nodes]
    if all(k is LORA for k in kinds):
        return None
    odd = next(k for k in kinds if k is not LORA)
    if routed and not (odd.combines and odd.factorized):
        raise ValueError(f"lora.wrap(adapter_ids=...): per-example routing does not support {odd.name} adapters")
    if len(nodes) > 1:
        if not all(k.combines for k in kinds) or len(set(kinds)) > 1:
            raise ValueError(f"lora.wrap: {len(nodes)} adapters are active on one kernel and one of them is "
                             f"{odd.name}; activate one ({[node.name for node in nodes]}) with lora.select")
    return odd

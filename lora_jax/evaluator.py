"""The interpreter under `lora.wrap`: the lazy LoRA weight, the jaxpr evaluator and its open rule table.

Inside the evaluator each LoRA weight is a `Lazy` value ``w + a @ b`` (the scale folded into ``a``)
in the layout ``kinds`` (one letter per axis of ``w``: ``s`` stack, ``i`` input, ``o`` output; see
`lora_jax.weight`). The evaluator walks a jaxpr; an equation none of whose operands is lazy is
bound as traced; otherwise the rule registered for its primitive runs, or, with none, `fallback`
merges the weight for that use with a `MaterializeWarning`.

A rule is ``rule(ctx, eqn, invals) -> list`` with one value per ``eqn.outvars``:

* ``ctx``: the `Ctx` of this evaluation (dropout, routing, sub-jaxpr evaluation: ``ctx.eval``);
* ``eqn``: the ``jax.extend.core.JaxprEqn`` (``eqn.primitive``, ``eqn.params``, ``eqn.outvars``);
* ``invals``: the operands, plain arrays and at least one `Lazy`.

It returns plain arrays or `Lazy` values, and may give up with ``return fallback(ctx, eqn,
invals)`` (exact, merged). `bind` runs the primitive itself on operands of the user's choice.
Register rules by primitive object with `register_rule` (public as `lora.register_rule`); a
primitive that only rearranges the weight declares itself in one line with `layout_rule`.

Example (a user's primitive ``double(x) = 2x``, declared layout-only: ``2(w + a b) = 2w + (2a) b``):
  >>> import jax, jax.numpy as jnp, lora_jax as lora
  >>> from lora_jax.evaluator import layout_rule
  >>> double_p = jax.extend.core.Primitive("double")
  >>> _ = double_p.def_impl(lambda x: 2 * x); _ = double_p.def_abstract_eval(lambda x: x)
  >>> _ = layout_rule(double_p, lambda lz, eqn, others: {"a": 2 * lz.a})
  >>> lp = lora.init({"w": jnp.ones((4, 3))}, lora.Rules("w", rank=2, init=False), 0)
  >>> f = lambda p, x: x @ double_p.bind(p["w"])
  >>> bool(jnp.allclose(lora.wrap(f)(lp, jnp.ones((1, 4))), f(lora.merge(lp), jnp.ones((1, 4)))))
  True
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.extend import core as jcore
from jax.extend.core import primitives as P

from .layout import delta_from_factors, in_w_layout
from .weight import dense_base

__all__ = ["MaterializeWarning", "Lazy", "Ctx", "Rule", "bind", "dense", "is_lazy", "eval_jaxpr", "fallback",
           "finish", "register_rule", "layout_rule", "primitive", "rule_table"]


class MaterializeWarning(UserWarning):
    """A LoRA weight met a primitive with no factorized rule and was merged for that use.

    The result is still exact; only the cost differs. Turn it into an error in tests with
    ``warnings.simplefilter("error", lora.MaterializeWarning)``; keep the primitive factorized
    with `lora.register_rule`.
    """


# ------------------------------------------------------------------------------------------
# The lazy value
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Lazy:
    """``w + a @ b`` in the layout ``kinds`` (scale already folded into ``a``).

    ``a``: ``(*s, *i, r)``, ``b``: ``(*s, r, *o)`` with each group in ``w``'s axis order.
    ``key``: the dropout key (None: no dropout), ``dropout`` its rate.
    ``variant``/``state``: an adapter variant (`lora_jax.variants.Variant`, None for plain LoRA)
    and its per-output state, shaped like ``b`` with a small "rank" axis, so that every layout rule
    moves it as it moves ``b`` (`b_like`). ``routed``: per-example adapter routing is on.
    ``w`` may be a quantized base; `wd` is it dense.
    """

    w: Any
    a: Any
    b: Any
    key: Any
    kinds: str
    dropout: float
    state: Any = None
    variant: Any = None
    routed: bool = False

    @property
    def wd(self):
        """The base as a dense array (a quantized base is dequantized here, at its use)."""
        return dense_base(self.w)

    @property
    def dtype(self):
        return self.w.dtype

    @property
    def shape(self):
        return self.w.shape

    def with_(self, **changes) -> "Lazy":
        return dataclasses.replace(self, **changes)

    def axes(self, kind: str) -> list[int]:
        return [j for j, k in enumerate(self.kinds) if k == kind]

    def b_like(self, f) -> dict:
        """``f(array, rank)`` applied to ``b`` and to the variant state (whose rank axis is its own)."""
        ns = len(self.axes("s"))
        return dict(b=f(self.b, self.b.shape[ns]),
                    state=None if self.state is None else f(self.state, self.state.shape[ns]))

    def state_parts(self) -> list:
        """The variant state as its per-output arrays, each ``(*s, *o)``."""
        ns = len(self.axes("s"))
        return [jnp.take(self.state, j, axis=ns) for j in range(self.state.shape[ns])]

    def materialize(self):
        if self.routed:
            raise ValueError("lora.wrap(adapter_ids=...): a LoRA weight reached an operation with no factorized rule "
                             "(it would have to be merged), which per-example routing cannot do; route only models "
                             "whose LoRA weights feed matmuls, convolutions and embedding lookups")
        ct = jnp.promote_types(self.w.dtype, jnp.float32)
        with jax.named_scope("lora_materialize"):
            w, d = self.wd.astype(ct), delta_from_factors(self.a.astype(ct), self.b.astype(ct), self.kinds)
            if self.variant is None:
                return (w + d).astype(self.w.dtype)
            parts = [in_w_layout(m.astype(ct), self.w.shape, self.kinds) for m in self.state_parts()]
            return self.variant.weight(w, d, parts).astype(self.w.dtype)


jax.tree_util.register_dataclass(Lazy, data_fields=["w", "a", "b", "key", "state"],
                                 meta_fields=["kinds", "dropout", "variant", "routed"])


def is_lazy(x) -> bool:
    return isinstance(x, Lazy)


def dense(x):
    """``x`` itself, or a lazy weight merged."""
    return x.materialize() if is_lazy(x) else x


def finish(lz: Lazy, base, d, out_dtype, place: Optional[Callable] = None, dropped: Optional[Callable] = None):
    """A consumer's output from the base term ``base`` and the adapter term ``d``: ``base + d``, or
    what the weight's variant makes of them. ``place(v)`` arranges a ``(*s, *o)`` per-output
    array to broadcast against the output; ``dropped()`` is the base term on the dropped-out input
    (None: no dropout happened). A consumer that cannot place per-output arrays falls back
    before computing when ``lz.variant`` is set."""
    if lz.variant is None:
        return base + d.astype(out_dtype)
    return lz.variant.output(base, d, [place(m) for m in lz.state_parts()], dropped, out_dtype)


# ------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------


class Ctx:
    """Per-call state: dropout salts (loop iteration counters), a counter of LoRA uses, and the
    per-example routing mask."""

    def __init__(self, salts=(), route=None):
        self.salts = tuple(salts)
        self.uses = [0]
        self.route = route  # (examples, n_adapters * r) 0/1 mask of each example's rank columns

    def child(self, salt):
        c = Ctx(self.salts + (salt,), self.route)
        c.uses = self.uses
        return c

    def eval(self, closed, args):
        """Evaluate a closed sub-jaxpr (a loop body, a branch) with this context."""
        return eval_jaxpr(closed.jaxpr, closed.consts, args, self)

    def routed(self, t, example_axis: int, rank_axis: int):
        """Keep, for each example (along ``example_axis``), only its adapter's rank columns."""
        if self.route is None:
            return t
        n_ex, width = self.route.shape
        rows = t.shape[example_axis]
        if t.shape[rank_axis] != width:
            raise ValueError(f"internal: routed rank width {t.shape[rank_axis]} != {width}")
        if rows % n_ex:
            raise ValueError(f"lora.wrap(adapter_ids=...): {n_ex} adapter ids but a LoRA input has {rows} rows on its "
                             f"leading axis (shape {tuple(t.shape)}); the leading axis must be the examples (or "
                             "examples x tokens, flattened)")
        mask = jnp.repeat(self.route, rows // n_ex, axis=0) if rows != n_ex else self.route
        shape = [1] * t.ndim
        shape[example_axis], shape[rank_axis] = rows, width
        if example_axis > rank_axis:
            mask = mask.T
        return t * mask.reshape(shape).astype(t.dtype)

    def dropout(self, x, lz: Lazy):
        """Inverted dropout on the adapter's input ``x`` (identity when ``lz`` has no key)."""
        if lz.key is None or lz.dropout <= 0.0:
            return x
        self.uses[0] += 1
        k = jax.random.fold_in(lz.key, self.uses[0])
        for s in self.salts:
            k = jax.random.fold_in(k, s)
        keep = 1.0 - lz.dropout
        mask = jax.random.bernoulli(k, keep, x.shape)
        return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype)).astype(x.dtype)


def bind(eqn, invals) -> list:
    """Run ``eqn``'s primitive with its own params on ``invals`` (plain arrays); always a list."""
    params = eqn.primitive.get_bind_params(eqn.params)
    out = eqn.primitive.bind(*invals, **params)
    return out if eqn.primitive.multiple_results else [out]


def _read(env, v):
    return v.val if isinstance(v, jcore.Literal) else env[v]


def eval_jaxpr(jaxpr, consts, args, ctx: Ctx) -> list:
    env = {}

    def write(v, val):
        if not isinstance(v, jcore.DropVar):
            env[v] = val

    for v, val in zip(jaxpr.constvars, consts):
        write(v, val)
    if len(args) != len(jaxpr.invars):
        raise TypeError(f"internal: jaxpr takes {len(jaxpr.invars)} inputs, got {len(args)}")
    for v, val in zip(jaxpr.invars, args):
        write(v, val)
    for eqn in jaxpr.eqns:
        invals = [_read(env, v) for v in eqn.invars]
        if any(is_lazy(x) for x in invals):
            outvals = _RULES.get(eqn.primitive, fallback)(ctx, eqn, invals)
        else:
            outvals = bind(eqn, invals)
        for v, val in zip(eqn.outvars, outvals):
            write(v, val)
    return [_read(env, v) for v in jaxpr.outvars]


def fallback(ctx, eqn, invals) -> list:
    """Merge every lazy operand (``w + a @ b``) and bind the primitive: exact, with a warning."""
    merged = [dense(x) for x in invals]  # raises first if this use cannot be merged (routing)
    warnings.warn(
        f"lora_jax.wrap: primitive '{eqn.primitive.name}' has no factorized LoRA rule; the LoRA weight "
        f"was merged (w + s*A@B) for this use. Results are exact; only the cost differs. "
        f"lora.register_rule can keep it factorized.",
        MaterializeWarning, stacklevel=2)
    return bind(eqn, merged)


# ------------------------------------------------------------------------------------------
# The rule table
# ------------------------------------------------------------------------------------------

Rule = Callable[[Ctx, Any, list], list]
_RULES: dict[Any, Rule] = {}


def _check_primitive(prim, who: str):
    if not isinstance(prim, jcore.Primitive):
        raise TypeError(f"{who}: expected a jax.extend.core.Primitive (e.g. jax.extend.core.primitives.dot_general_p "
                        f"or the eqn.primitive of a traced jaxpr), got {type(prim).__name__} {prim!r}")


def register_rule(prim, rule: Rule) -> Rule:
    """Keep LoRA weights factorized through ``prim``: ``rule(ctx, eqn, invals)`` runs whenever a
    LoRA weight is among the operands of an equation of this primitive (replacing any rule before).

    ``invals`` holds plain arrays and at least one `Lazy` (``w + a @ b``, fields ``w, a, b,
    kinds``); the rule returns one value per ``eqn.outvars``, plain or `Lazy`, or gives up with
    ``fallback(ctx, eqn, invals)``. The module docstring of `lora_jax.evaluator` states the contract.

    Args:
      prim: the primitive object (``jax.extend.core.primitives.<name>_p``, or
        ``jax.make_jaxpr(f)(...).eqns[k].primitive``), never a name.
      rule: the rule.

    Returns:
      ``rule`` (so it can decorate).

    Raises:
      TypeError: if ``prim`` is not a primitive or ``rule`` is not callable.

    Example (a user's primitive ``double(x) = 2x``; ``2(w + a b) = 2w + (2a) b`` stays factorized):
      >>> import jax, jax.numpy as jnp, lora_jax as lora
      >>> double_p = jax.extend.core.Primitive("double")
      >>> _ = double_p.def_impl(lambda x: 2 * x); _ = double_p.def_abstract_eval(lambda x: x)
      >>> def double_rule(ctx, eqn, invals):
      ...     (lz,) = invals
      ...     return [lz.with_(w=2 * lz.wd, a=2 * lz.a)]
      >>> _ = lora.register_rule(double_p, double_rule)
    """
    _check_primitive(prim, "lora.register_rule")
    if not callable(rule):
        raise TypeError(f"lora.register_rule: rule must be callable as rule(ctx, eqn, invals), got {rule!r}")
    _RULES[prim] = rule
    return rule


def rule_table() -> dict:
    """A copy of the rule table: primitive -> rule."""
    return dict(_RULES)


def layout_rule(prim, factors: Optional[Callable] = None) -> Rule:
    """Declare a primitive that only rearranges the weight (its one lazy operand is ``w + a @ b``).

    The primitive runs on ``w``; ``factors(lz, eqn, others)`` says what becomes of the factors: a
    dict of `Lazy` fields to replace (``a``, ``kinds``, and ``b``/``state`` through ``lz.b_like``),
    ``{}`` when only ``w`` changes, or None to fall back. ``others`` are the plain operands in order.
    Without ``factors`` the primitive changes ``w`` alone (copies, sharding constraints).
    """

    def rule(ctx, eqn, invals):
        lazy = [k for k, x in enumerate(invals) if is_lazy(x)]
        if len(lazy) != 1 or eqn.primitive.multiple_results:
            return fallback(ctx, eqn, invals)
        lz = invals[lazy[0]]
        others = [x for k, x in enumerate(invals) if k != lazy[0]]
        changes = {} if factors is None else factors(lz, eqn, others)
        if changes is None:
            return fallback(ctx, eqn, invals)
        (w,) = bind(eqn, [lz.wd if k == lazy[0] else x for k, x in enumerate(invals)])
        return [lz.with_(w=w, **changes)]

    return register_rule(prim, rule)


def primitive(name: str, trace: Optional[Callable] = None):
    """The primitive ``jax.extend.core.primitives.<name>``, or, where this jax does not export it,
    the one ``trace()`` (a ``jax.make_jaxpr`` of the public function on abstract values) binds.

    Raises:
      RuntimeError: when neither finds it: a JAX rename must fail at import, not silently merge.
    """
    prim = getattr(P, name, None)
    if prim is None and trace is not None:
        eqns = trace().jaxpr.eqns
        prim = eqns[0].primitive if len(eqns) == 1 else None
    if prim is None:
        raise RuntimeError(f"lora_jax: jax {jax.__version__} has no primitive {name!r} (renamed?); lora.wrap needs it "
                           "to keep LoRA weights factorized. Please report this with your jax version.")
    return prim

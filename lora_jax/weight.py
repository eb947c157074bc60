"""`LoraWeight`: one frozen kernel with its low-rank adapter, as a pytree node.

The math (layouts, factor shapes, ``w + scale * a @ b``) is stated once in `lora_jax.layout`; this
module knows nothing of rules or trees, it only defines one weight and its settings.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .layout import delta_from_factors
from .variants import Variant, get_variant, peft_variants, variant_names

__all__ = ["AdapterSettings", "LoraWeight", "Trainable", "StoredArray", "is_lora", "is_trainable", "is_node",
           "is_unit", "is_stored", "dense_base", "unstacked", "map_chain", "static_field"]

# ------------------------------------------------------------------------------------------
# A base that is not a plain array
# ------------------------------------------------------------------------------------------


class StoredArray:
    """A frozen base kept in another form than a dense array (`lora.QuantizedArray`).

    Its ``shape`` and ``dtype`` describe the dense array it stands for. The rest of the package
    meets such a base only through `dense_base`, `unstacked`, `requantize` and `is_stored`, so a
    new storage form (another quantization scheme) is one pytree subclass that implements the
    methods below (public as `lora_jax.extend.StoredArray`).
    """

    shape: tuple
    dtype: Any

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def dequantize(self, dtype=None) -> jax.Array:
        """The dense array (in its own dtype, or ``dtype``)."""
        raise NotImplementedError

    def unstacked(self) -> "StoredArray":
        """The same children viewed as one slice of the leading stack axis (``scan`` slices them)."""
        raise NotImplementedError

    def requantize(self, x) -> "StoredArray":
        """A dense array ``x`` of this shape stored the same way (``lora.merge(requantize=True)``)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement requantize: merge with "
                                  "requantize=False for full-precision merged kernels")


def is_stored(x: Any) -> bool:
    """True for a base stored in another form than a dense array (a `StoredArray`)."""
    return isinstance(x, StoredArray)


def dense_base(x: Any) -> Any:
    """The dense array a base stands for: ``x`` itself, or a `StoredArray` dequantized.

    >>> import jax.numpy as jnp
    >>> dense_base(jnp.ones(2)).tolist()
    [1.0, 1.0]
    """
    return x.dequantize() if isinstance(x, StoredArray) else x


def unstacked(x: Any) -> Any:
    """One slice of a stacked base as ``scan`` sees it: a plain array is already sliced by
    ``scan`` itself; a `StoredArray`'s children are, and it is viewed one stack axis lower."""
    return x.unstacked() if isinstance(x, StoredArray) else x


def is_lora(x: Any) -> bool:
    """True for a `LoraWeight` node (use as ``is_leaf`` when walking a LoRA tree)."""
    return isinstance(x, LoraWeight)


def is_trainable(x: Any) -> bool:
    """True for a `Trainable` node (a leaf trained in full)."""
    return isinstance(x, Trainable)


def is_node(x: Any) -> bool:
    """True for the nodes lora_jax defines (`LoraWeight`, `Trainable`)."""
    return isinstance(x, (LoraWeight, Trainable))


def is_unit(x: Any) -> bool:
    """True for what a walk over a LoRA tree handles whole: a `LoraWeight`, a `Trainable`, a
    `StoredArray` (use as ``is_leaf``)."""
    return isinstance(x, (LoraWeight, Trainable, StoredArray))


def static_field(**kw):
    """A dataclass field that is static pytree data (``jax.tree_util.register_dataclass``)."""
    return dataclasses.field(metadata={"static": True}, **kw)


def _not_an_array(what: Callable[[Any], str]):
    """``__jax_array__`` / ``__array__`` for a node: raise, naming the node (``what(self)``)."""
    def guard(self, *_, **__):
        raise TypeError(f"{what(self)} was used as an array. Call the model through lora.wrap(fn)(tree, ...), or "
                        "lora.merge(tree) first; lora_jax never falls back to the base weight silently.")
    return guard


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Trainable:
    """A leaf trained in full beside the adapters (PEFT's ``modules_to_save`` and ``bias``).

    Its one child is ``value``. `lora.wrap` and `lora.merge` see the plain value; `lora.split`
    puts it on the trainable side, `lora.freeze` trains it, and adapters are saved with it.
    Like `LoraWeight`, it is not an array: an unwrapped model that receives it raises.
    """

    value: Any

    @property
    def shape(self):
        return tuple(self.value.shape)

    @property
    def dtype(self):
        return self.value.dtype

    __jax_array__ = __array__ = _not_an_array(
        lambda self: f"a lora.Trainable leaf (shape {getattr(self.value, 'shape', None)})")

    def __repr__(self):
        v = self.value
        return f"Trainable({getattr(v, 'dtype', '?')}{list(getattr(v, 'shape', ()))})" if v is not None else \
            "Trainable(None)"


def map_chain(lw, node_fn, base_fn):
    """Rebuild a chain of adapters: ``node_fn(node, new_w)`` for each node (innermost first) and
    ``base_fn(base)`` for the array under them. Returns what the outermost ``node_fn`` returns."""
    if isinstance(lw, LoraWeight):
        return node_fn(lw, map_chain(lw.w, node_fn, base_fn))
    return base_fn(lw)


# ------------------------------------------------------------------------------------------
# The adapter's settings: spelled once
# ------------------------------------------------------------------------------------------
# Each check returns the normalized value or raises ValueError with what it expects.


def _positive_int(v):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise ValueError("a positive integer")
    return int(v)


def _positive_number(v):
    if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not math.isfinite(v) or v <= 0:
        raise ValueError("a positive finite number")
    return float(v)


def _probability(v):
    if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not 0.0 <= v < 1.0:
        raise ValueError("a number in [0, 1)")
    return float(v)


def _flag(v):
    if not isinstance(v, (bool, np.bool_)):
        raise ValueError("True or False")
    return bool(v)


def _bools(v, *, need_true=False):
    if v is None:
        return None
    if isinstance(v, (str, bytes)) or not isinstance(v, (Sequence, np.ndarray)) or len(v) == 0 or \
            not all(isinstance(x, (bool, np.bool_)) for x in v) or (need_true and not any(v)):
        raise ValueError("None or a non-empty list of booleans" + (" with at least one True" if need_true else ""))
    return tuple(bool(x) for x in v)


def _slices(v):
    return _bools(v, need_true=True)


def _name(v):
    if not isinstance(v, str) or not v:
        raise ValueError("a non-empty string")
    return v


def _variant(v):
    if not isinstance(v, str) or v not in variant_names():
        raise ValueError(f"one of the registered variants {list(variant_names())}")
    return v


def _setting(default, check, doc, **bounds):
    """A field of `AdapterSettings`: its default, its check, a line of help, and numeric bounds
    (``min``/``gt``/``lt``, what the run config's schema reads)."""
    return dataclasses.field(default=default, metadata={"check": check, "doc": doc, **bounds})


@dataclasses.dataclass(frozen=True)
class AdapterSettings:
    """The settings of one adapter: one frozen, hashable value, validated when it is made.

    `lora.Rules` resolves one per selected kernel, a `LoraWeight` carries it as static data,
    adapter files store its fields by these names, and the trainer's ``lora`` config section takes
    its defaults from it. A variant's new setting is one more field here.

    The scale is ``alpha / rank`` (rsLoRA: ``alpha / sqrt(rank)``).

    Raises:
      ValueError: naming every field that is off, what was given and what is expected.

    Example:
      >>> import lora_jax as lora
      >>> s = lora.AdapterSettings(rank=16, alpha=32)
      >>> s.scale, lora.AdapterSettings(rank=16, alpha=32, rslora=True).scale
      (2.0, 8.0)
    """

    rank: int = _setting(8, _positive_int, "LoRA rank r", min=1)
    alpha: float = _setting(8.0, _positive_number, "lora_alpha; the delta is scaled by alpha/r", gt=0)
    rslora: bool = _setting(False, _flag, "scale by alpha/sqrt(r)")
    dropout: float = _setting(0.0, _probability, "LoRA dropout on the adapter input", min=0.0, lt=1.0)
    layer_mask: Optional[tuple[bool, ...]] = _setting(None, _bools, "stacked kernels: the layers that get a delta")
    out_slices: Optional[tuple[bool, ...]] = _setting(
        None, _slices, "the output features split in equal slices; only the True ones get a delta")
    name: str = _setting("default", _name, "the adapter's name")
    active: bool = _setting(True, _flag, "applied by lora.wrap / lora.merge and trained by lora.freeze")
    variant: str = _setting("lora", _variant, "the adapter variant: 'lora' (plain), 'dora', or a registered one")

    #: older keyword names, still accepted by `parse` (and so by `lora.Rules`): PEFT's spellings
    ALIASES: ClassVar[Mapping[str, str]] = {"use_rslora": "rslora", "enable_lora": "out_slices"}

    def __post_init__(self):
        values, problems = _checked({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        if problems:
            raise ValueError("; ".join(problems))
        for k, v in values.items():
            object.__setattr__(self, k, v)

    @property
    def scale(self) -> float:
        """``alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA)."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def kind(self) -> Variant:
        """The registered `lora_jax.variants.Variant` named by ``variant``."""
        return get_variant(self.variant)

    @classmethod
    def flags(cls) -> dict:
        """PEFT's flag of each registered variant that has one: ``use_dora=True`` is
        ``variant="dora"`` (False: ``"lora"``)."""
        return {v.peft[0]: v.name for v in peft_variants()}

    @classmethod
    def field_of(cls, key: str) -> str:
        """The field a keyword sets: itself, the field of an alias, or ``variant`` for a PEFT flag."""
        return "variant" if key in cls.flags() else cls.ALIASES.get(key, key)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The field names, in order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def parse(cls, values: Mapping[str, Any], *, where: str = "",
              base: Optional["AdapterSettings"] = None) -> tuple[Optional["AdapterSettings"], list[str]]:
        """``(settings, [])`` from a mapping of field names (or their `ALIASES`) over ``base`` (or
        the defaults), else ``(None, problems)`` with every problem, each starting with ``where``."""
        prefix = f"{where}: " if where else ""
        kw, given, problems = {}, {}, []
        for k, v in values.items():
            key = cls.field_of(k)
            if k in cls.flags():
                if v is None:  # not given
                    continue
                if not isinstance(v, (bool, np.bool_)):
                    problems.append(f"{prefix}{k} must be True or False, got {v!r}")
                    continue
                v = cls.flags()[k] if v else "lora"
            if key not in cls.names():
                problems.append(f"{prefix}unknown adapter setting {k!r}; expected one of {list(cls.names())}")
            elif key in kw:
                problems.append(f"{prefix}{key} is given twice (also as {k!r})")
            else:
                kw[key], given[key] = v, k
        _, bad = _checked(kw, given)
        problems += [prefix + p for p in bad]
        if problems:
            return None, problems
        return dataclasses.replace(base, **kw) if base is not None else cls(**kw), []

    @classmethod
    def of(cls, values: Mapping[str, Any], *, where: str = "", base: Optional["AdapterSettings"] = None):
        """`parse`, raising ``ValueError`` with every problem."""
        settings, problems = cls.parse(values, where=where, base=base)
        if problems:
            raise ValueError("; ".join(problems))
        return settings

    def to_json(self) -> dict:
        """The fields as JSON values (tuples become lists); ``variant`` only when it is not plain
        LoRA, so files of plain adapters read as they did before variants had a name."""
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        if out["variant"] == "lora":
            del out["variant"]
        return out


def _checked(values: Mapping[str, Any], given: Mapping[str, str] = {}) -> tuple[dict, list[str]]:  # noqa: B006
    """Each value through its field's check: ``(normalized values, problems)``; a problem names
    the field as it was ``given`` (an alias) or by its name."""
    fields = {f.name: f for f in dataclasses.fields(AdapterSettings)}
    out, problems = {}, []
    for k, v in values.items():
        try:
            out[k] = fields[k].metadata["check"](v)
        except ValueError as e:
            problems.append(f"{given.get(k, k)} must be {e}, got {v!r}")
    return out, problems


# ------------------------------------------------------------------------------------------
# The LoRA weight
# ------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class LoraWeight:
    """A frozen kernel ``w`` with its adapter factors ``a``, ``b``.

    Children (pytree leaves): ``w``, ``a``, ``b`` and the variant's own array ``m`` (None for plain
    LoRA; DoRA's magnitude, shape ``(*stack, *out)``). The variant (``settings.variant``, see
    `lora_jax.variants`) says what the adapter makes of the kernel: plain LoRA ``w + scale a@b``.

    Static data: the ``layout`` and the adapter's `AdapterSettings` (``settings``), whose fields
    read as attributes too: ``rank``, ``alpha``, ``rslora``, ``dropout``, ``variant``, an optional per-layer
    ``layer_mask`` for stacked kernels (layers where it is False get no delta), optional
    ``out_slices`` (loralib's ``enable_lora``: the flattened output split in equal slices, only the
    True ones get a delta, e.g. q and v of a fused q|k|v kernel), the adapter's ``name`` and whether
    it is ``active``. Build one with ``settings=`` or with those fields as keywords.

    Several adapters on one kernel form a chain: ``w`` is then itself a `LoraWeight` (the adapter
    added before), down to the base array (`base`). Children may be None (`lora.split` uses that),
    so the class never checks shapes itself; use `lora.init` / `lora.add` to build one.

    A `LoraWeight` is not an array: passing it to a function that was not transformed with
    `lora.wrap` raises a ``TypeError`` rather than silently using the base weight.

    Example:
      >>> import jax.numpy as jnp, lora_jax as lora
      >>> lw = lora.LoraWeight(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.ones((2, 3)), layout="io", rank=2, alpha=4.0)
      >>> lw.scale, lw.merge()[0, 0].item()
      (2.0, 5.0)
    """

    w: Any
    a: Any
    b: Any
    m: Any = None
    layout: str = static_field(default="io")
    settings: AdapterSettings = static_field(default=AdapterSettings())

    def __init__(self, w, a, b, *, layout: str, m=None, settings: Optional[AdapterSettings] = None, **fields):
        if settings is None:
            settings = AdapterSettings(**fields)
        elif fields:
            settings = dataclasses.replace(settings, **fields)
        if isinstance(m, (jax.Array, np.ndarray)) and not settings.kind.has_m:  # not JAX's placeholders
            raise ValueError(f"LoraWeight: an m {getattr(m, 'shape', m)} is given but the adapter's variant "
                             f"{settings.variant!r} has none; pass variant='dora' (or another variant with an m)")
        for k, v in (("w", w), ("a", a), ("b", b), ("m", m), ("layout", layout), ("settings", settings)):
            object.__setattr__(self, k, v)

    def replace(self, **changes) -> "LoraWeight":
        """A copy with some children, the layout or settings fields (by name) replaced."""
        own = {f.name for f in dataclasses.fields(self)}
        settings = {k: changes.pop(k) for k in list(changes) if k not in own}
        unknown = set(settings) - set(AdapterSettings.names())
        if unknown:
            raise TypeError(f"LoraWeight.replace: unknown fields {sorted(unknown)}; fields are "
                            f"{sorted(own | set(AdapterSettings.names()))}")
        if settings:
            changes["settings"] = dataclasses.replace(self.settings, **settings)
        return dataclasses.replace(self, **changes)


    # -- chains of adapters -----------------------------------------------------------------
    @property
    def base(self):
        """The frozen base array under every adapter of the chain."""
        w = self.w
        while isinstance(w, LoraWeight):
            w = w.w
        return w

    def chain(self) -> list["LoraWeight"]:
        """Every adapter on this kernel, the first added first (this node last)."""
        nodes, n = [], self
        while isinstance(n, LoraWeight):
            nodes.append(n)
            n = n.w
        return nodes[::-1]

    # -- derived ----------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        """``alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA): `AdapterSettings.scale`."""
        return self.settings.scale

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    @property
    def dtype(self):
        return self.base.dtype

    @property
    def ndim(self) -> int:
        return len(self.layout)

    def effective_a(self) -> jax.Array:
        """``a`` with the per-layer mask applied (layers outside ``layer_mask`` contribute nothing)."""
        if self.layer_mask is None:
            return self.a
        mask = jnp.asarray(np.array(self.layer_mask), dtype=self.a.dtype)
        return self.a * mask.reshape(mask.shape + (1,) * (self.a.ndim - 1))

    def effective_b(self) -> jax.Array:
        """``b`` with the output-slice mask applied (disabled slices contribute nothing)."""
        if self.out_slices is None:
            return self.b
        out = tuple(self.b.shape[self.layout.count("s") + 1:])
        n = int(np.prod(out))
        k = len(self.out_slices)
        mask = np.repeat(np.array(self.out_slices, bool), n // k).reshape(out)
        return self.b * jnp.asarray(mask, self.b.dtype)

    def lora_delta(self, dtype=jnp.float32) -> jax.Array:
        """``scale * a @ b`` in the kernel's layout, computed and returned in ``dtype``."""
        a = self.effective_a().astype(dtype)
        return (self.scale * delta_from_factors(a, self.effective_b().astype(dtype), self.layout,
                                                precision=jax.lax.Precision.HIGHEST)).astype(dtype)

    @property
    def kind(self) -> Variant:
        """The registered `lora_jax.variants.Variant` named by ``settings.variant``."""
        return self.settings.kind

    def inner(self):
        """The kernel this adapter applies to: the base (dequantized if stored quantized), or the
        merge of the adapters before it."""
        if isinstance(self.w, LoraWeight):
            return self.w.merge()
        return dense_base(self.w)

    def delta(self, dtype=jnp.float32) -> jax.Array:
        """What this adapter adds to the kernel below it (``scale * a @ b`` for plain LoRA; for a
        variant, what its kernel differs by), computed and returned in ``dtype``."""
        return self.kind.delta(self, dtype)

    def merge(self) -> jax.Array:
        """The adapted kernel in the base dtype, computed in float32 (or wider): every active adapter
        of the chain applied in order."""
        inner = self.inner()
        if not self.active:
            return inner
        ct = jnp.promote_types(inner.dtype, jnp.float32)
        return self.kind.apply(self, inner, ct).astype(inner.dtype)

    def unmerge(self, merged: jax.Array) -> jax.Array:
        """The base weight back from a merged one (every active adapter removed, last first), in
        ``merged``'s dtype."""
        ct = jnp.promote_types(merged.dtype, jnp.float32)
        w = merged.astype(ct)
        for node in reversed(self.chain()):
            if node.active:
                w = node.kind.remove(node, w, ct)
        return w.astype(merged.dtype)

    # -- not an array -----------------------------------------------------------------------
    __jax_array__ = __array__ = _not_an_array(
        lambda self: f"a LoraWeight (kernel shape {getattr(self.w, 'shape', None)}, rank {self.rank})")

    def __repr__(self) -> str:
        def sh(x):
            if isinstance(x, LoraWeight):
                return repr(x)
            return None if x is None else f"{getattr(x, 'dtype', '?')}{list(getattr(x, 'shape', ()))}"
        extra = f", variant={self.variant!r}" if self.variant != "lora" else ""
        extra += f", m={sh(self.m)}" if self.m is not None else ""
        for f in ("layer_mask", "out_slices"):
            if getattr(self, f) is not None:
                extra += f", {f}={getattr(self, f)}"
        if self.name != "default" or not self.active:
            extra += f", name={self.name!r}, active={self.active}"
        return (f"LoraWeight(w={sh(self.w)}, a={sh(self.a)}, b={sh(self.b)}{extra}, layout={self.layout!r}, "
                f"rank={self.rank}, alpha={self.alpha:g}, rslora={self.rslora}, dropout={self.dropout:g})")


for _f in dataclasses.fields(AdapterSettings):  # lw.rank, lw.alpha, ...: the settings' fields, read-only
    setattr(LoraWeight, _f.name, property(operator.attrgetter(f"settings.{_f.name}"), doc=_f.metadata["doc"]))
del _f

"""QLoRA: frozen kernels stored in 4-bit NF4 (or int8), dequantized on the fly.

``lora.quantize(tree, "nf4", block=64, double_quant=True)`` replaces the frozen base of every
`LoraWeight` (and every other leaf its ``rules=`` select) by a `QuantizedArray`:

* NF4 (QLoRA, Dettmers et al. 2023): each block of ``block`` consecutive values (per stack index)
  is scaled by its absolute maximum and each value is replaced by the nearest of the 16 NF4 levels
  (quantiles of a normal distribution, `NF4_LEVELS`); two 4-bit codes per byte.
* double quantization: the float32 block scales are themselves quantized to 8 bits in blocks of
  256 (after subtracting their mean), which takes the scale overhead from 0.5 to ~0.127 bit per
  parameter: NF4 + double quantization costs ~4.13 bits per parameter, ~3.9x less than bf16.
* int8: symmetric ``round(127 x / absmax)`` per block.

`lora.wrap` dequantizes each kernel where it is used (inside the jitted step, per layer under
``scan``), so the dense base is never held whole; `lora.merge` dequantizes, adds the adapters and
returns full precision (``requantize=True`` stores the merged kernel quantized again).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .rules import Rules, path_str
from .weight import StoredArray, dense_base, is_lora, is_unit, map_chain, static_field

__all__ = ["QuantizedArray", "quantize", "dequantize", "quantize_array", "NF4_LEVELS", "nbytes"]

# The 16 NF4 levels of the QLoRA paper (bitsandbytes' create_normal_map(0.9677083, use_extra_value=True)):
# 8 positive and 7 negative quantiles of N(0, 1), zero, normalized to [-1, 1].
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823029, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=np.float32)

_SCHEMES = ("nf4", "int8")
_DQ_BLOCK = 256


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class QuantizedArray(StoredArray):
    """A frozen array stored quantized; ``shape``/``dtype`` describe the dense array it stands for.

    Children: ``codes`` (uint8: two NF4 codes per byte, or int8 values), ``scales`` (float32 block
    absmax, or their 8-bit codes with double quantization), ``scales2`` / ``offset`` (the second
    level of double quantization, else None). Static: ``shape``, ``dtype``, ``scheme``, ``block``,
    ``stack`` (leading axes quantized separately, so ``scan`` can slice them).
    """

    codes: Any
    scales: Any
    scales2: Any
    offset: Any
    shape: tuple = static_field()
    dtype: Any = static_field()
    scheme: str = static_field()
    block: int = static_field()
    stack: int = static_field(default=0)

    def __post_init__(self):
        for k, v in (("shape", tuple(int(d) for d in self.shape)), ("dtype", jnp.dtype(self.dtype)),
                     ("block", int(self.block)), ("stack", int(self.stack))):
            object.__setattr__(self, k, v)

    def unstacked(self) -> "QuantizedArray":
        """The same children viewed as one slice of the leading stack axis (``scan`` slices them)."""
        if self.stack < 1:
            raise ValueError("QuantizedArray.unstacked: this array has no stack axis")
        return dataclasses.replace(self, shape=self.shape[1:], stack=self.stack - 1)

    def requantize(self, x) -> "QuantizedArray":
        """``x`` (same shape) quantized with this array's settings."""
        return quantize_array(x.astype(self.dtype), self.scheme, self.block, self.scales2 is not None, self.stack)

    def block_scales(self) -> jax.Array:
        if self.scales2 is None:
            return self.scales
        q = self.scales.astype(jnp.float32) - 127.0
        lead = q.shape[:-1]
        n = q.shape[-1]
        pad = (-n) % _DQ_BLOCK
        q = jnp.pad(q, [(0, 0)] * len(lead) + [(0, pad)]).reshape(lead + (-1, _DQ_BLOCK))
        s = (q / 127.0 * self.scales2[..., None]).reshape(lead + (-1,))[..., :n]
        return s + self.offset[..., None]

    def dequantize(self, dtype=None) -> jax.Array:
        """The dense array (in its own dtype, or ``dtype``)."""
        lead = self.shape[:self.stack]
        per = int(np.prod(self.shape[self.stack:]))
        if self.scheme == "nf4":
            lo = (self.codes & 0x0F).astype(jnp.int32)
            hi = (self.codes >> 4).astype(jnp.int32)
            idx = jnp.stack([lo, hi], axis=-1).reshape(lead + (-1,))
            vals = jnp.asarray(NF4_LEVELS)[idx]
        else:
            vals = self.codes.astype(jnp.float32) / 127.0
        vals = vals.reshape(lead + (-1, self.block)) * self.block_scales()[..., None]
        out = vals.reshape(lead + (-1,))[..., :per].reshape(self.shape)
        return out.astype(dtype or self.dtype)

    def __jax_array__(self, *_, **__):
        raise TypeError("a lora QuantizedArray was used as an array; call the model through lora.wrap or "
                        "lora.merge / lora.dequantize first")

    __array__ = __jax_array__

    def __repr__(self):
        dq = "+dq" if self.scales2 is not None else ""
        return f"QuantizedArray({self.scheme}{dq}, block={self.block}, {self.dtype.name}{list(self.shape)})"


def quantize_array(x, scheme: str, block: int, double_quant: bool, stack: int) -> QuantizedArray:
    """``x`` quantized per index of its ``stack`` leading axes, in blocks of ``block`` values."""
    shape, dtype = tuple(x.shape), x.dtype
    lead = shape[:stack]
    flat = jnp.asarray(x, jnp.float32).reshape(lead + (-1,))
    pad = (-flat.shape[-1]) % block
    blocks = jnp.pad(flat, [(0, 0)] * stack + [(0, pad)]).reshape(lead + (-1, block))
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    safe = jnp.where(absmax > 0, absmax, 1.0)[..., None]
    normed = blocks / safe
    if scheme == "nf4":
        levels = jnp.asarray(NF4_LEVELS)
        # nearest level: the midpoints between consecutive levels split [-1, 1] into 16 bins
        mids = (levels[1:] + levels[:-1]) / 2
        codes = jnp.searchsorted(mids, normed.reshape(lead + (-1,))).astype(jnp.uint8)
        codes = codes.reshape(lead + (-1, 2))
        codes = codes[..., 0] | (codes[..., 1] << 4)
    else:
        codes = jnp.clip(jnp.round(normed * 127.0), -127, 127).astype(jnp.int8).reshape(lead + (-1,))
    scales2 = offset = None
    scales = absmax
    if double_quant:
        offset = jnp.mean(absmax, axis=-1)
        centred = absmax - offset[..., None]
        n = centred.shape[-1]
        p2 = (-n) % _DQ_BLOCK
        cb = jnp.pad(centred, [(0, 0)] * stack + [(0, p2)]).reshape(lead + (-1, _DQ_BLOCK))
        scales2 = jnp.max(jnp.abs(cb), axis=-1)
        s2 = jnp.where(scales2 > 0, scales2, 1.0)[..., None]
        q = jnp.clip(jnp.round(cb / s2 * 127.0), -127, 127) + 127.0
        scales = q.reshape(lead + (-1,))[..., :n].astype(jnp.uint8)
    return QuantizedArray(codes, scales, scales2, offset, shape=shape, dtype=dtype, scheme=scheme, block=block,
                          stack=stack)


def quantize(tree, scheme: str = "nf4", *, block: int = 64, double_quant: bool = True, rules: Any = None,
             which: Optional[str] = None):
    """Store frozen kernels quantized (QLoRA).

    The base of every `LoraWeight` is quantized; ``rules`` selects further plain leaves (a frozen
    embedding or head), each quantized per index of its rule's stack axes.

    Args:
      tree: a LoRA tree (or, with ``rules``, any parameter tree).
      scheme: ``"nf4"`` or ``"int8"``.
      block: values per scale (even for NF4).
      double_quant: quantize the block scales to 8 bits too.
      rules: a `lora.Rules` (or its targets) selecting plain leaves to quantize as well, e.g.
        ``lora.Rules(".*")`` for every floating leaf with at least two axes.
      which: deprecated: ``"lora"`` is the default, ``"all"`` is ``rules=lora.Rules(".*")``.

    Returns:
      The tree with those arrays replaced by `QuantizedArray` nodes; adapters stay in full precision.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lora
      >>> lp = lora.init({"k": jnp.ones((64, 64))}, lora.Rules("k", rank=4), 0)
      >>> q = lora.quantize(lp, "nf4")
      >>> q["k"].base
      QuantizedArray(nf4+dq, block=64, float32[64, 64])
    """
    if scheme not in _SCHEMES:
        raise ValueError(f"quantize: scheme must be one of {_SCHEMES}, got {scheme!r}")
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 2 or \
            (scheme == "nf4" and block % 2):
        raise ValueError(f"quantize: block must be an integer >= 2 (even for nf4), got {block!r}")
    if which is not None:
        if which not in ("lora", "all") or rules is not None:
            raise ValueError(f"quantize: which is deprecated and takes 'lora' or 'all' without rules=, got "
                             f"which={which!r}, rules={rules!r}")
        warnings.warn(f"quantize(which={which!r}) is deprecated; pass " + (
            "nothing (the LoRA bases are always quantized)" if which == "lora" else "rules=lora.Rules('.*')"),
            DeprecationWarning, stacklevel=2)
        rules = Rules(".*") if which == "all" else None
    if rules is not None and not isinstance(rules, Rules):
        rules = Rules(rules)

    def q(base, stack):
        if base is None or isinstance(base, StoredArray):
            return base
        return quantize_array(base, scheme, block, double_quant, stack)

    def one(kp, x):
        if is_lora(x):
            return map_chain(x, lambda n, w: n.replace(w=w), lambda base: q(base, x.layout.count("s")))
        if rules is not None and not is_unit(x) and hasattr(x, "shape") and hasattr(x, "dtype"):
            stack = rules.selects(path_str(kp), x.shape, x.dtype)
            if stack is not None:
                return q(x, stack)
        return x

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=is_unit)


def dequantize(tree):
    """Every `QuantizedArray` in ``tree`` (LoRA bases included) back to a dense array."""
    def one(x):
        if is_lora(x):
            return map_chain(x, lambda n, w: n.replace(w=w), dense_base)
        return dense_base(x)

    return jax.tree_util.tree_map(one, tree, is_leaf=is_unit)


def nbytes(tree, *, frozen_only: bool = True) -> int:
    """Bytes held by the tree's arrays (by default the frozen base only: no adapters)."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree, is_leaf=is_unit):
        if is_lora(leaf):
            base = leaf.base
            leaves = jax.tree_util.tree_leaves(base)
            if not frozen_only:
                leaves += [x for n in leaf.chain() for x in (n.a, n.b, n.m) if x is not None]
        else:
            leaves = jax.tree_util.tree_leaves(leaf)
        total += sum(int(np.prod(v.shape)) * jnp.dtype(v.dtype).itemsize for v in leaves)
    return total

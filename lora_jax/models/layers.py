"""The building blocks every `lora_jax.models` family is made of.

Config plumbing (dtypes, hashable dicts, activations, remat policies), rotary embeddings for every
``rope_type`` the supported checkpoints use, RMSNorm (plain and Gemma's ``1 + w``), LayerNorm
(GPT-2, BERT), the attention
core (``jax.nn.dot_product_attention``, cuDNN on a GPU; an XLA form for logit soft-capping), the
KV cache and its mask. The families (`llama`, `gemma`, `phi3`, `gpt2`, `bert`) import these and
add only what is theirs.

Rotary embeddings, once: for a head vector split in halves ``x = [x1, x2]`` at position ``p``,
``rope(x) = [x1 cos(p f) - x2 sin(p f), x2 cos(p f) + x1 sin(p f)] * attention_factor`` with the
inverse frequencies ``f_j = 1 / theta^(2j / d)`` (``d`` the rotary dimension, ``j < d/2``) adjusted
by the scaling type, exactly as transformers computes them in float32.

Example:
  >>> import jax.numpy as jnp
  >>> rope = rope_parameters({"rope_theta": 500000.0})
  >>> cos, sin = rope_tables(rope, 8, 2048, jnp.arange(4)[None], jnp.float32)
  >>> cos.shape
  (1, 4, 4)
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ACTIVATIONS", "REMAT_POLICIES", "ROPE_TYPES", "ATTENTION_IMPLS",
    "canon_dtype", "positive_int", "freeze", "thaw", "remat_policy", "check_remat_policy", "scan_layers",
    "rope_parameters", "check_rope", "rotary_dim", "rope_frequencies", "rope_tables", "apply_rope",
    "RMSNorm", "LayerNorm", "dense", "attention_impl", "attention", "decoder_inputs", "decoder_mask", "segment_mask", "causal_cache_mask", "init_cache",
    "MOE_IMPLS", "moe_impl", "route", "SparseMoe", "load_balancing_loss",
]

ACTIVATIONS: dict[str, Callable] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
}

REMAT_POLICIES = ("nothing_saveable", "everything_saveable", "dots_saveable", "checkpoint_dots",
                  "dots_with_no_batch_dims_saveable", "checkpoint_dots_with_no_batch_dims")

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
# the fields each rope_type needs besides rope_theta
_ROPE_NEEDS = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
               "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
               "longrope": ("short_factor", "long_factor")}

ATTENTION_IMPLS = (None, "xla", "cudnn")


# -------------------------------------------------------------------------------------------
# Config plumbing
# -------------------------------------------------------------------------------------------
def positive_int(value, what: str) -> int:
    """``value`` as an int, or a ValueError naming the config field ``what`` (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def canon_dtype(value, what: str) -> np.dtype:
    """``value`` as a floating NumPy dtype, or a TypeError naming the config field ``what``."""
    try:
        dt = jnp.dtype(value)
    except TypeError:
        raise TypeError(f"{what}: expected a floating dtype (e.g. 'float32', 'bfloat16'), got {value!r}") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"{what}: expected a floating dtype, got {dt}")
    return dt


def freeze(value):
    """A hashable form of nested dicts/lists (sorted item tuples), for frozen config fields."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value) -> Optional[dict]:
    """The dict a `freeze`-d mapping came from (one level; None stays None)."""
    return None if value is None else dict(value)


def check_remat_policy(spec, what: str) -> None:
    """Raise unless ``spec`` is None, a ``jax.checkpoint_policies`` callable or a name in `REMAT_POLICIES`."""
    if spec is not None and not callable(spec) and spec not in REMAT_POLICIES:
        raise ValueError(f"{what} must be None, a jax.checkpoint_policies callable or one of {REMAT_POLICIES}, "
                         f"got {spec!r}")


def scan_layers(block, config, *, length: int, in_axes, variable_axes=None):
    """The decoder/encoder stack of every family: ``block`` under ``nn.remat`` with the config's
    ``remat_policy`` (when set), under one ``nn.scan`` of ``length`` layers (parameters stacked on a
    leading layer axis) unrolled ``config.scan_unroll`` layers per iteration; returns the scanned
    module class (call it with the config)."""
    if config.remat_policy is not None:
        block = nn.remat(block, prevent_cse=False, policy=remat_policy(config.remat_policy))
    return nn.scan(block, variable_axes=variable_axes or {"params": 0}, split_rngs={"params": True},
                   in_axes=in_axes, length=length, unroll=config.scan_unroll)


def remat_policy(spec):
    """The ``jax.checkpoint`` policy for a name in `REMAT_POLICIES` (callables and None pass through)."""
    if spec is None or callable(spec):
        return spec
    return getattr(jax.checkpoint_policies, spec)


# -------------------------------------------------------------------------------------------
# Rotary embeddings
# -------------------------------------------------------------------------------------------
def check_rope_mappings(hf: Mapping[str, Any], what: str = "") -> None:
    """A HF config's ``rope_parameters`` and ``rope_scaling`` are mappings or null (every family
    reads them as mappings; a string or list must not fall back to the default rotary base)."""
    for key in ("rope_parameters", "rope_scaling"):
        if hf.get(key) is not None and not isinstance(hf[key], Mapping):
            raise ValueError(f"{what}{key} must be a mapping of rotary-embedding fields (or null), got "
                             f"{type(hf[key]).__name__} {hf[key]!r}")


def rope_parameters(hf: Mapping[str, Any], layer_type: Optional[str] = None, *,
                    default_theta: float = 10000.0) -> dict:
    """One flat rotary-embedding dict ``{"rope_type", "rope_theta", ...}`` from a HF config dict.

    Reads both spellings: transformers 5's ``rope_parameters`` (flat, or keyed by layer type as in
    Gemma 3: pass ``layer_type``) and the older ``rope_theta`` + ``rope_scaling`` (+
    ``partial_rotary_factor``). The result is validated by `check_rope`.

    Example:
      >>> rope_parameters({"rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 2.0}})["rope_type"]
      'linear'
    """
    check_rope_mappings(hf)
    rp = hf.get("rope_parameters")
    if isinstance(rp, Mapping) and rp:
        if layer_type is not None and isinstance(rp.get(layer_type), Mapping):
            rp = rp[layer_type]
        elif layer_type is not None and all(isinstance(v, Mapping) for v in rp.values()):
            raise ValueError(f"rope_parameters has no entry for layer type {layer_type!r}: got {sorted(rp)}")
        out = dict(rp)
    else:
        out = dict(hf.get("rope_scaling") or {})
        out.setdefault("rope_theta", hf.get("rope_theta", default_theta))
    if "type" in out and "rope_type" not in out:
        out["rope_type"] = out.pop("type")
    out.setdefault("rope_type", "default")
    if out.get("rope_theta") is None:
        out["rope_theta"] = default_theta
    prf = hf.get("partial_rotary_factor")
    if prf is not None and "partial_rotary_factor" not in out:
        out["partial_rotary_factor"] = prf
    check_rope(out, "rope_parameters")
    return out


# every field transformers reads from a rope dict; a key close to one of these is a misspelling
_ROPE_FIELDS = ("rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "low_freq_factor",
                "high_freq_factor", "attention_factor", "beta_fast", "beta_slow", "short_factor", "long_factor",
                "mscale", "mscale_all_dim", "partial_rotary_factor", "truncate")
# the fields that must be finite numbers > 0 where given
_ROPE_POSITIVE = ("rope_theta", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
                  "attention_factor", "beta_fast", "beta_slow")


def check_rope(rope: Mapping[str, Any], what: str) -> str:
    """Validate a flat rope dict; return its type. Unknown types, missing fields, misspelled keys
    (which would silently fall back to a default) and numbers that are not finite and > 0 are
    ValueErrors."""
    import difflib

    for k in rope:
        close = difflib.get_close_matches(str(k), _ROPE_FIELDS, n=1, cutoff=0.85)
        if k not in _ROPE_FIELDS and close:
            raise ValueError(f"{what}: unknown key {k!r}; did you mean {close[0]!r}?")
    for k in _ROPE_POSITIVE:
        v = rope.get(k)
        if v is None:
            continue
        ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
        if not ok or not math.isfinite(float(v)) or float(v) <= 0:
            raise ValueError(f"{what}: {k} must be a finite number > 0, got {v!r}")
    t = rope.get("rope_type", "default")
    if t not in ROPE_TYPES:
        raise ValueError(f"{what}: rope_type {t!r} is not supported; supported: {ROPE_TYPES}")
    missing = [k for k in _ROPE_NEEDS.get(t, ()) if rope.get(k) is None]
    if missing:
        raise ValueError(f"{what}: rope_type {t!r} needs {missing}, got {dict(rope)}")
    prf = float(rope.get("partial_rotary_factor") or 1.0)
    if not 0.0 < prf <= 1.0:
        raise ValueError(f"{what}: partial_rotary_factor must be in (0, 1], got {prf}")
    return t


def rotary_dim(rope: Mapping[str, Any], head_dim: int) -> int:
    """The number of leading head dimensions rotated (``head_dim * partial_rotary_factor``)."""
    return int(head_dim * float(rope.get("partial_rotary_factor") or 1.0))


def _inv_freq_default(theta, dim):
    f32 = np.float32
    exponent = np.arange(0, dim, 2).astype(np.int64).astype(f32) / f32(dim)
    return (f32(1.0) / np.power(f32(theta), exponent)).astype(f32)


def rope_frequencies(rope: Mapping[str, Any], dim: int, max_pos: int) -> tuple[np.ndarray, float]:
    """``(inv_freq, attention_factor)`` in float32 for the rope types that do not depend on the
    sequence length (default, linear, llama3, yarn), for a rotary dimension ``dim``."""
    f32 = np.float32
    kind = rope.get("rope_type", "default")
    theta = float(rope["rope_theta"])
    inv_freq = _inv_freq_default(theta, dim)
    factor_attn = 1.0
    if kind == "linear":
        inv_freq = (inv_freq / f32(rope["factor"])).astype(f32)
    elif kind == "llama3":
        factor = f32(rope["factor"])
        low, high = f32(rope["low_freq_factor"]), f32(rope["high_freq_factor"])
        old = f32(rope["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = f32(2 * math.pi) / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(f32)
        smooth = ((old / wavelen - low) / (high - low)).astype(f32)
        smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(f32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(f32)
    elif kind == "yarn":
        factor = float(rope["factor"])
        orig = rope.get("original_max_position_embeddings") or max_pos

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        factor_attn = rope.get("attention_factor")
        if factor_attn is None:
            if rope.get("mscale") and rope.get("mscale_all_dim"):
                factor_attn = mscale(factor, rope["mscale"]) / mscale(factor, rope["mscale_all_dim"])
            else:
                factor_attn = mscale(factor)
        beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

        def corr_dim(rot):
            return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(theta))

        lo, hi = corr_dim(beta_fast), corr_dim(beta_slow)
        if rope.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=f32) - f32(lo)) / f32(hi - lo), 0, 1).astype(f32)
        extrap_w = f32(1) - ramp
        pos_freqs = np.power(f32(theta), np.arange(0, dim, 2).astype(f32) / f32(dim)).astype(f32)
        inv_extrap = (f32(1) / pos_freqs).astype(f32)
        inv_interp = (f32(1) / (f32(factor) * pos_freqs)).astype(f32)
        inv_freq = (inv_interp * (1 - extrap_w) + inv_extrap * extrap_w).astype(f32)
    return inv_freq, float(factor_attn)


def rope_tables(rope: Mapping[str, Any], head_dim: int, max_position_embeddings: int, positions: jax.Array,
                dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin ``positions.shape + (rotary_dim // 2,)`` in ``dtype`` (``rope`` from `rope_parameters`).

    ``dynamic`` (NTK) and ``longrope`` depend on the sequence length, which is read as
    ``max(positions) + 1`` inside the computation, as transformers does.
    """
    rope = dict(rope)
    kind = check_rope(rope, "rope_tables")
    dim = rotary_dim(rope, head_dim)
    pos = positions.astype(jnp.float32)[..., None]
    factor = 1.0
    if kind == "dynamic":
        theta, f = float(rope["rope_theta"]), float(rope["factor"])
        seq = jnp.maximum(jnp.max(positions) + 1, max_position_embeddings).astype(jnp.float32)
        base = theta * ((f * seq / max_position_embeddings) - (f - 1)) ** (dim / (dim - 2))
        exponent = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
        inv_freq = 1.0 / (base ** exponent)
    elif kind == "longrope":
        # transformers: factor defaults to max_position_embeddings / original (Phi-3's convention),
        # inv_freq = 1 / (ext_factor * theta^(2j/d)) with the long factors once the sequence
        # (max position + 1) exceeds original_max_position_embeddings, the short ones otherwise
        orig = rope.get("original_max_position_embeddings") or max_position_embeddings
        f = rope.get("factor")
        if f is None:
            f = max_position_embeddings / orig
        factor = rope.get("attention_factor")
        if factor is None:
            factor = 1.0 if f <= 1.0 else math.sqrt(1 + math.log(f) / math.log(orig))
        f32 = np.float32
        exponent = np.arange(0, dim, 2).astype(np.int64).astype(f32) / f32(dim)
        powers = np.power(f32(rope["rope_theta"]), exponent).astype(f32)

        def scaled(ext):
            ext = np.asarray(ext, f32)
            if ext.shape != powers.shape:
                raise ValueError(f"rope_tables: longrope factors need {powers.shape[0]} values (rotary dim {dim} / 2), "
                                 f"got {ext.shape[0] if ext.ndim == 1 else ext.shape}")
            return jnp.asarray((f32(1.0) / (ext * powers)).astype(f32))

        short, long = scaled(rope["short_factor"]), scaled(rope["long_factor"])
        inv_freq = jnp.where(jnp.max(positions) + 1 > orig, long, short)
    else:
        inv_freq, factor = rope_frequencies(rope, dim, max_position_embeddings)
        inv_freq = jnp.asarray(inv_freq)
    angles = pos * inv_freq
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return cos.astype(dtype), sin.astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE (transformers' convention) on the first ``2 * cos.shape[-1]`` dimensions.

    ``x`` is ``(B, T, heads, H)``, ``cos``/``sin`` ``(B, T, R/2)``; dimensions past ``R`` (partial
    rotary) pass through.
    """
    r = 2 * cos.shape[-1]
    rot, rest = (x, None) if r == x.shape[-1] else (x[..., :r], x[..., r:])
    x1, x2 = jnp.split(rot, 2, axis=-1)
    c, s = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    return out if rest is None else jnp.concatenate([out, rest], axis=-1)


# -------------------------------------------------------------------------------------------
# Layers
# -------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * w`` normalised in float32.

    ``gemma=True`` is Gemma's form: the weight is stored as ``w - 1`` (zeros at init) and
    multiplied as ``1 + w`` in float32 before the cast to the compute dtype; otherwise the
    normalised value is cast first and multiplied by ``w`` (Llama's order).
    """

    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    gemma: bool = False

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.gemma else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.gemma:
            return (y * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)
        return y.astype(self.dtype) * scale.astype(self.dtype)


class LayerNorm(nn.Module):
    """``(x - mean(x)) / sqrt(var(x) + eps) * w + b`` over the last axis, computed in float32.

    PyTorch's ``nn.LayerNorm`` (biased variance); the parameters are ``scale`` (ones at init) and
    ``bias`` (zeros), as Flax names them. The result is cast to ``dtype``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ln = LayerNorm(1e-5)
      >>> y = ln.apply(ln.init(jax.random.key(0), jnp.ones((2, 4))), jnp.arange(8.0).reshape(2, 4))
      >>> [round(float(v), 4) for v in y[0]]
      [-1.3416, -0.4472, 0.4472, 1.3416]
    """

    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centred = x32 - mean
        var = jnp.mean(centred * centred, axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def dense(features: int, *, use_bias: bool, name: str, dtype, param_dtype, std: float = 0.02) -> nn.Dense:
    """A Flax ``Dense`` with kernel ``(in, out)`` initialised ``normal(std)`` (transformers' init)."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=nn.initializers.normal(std), name=name)


def attention_impl(impl: Optional[str], dtype, head_dim: int) -> str:
    """The ``jax.nn.dot_product_attention`` implementation: ``impl`` if given, else cuDNN on a GPU
    in bf16/fp16 for head sizes that are a multiple of 8 up to 128, XLA otherwise."""
    if impl is not None:
        return impl
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) \
            and head_dim % 8 == 0 and head_dim <= 128:
        return "cudnn"
    return "xla"


def attention(q, k, v, *, mask=None, causal: bool = True, window: Optional[int] = None,
              scale: Optional[float] = None, softcap: Optional[float] = None, sinks=None, impl: str = "xla"):
    """Grouped-query attention ``softmax(q k^T * scale [+ mask]) v`` over ``(B, T, heads, H)`` arrays.

    ``k``/``v`` may have fewer heads than ``q`` (a divisor). ``mask`` is boolean, broadcastable to
    ``(B, 1, T, S)`` (True = attend). ``causal`` adds the causal mask (for ``T == S``); ``window``
    keeps only the last ``window`` keys of each query (transformers' ``sliding_window``).
    ``softcap`` applies ``softcap * tanh(logits / softcap)`` before the softmax (Gemma 2);
    ``sinks`` ``(heads,)`` are attention sinks (GPT-OSS): one more logit per head in the softmax's
    denominator, attending to nothing (``p_j = e^{l_j} / (e^{sink} + sum_i e^{l_i})``). Both run
    in XLA; everything else goes through ``jax.nn.dot_product_attention`` with ``impl``.
    """
    b, t, n, h = q.shape
    s = k.shape[1]
    scale = 1.0 / math.sqrt(h) if scale is None else float(scale)
    if softcap is None and sinks is None:
        local = (window - 1, 0) if window is not None and window < max(t, s) else None
        if mask is not None and impl == "cudnn":
            mask = jnp.broadcast_to(mask, (b, 1, t, s))
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal,
                                            local_window_size=local, implementation=impl)
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    allowed = jnp.ones((t, s), bool)
    if causal:
        allowed = jnp.tril(allowed, s - t)
    if window is not None:
        allowed = allowed & ~jnp.tril(jnp.ones((t, s), bool), s - t - window)
    allowed = allowed[None, None]
    if mask is not None:
        allowed = allowed & jnp.broadcast_to(mask, (b, 1, t, s))
    logits = jnp.where(allowed[:, :, None], logits, jnp.finfo(jnp.float32).min)
    if sinks is None:
        probs = jax.nn.softmax(logits, axis=-1)
    else:
        sink = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(1, kh, n // kh, 1, 1), logits.shape[:-1] + (1,))
        probs = jax.nn.softmax(jnp.concatenate([logits, sink], axis=-1), axis=-1)[..., :-1]
    probs = probs.astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, n, h)


LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_types_by_pattern(n: int, pattern: int) -> tuple[str, ...]:
    """transformers' rule: layer ``i`` slides unless ``(i + 1) % pattern == 0`` (Gemma 2 and
    GPT-OSS: pattern 2; Gemma 3: 6)."""
    return tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n))


def check_layer_types(types, n: int, sliding_window, what: str) -> tuple[str, ...]:
    """``types`` as a tuple after checking it names one of `LAYER_TYPES` per layer, and that
    sliding layers have a window; a ValueError naming ``what`` otherwise."""
    if isinstance(types, str) or not isinstance(types, (list, tuple)) or len(types) != n \
            or any(t not in LAYER_TYPES for t in types):
        raise ValueError(f"{what}.layer_types must list one of {LAYER_TYPES} for each of the {n} layers, "
                         f"got {types!r}")
    if "sliding_attention" in types and sliding_window is None:
        raise ValueError(f"{what}: layer_types has sliding_attention layers but sliding_window is None")
    return tuple(types)


def layer_mask(attention_mask, cache, cache_index, t: int, window):
    """The mask of one layer of a scanned stack whose layers differ in window: ``window`` is that
    layer's (a traced scalar; 0 = full attention), combined with causality by slot and
    ``attention_mask`` (padding, documents) by `causal_cache_mask`. ``cache`` is the layer's own
    ``(B, M, K, H)`` slice."""
    m = t if cache is None else cache["k"].shape[1]
    start = 0 if cache is None else cache_index
    return causal_cache_mask(start, t, m, attention_mask, jnp.where(window > 0, window, m + t + 1))


def decoder_inputs(who: str, input_ids, attention_mask=None, positions=None, cache=None, cache_index=None):
    """Check and complete the inputs of a decoder call; return ``(input_ids, attention_mask,
    positions, cache_index, kv_len)``.

    ``input_ids`` must be integer ``(B, T)``; ``attention_mask`` (1 = token) ``(B, T)``, or
    ``(B, M)`` covering an ``M``-slot cache; ``positions`` default to ``0..T-1`` (after
    ``cache_index`` with a cache); a cache needs ``cache_index``. ``kv_len`` is ``M`` or ``T``.
    Every mismatch is a ValueError naming ``who`` and both shapes.
    """
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"{who}: input_ids must be an integer (batch, seq) array, got "
                         f"{input_ids.dtype}{list(input_ids.shape)}")
    b, t = input_ids.shape
    if cache is not None:
        if cache_index is None:
            raise ValueError(f"{who}: a cache needs cache_index (the cache slot of input_ids[:, 0])")
        cache_index = jnp.asarray(cache_index, jnp.int32)
        m = cache["k"].shape[2]
        start = cache_index
        what = f"cover the cache of length {m}"
    else:
        m, start, what = t, 0, "have the shape of input_ids"
    if attention_mask is not None:
        attention_mask = jnp.asarray(attention_mask)
        if tuple(attention_mask.shape) != (b, m):
            raise ValueError(f"{who}: attention_mask must {what}: expected {(b, m)}, got "
                             f"{tuple(attention_mask.shape)}")
    if positions is None:
        positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    positions = jnp.asarray(positions)
    if tuple(positions.shape) != (b, t):
        raise ValueError(f"{who}: positions must have the shape of input_ids {(b, t)}, got {tuple(positions.shape)}")
    return input_ids, attention_mask, positions, cache_index, m


def segment_mask(attention_mask, t: int, m: int):
    """Boolean ``(B, 1, t, m)`` mask of an ``attention_mask`` ``(B, m)`` for ``t`` queries.

    ``attention_mask`` holds 0 on padding and, on real tokens, 1 or a document (segment) id:
    rows packed with several documents number them ``1, 2, ...`` and a token attends only to
    tokens of its own document (TRL's padding-free packing, axolotl's multipack). A plain 0/1
    mask is one document: keys that are padding are masked, nothing else. Segments are compared
    only when the queries are the mask's own tokens (``t == m``: no cache, or a prefill filling
    the whole cache); with a cache the mask masks keys only. Padding queries see every real key
    before them, as transformers computes them.
    """
    seg = jnp.asarray(attention_mask)
    keys = (seg != 0)[:, None, :]
    if t != m:
        return keys[:, None]
    same = (seg[:, :, None] == seg[:, None, :]) | (seg[:, :, None] == 0)
    return (same & keys)[:, None]


def decoder_mask(attention_mask, cache, cache_index, t: int, m: int, window=None):
    """The boolean attention mask of a decoder call: with a cache `causal_cache_mask` (causality by
    slot, the window, the padding); without one only the padding and documents (`segment_mask`,
    or None), the attention core adding causality and the window itself (cuDNN's fast causal
    path when there is no mask)."""
    if cache is not None:
        return causal_cache_mask(cache_index, t, m, attention_mask, window)
    return None if attention_mask is None else segment_mask(attention_mask, t, m)


def causal_cache_mask(cache_index, t: int, m: int, attention_mask=None, window=None):
    """Boolean ``(B or 1, 1, t, m)`` mask for ``t`` new tokens written at slot ``cache_index`` of an
    ``m``-slot cache: causal by slot, limited to the last ``window`` slots when given (an int or a
    traced scalar), and ``attention_mask`` ``(B, m)`` (0 = padding; document ids: `segment_mask`)
    applied."""
    slots = jnp.arange(m, dtype=jnp.int32)
    q_slots = cache_index + jnp.arange(t, dtype=jnp.int32)
    mask = slots[None, :] <= q_slots[:, None]
    if window is not None:
        mask = mask & (slots[None, :] > q_slots[:, None] - window)
    mask = mask[None, None]
    if attention_mask is not None:
        mask = mask & segment_mask(attention_mask, t, m)
    return mask


def init_cache(num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype) -> dict:
    """An empty KV cache ``{"k", "v"}``, each ``(layers, batch, max_len, kv_heads, head_dim)``."""
    shape = (num_layers, batch, max_len, kv_heads, head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


# -------------------------------------------------------------------------------------------
# Mixture of experts
# -------------------------------------------------------------------------------------------
MOE_IMPLS = (None, "ragged", "dense")


def moe_impl(impl: Optional[str]) -> str:
    """The experts' computation: ``impl`` if given, else ``"ragged"`` on a GPU or TPU (XLA's native
    grouped matmul: each token meets only its ``k`` experts) and ``"dense"`` on a CPU, where
    ``ragged_dot`` is lowered to a masked dense product over every group and so costs ``k`` times
    the dense form (measured in `benchmarks/moe_step.py`)."""
    if impl is not None:
        return impl
    return "dense" if jax.default_backend() == "cpu" else "ragged"


def route(logits: jax.Array, top_k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """``(weights, experts)``, each ``(..., top_k)``: the ``top_k`` largest of ``softmax(logits)``
    (computed in float32), renormalized to sum to 1 when ``normalize`` (transformers'
    ``norm_topk_prob``; Mixtral always). The weights stay float32."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts


def load_balancing_loss(router_logits: jax.Array, top_k: int, mask: Optional[jax.Array] = None) -> jax.Array:
    """The auxiliary load-balancing loss of Switch Transformer as transformers computes it.

    ``router_logits`` ``(L, N, E)`` (layers, tokens, experts); ``mask`` ``(N,)`` (1 = real token)
    excludes padding. With ``p = softmax(logits)``, ``c_e`` the number of top-``k`` choices of
    expert ``e`` and ``P_e`` the sum of its probabilities, both summed over the layers' (real)
    tokens, and ``R`` the number of (real) token rows over all layers::

        loss = E * sum_e (c_e / R) * (P_e / R)

    Example:
      >>> float(load_balancing_loss(jnp.zeros((1, 4, 2)), 1))  # uniform router: 2 * (0.5*0.5 + 0.5*0.5)
      1.0
    """
    n_exp = router_logits.shape[-1]
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    _, chosen = jax.lax.top_k(probs, top_k)
    counts = jax.nn.one_hot(chosen, n_exp, dtype=jnp.float32).sum(axis=-2)  # (L, N, E)
    w = jnp.ones(router_logits.shape[1], jnp.float32) if mask is None else mask.reshape(-1).astype(jnp.float32)
    rows = router_logits.shape[0] * jnp.sum(w)
    c = jnp.einsum("lne,n->e", counts, w) / rows
    p = jnp.einsum("lne,n->e", probs, w) / rows
    return n_exp * jnp.sum(c * p)


class SparseMoe(nn.Module):
    """A sparse mixture-of-experts SwiGLU block: a router picks ``top_k`` of ``num_experts`` experts
    per token and their outputs are summed with the routing weights.

    Parameters (``E`` experts, ``D`` hidden, ``F`` expert intermediate size), as transformers 5
    stores them but with our ``(in, out)`` kernels::

        gate/kernel                (D, E)       the router
        experts/gate_up_proj       (E, D, 2F)   gate then up, fused on the output axis
        experts/down_proj          (E, F, D)

    ``impl="ragged"`` sorts the token copies by expert and runs each expert on its own rows with
    ``jax.lax.ragged_dot`` (``k/E`` of the dense FLOPs where the backend has a grouped matmul);
    ``"dense"`` runs every expert on every token with plain einsums and zeroes the unchosen ones by
    their weight (no sort or gather, ``E/k`` times the FLOPs); None picks by backend (`moe_impl`).
    Both keep LoRA factorized under ``lora.wrap`` and give the same outputs. The router's logits are sown
    in the ``"intermediates"`` collection as ``router_logits`` ``(N, E)`` (the auxiliary loss).

    GPT-OSS's form: ``router`` names the router module (``"router"``), ``bias`` gives the router
    and the experts biases (``experts/gate_up_proj_bias`` ``(E, 2F)``, ``experts/down_proj_bias``
    ``(E, D)``), and ``clamp=(alpha, limit)`` is its GLU over gate and up interleaved on the fused
    axis (``g = min(h[::2], limit)``, ``u = clip(h[1::2], -limit, limit)``,
    ``(u + 1) * g * sigmoid(alpha * g)``) instead of ``act(gate) * up`` over its two halves.
    """

    num_experts: int
    top_k: int
    intermediate_size: int
    normalize: bool
    hidden_act: str = "silu"
    impl: Optional[str] = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    std: float = 0.02
    router: str = "gate"
    bias: bool = False
    clamp: Optional[tuple] = None

    def glu(self, h):
        """The experts' gated unit of the fused gate/up output ``h`` ``(..., 2F)``."""
        f = self.intermediate_size
        if self.clamp is None:
            return ACTIVATIONS[self.hidden_act](h[..., :f]) * h[..., f:]
        alpha, limit = self.clamp
        g = jnp.minimum(h[..., ::2], limit)
        u = jnp.clip(h[..., 1::2], -limit, limit)
        return (u + 1) * (g * jax.nn.sigmoid(g * alpha))

    @nn.compact
    def __call__(self, x):
        e, f, k = self.num_experts, self.intermediate_size, self.top_k
        shape, d = x.shape, x.shape[-1]
        xf = x.reshape(-1, d)
        logits = dense(e, use_bias=self.bias, name=self.router, dtype=self.dtype, param_dtype=self.param_dtype,
                       std=self.std)(xf)
        self.sow("intermediates", "router_logits", logits)
        weights, experts = route(logits, k, self.normalize)
        ws = _Experts(e, d, f, self.param_dtype, self.std, self.bias, name="experts")()
        gate_up, down, b_gate_up, b_down = (None if w is None else w.astype(self.dtype) for w in ws)
        if moe_impl(self.impl) == "dense":
            h = jnp.einsum("nd,edf->enf", xf, gate_up)
            h = h if b_gate_up is None else h + b_gate_up[:, None]
            y = jnp.einsum("enf,efd->end", self.glu(h), down)
            y = y if b_down is None else y + b_down[:, None]
            dense_w = jnp.sum(jax.nn.one_hot(experts, e, dtype=jnp.float32) * weights[..., None], axis=-2)
            out = jnp.einsum("end,ne->nd", y.astype(jnp.float32), dense_w)
        else:
            n = xf.shape[0]
            flat = experts.reshape(-1)
            order = jnp.argsort(flat, stable=True)
            rows = xf[order // k]
            sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
            h = jax.lax.ragged_dot(rows, gate_up, sizes)
            h = h if b_gate_up is None else h + b_gate_up[flat[order]]
            y = jax.lax.ragged_dot(self.glu(h), down, sizes)
            y = y if b_down is None else y + b_down[flat[order]]
            y = y.astype(jnp.float32) * weights.reshape(-1)[order][:, None]
            out = y[jnp.argsort(order)].reshape(n, k, d).sum(axis=1)
        return out.astype(self.dtype).reshape(shape)


class _Experts(nn.Module):
    num_experts: int
    hidden: int
    intermediate: int
    param_dtype: Any
    std: float
    bias: bool = False

    @nn.compact
    def __call__(self):
        init = nn.initializers.normal(self.std)
        e, d, f = self.num_experts, self.hidden, self.intermediate
        zeros = nn.initializers.zeros
        gate_up = self.param("gate_up_proj", init, (e, d, 2 * f), self.param_dtype)
        b_gate_up = self.param("gate_up_proj_bias", zeros, (e, 2 * f), self.param_dtype) if self.bias else None
        down = self.param("down_proj", init, (e, f, d), self.param_dtype)
        b_down = self.param("down_proj_bias", zeros, (e, d), self.param_dtype) if self.bias else None
        return gate_up, down, b_gate_up, b_down

"""A fast Llama-family decoder in Flax linen: Llama 2/3, Qwen2, Mistral.

Built for LoRA training through ``lora.wrap(model.apply)``: the model code knows nothing of LoRA,
its layers run under ``nn.scan`` (one compiled layer, weights stacked on a leading layer axis),
attention goes through ``jax.nn.dot_product_attention`` (cuDNN flash attention on a GPU in
bf16/fp16, XLA elsewhere), RMSNorm is computed in float32, and an optional ``nn.remat`` policy
wraps the scanned block.

Parameter tree (``L`` layers, ``D`` hidden, ``F`` intermediate, ``N``/``K`` query/KV heads of
size ``H``, ``V`` vocab); every projection kernel is a plain 2-D Flax Dense kernel ``(in, out)``
per layer, stacked to ``(L, in, out)``::

    model/embed_tokens/embedding             (V, D)
    model/layers/input_layernorm/scale       (L, D)
    model/layers/self_attn/q_proj/kernel     (L, D, N*H)   (+ bias (L, N*H) for Qwen2 / attention_bias)
    model/layers/self_attn/k_proj/kernel     (L, D, K*H)   (+ bias)
    model/layers/self_attn/v_proj/kernel     (L, D, K*H)   (+ bias)
    model/layers/self_attn/o_proj/kernel     (L, N*H, D)   (+ bias with Llama's attention_bias)
    model/layers/post_attention_layernorm/scale  (L, D)
    model/layers/mlp/gate_proj/kernel        (L, D, F)     (+ bias with mlp_bias)
    model/layers/mlp/up_proj/kernel          (L, D, F)
    model/layers/mlp/down_proj/kernel        (L, F, D)
    model/norm/scale                         (D,)
    lm_head/kernel                           (D, V)        (absent with tie_word_embeddings)

In lora_jax terms the projection kernels have layout ``"sio"``: target them with
``lora.Rules(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
stack_axes=1)`` (or ``"all-linear"`` with ``stack_axes=1``; the embedding and ``lm_head`` are left
out by that rule). The paths mirror the PyTorch names with the layer index removed:
`hf_module_name` maps ``("model/layers/self_attn/q_proj/kernel", 3)`` to
``model.layers.3.self_attn.q_proj``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
  ...                   num_attention_heads=4, num_key_value_heads=2)
  >>> params = init_params(cfg, jax.random.key(0))
  >>> logits = LlamaForCausalLM(cfg).apply({"params": params}, jnp.zeros((1, 8), jnp.int32))
  >>> logits.shape
  (1, 8, 97)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .safetensors_io import read_checkpoint_dir

__all__ = [
    "LlamaConfig", "LlamaForCausalLM", "LlamaModel", "DecoderLayer", "RMSNorm",
    "from_hf_config", "init_params", "init_cache", "rope_frequencies",
    "load_hf", "to_hf_state_dict", "hf_module_name", "hf_param_name", "generate",
    "SUPPORTED_MODEL_TYPES", "ROPE_TYPES", "REMAT_POLICIES",
]

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
ATTENTION_IMPLS = (None, "xla", "cudnn")
REMAT_POLICIES = ("nothing_saveable", "everything_saveable", "dots_saveable", "checkpoint_dots",
                  "dots_with_no_batch_dims_saveable", "checkpoint_dots_with_no_batch_dims")
_ACTIVATIONS: dict[str, Callable] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


def _canon_dtype(value, what: str) -> np.dtype:
    try:
        dt = jnp.dtype(value)
    except TypeError:
        raise TypeError(f"LlamaConfig.{what}: expected a floating dtype (e.g. 'float32', 'bfloat16'), "
                        f"got {value!r}") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"LlamaConfig.{what}: expected a floating dtype, got {dt}")
    return dt


def _freeze(value):
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


# -------------------------------------------------------------------------------------------
# Config
# -------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-family decoder (hashable: usable as a static ``jit`` argument).

    Field names follow transformers' configs; the additions are ``qkv_bias``/``o_bias`` (Qwen2 has
    q/k/v biases only, Llama's ``attention_bias`` sets both), ``dtype`` (compute), ``param_dtype``,
    ``attention_impl`` (``None`` = cuDNN on a GPU in bf16/fp16 for head sizes that are a
    multiple of 8 up to 128, XLA otherwise; ``"xla"``; ``"cudnn"``) and ``remat_policy`` (a name
    from ``REMAT_POLICIES``, a ``jax.checkpoint_policies`` callable, or None for no remat).

    ``rope_scaling`` is a dict as in transformers (``{"rope_type": "llama3", "factor": 8, ...}``);
    it is stored as a sorted tuple of items so the config stays hashable (`rope_scaling_dict`
    returns the dict). ``sliding_window`` (Mistral) limits attention to the last
    ``sliding_window`` positions, as transformers does.

    Example:
      >>> cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, dtype="bfloat16")
      >>> cfg.head_dim, cfg.num_key_value_heads, str(cfg.dtype)
      (16, 4, 'bfloat16')
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Any = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: Optional[int] = None
    initializer_range: float = 0.02
    model_type: str = "llama"
    bos_token_id: Optional[int] = None
    eos_token_id: Any = None
    pad_token_id: Optional[int] = None
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    attention_impl: Optional[str] = None
    remat_policy: Any = None

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {v!r}")
            set_(name, int(v))
        if self.num_key_value_heads is None:
            set_("num_key_value_heads", self.num_attention_heads)
        if self.num_attention_heads % int(self.num_key_value_heads) != 0:
            raise ValueError(f"LlamaConfig: num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        set_("num_key_value_heads", int(self.num_key_value_heads))
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"LlamaConfig: hidden_size={self.hidden_size} is not divisible by "
                                 f"num_attention_heads={self.num_attention_heads}; give head_dim explicitly")
            set_("head_dim", self.hidden_size // self.num_attention_heads)
        if int(self.head_dim) % 2:
            raise ValueError(f"LlamaConfig.head_dim must be even for rotary embeddings, got {self.head_dim}")
        set_("head_dim", int(self.head_dim))
        set_("dtype", _canon_dtype(self.dtype, "dtype"))
        set_("param_dtype", _canon_dtype(self.param_dtype, "param_dtype"))
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"LlamaConfig.attention_impl must be one of {ATTENTION_IMPLS}, "
                             f"got {self.attention_impl!r}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"LlamaConfig.hidden_act must be one of {sorted(_ACTIVATIONS)}, got {self.hidden_act!r}")
        if self.remat_policy is not None and not callable(self.remat_policy) \
                and self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"LlamaConfig.remat_policy must be None, a jax.checkpoint_policies callable or one of "
                             f"{REMAT_POLICIES}, got {self.remat_policy!r}")
        if self.sliding_window is not None and (isinstance(self.sliding_window, bool) or int(self.sliding_window) <= 0):
            raise ValueError(f"LlamaConfig.sliding_window must be None or a positive integer, "
                             f"got {self.sliding_window!r}")
        if isinstance(self.eos_token_id, (list, tuple)):
            set_("eos_token_id", tuple(int(t) for t in self.eos_token_id))
        rs = self.rope_scaling
        if rs is not None:
            rs = dict(rs) if not isinstance(rs, Mapping) else rs
            set_("rope_scaling", _freeze(rs))
            _rope_type(self)  # validates

    @property
    def rope_scaling_dict(self) -> Optional[dict]:
        """``rope_scaling`` as the dict transformers uses (None when absent)."""
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """``eos_token_id`` as a tuple (empty when None)."""
        e = self.eos_token_id
        return () if e is None else (e if isinstance(e, tuple) else (int(e),))

    def replace(self, **changes) -> "LlamaConfig":
        """A copy with some fields changed (``cfg.replace(dtype="bfloat16")``)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_config(cls, hf_config: Any, **overrides) -> "LlamaConfig":
        """See `from_hf_config`."""
        return from_hf_config(hf_config, **overrides)

    def to_hf_config(self) -> dict:
        """A transformers ``config.json`` dict for this model (for exporting merged checkpoints)."""
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
        d = dict(
            architectures=[arch[self.model_type]], model_type=self.model_type, vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta, rope_scaling=self.rope_scaling_dict,
            max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=self.tie_word_embeddings,
            hidden_act=self.hidden_act, initializer_range=self.initializer_range,
            bos_token_id=self.bos_token_id, pad_token_id=self.pad_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            torch_dtype={"bfloat16": "bfloat16", "float16": "float16"}.get(self.param_dtype.name, "float32"),
        )
        if self.model_type == "llama":
            d.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        elif self.model_type == "qwen2":
            d.update(use_sliding_window=self.sliding_window is not None,
                     sliding_window=self.sliding_window, max_window_layers=0)
        else:
            d.update(sliding_window=self.sliding_window)
        return d


def from_hf_config(hf_config: Any, **overrides) -> LlamaConfig:
    """A `LlamaConfig` from a transformers config (a ``config.json`` dict, a path to one or to its
    directory, or a ``PretrainedConfig``), with ``overrides`` applied (``dtype="bfloat16"``, ...).

    Supported ``model_type``: ``llama`` (``attention_bias`` -> q/k/v/o biases, ``mlp_bias``),
    ``qwen2`` (q/k/v biases; a sliding window only if every layer uses it), ``mistral``.

    Raises:
      ValueError: for another ``model_type``, an unsupported ``rope_scaling`` type, a partial
        rotary factor, or a Qwen2 config that mixes sliding and full attention layers.

    Example:
      >>> cfg = from_hf_config({"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4,
      ...                       "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 128,
      ...                       "vocab_size": 100}, dtype="bfloat16")
      >>> cfg.qkv_bias, cfg.o_bias
      (True, False)
    """
    if isinstance(hf_config, (str, os.PathLike)):
        p = os.fspath(hf_config)
        if os.path.isdir(p):
            p = os.path.join(p, "config.json")
        with open(p) as f:
            d = json.load(f)
    elif isinstance(hf_config, Mapping):
        d = dict(hf_config)
    elif hasattr(hf_config, "to_dict"):
        d = hf_config.to_dict()
    else:
        raise TypeError(f"from_hf_config: expected a config dict, a path or a transformers PretrainedConfig, "
                        f"got {type(hf_config).__name__}")
    mt = d.get("model_type", "llama")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"from_hf_config: model_type {mt!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
    if float(d.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise ValueError(f"from_hf_config: partial_rotary_factor={d['partial_rotary_factor']} is not supported "
                         "(only full rotary embeddings)")
    heads = d.get("num_attention_heads", 32)
    hidden = d.get("hidden_size", 4096)
    kw = dict(
        vocab_size=d.get("vocab_size", 32000), hidden_size=hidden,
        intermediate_size=d.get("intermediate_size", 11008), num_hidden_layers=d.get("num_hidden_layers", 32),
        num_attention_heads=heads, num_key_value_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or None, rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=d.get("rope_theta", 10000.0), rope_scaling=d.get("rope_scaling"),
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), hidden_act=d.get("hidden_act", "silu"),
        initializer_range=d.get("initializer_range", 0.02), model_type=mt,
        bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"),
    )
    if mt == "llama":
        kw.update(qkv_bias=bool(d.get("attention_bias", False)), o_bias=bool(d.get("attention_bias", False)),
                  mlp_bias=bool(d.get("mlp_bias", False)))
    elif mt == "qwen2":
        kw.update(qkv_bias=True)
        if d.get("use_sliding_window", False) and d.get("sliding_window"):
            n = kw["num_hidden_layers"]
            types = d.get("layer_types") or ["sliding_attention" if i >= d.get("max_window_layers", 28)
                                             else "full_attention" for i in range(n)]
            if len(set(types)) > 1:
                raise ValueError(f"from_hf_config: Qwen2 config mixes sliding and full attention layers "
                                 f"(layer_types={types}); only all-sliding or all-full is supported")
            if types[0] == "sliding_attention":
                kw.update(sliding_window=int(d["sliding_window"]))
    else:  # mistral
        if d.get("sliding_window"):
            kw.update(sliding_window=int(d["sliding_window"]))
    kw.update(overrides)
    return LlamaConfig(**kw)


# -------------------------------------------------------------------------------------------
# Rotary embeddings
# -------------------------------------------------------------------------------------------
def _rope_type(config: LlamaConfig) -> str:
    rs = config.rope_scaling_dict
    if not rs:
        return "default"
    t = rs.get("rope_type", rs.get("type", "default"))
    if t not in ROPE_TYPES:
        raise ValueError(f"LlamaConfig.rope_scaling: rope_type {t!r} is not supported; supported: {ROPE_TYPES}")
    need = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                              "original_max_position_embeddings"), "yarn": ("factor",)}.get(t, ())
    missing = [k for k in need if k not in rs]
    if missing:
        raise ValueError(f"LlamaConfig.rope_scaling of type {t!r} lacks {missing}: got {rs}")
    return t


def rope_frequencies(config: LlamaConfig) -> tuple[np.ndarray, float]:
    """``(inv_freq, attention_factor)``: the rotary inverse frequencies ``(head_dim // 2,)`` in float32
    and the factor applied to cos/sin, computed as transformers does in float32 for the
    ``rope_scaling`` types ``default``, ``linear``, ``llama3`` and ``yarn``."""
    f32 = np.float32
    dim = config.head_dim
    base = f32(config.rope_theta)
    exponent = np.arange(0, dim, 2).astype(f32) / f32(dim)
    inv_freq = (f32(1.0) / np.power(base, exponent)).astype(f32)
    kind = _rope_type(config)
    rs = config.rope_scaling_dict or {}
    factor_attn = 1.0
    if kind == "linear":
        inv_freq = (inv_freq / f32(rs["factor"])).astype(f32)
    elif kind == "llama3":
        factor = f32(rs["factor"])
        low, high = f32(rs["low_freq_factor"]), f32(rs["high_freq_factor"])
        old = f32(rs["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = f32(2 * math.pi) / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(f32)
        smooth = ((old / wavelen - low) / (high - low)).astype(f32)
        smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(f32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(f32)
    elif kind == "yarn":
        factor = float(rs["factor"])
        orig = rs.get("original_max_position_embeddings") or config.max_position_embeddings

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        factor_attn = rs.get("attention_factor")
        if factor_attn is None:
            if rs.get("mscale") and rs.get("mscale_all_dim"):
                factor_attn = mscale(factor, rs["mscale"]) / mscale(factor, rs["mscale_all_dim"])
            else:
                factor_attn = mscale(factor)
        beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

        def corr_dim(rot):
            return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(config.rope_theta))

        lo, hi = corr_dim(beta_fast), corr_dim(beta_slow)
        if rs.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=f32) - f32(lo)) / f32(hi - lo), 0, 1).astype(f32)
        extrap_w = f32(1) - ramp
        pos_freqs = np.power(base, exponent).astype(f32)
        inv_extrap = (f32(1) / pos_freqs).astype(f32)
        inv_interp = (f32(1) / (f32(factor) * pos_freqs)).astype(f32)
        inv_freq = (inv_interp * (1 - extrap_w) + inv_extrap * extrap_w).astype(f32)
    return inv_freq, float(factor_attn)


def _rope_tables(config: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape ``positions.shape + (head_dim // 2,)`` in the compute dtype."""
    inv_freq, factor = rope_frequencies(config)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return cos.astype(config.dtype), sin.astype(config.dtype)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE (transformers' convention): x ``(B, T, heads, H)``, cos/sin ``(B, T, H/2)``."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    c, s = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


# -------------------------------------------------------------------------------------------
# Modules
# -------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """``scale * x / sqrt(mean(x^2) + eps)``, normalised in float32, returned in the compute dtype."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), c.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + c.rms_norm_eps)
        return y.astype(c.dtype) * scale.astype(c.dtype)


def _dense(config: LlamaConfig, features: int, use_bias: bool, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=config.dtype, param_dtype=config.param_dtype,
                    kernel_init=nn.initializers.normal(config.initializer_range), name=name)


def _attention_impl(config: LlamaConfig) -> str:
    if config.attention_impl is not None:
        return config.attention_impl
    if jax.default_backend() == "gpu" and config.dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) \
            and config.head_dim % 8 == 0 and config.head_dim <= 128:
        return "cudnn"
    return "xla"


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE; optional KV cache passed in and returned explicitly."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache, cache_index):
        c = self.config
        b, t, _ = x.shape
        n, k, h = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q = _dense(c, n * h, c.qkv_bias, "q_proj")(x).reshape(b, t, n, h)
        kk = _dense(c, k * h, c.qkv_bias, "k_proj")(x).reshape(b, t, k, h)
        v = _dense(c, k * h, c.qkv_bias, "v_proj")(x).reshape(b, t, k, h)
        q, kk = _apply_rope(q, cos, sin), _apply_rope(kk, cos, sin)
        if cache is None:
            impl = _attention_impl(c)
            window = None
            if c.sliding_window is not None and t > c.sliding_window:
                window = (c.sliding_window - 1, 0)
            if mask is not None and impl == "cudnn":
                mask = jnp.broadcast_to(mask, (b, 1, t, t))
            out = jax.nn.dot_product_attention(q, kk, v, mask=mask, is_causal=True, local_window_size=window,
                                               implementation=impl)
            new_cache = None
        else:
            idx = (0, cache_index, 0, 0)
            kc = jax.lax.dynamic_update_slice(cache["k"], kk.astype(cache["k"].dtype), idx)
            vc = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), idx)
            # The mask (causal by cache slot, padding, window) was built once by the caller.
            out = jax.nn.dot_product_attention(q, kc.astype(q.dtype), vc.astype(q.dtype), mask=mask,
                                               implementation="xla")
            new_cache = {"k": kc, "v": vc}
        out = _dense(c, c.hidden_size, c.o_bias, "o_proj")(out.reshape(b, t, n * h))
        return out, new_cache


class MLP(nn.Module):
    """SwiGLU: ``down(act(gate(x)) * up(x))``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        g = _dense(c, c.intermediate_size, c.mlp_bias, "gate_proj")(x)
        u = _dense(c, c.intermediate_size, c.mlp_bias, "up_proj")(x)
        return _dense(c, c.hidden_size, c.mlp_bias, "down_proj")(_ACTIVATIONS[c.hidden_act](g) * u)


class DecoderLayer(nn.Module):
    """One pre-norm decoder layer, shaped for ``nn.scan``: ``(h, cache, *broadcast) -> (h, cache)``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, h, cache, cos, sin, mask, cache_index):
        c = self.config
        a, new_cache = Attention(c, name="self_attn")(RMSNorm(c, name="input_layernorm")(h), cos, sin, mask,
                                                      cache, cache_index)
        h = h + a
        h = h + MLP(c, name="mlp")(RMSNorm(c, name="post_attention_layernorm")(h))
        return h, new_cache


def _remat_policy(spec):
    if spec is None or callable(spec):
        return spec
    return getattr(jax.checkpoint_policies, spec)


class LlamaModel(nn.Module):
    """Embedding, the scanned decoder layers and the final norm; returns hidden states."""

    config: LlamaConfig

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
                                     embedding_init=nn.initializers.normal(c.initializer_range))
        block = DecoderLayer
        if c.remat_policy is not None:
            block = nn.remat(block, prevent_cse=False, policy=_remat_policy(c.remat_policy))
        self.layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                              in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                              length=c.num_hidden_layers)(c)
        self.norm = RMSNorm(c)

    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None, cache_index=None):
        c = self.config
        b, t = input_ids.shape
        if cache is not None:
            if cache_index is None:
                raise ValueError("LlamaModel: a cache needs cache_index (the slot of input_ids' first token)")
            cache_index = jnp.asarray(cache_index, jnp.int32)
            m = cache["k"].shape[2]
            if positions is None:
                positions = jnp.broadcast_to(cache_index + jnp.arange(t, dtype=jnp.int32), (b, t))
            slots = jnp.arange(m, dtype=jnp.int32)
            q_slots = cache_index + jnp.arange(t, dtype=jnp.int32)
            mask = slots[None, :] <= q_slots[:, None]
            if c.sliding_window is not None:
                mask = mask & (slots[None, :] > q_slots[:, None] - c.sliding_window)
            mask = mask[None, None]
            if attention_mask is not None:
                if attention_mask.shape != (b, m):
                    raise ValueError(f"LlamaModel: with a cache of length {m}, attention_mask must cover the cache: "
                                     f"expected shape {(b, m)}, got {tuple(attention_mask.shape)}")
                mask = mask & attention_mask.astype(bool)[:, None, None, :]
        else:
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            mask = None
            if attention_mask is not None:
                if attention_mask.shape != (b, t):
                    raise ValueError(f"LlamaModel: attention_mask must have the shape of input_ids {(b, t)}, "
                                     f"got {tuple(attention_mask.shape)}")
                mask = attention_mask.astype(bool)[:, None, None, :]
        cos, sin = _rope_tables(c, positions)
        h = self.embed_tokens(input_ids)
        h, new_cache = self.layers(h, cache, cos, sin, mask, cache_index)
        return self.norm(h), new_cache

    def attend(self, h):
        """Tied output head: ``h @ embedding.T``."""
        return self.embed_tokens.attend(h)


class LlamaForCausalLM(nn.Module):
    """The decoder with its output head.

    Call ``model.apply({"params": params}, input_ids, attention_mask=None, positions=None)`` for
    logits ``(B, T, V)`` in float32. ``attention_mask`` ``(B, T)`` (1 = token, 0 = padding) is
    combined with the causal mask; ``positions`` default to ``0..T-1`` (give
    ``cumsum(mask) - 1`` for left-padded rows, as transformers' ``generate`` does). For
    right-padded training batches the mask can be left out: causal attention never lets a real
    token see the padding after it, and the cuDNN kernel then runs its fastest causal path.

    With ``cache=init_cache(...)`` and ``cache_index`` (the cache slot of ``input_ids[:, 0]``) it
    returns ``(logits, new_cache)``; ``attention_mask`` then has the cache's length (which slots
    hold real tokens). The cache is an explicit input and output, not a Flax collection, so the
    call stays a pure function of ``params``.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None, cache_index=None):
        c = self.config
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"LlamaForCausalLM: input_ids must be integer (batch, seq), got "
                             f"{input_ids.dtype}{list(input_ids.shape)}")
        model = LlamaModel(c, name="model")
        h, new_cache = model(input_ids, attention_mask, positions, cache, cache_index)
        if c.tie_word_embeddings:
            logits = model.attend(h)
        else:
            logits = nn.Dense(c.vocab_size, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype,
                              kernel_init=nn.initializers.normal(c.initializer_range), name="lm_head")(h)
        logits = logits.astype(jnp.float32)
        return logits if cache is None else (logits, new_cache)


def init_params(config: LlamaConfig, key) -> dict:
    """Random parameters (normal(initializer_range) kernels, unit norms), in ``config.param_dtype``."""
    model = LlamaForCausalLM(config)
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.jit(lambda k: model.init(k, ids)["params"])(key)


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=None) -> dict:
    """An empty KV cache ``{"k", "v"}``, each ``(layers, batch, max_len, kv_heads, head_dim)``."""
    shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
    dt = config.dtype if dtype is None else dtype
    return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)}


# -------------------------------------------------------------------------------------------
# Generation
# -------------------------------------------------------------------------------------------
def _sample(logits, key, temperature, top_k):
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "temperature", "top_k", "eos", "pad",
                                             "apply_fn"))
def _generate(params, prompt_ids, prompt_mask, key, *, config, max_new_tokens, temperature, top_k, eos, pad,
              apply_fn):
    if apply_fn is None:
        model = LlamaForCausalLM(config)

        def apply_fn(p, ids, **kw):
            return model.apply({"params": p}, ids, **kw)

    b, p_len = prompt_ids.shape
    n = max_new_tokens
    cache = init_cache(config, b, p_len + n)
    kv_mask = jnp.concatenate([prompt_mask, jnp.ones((b, n), prompt_mask.dtype)], axis=1)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)
    logits, cache = apply_fn(params, prompt_ids, attention_mask=kv_mask, positions=positions, cache=cache,
                             cache_index=jnp.int32(0))
    keys = jax.random.split(key, n)
    tok = _sample(logits[:, -1], keys[0], temperature, top_k)
    eos_arr = jnp.asarray(eos, jnp.int32) if eos else None
    done = jnp.isin(tok, eos_arr) if eos else jnp.zeros((b,), bool)
    out = jnp.zeros((b, n), jnp.int32).at[:, 0].set(tok)
    last_pos = positions[:, -1]

    def body(i, state):
        cache, tok, done, out = state
        logits, cache = apply_fn(params, tok[:, None], attention_mask=kv_mask, positions=(last_pos + i)[:, None],
                                 cache=cache, cache_index=(p_len + i - 1).astype(jnp.int32))
        new = _sample(logits[:, -1], keys[i], temperature, top_k)
        if eos:
            new = jnp.where(done, jnp.int32(pad), new)
            done = done | jnp.isin(new, eos_arr)
        return cache, new, done, out.at[:, i].set(new)

    _, _, _, out = jax.lax.fori_loop(1, n, body, (cache, tok, done, out))
    return jnp.concatenate([prompt_ids, out], axis=1)


def generate(params, config: LlamaConfig, prompt_ids, max_new_tokens: int, *, attention_mask=None,
             temperature: float = 0.0, top_k: Optional[int] = None, rng=None, eos_token_id: Any = None,
             pad_token_id: Optional[int] = None, apply_fn: Optional[Callable] = None) -> jax.Array:
    """Autoregressive decoding with a fixed-size KV cache, compiled once per shape.

    The prompt is run in one prefill call; each new token is one cached decode step inside a
    ``lax.fori_loop``. Rows may be left-padded (``attention_mask`` 0 on the left); positions are
    ``cumsum(mask) - 1`` as in transformers' ``generate``. With ``eos_token_id``, a row that has
    produced it continues with ``pad_token_id`` (the output keeps its fixed length).

    Args:
      params: the model's params tree (``{"params": ...}``'s inner dict).
      config: the `LlamaConfig`.
      prompt_ids: int ``(B, P)``.
      max_new_tokens: number of tokens to generate (>= 1).
      attention_mask: ``(B, P)`` 1 for tokens, 0 for left padding (default: all ones).
      temperature: 0 for greedy argmax; > 0 samples from ``softmax(logits / temperature)``.
      top_k: sample only among the ``top_k`` largest logits (with temperature > 0).
      rng: a ``jax.random`` key, needed when ``temperature > 0``.
      eos_token_id, pad_token_id: stop token(s) and the filler after them (default: the config's).
      apply_fn: ``(params, ids, *, attention_mask, positions, cache, cache_index) -> (logits, cache)``;
        default ``LlamaForCausalLM(config).apply`` on ``{"params": params}``. Pass
        ``lora.wrap(...)`` of that function to decode with factorized LoRA weights. It is a static
        argument of the compiled function: reuse the same function object to avoid recompiling.

    Returns:
      int32 ``(B, P + max_new_tokens)``: the prompt followed by the generated tokens.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
      ...                   num_attention_heads=4)
      >>> out = generate(init_params(cfg, jax.random.key(0)), cfg, jnp.ones((2, 3), jnp.int32), 4)
      >>> out.shape
      (2, 7)
    """
    prompt_ids = jnp.asarray(prompt_ids)
    if prompt_ids.ndim != 2 or not jnp.issubdtype(prompt_ids.dtype, jnp.integer) or prompt_ids.shape[1] == 0:
        raise ValueError(f"generate: prompt_ids must be a non-empty integer (batch, length) array, got "
                         f"{prompt_ids.dtype}{list(prompt_ids.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    temperature = float(temperature)
    if not temperature >= 0.0:
        raise ValueError(f"generate: temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer))
                              or not 1 <= top_k <= config.vocab_size):
        raise ValueError(f"generate: top_k must be None or an integer in [1, {config.vocab_size}], got {top_k!r}")
    if temperature > 0 and rng is None:
        raise ValueError("generate: temperature > 0 samples and needs rng (a jax.random key)")
    if attention_mask is None:
        attention_mask = jnp.ones(prompt_ids.shape, jnp.int32)
    attention_mask = jnp.asarray(attention_mask).astype(jnp.int32)
    if attention_mask.shape != prompt_ids.shape:
        raise ValueError(f"generate: attention_mask shape {tuple(attention_mask.shape)} differs from prompt_ids "
                         f"shape {tuple(prompt_ids.shape)}")
    try:
        ends_real = bool(jnp.all(attention_mask[:, -1] == 1))
    except jax.errors.ConcretizationTypeError:  # traced (generate called under jit): not checkable
        ends_real = True
    if not ends_real:
        raise ValueError("generate: every prompt must end with a real token (attention_mask[:, -1] == 1); "
                         "pad prompts on the left")
    eos = config.eos_token_ids if eos_token_id is None else (
        tuple(int(e) for e in eos_token_id) if isinstance(eos_token_id, (list, tuple)) else (int(eos_token_id),))
    pad = pad_token_id if pad_token_id is not None else config.pad_token_id
    if eos and pad is None:
        pad = eos[0]
    key = rng if rng is not None else jax.random.key(0)
    return _generate(params, prompt_ids.astype(jnp.int32), attention_mask, key, config=config,
                     max_new_tokens=int(max_new_tokens), temperature=temperature,
                     top_k=None if top_k is None else int(top_k), eos=eos,
                     pad=None if pad is None else int(pad), apply_fn=apply_fn)


# -------------------------------------------------------------------------------------------
# Hugging Face checkpoints
# -------------------------------------------------------------------------------------------
# (tree path below model/layers, torch suffix below model.layers.N, kind, config flag for presence)
_LAYER_LEAVES = (
    ("input_layernorm/scale", "input_layernorm.weight", "vector", None),
    ("self_attn/q_proj/kernel", "self_attn.q_proj.weight", "kernel", None),
    ("self_attn/q_proj/bias", "self_attn.q_proj.bias", "vector", "qkv_bias"),
    ("self_attn/k_proj/kernel", "self_attn.k_proj.weight", "kernel", None),
    ("self_attn/k_proj/bias", "self_attn.k_proj.bias", "vector", "qkv_bias"),
    ("self_attn/v_proj/kernel", "self_attn.v_proj.weight", "kernel", None),
    ("self_attn/v_proj/bias", "self_attn.v_proj.bias", "vector", "qkv_bias"),
    ("self_attn/o_proj/kernel", "self_attn.o_proj.weight", "kernel", None),
    ("self_attn/o_proj/bias", "self_attn.o_proj.bias", "vector", "o_bias"),
    ("post_attention_layernorm/scale", "post_attention_layernorm.weight", "vector", None),
    ("mlp/gate_proj/kernel", "mlp.gate_proj.weight", "kernel", None),
    ("mlp/gate_proj/bias", "mlp.gate_proj.bias", "vector", "mlp_bias"),
    ("mlp/up_proj/kernel", "mlp.up_proj.weight", "kernel", None),
    ("mlp/up_proj/bias", "mlp.up_proj.bias", "vector", "mlp_bias"),
    ("mlp/down_proj/kernel", "mlp.down_proj.weight", "kernel", None),
    ("mlp/down_proj/bias", "mlp.down_proj.bias", "vector", "mlp_bias"),
)
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# Buffers some checkpoints carry that are not parameters (recomputed from the config here).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _layer_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Unstacked Flax shape of each layer leaf present for this config."""
    d, f = config.hidden_size, config.intermediate_size
    nh = config.num_attention_heads * config.head_dim
    kh = config.num_key_value_heads * config.head_dim
    shapes = {
        "input_layernorm/scale": (d,), "post_attention_layernorm/scale": (d,),
        "self_attn/q_proj/kernel": (d, nh), "self_attn/q_proj/bias": (nh,),
        "self_attn/k_proj/kernel": (d, kh), "self_attn/k_proj/bias": (kh,),
        "self_attn/v_proj/kernel": (d, kh), "self_attn/v_proj/bias": (kh,),
        "self_attn/o_proj/kernel": (nh, d), "self_attn/o_proj/bias": (d,),
        "mlp/gate_proj/kernel": (d, f), "mlp/gate_proj/bias": (f,),
        "mlp/up_proj/kernel": (d, f), "mlp/up_proj/bias": (f,),
        "mlp/down_proj/kernel": (f, d), "mlp/down_proj/bias": (d,),
    }
    return {path: shapes[path] for path, _, _, flag in _LAYER_LEAVES if flag is None or getattr(config, flag)}


def _top_leaves(config: LlamaConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Flax path -> (torch name, Flax shape) for the leaves outside the layers."""
    out = {"model/embed_tokens/embedding": ("model.embed_tokens.weight", (config.vocab_size, config.hidden_size)),
           "model/norm/scale": ("model.norm.weight", (config.hidden_size,))}
    if not config.tie_word_embeddings:
        out["lm_head/kernel"] = ("lm_head.weight", (config.hidden_size, config.vocab_size))
    return out


def _torch_shape(flax_shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    return tuple(reversed(flax_shape)) if kind == "kernel" else flax_shape


def _set_path(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def hf_module_name(path: str, layer: Optional[int] = None) -> str:
    """The PyTorch module name of a leaf path (or module path) of this model's tree.

    ``hf_module_name("model/layers/self_attn/q_proj/kernel", 3)`` is
    ``"model.layers.3.self_attn.q_proj"``; ``"lm_head/kernel"`` gives ``"lm_head"``. A leading
    ``params/`` component is dropped.

    Raises:
      ValueError: for a path under ``model/layers`` without a layer index (or the reverse).
    """
    parts = [p for p in path.split("/") if p]
    if parts and parts[0] == "params":
        parts = parts[1:]
    if parts and parts[-1] in _LEAF_TO_TORCH:
        parts = parts[:-1]
    in_layers = len(parts) >= 2 and parts[0] == "model" and parts[1] == "layers"
    if in_layers:
        if layer is None or isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or layer < 0:
            raise ValueError(f"hf_module_name: {path!r} is inside the stacked layers and needs a layer index "
                             f"(a non-negative int), got {layer!r}")
        parts = parts[:2] + [str(int(layer))] + parts[2:]
    elif layer is not None:
        raise ValueError(f"hf_module_name: {path!r} is not a per-layer leaf but layer={layer!r} was given")
    return ".".join(parts)


def hf_param_name(path: str, layer: Optional[int] = None) -> str:
    """The PyTorch parameter name of a leaf path: ``("model/layers/mlp/up_proj/kernel", 0)`` ->
    ``"model.layers.0.mlp.up_proj.weight"``."""
    leaf = path.rstrip("/").rpartition("/")[2]
    if leaf not in _LEAF_TO_TORCH:
        raise ValueError(f"hf_param_name: {path!r} does not end in a leaf name {sorted(_LEAF_TO_TORCH)}")
    return f"{hf_module_name(path, layer)}.{_LEAF_TO_TORCH[leaf]}"


def load_hf(source: Union[str, os.PathLike, Mapping[str, Any]], config: Optional[LlamaConfig] = None, *,
            dtype=None) -> dict:
    """Parameters of this model from a Hugging Face Llama/Qwen2/Mistral checkpoint, without torch.

    Torch ``(out, in)`` weights are transposed to Flax ``(in, out)`` kernels and the per-layer
    tensors stacked on a leading layer axis. The match is strict: every missing or unexpected
    tensor and every shape mismatch is reported in one error. (``rotary_emb.inv_freq`` buffers are
    ignored; with tied embeddings a stored ``lm_head.weight`` is ignored.)

    Args:
      source: a checkpoint directory (``model.safetensors`` or ``model.safetensors.index.json``),
        a ``.safetensors`` file, or a state dict ``{torch_name: array}`` (NumPy-convertible).
      config: the `LlamaConfig`; default: read from ``source``'s ``config.json``.
      dtype: dtype of the returned arrays (default ``config.param_dtype``).

    Returns:
      The params tree (nested dicts of NumPy arrays); ``jax.device_put`` it with any sharding.

    Raises:
      ValueError: listing missing/unexpected tensors and shape mismatches.

    Example:
      >>> params = load_hf("/path/to/Llama-3.2-1B", from_hf_config("/path/to/Llama-3.2-1B"))  # doctest: +SKIP
    """
    if isinstance(source, Mapping):
        if config is None:
            raise ValueError("load_hf: a state dict source needs config=LlamaConfig(...)")
        state = dict(source)
    else:
        if config is None:
            base = os.fspath(source)
            base = base if os.path.isdir(base) else os.path.dirname(base)
            config = from_hf_config(base)
        state = read_checkpoint_dir(source)
    if not isinstance(config, LlamaConfig):
        raise TypeError(f"load_hf: config must be a LlamaConfig, got {type(config).__name__}")
    out_dtype = config.param_dtype if dtype is None else jnp.dtype(dtype)

    def get(name):
        return np.asarray(state[name])

    used, missing, bad_shape = set(), [], []
    params: dict = {}
    for path, (name, shape) in _top_leaves(config).items():
        kind = "kernel" if path.endswith("kernel") else "vector"
        if name not in state:
            missing.append(name)
            continue
        used.add(name)
        arr = get(name)
        if arr.shape != _torch_shape(shape, kind):
            bad_shape.append(f"{name}: expected {_torch_shape(shape, kind)}, got {arr.shape}")
            continue
        _set_path(params, path, (arr.T if kind == "kernel" else arr).astype(out_dtype))
    layer_shapes = _layer_shapes(config)
    for path, suffix, kind, _ in _LAYER_LEAVES:
        if path not in layer_shapes:
            continue
        shape = layer_shapes[path]
        per_layer = []
        for i in range(config.num_hidden_layers):
            name = f"model.layers.{i}.{suffix}"
            if name not in state:
                missing.append(name)
                continue
            used.add(name)
            arr = get(name)
            if arr.shape != _torch_shape(shape, kind):
                bad_shape.append(f"{name}: expected {_torch_shape(shape, kind)}, got {arr.shape}")
                continue
            per_layer.append(arr.T if kind == "kernel" else arr)
        if len(per_layer) == config.num_hidden_layers:
            stacked = np.empty((config.num_hidden_layers,) + shape, out_dtype)
            for i, a in enumerate(per_layer):
                stacked[i] = a
            _set_path(params, "model/layers/" + path, stacked)
    unexpected = sorted(n for n in state if n not in used and not n.endswith(_IGNORED_SUFFIXES)
                        and not (config.tie_word_embeddings and n == "lm_head.weight"))
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {missing}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {unexpected}")
        if bad_shape:
            parts.append(f"shape mismatches (torch layout (out, in)) {len(bad_shape)}: {bad_shape}")
        raise ValueError(f"load_hf: the checkpoint does not match the {config.model_type} config "
                         f"({config.num_hidden_layers} layers, hidden {config.hidden_size}, "
                         f"tie_word_embeddings={config.tie_word_embeddings}): " + "; ".join(parts))
    return params


def to_hf_state_dict(params: Mapping, config: LlamaConfig) -> dict[str, np.ndarray]:
    """The inverse of `load_hf`: ``{torch_name: np.ndarray}`` in PyTorch layout, dtype kept.

    ``params`` may be wrapped as ``{"params": ...}``. The tree must be exactly this config's
    (plain arrays: merge LoRA weights first with ``lora.merge``).

    Raises:
      ValueError: listing missing/unexpected leaves and shape mismatches.
    """
    if not isinstance(config, LlamaConfig):
        raise TypeError(f"to_hf_state_dict: config must be a LlamaConfig, got {type(config).__name__}")
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]
    flat = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        flat["/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in kp)] = leaf
    expected = {path: shape for path, (_, shape) in _top_leaves(config).items()}
    layer_shapes = _layer_shapes(config)
    expected.update({"model/layers/" + p: (config.num_hidden_layers,) + s for p, s in layer_shapes.items()})
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    bad = [f"{p}: expected {expected[p]}, got {tuple(np.shape(flat[p]))}" for p in sorted(set(expected) & set(flat))
           if tuple(np.shape(flat[p])) != expected[p]]
    if missing or unexpected or bad:
        raise ValueError(f"to_hf_state_dict: params do not match the config: missing {missing}; unexpected "
                         f"{unexpected}; shape mismatches {bad}")
    out = {}
    for path, (name, _) in _top_leaves(config).items():
        arr = np.asarray(flat[path])
        out[name] = np.ascontiguousarray(arr.T) if path.endswith("kernel") else arr
    for path, suffix, kind, flag in _LAYER_LEAVES:
        if path not in layer_shapes:
            continue
        arr = np.asarray(flat["model/layers/" + path])
        for i in range(config.num_hidden_layers):
            out[f"model.layers.{i}.{suffix}"] = np.ascontiguousarray(arr[i].T) if kind == "kernel" else arr[i].copy()
    return out

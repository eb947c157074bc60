"""The Gemma 2 and Gemma 3 (text) decoders in Flax linen, on the shared blocks of `layers`.

What sets Gemma apart from Llama, each done as transformers' PyTorch code does it:

* RMSNorm multiplies by ``1 + w`` (the checkpoint stores ``w``, zeros at init), in float32;
* "sandwich" norms: every layer normalises the attention and MLP inputs *and* outputs
  (``input_layernorm``, ``post_attention_layernorm``, ``pre_feedforward_layernorm``,
  ``post_feedforward_layernorm``);
* the embedding is scaled by ``sqrt(hidden_size)``, the factor cast to the compute dtype first;
* a GeGLU MLP (``down(act(gate(x)) * up(x))`` with ``hidden_activation``, ``gelu_pytorch_tanh``);
* attention scores scaled by ``query_pre_attn_scalar ** -0.5``; ``head_dim`` independent of
  ``hidden_size / num_attention_heads``;
* Gemma 2: attention logits soft-capped, ``c * tanh(s / c)`` with ``attn_logit_softcapping``
  (Gemma 3's PyTorch attention does not apply it: the field is kept but has no effect there);
* both: final logits soft-capped with ``final_logit_softcapping`` (when set);
* Gemma 3: per-head RMSNorm of queries and keys (``q_norm``/``k_norm``) before the rotary embedding;
* sliding-window layers (the last ``sliding_window`` tokens, counted by sequence slot) alternating
  with global layers as ``layer_types`` says; Gemma 3 gives each kind its own rotary embedding
  (``rope_parameters["sliding_attention"]``/``["full_attention"]``);
* tied input/output embeddings by default.

The layers run as one ``nn.scan`` (one compiled layer): the per-layer difference, "is this a
sliding layer", enters as a scanned boolean, and each layer picks its rotary table and builds its
mask (causal, padding, and the window when sliding) from it.

Parameter tree of `GemmaForCausalLM` (``L`` layers, ``D`` hidden, ``F`` intermediate, ``N``/``K``
query/KV heads of size ``H``, ``V`` vocab); `GemmaModel` (the ``"base"`` head) is the ``model``
subtree::

    model/embed_tokens/embedding                         (V, D)
    model/layers/input_layernorm/scale                   (L, D)
    model/layers/self_attn/q_proj/kernel                 (L, D, N*H)   (+ bias with attention_bias)
    model/layers/self_attn/k_proj/kernel                 (L, D, K*H)   (+ bias)
    model/layers/self_attn/v_proj/kernel                 (L, D, K*H)   (+ bias)
    model/layers/self_attn/o_proj/kernel                 (L, N*H, D)   (+ bias)
    model/layers/self_attn/q_norm/scale                  (L, H)        (Gemma 3)
    model/layers/self_attn/k_norm/scale                  (L, H)        (Gemma 3)
    model/layers/post_attention_layernorm/scale          (L, D)
    model/layers/pre_feedforward_layernorm/scale         (L, D)
    model/layers/mlp/gate_proj/kernel                    (L, D, F)
    model/layers/mlp/up_proj/kernel                      (L, D, F)
    model/layers/mlp/down_proj/kernel                    (L, F, D)
    model/layers/post_feedforward_layernorm/scale        (L, D)
    model/norm/scale                                     (D,)
    lm_head/kernel                                       (D, V)        (absent with tie_word_embeddings)

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lora_jax.models.family import build, init_params
  >>> cfg = from_hf_config({"model_type": "gemma3_text", "vocab_size": 97, "hidden_size": 32,
  ...                       "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
  ...                       "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 4,
  ...                       "layer_types": ["sliding_attention", "full_attention"]})
  >>> model = build(cfg)
  >>> model.apply({"params": init_params(model, jax.random.key(0))}, jnp.zeros((1, 8), jnp.int32)).shape
  (1, 8, 97)
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import layers as ly
from .decoder import DecoderForCausalLM, DecoderModel
from .family import Family, Leaf, strip_prefix

__all__ = ["GemmaConfig", "GemmaModel", "GemmaForCausalLM", "from_hf_config", "FAMILY", "MODEL_TYPES",
           "LAYER_TYPES"]

MODEL_TYPES = ("gemma2", "gemma3_text")
LAYER_TYPES = ly.LAYER_TYPES

# transformers' defaults where the two configs differ (the dataclass defaults are Gemma 3's)
_DEFAULTS = {
    "gemma2": dict(vocab_size=256000, max_position_embeddings=8192, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0),
    "gemma3_text": dict(vocab_size=262208, max_position_embeddings=131072, final_logit_softcapping=None,
                        attn_logit_softcapping=None),
}
# Gemma 2: every other layer slides (pattern 2); Gemma 3: five sliding, one global (pattern 6)
_DEFAULT_PATTERN = {"gemma2": 2, "gemma3_text": 6}
_DEFAULT_THETA = {"gemma2": {"full_attention": 10000.0, "sliding_attention": 10000.0},
                  "gemma3_text": {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}}


def _check_rope_entry(rope: Mapping[str, Any], what: str) -> dict:
    """One flat rope dict normalised by `layers.rope_parameters` (a ValueError for unsupported types);
    a partial rotary factor is refused (Gemma's rotary code rotates whole heads)."""
    out = ly.rope_parameters({"rope_parameters": dict(rope)})
    prf = out.get("partial_rotary_factor")
    if prf is not None and float(prf) != 1.0:
        raise ValueError(f"{what}: partial_rotary_factor={prf} is not supported by the Gemma family")
    return out


# -------------------------------------------------------------------------------------------
# Config
# -------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Hyper-parameters of a Gemma 2 / Gemma 3 text decoder (hashable: usable as a static ``jit`` argument).

    Field names and defaults are transformers' (``Gemma3TextConfig``'s; `from_hf_config` uses
    ``Gemma2Config``'s for ``model_type="gemma2"``). Additions: ``dtype`` (compute),
    ``param_dtype``, ``attention_impl`` (None: cuDNN on a GPU in bf16/fp16 where it applies, else
    XLA; Gemma 2's soft-capped attention always runs in XLA) and ``remat_policy`` (None, a name in
    `layers.REMAT_POLICIES` or a ``jax.checkpoint_policies`` callable).

    ``layer_types`` is a tuple of ``"sliding_attention"``/``"full_attention"`` (default:
    transformers' rule for the model type). ``rope_parameters`` is stored frozen (sorted item
    tuples): for Gemma 2 one flat dict for every layer, for Gemma 3 one per layer type
    (``{"full_attention": {...}, "sliding_attention": {...}}``); `rope_for` returns the dict of a
    layer type. ``attn_logit_softcapping`` is applied by Gemma 2 only, as in transformers.

    Example:
      >>> cfg = GemmaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
      ...                   num_hidden_layers=6)
      >>> cfg.layer_types.count("full_attention"), cfg.rope_for("full_attention")["rope_theta"]
      (1, 1000000.0)
    """

    vocab_size: int = 262208
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: Optional[int] = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    query_pre_attn_scalar: float = 256
    sliding_window: Optional[int] = 4096
    layer_types: Any = None
    rope_parameters: Any = None
    final_logit_softcapping: Optional[float] = None
    attn_logit_softcapping: Optional[float] = None
    initializer_range: float = 0.02
    model_type: str = "gemma3_text"
    bos_token_id: Optional[int] = 2
    eos_token_id: Any = 1
    pad_token_id: Optional[int] = 0
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    attention_impl: Optional[str] = None
    remat_policy: Any = None
    scan_unroll: int = 1

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        name = type(self).__name__
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"{name}.model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"{name}.{f} must be a positive integer, got {v!r}")
            set_(f, int(v))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{name}: num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim is None:
            set_("head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, (int, np.integer)) \
                or self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"{name}.head_dim must be a positive even integer (rotary halves), got {self.head_dim!r}")
        set_("head_dim", int(self.head_dim))
        set_("dtype", ly.canon_dtype(self.dtype, f"{name}.dtype"))
        set_("param_dtype", ly.canon_dtype(self.param_dtype, f"{name}.param_dtype"))
        if self.attention_impl not in ly.ATTENTION_IMPLS:
            raise ValueError(f"{name}.attention_impl must be one of {ly.ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.hidden_activation not in ly.ACTIVATIONS:
            raise ValueError(f"{name}.hidden_activation must be one of {sorted(ly.ACTIVATIONS)}, "
                             f"got {self.hidden_activation!r}")
        ly.check_remat_policy(self.remat_policy, f"{name}.remat_policy")
        object.__setattr__(self, "scan_unroll", ly.positive_int(self.scan_unroll, f"{name}.scan_unroll"))
        for f in ("query_pre_attn_scalar", "rms_norm_eps"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not v > 0:
                raise ValueError(f"{name}.{f} must be a positive number, got {v!r}")
        for f in ("final_logit_softcapping", "attn_logit_softcapping"):
            v = getattr(self, f)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not v > 0):
                raise ValueError(f"{name}.{f} must be None or a positive number, got {v!r}")
        if isinstance(self.eos_token_id, (list, tuple)):
            set_("eos_token_id", tuple(int(t) for t in self.eos_token_id))

        types = self.layer_types
        if types is None:
            types = ly.layer_types_by_pattern(self.num_hidden_layers, _DEFAULT_PATTERN[self.model_type])
        sw = self.sliding_window
        if sw is not None and (isinstance(sw, bool) or not isinstance(sw, (int, np.integer)) or sw <= 0):
            raise ValueError(f"{name}.sliding_window must be None or a positive integer, got {sw!r}")
        set_("layer_types", ly.check_layer_types(types, self.num_hidden_layers, sw, name))
        set_("sliding_window", None if sw is None else int(sw))

        rp = self.rope_parameters
        theta = _DEFAULT_THETA[self.model_type]
        if self.model_type == "gemma2":
            # a dict, or its `layers.freeze` form (sorted item tuples) when a config is replaced
            rp = {"rope_type": "default", "rope_theta": theta["full_attention"]} if rp is None else dict(rp)
            if any(k in LAYER_TYPES for k in rp):
                raise ValueError(f"{name}.rope_parameters: gemma2 uses one rotary embedding for all layers; "
                                 f"got per-layer-type entries {sorted(rp)}")
            rp.setdefault("rope_theta", theta["full_attention"])
            set_("rope_parameters", ly.freeze(_check_rope_entry(rp, f"{name}.rope_parameters")))
        else:
            rp = {} if rp is None else dict(rp)
            flat = sorted(k for k in rp if k not in LAYER_TYPES)
            if flat:
                raise ValueError(f"{name}.rope_parameters: gemma3_text expects one entry per layer type "
                                 f"{LAYER_TYPES}, got keys {sorted(rp)}")
            out = {}
            for lt in LAYER_TYPES:
                entry = dict(rp.get(lt) or {"rope_type": "default"})  # a dict or its frozen form
                entry.setdefault("rope_theta", theta[lt])
                out[lt] = _check_rope_entry(entry, f"{name}.rope_parameters[{lt!r}]")
            set_("rope_parameters", ly.freeze(out))

    def rope_for(self, layer_type: str) -> dict:
        """The flat rotary-embedding dict (``rope_type``, ``rope_theta``, ...) of ``layer_type``."""
        if layer_type not in LAYER_TYPES:
            raise ValueError(f"layer_type must be one of {LAYER_TYPES}, got {layer_type!r}")
        rp = dict(self.rope_parameters)
        if self.model_type == "gemma3_text":
            rp = dict(rp[layer_type])
        return rp

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """``eos_token_id`` as a tuple (empty when None)."""
        e = self.eos_token_id
        return () if e is None else (e if isinstance(e, tuple) else (int(e),))

    def replace(self, **changes) -> "GemmaConfig":
        """A copy with some fields changed (``cfg.replace(dtype="bfloat16")``)."""
        return dataclasses.replace(self, **changes)

    def to_hf_config(self) -> dict:
        """The ``config.json`` dict transformers 5 rebuilds this model from (no ``architectures``)."""

        def plain(rope):
            return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(rope).items()}

        if self.model_type == "gemma2":
            rope = plain(self.rope_parameters)
        else:
            rope = {lt: plain(self.rope_for(lt)) for lt in LAYER_TYPES}
        q = self.query_pre_attn_scalar
        return dict(
            model_type=self.model_type, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim, hidden_activation=self.hidden_activation,
            max_position_embeddings=self.max_position_embeddings, initializer_range=self.initializer_range,
            rms_norm_eps=self.rms_norm_eps, tie_word_embeddings=self.tie_word_embeddings,
            attention_bias=self.attention_bias, attention_dropout=0.0,
            query_pre_attn_scalar=int(q) if float(q).is_integer() else q,
            sliding_window=self.sliding_window, layer_types=list(self.layer_types), rope_parameters=rope,
            final_logit_softcapping=self.final_logit_softcapping, attn_logit_softcapping=self.attn_logit_softcapping,
            use_bidirectional_attention=False, bos_token_id=self.bos_token_id, pad_token_id=self.pad_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            dtype={"bfloat16": "bfloat16", "float16": "float16"}.get(self.param_dtype.name, "float32"),
        )


_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "hidden_activation", "max_position_embeddings", "rms_norm_eps",
           "tie_word_embeddings", "attention_bias", "query_pre_attn_scalar", "sliding_window",
           "final_logit_softcapping", "attn_logit_softcapping", "initializer_range", "bos_token_id", "eos_token_id",
           "pad_token_id")


def from_hf_config(d: Mapping[str, Any]) -> GemmaConfig:
    """A `GemmaConfig` from a transformers ``config.json`` dict (``model_type`` ``gemma2`` or ``gemma3_text``).

    Missing fields take transformers' defaults for the model type. Reads both config spellings:
    ``layer_types``, or the older ``sliding_window_pattern`` (Gemma 3) / every-other-layer rule
    (Gemma 2); transformers 5's ``rope_parameters`` (Gemma 3: keyed by layer type), or the older
    ``rope_theta`` (global layers) + ``rope_local_base_freq`` (Gemma 3's sliding layers) +
    ``rope_scaling`` (Gemma 3: the global layers only).

    ``attention_dropout`` is not read: these modules have no dropout (inference logits are the
    same; training with lora_jax runs without attention dropout).

    Raises:
      ValueError: for another model type, ``use_bidirectional_attention`` (not supported), a
        non-causal config, an unsupported rope type or partial rotary factor, unknown layer types,
        sliding layers without a ``sliding_window``, an unknown ``hidden_activation``.

    Example:
      >>> cfg = from_hf_config({"model_type": "gemma3_text", "num_hidden_layers": 4, "sliding_window_pattern": 2,
      ...                       "rope_theta": 1e6, "rope_local_base_freq": 1e4,
      ...                       "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
      >>> cfg.layer_types[:2], cfg.rope_for("full_attention")["rope_type"]
      (('sliding_attention', 'full_attention'), 'linear')
    """
    d = dict(d)
    mt = d.get("model_type")
    if mt not in MODEL_TYPES:
        raise ValueError(f"gemma: model_type must be one of {MODEL_TYPES}, got {mt!r}")
    if d.get("use_bidirectional_attention"):
        raise ValueError(f"{mt}: use_bidirectional_attention={d['use_bidirectional_attention']!r} is not supported "
                         f"(only causal attention)")
    if d.get("is_causal") is False:
        raise ValueError(f"{mt}: is_causal=False is not supported (only causal attention)")
    defaults = {f.name: f.default for f in dataclasses.fields(GemmaConfig)}
    defaults.update(_DEFAULTS[mt])
    kw = {f: d[f] if f in d else defaults[f] for f in _FIELDS}
    n = kw["num_hidden_layers"]
    types = d.get("layer_types")
    if types is None:
        pattern = d.get("sliding_window_pattern", _DEFAULT_PATTERN[mt]) if mt == "gemma3_text" else 2
        if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern <= 0:
            raise ValueError(f"{mt}: sliding_window_pattern must be a positive integer, got {pattern!r}")
        types = ly.layer_types_by_pattern(n if isinstance(n, int) else 0, pattern)
    kw["layer_types"] = types
    prf = d.get("partial_rotary_factor")
    if prf is not None and float(prf) != 1.0:
        raise ValueError(f"{mt}: partial_rotary_factor={prf} is not supported by the Gemma family")
    theta = _DEFAULT_THETA[mt]
    if mt == "gemma2":
        rp = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
        rp.setdefault("rope_theta", d.get("rope_theta", theta["full_attention"]))
    else:
        given = d.get("rope_parameters")
        if given is not None and not isinstance(given, Mapping):
            raise ValueError(f"{mt}: rope_parameters must be a dict keyed by layer type, got {given!r}")
        rp = copy.deepcopy(dict(given or {}))
        flat = sorted(k for k in rp if k not in LAYER_TYPES)
        if flat and not all(isinstance(rp.get(lt), Mapping) for lt in LAYER_TYPES):
            raise ValueError(f"{mt}: rope_parameters must be keyed by layer type {LAYER_TYPES} (transformers ignores "
                             f"flat entries such as {flat}), got {given!r}")
        rp = {lt: rp[lt] for lt in LAYER_TYPES if lt in rp}  # flat entries beside both keyed ones are unused
        full = dict(rp.get("full_attention") or {"rope_type": "default"})
        full.update(d.get("rope_scaling") or {})
        full.setdefault("rope_theta", d.get("rope_theta", theta["full_attention"]))
        slide = dict(rp.get("sliding_attention") or {"rope_type": "default"})
        slide.setdefault("rope_theta", d.get("rope_local_base_freq", theta["sliding_attention"]))
        rp.update(full_attention=full, sliding_attention=slide)
    kw["rope_parameters"] = rp
    return GemmaConfig(model_type=mt, **kw)


# -------------------------------------------------------------------------------------------
# Modules
# -------------------------------------------------------------------------------------------
def _dense(c: GemmaConfig, features: int, name: str) -> nn.Dense:
    return ly.dense(features, use_bias=c.attention_bias, name=name, dtype=c.dtype, param_dtype=c.param_dtype,
                    std=c.initializer_range)


def _norm(c: GemmaConfig, name: str) -> ly.RMSNorm:
    return ly.RMSNorm(c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype, gemma=True, name=name)


class GemmaAttention(nn.Module):
    """Grouped-query attention (Gemma 3: q/k RMSNorm), its rotary table and mask chosen by the caller."""

    config: GemmaConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache, cache_index):
        c = self.config
        b, t, _ = x.shape
        n, k, h = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q = _dense(c, n * h, "q_proj")(x).reshape(b, t, n, h)
        kk = _dense(c, k * h, "k_proj")(x).reshape(b, t, k, h)
        v = _dense(c, k * h, "v_proj")(x).reshape(b, t, k, h)
        if c.model_type == "gemma3_text":
            q, kk = _norm(c, "q_norm")(q), _norm(c, "k_norm")(kk)
        q, kk = ly.apply_rope(q, cos, sin), ly.apply_rope(kk, cos, sin)
        softcap = c.attn_logit_softcapping if c.model_type == "gemma2" else None
        scale = float(c.query_pre_attn_scalar) ** -0.5
        if cache is None:
            out = ly.attention(q, kk, v, mask=mask, causal=True, scale=scale, softcap=softcap,
                               impl=ly.attention_impl(c.attention_impl, c.dtype, h))
            new_cache = None
        else:
            idx = (0, cache_index, 0, 0)
            kc = jax.lax.dynamic_update_slice(cache["k"], kk.astype(cache["k"].dtype), idx)
            vc = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), idx)
            out = ly.attention(q, kc.astype(q.dtype), vc.astype(q.dtype), mask=mask, causal=False, scale=scale,
                               softcap=softcap, impl="xla")
            new_cache = {"k": kc, "v": vc}
        return _dense(c, c.hidden_size, "o_proj")(out.reshape(b, t, n * h)), new_cache


class GemmaMLP(nn.Module):
    """GeGLU: ``down(act(gate(x)) * up(x))``."""

    config: GemmaConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        mk = functools.partial(ly.dense, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype,
                               std=c.initializer_range)
        g = mk(c.intermediate_size, name="gate_proj")(x)
        u = mk(c.intermediate_size, name="up_proj")(x)
        return mk(c.hidden_size, name="down_proj")(ly.ACTIVATIONS[c.hidden_activation](g) * u)


class GemmaDecoderLayer(nn.Module):
    """One sandwich-norm decoder layer, shaped for ``nn.scan``.

    ``(h, is_sliding, cache, *broadcast) -> (h, cache)``: ``is_sliding`` (a scanned boolean)
    selects the sliding rotary table and the windowed mask.
    """

    config: GemmaConfig

    @nn.compact
    def __call__(self, h, is_sliding, cache, cos_full, sin_full, cos_slide, sin_slide, kv_mask, cache_index):
        c = self.config
        t = h.shape[1]
        cos = jnp.where(is_sliding, cos_slide, cos_full)
        sin = jnp.where(is_sliding, sin_slide, sin_full)
        mask = ly.layer_mask(kv_mask, cache, cache_index, t, jnp.where(is_sliding, c.sliding_window or 0, 0))
        a, new_cache = GemmaAttention(c, name="self_attn")(_norm(c, "input_layernorm")(h), cos, sin, mask, cache,
                                                           cache_index)
        h = h + _norm(c, "post_attention_layernorm")(a)
        f = GemmaMLP(c, name="mlp")(_norm(c, "pre_feedforward_layernorm")(h))
        return h + _norm(c, "post_feedforward_layernorm")(f), new_cache


class GemmaModel(DecoderModel):
    """The Gemma decoder without a head (``Gemma2Model`` / ``Gemma3TextModel``; called as
    `decoder.DecoderModel`): the embedding scaled by ``sqrt(hidden_size)``, the scanned layers
    (each told whether it slides, with both rotary tables) and the final ``1 + w`` RMSNorm.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> cfg = GemmaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      ...                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4)
      >>> m = GemmaModel(cfg)
      >>> m.apply(m.init(jax.random.key(0), jnp.zeros((1, 5), jnp.int32)), jnp.zeros((1, 5), jnp.int32)).shape
      (1, 5, 32)
    """

    config: GemmaConfig
    decoder_layer = GemmaDecoderLayer
    layer_in_axes = (0, 0) + (nn.broadcast,) * 6

    def final_norm(self) -> nn.Module:
        c = self.config
        return ly.RMSNorm(c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype, gemma=True)

    def embed(self, input_ids):
        h = self.embed_tokens(input_ids)
        return h * jnp.asarray(math.sqrt(self.config.hidden_size), jnp.float32).astype(h.dtype)

    def layer_args(self, attention_mask, positions, cache, cache_index, t, m):
        c = self.config
        full, slide = c.rope_for("full_attention"), c.rope_for("sliding_attention")
        tables = {"full_attention": ly.rope_tables(full, c.head_dim, c.max_position_embeddings, positions, c.dtype)}
        tables["sliding_attention"] = tables["full_attention"] if slide == full else ly.rope_tables(
            slide, c.head_dim, c.max_position_embeddings, positions, c.dtype)
        is_sliding = jnp.asarray([lt == "sliding_attention" for lt in c.layer_types])
        return (is_sliding, cache, *tables["full_attention"], *tables["sliding_attention"], attention_mask,
                cache_index)


class GemmaForCausalLM(DecoderForCausalLM):
    """`GemmaModel` and the language-model head (``Gemma2ForCausalLM`` / ``Gemma3ForCausalLM``;
    called as `decoder.DecoderForCausalLM`), logits soft-capped with ``final_logit_softcapping``
    when set.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> cfg = GemmaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      ...                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
      ...                   model_type="gemma2", final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
      >>> m = GemmaForCausalLM(cfg)
      >>> m.apply(m.init(jax.random.key(0), jnp.zeros((1, 5), jnp.int32)), jnp.zeros((1, 5), jnp.int32)).shape
      (1, 5, 50)
    """

    config: GemmaConfig
    base_model = GemmaModel


# -------------------------------------------------------------------------------------------
# Checkpoint table
# -------------------------------------------------------------------------------------------
def leaves(config: GemmaConfig, head: str) -> list[Leaf]:
    """The checkpoint table of ``head`` (``"causal_lm"`` or ``"base"``) for ``config``."""
    if head not in ("causal_lm", "base"):
        raise ValueError(f"gemma has the heads 'causal_lm' and 'base', got {head!r}")
    d, f, h = config.hidden_size, config.intermediate_size, config.head_dim
    nh, kh = config.num_attention_heads * h, config.num_key_value_heads * h
    bias = config.attention_bias

    def layer(path, hf, shape, transpose=False, role=None):
        return Leaf(f"model/layers/{path}", f"model.layers.{{i}}.{hf}", shape, transpose, role=role)

    out = [Leaf("model/embed_tokens/embedding", "model.embed_tokens.weight", (config.vocab_size, d), role="embedding")]
    out.append(layer("input_layernorm/scale", "input_layernorm.weight", (d,)))
    for name, (fin, fout) in (("q_proj", (d, nh)), ("k_proj", (d, kh)), ("v_proj", (d, kh)), ("o_proj", (nh, d))):
        out.append(layer(f"self_attn/{name}/kernel", f"self_attn.{name}.weight", (fin, fout), True,
                         "row" if name == "o_proj" else "column"))
        if bias:
            out.append(layer(f"self_attn/{name}/bias", f"self_attn.{name}.bias", (fout,)))
    if config.model_type == "gemma3_text":
        out += [layer("self_attn/q_norm/scale", "self_attn.q_norm.weight", (h,)),
                layer("self_attn/k_norm/scale", "self_attn.k_norm.weight", (h,))]
    out += [layer("post_attention_layernorm/scale", "post_attention_layernorm.weight", (d,)),
            layer("pre_feedforward_layernorm/scale", "pre_feedforward_layernorm.weight", (d,)),
            layer("mlp/gate_proj/kernel", "mlp.gate_proj.weight", (d, f), True, "column"),
            layer("mlp/up_proj/kernel", "mlp.up_proj.weight", (d, f), True, "column"),
            layer("mlp/down_proj/kernel", "mlp.down_proj.weight", (f, d), True, "row"),
            layer("post_feedforward_layernorm/scale", "post_feedforward_layernorm.weight", (d,)),
            Leaf("model/norm/scale", "model.norm.weight", (d,))]
    if not config.tie_word_embeddings:
        out.append(Leaf("lm_head/kernel", "lm_head.weight", (d, config.vocab_size), True, role="head"))
    return out if head == "causal_lm" else strip_prefix(out, "model/", "model.")


def _ignore(config: GemmaConfig) -> tuple:
    """Buffers some checkpoints carry (rotary frequencies, the embedding scale), and a stored
    ``lm_head.weight`` under tied embeddings."""
    out = (r"rotary_emb\.[A-Za-z_]*inv_freq$", r"embed_tokens\.embed_scale$")
    return out + ((r"^lm_head\.weight$",) if config.tie_word_embeddings else ())


FAMILY = Family(
    name="gemma",
    torch_classes={"gemma2": {"causal_lm": "Gemma2ForCausalLM", "base": "Gemma2Model"},
                   "gemma3_text": {"causal_lm": "Gemma3ForCausalLM", "base": "Gemma3TextModel"}},
    config_from_hf=from_hf_config,
    modules={"causal_lm": GemmaForCausalLM, "base": GemmaModel},
    leaves=leaves,
    peft_targets={"gemma2": ("q_proj", "v_proj"), "gemma3_text": ("q_proj", "v_proj")},
    attention=("q_proj", "k_proj", "v_proj", "o_proj"),
    ignore=_ignore,
)

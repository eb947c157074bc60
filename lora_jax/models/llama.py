"""The Llama-style decoder family: Llama 2 / 3 / 3.1–3.3, Mistral, Qwen2 / Qwen2.5, Qwen3, OLMo 2.

Built for LoRA training through ``lora.wrap(model.apply)``: the model code knows nothing of LoRA,
its layers run under ``nn.scan`` (one compiled layer, weights stacked on a leading layer axis),
attention goes through `layers.attention` (cuDNN flash attention on a GPU in bf16/fp16, XLA
elsewhere), RMSNorm is computed in float32, and an optional ``nn.remat`` policy wraps the scanned
block.

Parameter tree (``L`` layers, ``D`` hidden, ``F`` intermediate, ``N``/``K`` query/KV heads of
size ``H``, ``V`` vocab); every projection kernel is a plain 2-D Flax Dense kernel ``(in, out)``
per layer, stacked to ``(L, in, out)``::

    model/embed_tokens/embedding             (V, D)
    model/layers/input_layernorm/scale       (L, D)        (pre-norm; OLMo 2 has none)
    model/layers/self_attn/q_proj/kernel     (L, D, N*H)   (+ bias (L, N*H): Qwen2, attention_bias)
    model/layers/self_attn/k_proj/kernel     (L, D, K*H)   (+ bias)
    model/layers/self_attn/v_proj/kernel     (L, D, K*H)   (+ bias)
    model/layers/self_attn/o_proj/kernel     (L, N*H, D)   (+ bias with attention_bias)
    model/layers/self_attn/q_norm/scale      (L, H)        (Qwen3; OLMo 2: (L, N*H))
    model/layers/self_attn/k_norm/scale      (L, H)        (Qwen3; OLMo 2: (L, K*H))
    model/layers/post_attention_layernorm/scale  (L, D)    (OLMo 2: of the attention's output)
    model/layers/post_feedforward_layernorm/scale  (L, D)  (OLMo 2: of the MLP's output)
    model/layers/mlp/gate_proj/kernel        (L, D, F)     (+ bias with mlp_bias)
    model/layers/mlp/up_proj/kernel          (L, D, F)
    model/layers/mlp/down_proj/kernel        (L, F, D)
    model/norm/scale                         (D,)
    lm_head/kernel                           (D, V)        (absent with tie_word_embeddings)

Target the projections with ``lora.Rules([...], stack_axes=1)`` or `lora_jax.hf.rules_for`; the
PyTorch names are in the family's checkpoint table (`FAMILY`, `lora_jax.models.family.Leaf`).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lora_jax.models.family import init_params
  >>> cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
  ...                   num_attention_heads=4, num_key_value_heads=2)
  >>> model = LlamaForCausalLM(cfg)
  >>> model.apply({"params": init_params(model, jax.random.key(0))}, jnp.zeros((1, 8), jnp.int32)).shape
  (1, 8, 97)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, ClassVar, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .decoder import DecoderForCausalLM, DecoderModel
from .family import Family, Leaf, strip_prefix
from .layers import (ACTIVATIONS, ATTENTION_IMPLS, RMSNorm, apply_rope, attention, attention_impl, canon_dtype,
                     check_layer_types, check_remat_policy, decoder_mask, layer_mask, check_rope, dense, freeze, positive_int,
                     rope_parameters, rope_tables, thaw)

__all__ = ["LlamaConfig", "LlamaForCausalLM", "LlamaModel", "DecoderLayer", "Attention", "from_hf_config", "config_problem", "rms_norm",
           "decoder_leaves", "ignored_keys", "decoder_config_kwargs",
           "FAMILY", "MODEL_TYPES"]

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "olmo2")
_CLASSES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "olmo2": "Olmo2"}
NORM_PLACEMENTS = ("pre", "post")  # RMSNorm of each block's input (Llama) or of its output (OLMo 2)
QK_NORMS = (False, True, "all")  # q/k RMSNorm: none, per head (Qwen3), over all heads (OLMo 2)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-style decoder (hashable: usable as a static ``jit`` argument).

    Field names follow transformers' configs; the additions are ``qkv_bias``/``o_bias`` (Qwen2 has
    q/k/v biases only, Llama's ``attention_bias`` sets both), ``qk_norm`` (RMSNorm of queries and
    keys before RoPE: True per head as Qwen3, ``"all"`` over all heads' projection as OLMo 2),
    ``norm_placement`` (``"pre"``: each block normalizes its input; ``"post"``: its output, before
    the residual add, as OLMo 2), ``dtype`` (compute), ``param_dtype``, ``attention_impl``
    (None = cuDNN on a GPU in bf16/fp16 where it applies, XLA otherwise; ``"xla"``; ``"cudnn"``)
    ``remat_policy`` (a name from `layers.REMAT_POLICIES`, a ``jax.checkpoint_policies``
    callable, or None) and ``scan_unroll`` (decoder layers per iteration of the layer scan; the
    number of layers unrolls it completely: no per-layer slicing of stacked weights and
    activations, at the price of compiling every layer).

    ``rope_scaling`` is a dict as in transformers (``{"rope_type": "llama3", "factor": 8, ...}``;
    types: default, linear, dynamic, llama3, yarn, longrope), stored as sorted item tuples so the
    config stays hashable. ``sliding_window`` limits attention to the last ``sliding_window``
    positions on every layer (Mistral; Qwen with ``use_sliding_window``), or only on the layers
    ``layer_types`` names ``"sliding_attention"`` (a tuple, one per layer; GPT-OSS alternates).
    ``attention_sinks`` gives each head a learned sink logit (GPT-OSS; `layers.attention`).

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
    qk_norm: Any = False
    norm_placement: str = "pre"
    hidden_act: str = "silu"
    sliding_window: Optional[int] = None
    layer_types: Any = None
    attention_sinks: bool = False
    initializer_range: float = 0.02
    model_type: str = "llama"
    bos_token_id: Optional[int] = None
    eos_token_id: Any = None
    pad_token_id: Optional[int] = None
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    attention_impl: Optional[str] = None
    remat_policy: Any = None
    scan_unroll: int = 1
    model_types: ClassVar[tuple] = MODEL_TYPES  # a subclass serving other model types widens it

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {v!r}")
            set_(name, int(v))
        if self.model_type not in self.model_types:
            raise ValueError(f"{type(self).__name__}.model_type must be one of {self.model_types}, "
                             f"got {self.model_type!r}")
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
        set_("dtype", canon_dtype(self.dtype, "LlamaConfig.dtype"))
        set_("param_dtype", canon_dtype(self.param_dtype, "LlamaConfig.param_dtype"))
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"LlamaConfig.attention_impl must be one of {ATTENTION_IMPLS}, "
                             f"got {self.attention_impl!r}")
        if not any(self.qk_norm is q or (isinstance(q, str) and self.qk_norm == q) for q in QK_NORMS):
            raise ValueError(f"LlamaConfig.qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
        if self.norm_placement not in NORM_PLACEMENTS:
            raise ValueError(f"LlamaConfig.norm_placement must be one of {NORM_PLACEMENTS}, got {self.norm_placement!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"LlamaConfig.hidden_act must be one of {sorted(ACTIVATIONS)}, got {self.hidden_act!r}")
        check_remat_policy(self.remat_policy, "LlamaConfig.remat_policy")
        set_("scan_unroll", positive_int(self.scan_unroll, "LlamaConfig.scan_unroll"))
        if self.sliding_window is not None and (isinstance(self.sliding_window, bool) or int(self.sliding_window) <= 0):
            raise ValueError(f"LlamaConfig.sliding_window must be None or a positive integer, "
                             f"got {self.sliding_window!r}")
        if self.layer_types is not None:
            set_("layer_types", check_layer_types(self.layer_types, self.num_hidden_layers, self.sliding_window,
                                                  "LlamaConfig"))
        if isinstance(self.eos_token_id, (list, tuple)):
            set_("eos_token_id", tuple(int(t) for t in self.eos_token_id))
        rs = self.rope_scaling
        if rs is not None:
            rs = dict(rs)
            if "type" in rs and "rope_type" not in rs:
                rs["rope_type"] = rs.pop("type")
            set_("rope_scaling", freeze(rs))
        check_rope(self.rope, "LlamaConfig.rope_scaling")

    @property
    def rope(self) -> dict:
        """The flat rotary-embedding dict (`layers.rope_parameters`): ``rope_theta`` and the scaling."""
        return {"rope_type": "default", **(thaw(self.rope_scaling) or {}), "rope_theta": self.rope_theta}

    @property
    def rope_scaling_dict(self) -> Optional[dict]:
        """``rope_scaling`` as the dict transformers uses (None when absent)."""
        return thaw(self.rope_scaling)

    @property
    def layer_windows(self) -> Optional[tuple]:
        """Each layer's window (0: full attention) when ``layer_types`` is given, else None (every
        layer as ``sliding_window`` says)."""
        if self.layer_types is None:
            return None
        return tuple(self.sliding_window if t == "sliding_attention" else 0 for t in self.layer_types)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """``eos_token_id`` as a tuple (empty when None)."""
        e = self.eos_token_id
        return () if e is None else (e if isinstance(e, tuple) else (int(e),))

    def replace(self, **changes) -> "LlamaConfig":
        """A copy with some fields changed (``cfg.replace(dtype="bfloat16")``)."""
        return dataclasses.replace(self, **changes)

    def to_hf_config(self) -> dict:
        """The ``config.json`` dict transformers 5 builds this model from (``architectures`` aside)."""
        rope = {k: v for k, v in self.rope.items() if v is not None}
        d = dict(
            model_type=self.model_type, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps, rope_parameters=rope,
            max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=self.tie_word_embeddings,
            hidden_act=self.hidden_act, initializer_range=self.initializer_range,
            bos_token_id=self.bos_token_id, pad_token_id=self.pad_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            dtype={"bfloat16": "bfloat16", "float16": "float16"}.get(self.param_dtype.name, "float32"),
        )
        if self.model_type == "llama":
            d.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        elif self.model_type == "mistral":
            d.update(sliding_window=self.sliding_window)
        elif self.model_type == "olmo2":
            d.update(attention_bias=self.qkv_bias)
        else:  # qwen2, qwen3
            if self.model_type == "qwen3":
                d.update(attention_bias=self.qkv_bias)
            d.update(use_sliding_window=self.sliding_window is not None, sliding_window=self.sliding_window,
                     max_window_layers=0,
                     layer_types=["sliding_attention" if self.sliding_window else "full_attention"]
                     * self.num_hidden_layers)
        return d


def config_problem(field: str, value, why: str) -> str:
    return f"{field}={value!r} ({why})"


def decoder_config_kwargs(d: Mapping[str, Any], model_type: str, problems: list) -> dict:
    """The config fields every Llama-style decoder (the MoE families too) reads from a transformers
    ``config.json`` dict, with transformers' defaults; a feature not implemented here (a partial
    rotary factor) is appended to ``problems``."""
    rope = rope_parameters(d)
    if float(rope.pop("partial_rotary_factor", None) or 1.0) != 1.0:
        problems.append(config_problem("partial_rotary_factor", d.get("partial_rotary_factor"),
                                       "only full rotary embeddings in this family"))
    heads = d.get("num_attention_heads", 32)
    return dict(
        vocab_size=d.get("vocab_size", 32000), hidden_size=d.get("hidden_size", 4096),
        num_hidden_layers=d.get("num_hidden_layers", 32), num_attention_heads=heads,
        num_key_value_heads=d.get("num_key_value_heads") or heads, head_dim=d.get("head_dim") or None,
        rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(rope.pop("rope_theta")),
        rope_scaling=None if rope.get("rope_type") == "default" and len(rope) == 1 else rope,
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), hidden_act=d.get("hidden_act", "silu"),
        initializer_range=d.get("initializer_range", 0.02), model_type=model_type,
        bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"),
    )


def from_hf_config(hf: Mapping[str, Any], **overrides) -> LlamaConfig:
    """A `LlamaConfig` from a transformers ``config.json`` dict (``model_type`` llama, mistral,
    qwen2, qwen3 or olmo2), ``overrides`` applied.

    Reads transformers 5's ``rope_parameters`` as well as the older ``rope_theta`` +
    ``rope_scaling``. Every config field whose feature this model does not implement is named in
    one ValueError (never silently different logits).

    Example:
      >>> cfg = from_hf_config({"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4,
      ...                       "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 128,
      ...                       "vocab_size": 100}, dtype="bfloat16")
      >>> cfg.qkv_bias, cfg.o_bias
      (True, False)
    """
    d = dict(hf)
    mt = d.get("model_type", "llama")
    if mt not in MODEL_TYPES:
        raise ValueError(f"from_hf_config: model_type {mt!r} is not a Llama-style decoder; supported: {MODEL_TYPES}")
    problems = []
    kw = decoder_config_kwargs(d, mt, problems)
    kw.update(intermediate_size=d.get("intermediate_size", 11008))
    n = kw["num_hidden_layers"]
    if mt == "llama":
        kw.update(qkv_bias=bool(d.get("attention_bias", False)), o_bias=bool(d.get("attention_bias", False)),
                  mlp_bias=bool(d.get("mlp_bias", False)))
    elif mt == "mistral":
        if d.get("sliding_window"):
            kw.update(sliding_window=int(d["sliding_window"]))
    elif mt == "olmo2":
        bias = bool(d.get("attention_bias", False))
        kw.update(qkv_bias=bias, o_bias=bias, qk_norm="all", norm_placement="post")
    else:  # qwen2 (q/k/v biases), qwen3 (attention_bias on q/k/v/o, q/k norm)
        if mt == "qwen2":
            kw.update(qkv_bias=True)
        else:
            kw.update(qkv_bias=bool(d.get("attention_bias", False)), o_bias=bool(d.get("attention_bias", False)),
                      qk_norm=True)
        types = d.get("layer_types")
        if not types:
            sliding = bool(d.get("use_sliding_window", False)) and d.get("sliding_window")
            types = ["sliding_attention" if sliding and i >= d.get("max_window_layers", 28) else "full_attention"
                     for i in range(n)]
        if any(t not in ("sliding_attention", "full_attention") for t in types):
            problems.append(config_problem("layer_types", types, "only sliding_attention and full_attention"))
        elif len(set(types)) > 1:
            problems.append(config_problem("layer_types", types, "mixing sliding and full attention layers is not "
                                     "implemented in this family; all-sliding or all-full is"))
        elif types and types[0] == "sliding_attention":
            if not d.get("sliding_window"):
                problems.append(config_problem("sliding_window", d.get("sliding_window"), "sliding layers need a window"))
            else:
                kw.update(sliding_window=int(d["sliding_window"]))
    if problems:
        raise ValueError(f"from_hf_config: this {mt} config uses features lora_jax does not implement, so its "
                         "logits would differ from transformers': " + "; ".join(problems))
    kw.update(overrides)
    return LlamaConfig(**kw)


# -------------------------------------------------------------------------------------------
# Modules
# -------------------------------------------------------------------------------------------
def _dense(c: LlamaConfig, features: int, use_bias: bool, name: str) -> nn.Dense:
    return dense(features, use_bias=use_bias, name=name, dtype=c.dtype, param_dtype=c.param_dtype,
                 std=c.initializer_range)


def rms_norm(c: LlamaConfig, name: str) -> RMSNorm:
    return RMSNorm(c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype, name=name)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE; the KV cache is passed in and returned explicitly."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache, cache_index, window=None):
        """``window``: this layer's window (a traced scalar, 0 = full; `LlamaConfig.layer_windows`),
        when the layers differ; ``mask`` is then the attention mask ``(B, M)``, not yet combined."""
        c = self.config
        b, t, _ = x.shape
        n, k, h = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q = _dense(c, n * h, c.qkv_bias, "q_proj")(x).reshape(b, t, n, h)
        kk = _dense(c, k * h, c.qkv_bias, "k_proj")(x).reshape(b, t, k, h)
        v = _dense(c, k * h, c.qkv_bias, "v_proj")(x).reshape(b, t, k, h)
        if c.qk_norm == "all":
            q = rms_norm(c, "q_norm")(q.reshape(b, t, n * h)).reshape(b, t, n, h)
            kk = rms_norm(c, "k_norm")(kk.reshape(b, t, k * h)).reshape(b, t, k, h)
        elif c.qk_norm:
            q, kk = rms_norm(c, "q_norm")(q), rms_norm(c, "k_norm")(kk)
        q, kk = apply_rope(q, cos, sin), apply_rope(kk, cos, sin)
        sinks = self.param("sinks", nn.initializers.normal(c.initializer_range), (n,), c.param_dtype) \
            if c.attention_sinks else None
        fixed = c.sliding_window
        if window is not None:  # this layer's own mask: causal by slot, its window, the padding/documents
            mask, fixed = layer_mask(mask, cache, cache_index, t, window), None
        if cache is None:
            out = attention(q, kk, v, mask=mask, causal=True, window=fixed, sinks=sinks,
                            impl=attention_impl(c.attention_impl, c.dtype, h))
            new_cache = None
        else:
            idx = (0, cache_index, 0, 0)
            kc = jax.lax.dynamic_update_slice(cache["k"], kk.astype(cache["k"].dtype), idx)
            vc = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), idx)
            # the mask (causal by cache slot, padding, window) was built once by the caller
            out = attention(q, kc.astype(q.dtype), vc.astype(q.dtype), mask=mask, causal=False, sinks=sinks,
                            impl="xla")
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
        return _dense(c, c.hidden_size, c.mlp_bias, "down_proj")(ACTIVATIONS[c.hidden_act](g) * u)


class DecoderLayer(nn.Module):
    """One decoder layer, shaped for ``nn.scan``: ``(h, cache, *broadcast) -> (h, cache)``; pre-norm
    ``h + f(norm(h))``, or post-norm ``h + norm(f(h))`` (``norm_placement="post"``)."""

    config: LlamaConfig

    def mlp(self) -> nn.Module:
        """The layer's MLP, named ``mlp`` (a mixture-of-experts family returns its sparse block)."""
        return MLP(self.config, name="mlp")

    @nn.compact
    def __call__(self, h, cache, window, cos, sin, mask, cache_index):
        c = self.config
        if c.norm_placement == "post":
            a, new_cache = Attention(c, name="self_attn")(h, cos, sin, mask, cache, cache_index, window)
            h = h + rms_norm(c, "post_attention_layernorm")(a)
            return h + rms_norm(c, "post_feedforward_layernorm")(self.mlp()(h)), new_cache
        a, new_cache = Attention(c, name="self_attn")(rms_norm(c, "input_layernorm")(h), cos, sin, mask,
                                                      cache, cache_index, window)
        h = h + a
        h = h + self.mlp()(rms_norm(c, "post_attention_layernorm")(h))
        return h, new_cache


class LlamaModel(DecoderModel):
    """Embedding, the scanned decoder layers and the final norm (the ``"base"`` head; called as
    `decoder.DecoderModel`). A config with ``layer_types`` gives each layer its own window."""

    config: LlamaConfig
    decoder_layer = DecoderLayer  # the scanned layer (a mixture-of-experts family swaps in its own)
    layer_in_axes = (0, 0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast)

    def layer_args(self, attention_mask, positions, cache, cache_index, t, m):
        c = self.config
        windows = c.layer_windows
        if windows is None:  # one mask for every layer
            mask = decoder_mask(attention_mask, cache, cache_index, t, m, c.sliding_window)
        else:  # each layer combines the attention mask with its own window
            mask, windows = attention_mask, jnp.asarray(windows, jnp.int32)
        cos, sin = rope_tables(c.rope, c.head_dim, c.max_position_embeddings, positions, c.dtype)
        return cache, windows, cos, sin, mask, cache_index


class LlamaForCausalLM(DecoderForCausalLM):
    """The decoder with its output head (the ``"causal_lm"`` head; called as
    `decoder.DecoderForCausalLM`: logits, ``method="hidden"``/``"logits"``, a KV cache).

    ``attention_mask`` ``(B, T)`` (1 = token, 0 = padding; document ids ``1, 2, ...`` in packed
    rows) is combined with the causal mask; ``positions`` default to ``0..T-1`` (give
    ``cumsum(mask) - 1`` for left-padded rows, as transformers' ``generate`` does).
    """

    config: LlamaConfig
    base_model = LlamaModel  # the "base" head inside (a mixture-of-experts family swaps in its own)


# -------------------------------------------------------------------------------------------
# Checkpoint table
# -------------------------------------------------------------------------------------------
def _mlp_leaves(c: LlamaConfig, p: str, t: str) -> list[Leaf]:
    d, f = c.hidden_size, c.intermediate_size
    out = []
    for name, shape in (("gate_proj", (d, f)), ("up_proj", (d, f)), ("down_proj", (f, d))):
        out.append(Leaf(f"{p}mlp/{name}/kernel", f"{t}mlp.{name}.weight", shape, transpose=True,
                        role="row" if name == "down_proj" else "column"))
        if c.mlp_bias:
            out.append(Leaf(f"{p}mlp/{name}/bias", f"{t}mlp.{name}.bias", shape[1:]))
    return out


def decoder_leaves(c: LlamaConfig, head: str, mlp_leaves: Callable = _mlp_leaves) -> list[Leaf]:
    """The checkpoint table of a Llama-style decoder (embedding, attention, norms, head).

    ``mlp_leaves(c, p, t)`` gives each layer's MLP leaves, ``p`` our layer path prefix and ``t`` the
    PyTorch name prefix with ``{i}``; the dense SwiGLU by default, the MoE families pass theirs."""
    d = c.hidden_size
    nh, kh, hd = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.head_dim
    p, t = "model/layers/", "model.layers.{i}."
    norms = ("post_attention_layernorm", "post_feedforward_layernorm") if c.norm_placement == "post" else \
        ("input_layernorm", "post_attention_layernorm")
    out = [Leaf("model/embed_tokens/embedding", "model.embed_tokens.weight", (c.vocab_size, d), role="embedding")]
    out += [Leaf(f"{p}{n}/scale", f"{t}{n}.weight", (d,)) for n in norms]
    for name, shape, bias in (("q_proj", (d, nh), c.qkv_bias), ("k_proj", (d, kh), c.qkv_bias),
                              ("v_proj", (d, kh), c.qkv_bias), ("o_proj", (nh, d), c.o_bias)):
        out.append(Leaf(f"{p}self_attn/{name}/kernel", f"{t}self_attn.{name}.weight", shape, transpose=True,
                        role="row" if name == "o_proj" else "column"))
        if bias:
            out.append(Leaf(f"{p}self_attn/{name}/bias", f"{t}self_attn.{name}.bias", shape[1:]))
    if c.attention_sinks:
        out.append(Leaf(p + "self_attn/sinks", t + "self_attn.sinks", (c.num_attention_heads,)))
    if c.qk_norm:
        qs, ks = (nh, kh) if c.qk_norm == "all" else (hd, hd)
        out += [Leaf(p + "self_attn/q_norm/scale", t + "self_attn.q_norm.weight", (qs,)),
                Leaf(p + "self_attn/k_norm/scale", t + "self_attn.k_norm.weight", (ks,))]
    out += mlp_leaves(c, p, t)
    out.append(Leaf("model/norm/scale", "model.norm.weight", (d,)))
    if not c.tie_word_embeddings:
        out.append(Leaf("lm_head/kernel", "lm_head.weight", (d, c.vocab_size), transpose=True, role="head"))
    return out if head == "causal_lm" else strip_prefix(out, "model/", "model.")


def ignored_keys(c: LlamaConfig) -> tuple:
    """Checkpoint keys a Llama-style decoder does not read: rotary buffers some checkpoints carry,
    and a stored ``lm_head.weight`` when the head is tied to the embedding."""
    return (r"(^|\.)rotary_emb\.inv_freq$",) + ((r"^lm_head\.weight$",) if c.tie_word_embeddings else ())


FAMILY = Family(
    name="llama",
    torch_classes={mt: {"causal_lm": f"{cls}ForCausalLM", "base": f"{cls}Model"} for mt, cls in _CLASSES.items()},
    config_from_hf=from_hf_config,
    modules={"causal_lm": LlamaForCausalLM, "base": LlamaModel},
    leaves=decoder_leaves,
    peft_targets={**{mt: ("q_proj", "v_proj") for mt in MODEL_TYPES}, "olmo2": ()},  # PEFT has no olmo2 default
    attention=("q_proj", "k_proj", "v_proj", "o_proj"),
    ignore=ignored_keys,
)

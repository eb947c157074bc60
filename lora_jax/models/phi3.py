"""The Phi-3 family (Phi-3, Phi-3.5-mini, Phi-4-mini: ``model_type`` ``"phi3"``) in Flax linen.

Phi-3 is a Llama-shaped decoder whose projections are fused: one ``qkv_proj`` for the queries,
keys and values (grouped-query attention) and one ``gate_up_proj`` for the SwiGLU gate and up
projections. The fused kernels stay fused in our tree, as in the checkpoint, so a LoRA adapter on
``qkv_proj`` is one adapter as PEFT makes it (``lora.Rules(..., enable_lora=...)`` restricts it to
some of the q | k | v slices). Rotary embeddings may be partial (``partial_rotary_factor``,
0.75 in Phi-4-mini) and of type ``"longrope"`` (short/long per-frequency factors chosen by the
sequence length against ``original_max_position_embeddings``, and an attention factor);
``sliding_window`` limits attention as transformers does. No projection has a bias.

Parameter tree (``L`` layers, ``D`` hidden, ``F`` intermediate, ``N``/``K`` query/KV heads of
size ``H``, ``V`` vocab); per-layer leaves are stacked on a leading layer axis (``nn.scan``)::

    model/embed_tokens/embedding                (V, D)
    model/layers/input_layernorm/scale          (L, D)
    model/layers/self_attn/qkv_proj/kernel      (L, D, N*H + 2*K*H)   columns: q | k | v
    model/layers/self_attn/o_proj/kernel        (L, N*H, D)
    model/layers/post_attention_layernorm/scale (L, D)
    model/layers/mlp/gate_up_proj/kernel        (L, D, 2*F)           columns: gate | up
    model/layers/mlp/down_proj/kernel           (L, F, D)
    model/norm/scale                            (D,)
    lm_head/kernel                              (D, V)   (absent with tie_word_embeddings)

The ``"base"`` head (`Phi3Model`, PyTorch ``Phi3Model``) is the tree under ``model/``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lora_jax.models.family import init_params
  >>> cfg = Phi3Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
  ...                  num_attention_heads=4, num_key_value_heads=2)
  >>> model = Phi3ForCausalLM(cfg)
  >>> params = init_params(model, jax.random.key(0))
  >>> params["model"]["layers"]["self_attn"]["qkv_proj"]["kernel"].shape
  (2, 32, 64)
  >>> model.apply({"params": params}, jnp.zeros((1, 5), jnp.int32)).shape
  (1, 5, 97)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import layers
from .decoder import DecoderForCausalLM, DecoderModel
from .family import Family, Leaf, strip_prefix

__all__ = ["Phi3Config", "from_hf_config", "Phi3Model", "Phi3ForCausalLM", "FAMILY"]

# transformers' Phi3Config accepts these rope types; "su" and "yarn" are old spellings of longrope
_PHI3_ROPE_TYPES = ("default", "longrope")
_LONGROPE_ALIASES = ("su", "yarn")
# flags other configs use that transformers' Phi3 has no code for (a checkpoint with them is not a Phi-3)
_NO_BIAS_FLAGS = ("attention_bias", "mlp_bias", "lm_head_bias")


def _normalize_rope(rope: Any, original_max_position_embeddings: int, rotary_pairs: int) -> dict:
    """The flat rope dict transformers' Phi3Config ends with: defaults filled in, ``su``/``yarn``
    read as ``longrope``, ``original_max_position_embeddings`` taken from the config's field
    (transformers gives that field priority over the one inside the rope dict)."""
    what = "Phi3Config.rope_parameters"
    if rope is None:
        rope = {}
    elif not isinstance(rope, Mapping):
        rope = dict(rope)  # a frozen (sorted item tuple) form
    rope = {k: (list(v) if isinstance(v, tuple) else v) for k, v in rope.items()}
    nested = [k for k, v in rope.items() if isinstance(v, Mapping)]
    if nested:
        raise ValueError(f"{what}: Phi-3 has one rotary embedding for all layers; got per-layer-type entries {nested}")
    rope.setdefault("rope_theta", 10000.0)
    rope.setdefault("partial_rotary_factor", 1.0)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in _LONGROPE_ALIASES:
        kind = "longrope"
    rope["rope_type"] = kind
    rope.pop("type", None)
    if kind not in _PHI3_ROPE_TYPES:
        raise ValueError(f"{what}: rope_type {kind!r} is not supported for phi3; transformers' Phi3 accepts "
                         f"{list(_PHI3_ROPE_TYPES)} (and 'su'/'yarn' as old names of 'longrope')")
    out = layers.rope_parameters({"rope_parameters": rope})
    if kind == "longrope":
        out["original_max_position_embeddings"] = int(original_max_position_embeddings)
        for key in ("short_factor", "long_factor"):
            fac = out.get(key)
            if not isinstance(fac, (list, tuple)) or len(fac) != rotary_pairs or \
                    not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in fac):
                raise ValueError(f"{what}: longrope {key} must be a list of {rotary_pairs} numbers (rotary dim / 2), "
                                 f"got {fac!r}")
    return out


@dataclasses.dataclass(frozen=True)
class Phi3Config:
    """Hyper-parameters of a Phi-3 decoder (hashable: usable as a static ``jit`` argument).

    Field names are transformers' ``Phi3Config``'s; ``rope_parameters`` is transformers 5's flat
    dict (``rope_type`` ``"default"`` or ``"longrope"``, ``rope_theta``, ``partial_rotary_factor``,
    and for longrope ``short_factor``/``long_factor``/optional ``factor``/``attention_factor``),
    stored frozen (`rope` returns the dict). ``head_dim`` defaults to ``hidden_size //
    num_attention_heads``. The dropout rates are kept for the config's round trip; the model is
    deterministic (they are 0 in every released Phi-3). Additions: ``dtype`` (compute),
    ``param_dtype``, ``attention_impl`` (None = cuDNN on a GPU in bf16/fp16 where it applies,
    ``"xla"``, ``"cudnn"``) and ``remat_policy`` (None, a `layers.REMAT_POLICIES` name or a
    ``jax.checkpoint_policies`` callable).

    Example:
      >>> cfg = Phi3Config(hidden_size=96, num_attention_heads=4, num_key_value_heads=2,
      ...                  rope_parameters={"partial_rotary_factor": 0.75})
      >>> cfg.head_dim, cfg.rope["partial_rotary_factor"], cfg.rope["rope_type"]
      (24, 0.75, 'default')
    """

    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_parameters: Any = None
    tie_word_embeddings: bool = False
    sliding_window: Optional[int] = None
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    model_type: str = "phi3"
    bos_token_id: Optional[int] = 1
    eos_token_id: Any = 32000
    pad_token_id: Optional[int] = 32000
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    attention_impl: Optional[str] = None
    remat_policy: Any = None
    scan_unroll: int = 1

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings", "original_max_position_embeddings"):
            set_(name, layers.positive_int(getattr(self, name), f"Phi3Config.{name}"))
        if self.model_type != "phi3":
            raise ValueError(f"Phi3Config.model_type must be 'phi3', got {self.model_type!r}")
        kv = self.num_attention_heads if self.num_key_value_heads is None else self.num_key_value_heads
        kv = layers.positive_int(kv, "Phi3Config.num_key_value_heads")
        if self.num_attention_heads % kv:
            raise ValueError(f"Phi3Config: num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={kv}")
        set_("num_key_value_heads", kv)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"Phi3Config: hidden_size={self.hidden_size} is not divisible by "
                                 f"num_attention_heads={self.num_attention_heads}; give head_dim explicitly")
            set_("head_dim", self.hidden_size // self.num_attention_heads)
        set_("head_dim", layers.positive_int(self.head_dim, "Phi3Config.head_dim"))
        set_("dtype", layers.canon_dtype(self.dtype, "Phi3Config.dtype"))
        set_("param_dtype", layers.canon_dtype(self.param_dtype, "Phi3Config.param_dtype"))
        if self.attention_impl not in layers.ATTENTION_IMPLS:
            raise ValueError(f"Phi3Config.attention_impl must be one of {layers.ATTENTION_IMPLS}, "
                             f"got {self.attention_impl!r}")
        if self.hidden_act not in layers.ACTIVATIONS:
            raise ValueError(f"Phi3Config.hidden_act must be one of {sorted(layers.ACTIVATIONS)}, "
                             f"got {self.hidden_act!r}")
        layers.check_remat_policy(self.remat_policy, "Phi3Config.remat_policy")
        object.__setattr__(self, "scan_unroll", layers.positive_int(self.scan_unroll, "Phi3Config.scan_unroll"))
        if self.sliding_window is not None:
            set_("sliding_window", layers.positive_int(self.sliding_window, "Phi3Config.sliding_window"))
        if isinstance(self.eos_token_id, (list, tuple)):
            set_("eos_token_id", tuple(int(t) for t in self.eos_token_id))
        prf = float((dict(self.rope_parameters) if self.rope_parameters is not None else {})
                    .get("partial_rotary_factor") or 1.0)
        pairs = (int(self.head_dim * prf) + 1) // 2
        rope = _normalize_rope(self.rope_parameters, self.original_max_position_embeddings, pairs)
        set_("rope_parameters", layers.freeze(rope))

    @property
    def rope(self) -> dict:
        """The rotary-embedding dict (`layers.rope_parameters`' form) with list values."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.rope_parameters}

    def replace(self, **changes) -> "Phi3Config":
        """A copy with some fields changed (``cfg.replace(dtype="bfloat16")``)."""
        return dataclasses.replace(self, **changes)

    def to_hf_config(self) -> dict:
        """The ``config.json`` dict transformers 5 rebuilds this model from (no ``architectures``)."""
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        d = dict(
            model_type="phi3", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            hidden_act=self.hidden_act, max_position_embeddings=self.max_position_embeddings,
            original_max_position_embeddings=self.original_max_position_embeddings, rms_norm_eps=self.rms_norm_eps,
            rope_parameters=self.rope, tie_word_embeddings=self.tie_word_embeddings,
            sliding_window=self.sliding_window, resid_pdrop=self.resid_pdrop, embd_pdrop=self.embd_pdrop,
            attention_dropout=self.attention_dropout, initializer_range=self.initializer_range,
            bos_token_id=self.bos_token_id, eos_token_id=eos, pad_token_id=self.pad_token_id,
            dtype={"bfloat16": "bfloat16", "float16": "float16"}.get(self.param_dtype.name, "float32"),
        )
        if self.head_dim != self.hidden_size // self.num_attention_heads:
            d["head_dim"] = self.head_dim
        return d


def from_hf_config(d: Mapping[str, Any]) -> Phi3Config:
    """A `Phi3Config` from a transformers ``config.json`` dict (either rope spelling).

    Reads ``rope_scaling`` (which transformers' Phi3 prefers when both are present) or
    ``rope_parameters``, with ``rope_theta`` and ``partial_rotary_factor`` from the top level
    where the rope dict lacks them.

    Raises:
      ValueError: for another ``model_type``; a rope type other than default/longrope (``su``
        and ``yarn`` are read as ``longrope``, as transformers does); longrope factors of the
        wrong length; a true ``attention_bias``/``mlp_bias``/``lm_head_bias`` (transformers'
        Phi-3 has no biases); an unknown ``hidden_act``.

    Example:
      >>> cfg = from_hf_config({"model_type": "phi3", "hidden_size": 32, "num_attention_heads": 4,
      ...                       "partial_rotary_factor": 0.5, "rope_theta": 250000.0})
      >>> cfg.rope["rope_theta"], cfg.rope["partial_rotary_factor"]
      (250000.0, 0.5)
    """
    d = dict(d)
    mt = d.get("model_type", "phi3")
    if mt != "phi3":
        raise ValueError(f"phi3.from_hf_config: model_type {mt!r} is not served by this family (expected 'phi3')")
    for flag in _NO_BIAS_FLAGS:
        if d.get(flag):
            raise ValueError(f"phi3.from_hf_config: {flag}={d[flag]!r} is not supported: transformers' Phi3 has no "
                             f"biases (a checkpoint with them is not a Phi-3)")
    rope = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    if not any(isinstance(v, Mapping) for v in rope.values()):
        if rope.get("rope_theta") is None:
            rope["rope_theta"] = d.get("rope_theta") if d.get("rope_theta") is not None else 10000.0
        if rope.get("partial_rotary_factor") is None:
            rope["partial_rotary_factor"] = d.get("partial_rotary_factor") or 1.0
    heads = d.get("num_attention_heads", 32)
    kw = dict(
        vocab_size=d.get("vocab_size", 32064), hidden_size=d.get("hidden_size", 3072),
        intermediate_size=d.get("intermediate_size", 8192), num_hidden_layers=d.get("num_hidden_layers", 32),
        num_attention_heads=heads, num_key_value_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or None, hidden_act=d.get("hidden_act", "silu"),
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        original_max_position_embeddings=d.get("original_max_position_embeddings", 4096),
        rms_norm_eps=d.get("rms_norm_eps", 1e-5), rope_parameters=rope,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), sliding_window=d.get("sliding_window"),
        resid_pdrop=d.get("resid_pdrop", 0.0), embd_pdrop=d.get("embd_pdrop", 0.0),
        attention_dropout=d.get("attention_dropout", 0.0), initializer_range=d.get("initializer_range", 0.02),
        bos_token_id=d.get("bos_token_id", 1), eos_token_id=d.get("eos_token_id", 32000),
        pad_token_id=d.get("pad_token_id", 32000),
    )
    return Phi3Config(**kw)


# -------------------------------------------------------------------------------------------
# Modules
# -------------------------------------------------------------------------------------------
def _dense(c: Phi3Config, features: int, name: str) -> nn.Dense:
    return layers.dense(features, use_bias=False, name=name, dtype=c.dtype, param_dtype=c.param_dtype,
                        std=c.initializer_range)


class Phi3Attention(nn.Module):
    """Grouped-query self-attention from the fused ``qkv_proj``, with (partial) RoPE and an
    optional KV cache passed in and returned explicitly."""

    config: Phi3Config

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache, cache_index):
        c = self.config
        b, t, _ = x.shape
        n, k, h = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        qkv = _dense(c, (n + 2 * k) * h, "qkv_proj")(x)
        q = qkv[..., :n * h].reshape(b, t, n, h)
        kk = qkv[..., n * h:(n + k) * h].reshape(b, t, k, h)
        v = qkv[..., (n + k) * h:].reshape(b, t, k, h)
        q, kk = layers.apply_rope(q, cos, sin), layers.apply_rope(kk, cos, sin)
        if cache is None:
            out = layers.attention(q, kk, v, mask=mask, causal=True, window=c.sliding_window,
                                   impl=layers.attention_impl(c.attention_impl, c.dtype, h))
            new_cache = None
        else:
            idx = (0, cache_index, 0, 0)
            kc = jax.lax.dynamic_update_slice(cache["k"], kk.astype(cache["k"].dtype), idx)
            vc = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), idx)
            # the mask (causal by cache slot, padding, window) was built once by the caller
            out = layers.attention(q, kc.astype(q.dtype), vc.astype(q.dtype), mask=mask, causal=False, impl="xla")
            new_cache = {"k": kc, "v": vc}
        return _dense(c, c.hidden_size, "o_proj")(out.reshape(b, t, n * h)), new_cache


class Phi3MLP(nn.Module):
    """``down(up * act(gate))`` with gate and up from the fused ``gate_up_proj`` (gate first)."""

    config: Phi3Config

    @nn.compact
    def __call__(self, x):
        c = self.config
        gate, up = jnp.split(_dense(c, 2 * c.intermediate_size, "gate_up_proj")(x), 2, axis=-1)
        return _dense(c, c.hidden_size, "down_proj")(up * layers.ACTIVATIONS[c.hidden_act](gate))


class Phi3DecoderLayer(nn.Module):
    """One pre-norm layer shaped for ``nn.scan``: ``(h, cache_l, *broadcast) -> (h, new_cache_l)``."""

    config: Phi3Config

    @nn.compact
    def __call__(self, h, cache, cos, sin, mask, cache_index):
        c = self.config
        norm = functools.partial(layers.RMSNorm, c.rms_norm_eps, c.dtype, c.param_dtype)
        a, new_cache = Phi3Attention(c, name="self_attn")(norm(name="input_layernorm")(h), cos, sin, mask, cache,
                                                          cache_index)
        h = h + a
        h = h + Phi3MLP(c, name="mlp")(norm(name="post_attention_layernorm")(h))
        return h, new_cache


class Phi3Model(DecoderModel):
    """Embedding, the scanned layers and the final norm (PyTorch ``Phi3Model``; head ``"base"``).

    ``apply({"params": p}, input_ids, attention_mask=None, positions=None, cache=None,
    cache_index=None)`` returns the final hidden states ``(B, T, D)`` in float32, and with a
    ``cache`` (`layers.init_cache` with ``num_hidden_layers``, ``num_key_value_heads``,
    ``head_dim``) ``(hidden, new_cache)``; ``cache_index`` is the cache slot of
    ``input_ids[:, 0]`` and ``attention_mask`` then covers the whole cache ``(B, M)``.
    ``positions`` default to ``0..T-1`` (from ``cache_index`` with a cache); give
    ``cumsum(mask) - 1`` for left-padded rows.

    Longrope uses the long factors for the whole call when ``max(positions) + 1`` exceeds
    ``original_max_position_embeddings``, as transformers does per forward call. (transformers'
    ``generate`` also recomputes the cache once decoding crosses that length; with a cache here,
    keys already cached keep the factors they were computed with.)
    """

    config: Phi3Config
    decoder_layer = Phi3DecoderLayer
    layer_in_axes = (0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast)

    def layer_args(self, attention_mask, positions, cache, cache_index, t, m):
        c = self.config
        mask = layers.decoder_mask(attention_mask, cache, cache_index, t, m, c.sliding_window)
        cos, sin = layers.rope_tables(c.rope, c.head_dim, c.max_position_embeddings, positions, c.dtype)
        return cache, cos, sin, mask, cache_index


class Phi3ForCausalLM(DecoderForCausalLM):
    """`Phi3Model` and the output head (PyTorch ``Phi3ForCausalLM``; head ``"causal_lm"``).

    ``apply({"params": p}, input_ids, attention_mask=None, positions=None, cache=None,
    cache_index=None)`` returns float32 logits ``(B, T, V)`` (``(logits, new_cache)`` with a
    cache; see `Phi3Model` for the arguments). ``lm_head`` is the embedding's transpose under
    ``tie_word_embeddings`` (Phi-4-mini). Decode with `lora_jax.models.generate.generate`.
    ``method="hidden"`` (same arguments; ``(hidden states, new cache or None)``) and
    ``method="logits"`` (the head) are its two halves, for a loss that runs the head in chunks
    (`lora_jax.train.loss.chunked_token_stats`).
    """

    config: Phi3Config
    base_model = Phi3Model


# -------------------------------------------------------------------------------------------
# The family record
# -------------------------------------------------------------------------------------------
def _leaves(config: Phi3Config, head: str) -> list[Leaf]:
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    nh = config.num_attention_heads * config.head_dim
    kh = config.num_key_value_heads * config.head_dim
    lay, hf = "model/layers/", "model.layers.{i}."
    out = [
        Leaf("model/embed_tokens/embedding", "model.embed_tokens.weight", (v, d), role="embedding"),
        Leaf(lay + "input_layernorm/scale", hf + "input_layernorm.weight", (d,)),
        Leaf(lay + "self_attn/qkv_proj/kernel", hf + "self_attn.qkv_proj.weight", (d, nh + 2 * kh), True, role="column"),
        Leaf(lay + "self_attn/o_proj/kernel", hf + "self_attn.o_proj.weight", (nh, d), True, role="row"),
        Leaf(lay + "post_attention_layernorm/scale", hf + "post_attention_layernorm.weight", (d,)),
        Leaf(lay + "mlp/gate_up_proj/kernel", hf + "mlp.gate_up_proj.weight", (d, 2 * f), True, role="column"),
        Leaf(lay + "mlp/down_proj/kernel", hf + "mlp.down_proj.weight", (f, d), True, role="row"),
        Leaf("model/norm/scale", "model.norm.weight", (d,)),
    ]
    if not config.tie_word_embeddings:
        out.append(Leaf("lm_head/kernel", "lm_head.weight", (d, v), True, role="head"))
    if head == "base":
        return strip_prefix(out, "model/", "model.")
    if head != "causal_lm":
        raise ValueError(f"phi3: no {head!r} head; heads: ['causal_lm', 'base']")
    return out


def _ignore(config: Phi3Config) -> tuple:
    buffers = (r"(^|\.)rotary_emb\.(inv_freq|original_inv_freq|long_inv_freq)$",)
    return buffers + ((r"^lm_head\.weight$",) if config.tie_word_embeddings else ())


FAMILY = Family(
    name="phi3",
    torch_classes={"phi3": {"causal_lm": "Phi3ForCausalLM", "base": "Phi3Model"}},
    config_from_hf=from_hf_config,
    modules={"causal_lm": Phi3ForCausalLM, "base": Phi3Model},
    leaves=_leaves,
    # PEFT 0.21 has no default target_modules for phi3 (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    # lacks the key: PEFT asks the user to name them)
    peft_targets={"phi3": ()},
    attention=("self_attn/qkv_proj", "self_attn/o_proj"),
    ignore=_ignore,
)

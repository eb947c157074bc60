"""OpenAI GPT-2 in Flax linen: ``GPT2LMHeadModel`` (``"causal_lm"``) and ``GPT2Model`` (``"base"``).

Pre-LayerNorm decoder with learned position embeddings (``wpe``), one fused query/key/value
projection per layer (``c_attn``), a GELU MLP (``c_fc``, ``c_proj``) and an output head tied to
the token embedding (``logits = h @ wte.T``; GPT-2 always ties). The layers run under
``nn.scan`` (weights stacked on a leading layer axis) with an optional ``nn.remat`` policy;
LayerNorm is computed in float32 and attention goes through `layers.attention`.

PyTorch's GPT-2 stores its projections as ``Conv1D`` weights ``(in, out)``, which is already the
layout of a Flax ``Dense`` kernel, so the checkpoint table has no transposes. Parameter tree
(``L`` layers, ``D = n_embd``, ``F = n_inner or 4 D``, ``V`` vocab, ``P = n_positions``)::

    transformer/wte/embedding            (V, D)
    transformer/wpe/embedding            (P, D)
    transformer/h/ln_1/scale, bias       (L, D)
    transformer/h/attn/c_attn/kernel     (L, D, 3D)   (+ bias (L, 3D)): queries, keys, values
    transformer/h/attn/c_proj/kernel     (L, D, D)    (+ bias)
    transformer/h/ln_2/scale, bias       (L, D)
    transformer/h/mlp/c_fc/kernel        (L, D, F)    (+ bias)
    transformer/h/mlp/c_proj/kernel      (L, F, D)    (+ bias)
    transformer/ln_f/scale, bias         (D,)

The ``"base"`` head (`GPT2Model`) has the same tree without the ``transformer/`` prefix and
returns the final hidden states ``(B, T, D)`` in float32. PEFT's default LoRA target is
``c_attn``: ``lora.Rules(["c_attn"], stack_axes=1)``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lora_jax.models.family import init_params
  >>> model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4))
  >>> model.apply({"params": init_params(model, jax.random.key(0))}, jnp.zeros((1, 8), jnp.int32)).shape
  (1, 8, 97)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .family import Family, Leaf, strip_prefix
from .layers import (ACTIVATIONS, ATTENTION_IMPLS, LayerNorm, attention, attention_impl, canon_dtype,
                     check_remat_policy, decoder_inputs, decoder_mask, dense, positive_int, scan_layers)

__all__ = ["GPT2Config", "GPT2LMHeadModel", "GPT2Model", "from_hf_config", "FAMILY"]


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Hyper-parameters of GPT-2 (hashable: usable as a static ``jit`` argument).

    Fields carry transformers' names (``n_embd``, ``n_layer``, ``n_head``, ``n_positions``,
    ``n_inner``, ``activation_function``, ``layer_norm_epsilon``, ...); the common names
    (``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``max_position_embeddings``,
    ``intermediate_size``) and the KV-cache shape (``num_key_value_heads = n_head``,
    ``head_dim``) are properties. The additions are ``dtype`` (compute), ``param_dtype``,
    ``attention_impl`` (None = cuDNN on a GPU in bf16/fp16 where it applies, XLA otherwise;
    ``"xla"``; ``"cudnn"``) and ``remat_policy`` (a `layers.REMAT_POLICIES` name, a
    ``jax.checkpoint_policies`` callable, or None). Dropout rates are not kept: the modules are
    deterministic (LoRA dropout belongs to ``lora.wrap``).

    ``scale_attn_weights`` divides the attention logits by ``sqrt(head_dim)``;
    ``scale_attn_by_inverse_layer_idx`` further divides layer ``i``'s by ``i + 1``;
    ``reorder_and_upcast_attn`` only changes how PyTorch orders the float32 arithmetic, so it is
    accepted and has no effect here.

    Example:
      >>> cfg = GPT2Config(n_embd=64, n_head=4, n_layer=2)
      >>> cfg.head_dim, cfg.num_key_value_heads, cfg.num_hidden_layers, cfg.intermediate_size
      (16, 4, 2, 256)
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: Optional[int] = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    model_type: str = "gpt2"
    bos_token_id: Optional[int] = 50256
    eos_token_id: Any = 50256
    pad_token_id: Optional[int] = None
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    attention_impl: Optional[str] = None
    remat_policy: Any = None
    scan_unroll: int = 1

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            set_(name, positive_int(getattr(self, name), f"GPT2Config.{name}"))
        if self.n_inner is not None:
            set_("n_inner", positive_int(self.n_inner, "GPT2Config.n_inner"))
        if self.model_type != "gpt2":
            raise ValueError(f"GPT2Config.model_type must be 'gpt2', got {self.model_type!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPT2Config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(f"GPT2Config.activation_function must be one of {sorted(ACTIVATIONS)}, "
                             f"got {self.activation_function!r}")
        set_("dtype", canon_dtype(self.dtype, "GPT2Config.dtype"))
        set_("param_dtype", canon_dtype(self.param_dtype, "GPT2Config.param_dtype"))
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"GPT2Config.attention_impl must be one of {ATTENTION_IMPLS}, "
                             f"got {self.attention_impl!r}")
        check_remat_policy(self.remat_policy, "GPT2Config.remat_policy")
        object.__setattr__(self, "scan_unroll", positive_int(self.scan_unroll, "GPT2Config.scan_unroll"))
        for name in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            set_(name, bool(getattr(self, name)))
        if isinstance(self.eos_token_id, (list, tuple)):
            set_("eos_token_id", tuple(int(t) for t in self.eos_token_id))

    # transformers' attribute_map and the names the shared code reads
    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def num_attention_heads(self) -> int:
        return self.n_head

    @property
    def num_key_value_heads(self) -> int:
        return self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def max_position_embeddings(self) -> int:
        return self.n_positions

    @property
    def intermediate_size(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def tie_word_embeddings(self) -> bool:
        return True

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """``eos_token_id`` as a tuple (empty when None)."""
        e = self.eos_token_id
        return () if e is None else (e if isinstance(e, tuple) else (int(e),))

    @property
    def attention_scale(self) -> float:
        """The attention logits' factor shared by every layer (``head_dim ** -0.5`` or 1)."""
        return self.head_dim ** -0.5 if self.scale_attn_weights else 1.0

    def layer_scales(self) -> Optional[np.ndarray]:
        """``1 / (i + 1)`` per layer (float32) with ``scale_attn_by_inverse_layer_idx``, else None."""
        if not self.scale_attn_by_inverse_layer_idx:
            return None
        return (1.0 / np.arange(1, self.n_layer + 1, dtype=np.float64)).astype(np.float32)

    def replace(self, **changes) -> "GPT2Config":
        """A copy with some fields changed (``cfg.replace(dtype="bfloat16")``)."""
        return dataclasses.replace(self, **changes)

    def to_hf_config(self) -> dict:
        """The ``config.json`` dict transformers 5 builds this model from (``architectures`` aside)."""
        return dict(
            model_type="gpt2", vocab_size=self.vocab_size, n_positions=self.n_positions, n_embd=self.n_embd,
            n_layer=self.n_layer, n_head=self.n_head, n_inner=self.n_inner,
            activation_function=self.activation_function, layer_norm_epsilon=self.layer_norm_epsilon,
            initializer_range=self.initializer_range, scale_attn_weights=self.scale_attn_weights,
            scale_attn_by_inverse_layer_idx=self.scale_attn_by_inverse_layer_idx,
            reorder_and_upcast_attn=self.reorder_and_upcast_attn, tie_word_embeddings=True,
            bos_token_id=self.bos_token_id, pad_token_id=self.pad_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            dtype={"bfloat16": "bfloat16", "float16": "float16"}.get(self.param_dtype.name, "float32"),
        )


def from_hf_config(hf: Mapping[str, Any], **overrides) -> GPT2Config:
    """A `GPT2Config` from a transformers ``config.json`` dict (``model_type`` ``"gpt2"``),
    ``overrides`` applied.

    Reads transformers' names and their aliases (``hidden_size`` for ``n_embd``, ...). Every
    field whose feature is not implemented (cross-attention, an untied output head, an unknown
    activation) is named in one ValueError, never silently different logits.

    Example:
      >>> cfg = from_hf_config({"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2,
      ...                       "vocab_size": 100, "scale_attn_by_inverse_layer_idx": True})
      >>> cfg.layer_scales().tolist()
      [1.0, 0.5]
    """
    d = dict(hf)
    mt = d.get("model_type", "gpt2")
    if mt != "gpt2":
        raise ValueError(f"from_hf_config: model_type {mt!r} is not GPT-2 (expected 'gpt2')")

    def get(name, alias, default):
        v = d.get(name)
        return d.get(alias, default) if v is None else v

    problems = []
    if d.get("add_cross_attention"):
        problems.append(f"add_cross_attention={d['add_cross_attention']!r} (cross-attention is not implemented)")
    if d.get("tie_word_embeddings", True) is False:
        problems.append("tie_word_embeddings=False (GPT-2's output head is the token embedding here)")
    act = d.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        problems.append(f"activation_function={act!r} (supported: {sorted(ACTIVATIONS)})")
    if problems:
        raise ValueError("from_hf_config: this gpt2 config uses features lora_jax does not implement, so its "
                         "logits would differ from transformers': " + "; ".join(problems))
    kw = dict(
        vocab_size=d.get("vocab_size", 50257), n_positions=get("n_positions", "max_position_embeddings", 1024),
        n_embd=get("n_embd", "hidden_size", 768), n_layer=get("n_layer", "num_hidden_layers", 12),
        n_head=get("n_head", "num_attention_heads", 12), n_inner=d.get("n_inner"), activation_function=act,
        layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5), initializer_range=d.get("initializer_range", 0.02),
        scale_attn_weights=d.get("scale_attn_weights", True),
        scale_attn_by_inverse_layer_idx=d.get("scale_attn_by_inverse_layer_idx", False),
        reorder_and_upcast_attn=d.get("reorder_and_upcast_attn", False),
        bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"),
    )
    kw.update(overrides)
    return GPT2Config(**kw)


# -------------------------------------------------------------------------------------------
# Modules
# -------------------------------------------------------------------------------------------
def _dense(c: GPT2Config, features: int, name: str, std: Optional[float] = None) -> nn.Dense:
    return dense(features, use_bias=True, name=name, dtype=c.dtype, param_dtype=c.param_dtype,
                 std=c.initializer_range if std is None else std)


def _norm(c: GPT2Config, name: str) -> LayerNorm:
    return LayerNorm(c.layer_norm_epsilon, dtype=c.dtype, param_dtype=c.param_dtype, name=name)


def _residual_std(c: GPT2Config) -> float:
    # GPT-2's init scales the projections into the residual stream by 1/sqrt(2 * n_layer)
    return c.initializer_range / math.sqrt(2 * c.n_layer)


class GPT2Attention(nn.Module):
    """Causal self-attention with a fused ``c_attn`` projection; the KV cache is explicit."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x, layer_scale, mask, cache, cache_index):
        c = self.config
        b, t, d = x.shape
        n, h = c.n_head, c.head_dim
        q, k, v = jnp.split(_dense(c, 3 * d, "c_attn")(x), 3, axis=-1)
        q, k, v = (a.reshape(b, t, n, h) for a in (q, k, v))
        if layer_scale is not None:  # scale_attn_by_inverse_layer_idx: this layer's 1 / (i + 1)
            q = q * layer_scale.astype(q.dtype)
        if cache is None:
            out = attention(q, k, v, mask=mask, causal=True, scale=c.attention_scale,
                            impl=attention_impl(c.attention_impl, c.dtype, h))
            new_cache = None
        else:
            idx = (0, cache_index, 0, 0)
            kc = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), idx)
            vc = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), idx)
            # the mask (causal by cache slot and padding) was built once by the caller
            out = attention(q, kc.astype(q.dtype), vc.astype(q.dtype), mask=mask, causal=False,
                            scale=c.attention_scale, impl="xla")
            new_cache = {"k": kc, "v": vc}
        return _dense(c, d, "c_proj", _residual_std(c))(out.reshape(b, t, d)), new_cache


class GPT2MLP(nn.Module):
    """``c_proj(act(c_fc(x)))``."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x):
        c = self.config
        y = ACTIVATIONS[c.activation_function](_dense(c, c.intermediate_size, "c_fc")(x))
        return _dense(c, c.n_embd, "c_proj", _residual_std(c))(y)


class GPT2Block(nn.Module):
    """One pre-LayerNorm layer, shaped for ``nn.scan``: ``(h, (cache, layer_scale), *broadcast) -> (h, cache)``."""

    config: GPT2Config

    @nn.compact
    def __call__(self, h, xs, mask, cache_index):
        c = self.config
        cache, layer_scale = xs
        a, new_cache = GPT2Attention(c, name="attn")(_norm(c, "ln_1")(h), layer_scale, mask, cache, cache_index)
        h = h + a
        h = h + GPT2MLP(c, name="mlp")(_norm(c, "ln_2")(h))
        return h, new_cache


class GPT2Model(nn.Module):
    """Embeddings, the scanned layers and the final LayerNorm (the ``"base"`` head).

    ``apply({"params": p}, input_ids, attention_mask=None, positions=None)`` returns the last
    hidden states ``(B, T, D)`` in float32 (with ``cache``/``cache_index``: ``(hidden,
    new_cache)``). Arguments as in `GPT2LMHeadModel`.
    """

    config: GPT2Config
    head: ClassVar[str] = "base"

    def setup(self):
        c = self.config
        emb = functools.partial(nn.Embed, features=c.n_embd, dtype=c.dtype, param_dtype=c.param_dtype,
                                embedding_init=nn.initializers.normal(c.initializer_range))
        self.wte = emb(c.vocab_size)
        self.wpe = emb(c.n_positions)
        self.h = scan_layers(GPT2Block, c, length=c.n_layer, in_axes=(0, nn.broadcast, nn.broadcast))(c)
        self.ln_f = _norm(c, "ln_f")

    def hidden(self, input_ids, attention_mask=None, positions=None, cache=None, cache_index=None):
        """``(hidden states in the compute dtype, new cache or None)``."""
        c = self.config
        who = type(self).__name__
        if cache is None and positions is None and input_ids.shape[-1] > c.n_positions:
            raise ValueError(f"{who}: {input_ids.shape[-1]} tokens exceed n_positions={c.n_positions} (the learned "
                             f"position embeddings)")
        input_ids, attention_mask, positions, cache_index, m = decoder_inputs(
            who, input_ids, attention_mask, positions, cache, cache_index)
        mask = decoder_mask(attention_mask, cache, cache_index, input_ids.shape[1], m)
        scales = c.layer_scales()
        h = self.wte(input_ids) + self.wpe(positions)
        h, new_cache = self.h(h, (cache, None if scales is None else jnp.asarray(scales)), mask, cache_index)
        return self.ln_f(h), new_cache

    def attend(self, h):
        """The tied output head: ``h @ wte.T``."""
        return self.wte.attend(h)

    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None, cache_index=None):
        h, new_cache = self.hidden(input_ids, attention_mask, positions, cache, cache_index)
        h = h.astype(jnp.float32)
        return h if cache is None else (h, new_cache)


class GPT2LMHeadModel(nn.Module):
    """GPT-2 with its tied output head (the ``"causal_lm"`` head).

    ``model.apply({"params": params}, input_ids, attention_mask=None, positions=None)`` gives
    logits ``(B, T, V)`` in float32. ``attention_mask`` ``(B, T)`` (1 = token, 0 = padding) is
    combined with the causal mask; ``positions`` default to ``0..T-1`` (give ``cumsum(mask) - 1``
    for left-padded rows, as transformers' ``generate`` does). With ``cache`` (from
    `layers.init_cache`) and ``cache_index`` (the cache slot of ``input_ids[:, 0]``; see
    `lora_jax.models.generate`) it returns ``(logits, new_cache)`` and ``attention_mask`` covers
    the cache's length. ``method="hidden"`` (same arguments; ``(hidden states, new cache or
    None)``) and ``method="logits"`` (the head) are its two halves, for a loss that runs the head
    in chunks (`lora_jax.train.loss.chunked_token_stats`).
    """

    config: GPT2Config
    head: ClassVar[str] = "causal_lm"

    def setup(self):
        self.transformer = GPT2Model(self.config)

    def hidden(self, input_ids, attention_mask=None, positions=None, cache=None, cache_index=None):
        """``(final hidden states (B, T, D) in the compute dtype, new cache or None)`` (`GPT2Model.hidden`)."""
        return self.transformer.hidden(input_ids, attention_mask, positions, cache, cache_index)

    def logits(self, h):
        """The tied output head: float32 logits ``(..., V)`` of hidden states ``h`` (``h @ wte.T``)."""
        return self.transformer.attend(h).astype(jnp.float32)

    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None, cache_index=None):
        h, new_cache = self.hidden(input_ids, attention_mask, positions, cache, cache_index)
        logits = self.logits(h)
        return logits if cache is None else (logits, new_cache)


# -------------------------------------------------------------------------------------------
# Checkpoint table
# -------------------------------------------------------------------------------------------
def _leaves(c: GPT2Config, head: str) -> list[Leaf]:
    d, f = c.n_embd, c.intermediate_size
    p, t = "transformer/h/", "transformer.h.{i}."
    out = [Leaf("transformer/wte/embedding", "transformer.wte.weight", (c.vocab_size, d), role="embedding"),
           Leaf("transformer/wpe/embedding", "transformer.wpe.weight", (c.n_positions, d), role="embedding")]
    for norm in ("ln_1", "ln_2"):
        out += [Leaf(f"{p}{norm}/scale", f"{t}{norm}.weight", (d,)), Leaf(f"{p}{norm}/bias", f"{t}{norm}.bias", (d,))]
    # Conv1D weights are (in, out) like our kernels: no transpose
    for mod, shape, role in (("attn/c_attn", (d, 3 * d), "column"), ("attn/c_proj", (d, d), "row"),
                             ("mlp/c_fc", (d, f), "column"), ("mlp/c_proj", (f, d), "row")):
        torch_mod = mod.replace("/", ".")
        out += [Leaf(f"{p}{mod}/kernel", f"{t}{torch_mod}.weight", shape, role=role),
                Leaf(f"{p}{mod}/bias", f"{t}{torch_mod}.bias", shape[1:])]
    out += [Leaf("transformer/ln_f/scale", "transformer.ln_f.weight", (d,)),
            Leaf("transformer/ln_f/bias", "transformer.ln_f.bias", (d,))]
    return out if head == "causal_lm" else strip_prefix(out, "transformer/", "transformer.")


def _ignore(c: GPT2Config) -> tuple:
    # the causal-mask buffers old checkpoints carry, and the output head (tied to wte)
    return (r"(^|\.)attn\.(bias|masked_bias)$", r"^lm_head\.weight$")


FAMILY = Family(
    name="gpt2",
    torch_classes={"gpt2": {"causal_lm": "GPT2LMHeadModel", "base": "GPT2Model"}},
    config_from_hf=from_hf_config,
    modules={"causal_lm": GPT2LMHeadModel, "base": GPT2Model},
    leaves=_leaves,
    peft_targets={"gpt2": ("c_attn",)},
    attention=("attn/c_attn", "attn/c_proj"),
    ignore=_ignore,
)

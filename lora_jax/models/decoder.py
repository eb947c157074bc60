"""The decoder skeleton every causal-LM family of ``model/layers`` shape shares.

A family is its layer and its differences: `DecoderModel` owns the token embedding, the input and
cache checks, the scanned stack of the family's ``decoder_layer`` (remat, unroll: `layers.scan_layers`)
and the final norm; `DecoderForCausalLM` owns the output head (``lm_head``, or the embedding's
transpose under ``tie_word_embeddings``; soft-capped when the config sets
``final_logit_softcapping``), the ``method="hidden"``/``"logits"`` halves and the KV-cache return
convention. A family subclasses both and fills in:

* ``decoder_layer``: the layer class, called as ``layer(h, *scanned, *broadcast)``;
* ``layer_in_axes``: ``nn.scan``'s ``in_axes`` of those arguments (0: one slice per layer);
* ``layer_args(attention_mask, positions, cache, cache_index, t, m)``: the arguments themselves
  (rotary tables, masks, per-layer flags), from the checked inputs;
* optionally ``final_norm()`` (RMSNorm by default) and ``embed(input_ids)`` (scaling).

Parameter tree (every family built on it): ``model/embed_tokens/embedding``,
``model/layers/...`` (the layer's, stacked on a leading layer axis), ``model/norm/...``,
``lm_head/kernel`` unless tied.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lora_jax.models import LlamaConfig, build, init_params
  >>> model = build(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
  ...                           num_attention_heads=2))
  >>> isinstance(model, DecoderForCausalLM), model.apply({"params": init_params(model, jax.random.key(0))},
  ...                                                    jnp.zeros((1, 3), jnp.int32)).shape
  (True, (1, 3, 50))
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from .layers import RMSNorm, decoder_inputs, dense, scan_layers

__all__ = ["DecoderModel", "DecoderForCausalLM", "check_cache"]


def check_cache(who: str, config, cache, batch: int) -> None:
    """A KV cache must be ``(layers, batch, max_len, kv_heads, head_dim)`` for both ``k`` and ``v``."""
    if cache is None:
        return
    want = (config.num_hidden_layers, batch, cache["k"].shape[2], config.num_key_value_heads, config.head_dim)
    if tuple(cache["k"].shape) != want or tuple(cache["v"].shape) != want:
        raise ValueError(f"{who}: the cache must be (layers, batch, max_len, kv_heads, head_dim) = {want}, "
                         f"got k {tuple(cache['k'].shape)}, v {tuple(cache['v'].shape)}")


class DecoderModel(nn.Module):
    """Embedding, the scanned decoder layers and the final norm (the ``"base"`` head).

    ``apply({"params": p}, input_ids, attention_mask=None, positions=None, cache=None,
    cache_index=None)`` returns the final hidden states ``(B, T, D)`` in float32 (with a cache:
    ``(hidden, new_cache)``); ``method="hidden"`` gives them in the compute dtype.
    ``attention_mask`` is ``(B, T)`` without a cache and ``(B, cache length)`` with one
    (`layers.decoder_inputs`); intermediates sown by a layer (MoE router logits) stack on the
    layer axis like its parameters.
    """

    config: Any
    head: ClassVar[str] = "base"
    decoder_layer: ClassVar[type]
    layer_in_axes: ClassVar[tuple]

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
                                     embedding_init=nn.initializers.normal(c.initializer_range))
        self.layers = scan_layers(self.decoder_layer, c, length=c.num_hidden_layers, in_axes=self.layer_in_axes,
                                  variable_axes={"params": 0, "intermediates": 0})(c)
        self.norm = self.final_norm()

    def final_norm(self) -> nn.Module:
        """The norm after the last layer (its parameters: ``norm/...``)."""
        c = self.config
        return RMSNorm(c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)

    def embed(self, input_ids):
        """The input embeddings ``(B, T, D)``."""
        return self.embed_tokens(input_ids)

    def layer_args(self, attention_mask, positions, cache, cache_index, t: int, m: int) -> tuple:
        """The arguments of the scanned layers after the hidden states, in ``layer_in_axes``' order."""
        raise NotImplementedError

    def hidden(self, input_ids, attention_mask=None, positions=None, cache=None, cache_index=None):
        """``(final hidden states in the compute dtype, new cache or None)``."""
        who = type(self).__name__
        input_ids, attention_mask, positions, cache_index, m = decoder_inputs(
            who, input_ids, attention_mask, positions, cache, cache_index)
        check_cache(who, self.config, cache, input_ids.shape[0])
        args = self.layer_args(attention_mask, positions, cache, cache_index, input_ids.shape[1], m)
        h, new_cache = self.layers(self.embed(input_ids), *args)
        return self.norm(h), new_cache

    def attend(self, h):
        """Tied output head: ``h @ embedding.T``."""
        return self.embed_tokens.attend(h)

    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None, cache_index=None):
        h, new_cache = self.hidden(input_ids, attention_mask, positions, cache, cache_index)
        h = h.astype(jnp.float32)
        return h if cache is None else (h, new_cache)


class DecoderForCausalLM(nn.Module):
    """A `DecoderModel` (``base_model``) and its output head (the ``"causal_lm"`` head).

    ``apply({"params": p}, input_ids, attention_mask=None, positions=None)`` gives float32 logits
    ``(B, T, V)``; rows packed with several documents give each its id ``1, 2, ...`` in the mask
    and positions restarting at 0 per document (no token attends across a document:
    `layers.segment_mask`); for right-padded training rows the mask can be left out. With
    ``cache``/``cache_index`` (`lora_jax.models.generate`) it returns ``(logits, new_cache)``. Its
    two halves are public methods, so a loss can run the head itself in chunks
    (`lora_jax.train.loss.chunked_token_stats`): ``method="hidden"`` (same arguments;
    ``(hidden states in the compute dtype, new cache or None)``) and ``method="logits"``.
    """

    config: Any
    head: ClassVar[str] = "causal_lm"
    base_model: ClassVar[type]

    def setup(self):
        c = self.config
        self.model = self.base_model(c)
        if not c.tie_word_embeddings:
            self.lm_head = dense(c.vocab_size, use_bias=False, name="lm_head", dtype=c.dtype,
                                 param_dtype=c.param_dtype, std=c.initializer_range)

    def hidden(self, input_ids, attention_mask=None, positions=None, cache=None, cache_index=None):
        """``(final hidden states (B, T, D) in the compute dtype, new cache or None)``."""
        return self.model.hidden(input_ids, attention_mask, positions, cache, cache_index)

    def logits(self, h):
        """The output head: float32 logits ``(..., V)`` of hidden states ``h`` ``(..., D)``,
        soft-capped (``cap * tanh(logits / cap)``, in the compute dtype as transformers does) when
        the config's ``final_logit_softcapping`` is set."""
        c = self.config
        logits = self.model.attend(h) if c.tie_word_embeddings else self.lm_head(h)
        cap = getattr(c, "final_logit_softcapping", None)
        if cap is not None:
            logits = jnp.tanh(logits / jnp.asarray(cap, logits.dtype)) * jnp.asarray(cap, logits.dtype)
        return logits.astype(jnp.float32)

    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None, cache_index=None):
        h, new_cache = self.hidden(input_ids, attention_mask, positions, cache, cache_index)
        logits = self.logits(h)
        return logits if cache is None else (logits, new_cache)

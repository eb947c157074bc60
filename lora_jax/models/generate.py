"""Autoregressive decoding for every decoder family, with a fixed-size KV cache, compiled once per shape.

A decoder module of `lora_jax.models` takes ``cache`` (from `layers.init_cache`, shaped by its
config's ``num_hidden_layers``, ``num_key_value_heads`` and ``head_dim``) and ``cache_index`` (the
slot of the first new token) and returns ``(logits, new_cache)``; `generate` needs nothing else.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lora_jax.models import LlamaConfig, build, init_params
  >>> model = build(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
  ...                           num_attention_heads=4))
  >>> out = generate(model, init_params(model, jax.random.key(0)), jnp.ones((2, 3), jnp.int32), 4)
  >>> out.shape
  (2, 7)
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ..interpreter import wrap
from ..weight import is_lora
from .layers import init_cache

__all__ = ["generate"]


def _sample(logits, key, temperature, top_k):
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "eos", "pad",
                                             "apply_fn"))
def _generate(params, prompt_ids, prompt_mask, key, adapter_ids, *, model, max_new_tokens, temperature, top_k, eos,
              pad, apply_fn):
    if apply_fn is None:
        def apply_fn(p, ids, **kw):
            return model.apply({"params": p}, ids, **kw)
    if adapter_ids is not None:  # each row with its adapter (an AdapterBank's slot), in one batch
        apply_fn = wrap(apply_fn, adapter_ids=adapter_ids)

    c = model.config
    b, p_len = prompt_ids.shape
    n = max_new_tokens
    cache = init_cache(c.num_hidden_layers, b, p_len + n, c.num_key_value_heads, c.head_dim, c.dtype)
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


def _eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(e) for e in value)
    return (int(value),)


def generate(model, params, prompt_ids, max_new_tokens: int, *, attention_mask=None, temperature: float = 0.0,
             top_k: Optional[int] = None, rng=None, eos_token_id: Any = None, pad_token_id: Optional[int] = None,
             apply_fn: Optional[Callable] = None, adapter_ids=None) -> jax.Array:
    """Decode ``max_new_tokens`` tokens after each prompt.

    Prompts of different lengths are left-padded (``attention_mask`` 0 on the padding); positions
    count real tokens only, as transformers' ``generate`` does. Greedy by default; with
    ``temperature > 0`` tokens are sampled (optionally among the ``top_k`` most likely) with
    ``rng``. After a row emits an end-of-sequence token it continues with ``pad_token_id``.

    Args:
      model: a decoder module of `lora_jax.models` (``model.config`` gives the cache shape).
      params: its parameters; with ``apply_fn`` anything ``apply_fn`` accepts (a LoRA tree with
        ``apply_fn=lora.wrap(lambda p, ids, **kw: model.apply({"params": p}, ids, **kw))``).
      prompt_ids: int ``(B, P)``, left-padded.
      max_new_tokens: how many tokens to add.
      attention_mask: ``(B, P)``, 1 = real token (default all ones); every row must end with a real token.
      temperature: 0 = greedy.
      top_k: sample among the ``top_k`` most likely tokens.
      rng: a ``jax.random`` key, needed when ``temperature > 0``.
      eos_token_id: an id or a list of ids (default: the config's); ``()`` disables stopping.
      pad_token_id: written after the end (default: the config's, else the first eos id).
      apply_fn: ``apply_fn(params, ids, **kw)`` instead of ``model.apply``. Pass the same
        function object each call to avoid recompiling.
      adapter_ids: int ``(B,)``: each row's adapter, an index into ``lora.adapter_names(params)``
        (a `lora.AdapterBank`'s slot; ``-1`` the base), for ``params`` a LoRA tree: every row
        decodes with its own adapter in one batch (``lora.wrap(adapter_ids=...)`` around the
        model). Swapping the bank's adapters does not recompile.

    Returns:
      int32 ``(B, P + max_new_tokens)``: the prompt followed by the generated tokens.

    Raises:
      ValueError: for a malformed prompt or mask, a non-positive ``max_new_tokens``, a negative
        temperature, an out-of-range ``top_k`` or sampling without ``rng``.
    """
    config = model.config
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
    eos = _eos_ids(getattr(config, "eos_token_id", None) if eos_token_id is None else eos_token_id)
    pad = pad_token_id if pad_token_id is not None else getattr(config, "pad_token_id", None)
    if eos and pad is None:
        pad = eos[0]
    if adapter_ids is not None:
        try:
            adapter_ids = jnp.asarray(adapter_ids)
        except (TypeError, ValueError):
            adapter_ids = np.asarray(adapter_ids, dtype=object)  # names, None: refused below
        if not any(is_lora(x) for x in jax.tree_util.tree_leaves(params, is_leaf=is_lora)):
            raise ValueError("generate: adapter_ids route rows to adapters, but params hold no LoRA weight "
                             "(pass an AdapterBank's .tree, not its .params)")
        if adapter_ids.shape != prompt_ids.shape[:1] or not jnp.issubdtype(adapter_ids.dtype, jnp.integer):
            raise ValueError(f"generate: adapter_ids must be an integer array of one id per row, shape "
                             f"({prompt_ids.shape[0]},), got {adapter_ids.dtype}{list(adapter_ids.shape)} "
                             "(AdapterBank.ids turns adapter names into ids)")
        adapter_ids = adapter_ids.astype(jnp.int32)
    key = rng if rng is not None else jax.random.key(0)
    return _generate(params, prompt_ids.astype(jnp.int32), attention_mask, key, adapter_ids, model=model,
                     max_new_tokens=int(max_new_tokens), temperature=temperature,
                     top_k=None if top_k is None else int(top_k), eos=eos,
                     pad=None if pad is None else int(pad), apply_fn=apply_fn)

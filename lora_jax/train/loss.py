"""The next-token cross-entropy of the trainer, plain and chunked over the sequence.

`token_stats` is the plain form: float32 logits ``(B, T, V)`` in, ``(sum of weighted NLL, sum of
weighted correct argmax)`` out. Over a large vocabulary those logits and their gradient are the
largest tensors of a LoRA step (Llama 3's 128,256 tokens: about 4 GiB of float32 logits for
8 x 1024 tokens, as much again for their gradient).

`chunked_token_stats` computes the same two sums from the final hidden states and the output head
without ever holding them: the sequence is cut into chunks of ``chunk`` positions (all rows at
once, so a data-parallel batch axis stays sharded), a ``lax.scan`` runs the head and the
log-softmax of one chunk at a time, and each chunk runs under ``jax.checkpoint``, so the backward
pass recomputes that chunk's logits instead of storing them. Only ``(B, chunk, V)`` logits live at
any time; the price is one extra head matmul per chunk in the backward pass. (When the head
kernel itself trains, as in full pretraining, each chunk's backward also forms a kernel-sized
gradient that is added into the running sum: on the CPU backend that is one ``(D, V)`` temporary;
a LoRA head's gradient is only its small factors.)

The head is the model's own (``model.apply(..., method="logits")`` of the `lora_jax.models`
causal LMs: kernel or tied embedding, Gemma's final soft-capping, float32 cast) or a kernel
``(D, V)`` (give ``embedding.T`` for a tied ``(V, D)`` embedding). Either way it is ordinary
``jnp`` ops of the kernel, so under ``lora.wrap`` a LoRA (or quantized) head stays factorized
inside each chunk, and gradients reach its factors.

It lives in `lora_jax.train`, not with the models: the models only expose their hidden states and
their head (``method="hidden"`` / ``method="logits"``); what is done with the logits is the
training objective's business.

Example:
  >>> import jax, jax.numpy as jnp
  >>> h = jax.random.normal(jax.random.key(0), (2, 10, 8))
  >>> w = jax.random.normal(jax.random.key(1), (8, 50))
  >>> t = jax.random.randint(jax.random.key(2), (2, 10), 0, 50)
  >>> wt = jnp.ones((2, 10))
  >>> plain = token_stats((h @ w).astype(jnp.float32), t, wt)
  >>> chunked = chunked_token_stats(h, w, t, wt, chunk=4)
  >>> bool(jnp.allclose(plain[0], chunked[0], rtol=1e-6)), float(plain[1]) == float(chunked[1])
  (True, True)
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp

__all__ = ["token_stats", "group_sum", "chunked_token_stats", "cross_entropy", "auto_chunk", "CHUNK_BYTES"]

# the float32 logits of one chunk: (rows x chunk positions x vocabulary) x 4 bytes, at most this
CHUNK_BYTES = 256 * 2**20


def group_sum(x, groups=None, n_groups: int = 0):
    """The sum of ``x``; with ``groups`` (same shape, ids ``0 .. n_groups-1``) one sum per group.

    >>> import jax.numpy as jnp
    >>> group_sum(jnp.arange(4.0), jnp.array([1, 0, 1, 1]), 2).tolist()
    [1.0, 5.0]
    """
    if groups is None:
        return jnp.sum(x)
    hit = groups[..., None] == jnp.arange(n_groups, dtype=groups.dtype)
    return jnp.sum(jnp.where(hit, x[..., None], 0.0), axis=tuple(range(x.ndim)))


def token_stats(logits, targets, weights, groups=None, n_groups: int = 0):
    """``(sum of weighted next-token NLL, sum of weighted correct argmax)``, in float32.

    Args:
      logits: ``(..., V)`` logits (cast to float32 here).
      targets: ``(...)`` integer targets.
      weights: ``(...)`` token weights (0 = not trained, e.g. padding).
      groups: optional ``(...)`` integer group of each token (e.g. the adapter its row trains):
        then both sums are ``(n_groups,)`` arrays, one entry per group.
      n_groups: how many groups (with ``groups``).
    """
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    w = weights.astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return group_sum((lse - tgt) * w, groups, n_groups), group_sum(correct * w, groups, n_groups)


def auto_chunk(rows: int, length: int, vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Positions per chunk so that one chunk's float32 logits ``(rows, chunk, vocab)`` stay within
    ``chunk_bytes`` (at least 1, at most ``length``; a power of two when it is smaller).

    Example:
      >>> auto_chunk(8, 1024, 128256), auto_chunk(1, 1024, 128256), auto_chunk(8, 1024, 512)
      (64, 512, 1024)
    """
    fit = max(1, int(chunk_bytes) // (4 * max(int(rows), 1) * max(int(vocab), 1)))
    if fit >= length:
        return int(length)
    return 1 << (fit.bit_length() - 1)


def _head_fn(head) -> tuple[Callable, Optional[int]]:
    if callable(head):
        return head, None
    shape = getattr(head, "shape", None)
    if shape is None or len(shape) != 2:
        raise TypeError(f"chunked_token_stats: head must be a callable (hidden -> logits) or a 2-D kernel (D, V); "
                        f"got {type(head).__name__} of shape {shape}")
    return (lambda h: h @ head), int(shape[1])


def chunked_token_stats(hidden, head: Union[Callable, jax.Array], targets, weights, *,
                        chunk: Optional[int] = None, chunk_bytes: int = CHUNK_BYTES, groups=None, n_groups: int = 0):
    """`token_stats` of ``head(hidden)``, computed ``chunk`` positions at a time.

    Args:
      hidden: ``(B, T, D)`` final hidden states (any float dtype; leading axes beyond one batch axis
        are flattened into it).
      head: ``h -> logits`` for ``h`` of shape ``(B, chunk, D)`` (cast to float32 here), or a
        kernel ``(D, V)`` (``h @ kernel``).
      targets: ``(B, T)`` integer targets.
      weights: ``(B, T)`` token weights (0: not trained).
      chunk: positions per chunk (all ``B`` rows together); None: `auto_chunk` with
        ``chunk_bytes``. ``T`` need not divide by it (the last chunk is padded with weight 0).
      chunk_bytes: the float32-logit budget of one chunk when ``chunk`` is None.
      groups, n_groups: per-token groups, as in `token_stats` (``(B, T)``).

    Returns:
      ``(sum of weighted NLL, sum of weighted correct argmax)`` in float32 (per group with
      ``groups``): the same values and
      gradients (w.r.t. ``hidden`` and everything ``head`` uses) as
      ``token_stats(head(hidden), targets, weights)``.

    Raises:
      ValueError: shapes that do not fit together, or a chunk below 1.
    """
    hidden, targets, weights = jnp.asarray(hidden), jnp.asarray(targets), jnp.asarray(weights)
    if hidden.ndim < 2 or targets.shape != hidden.shape[:-1] or weights.shape != targets.shape:
        raise ValueError(f"chunked_token_stats: hidden (..., T, D) with targets and weights (..., T) expected; got "
                         f"hidden {hidden.shape}, targets {targets.shape}, weights {weights.shape}")
    *lead, t, d = hidden.shape
    b = math.prod(lead)
    if groups is not None and jnp.shape(groups) != targets.shape:
        raise ValueError(f"chunked_token_stats: groups must have the targets' shape {targets.shape}, got "
                         f"{jnp.shape(groups)}")
    h, tg, w = hidden.reshape(b, t, d), targets.reshape(b, t).astype(jnp.int32), weights.reshape(b, t)
    g = jnp.zeros((b, t), jnp.int32) if groups is None else jnp.asarray(groups, jnp.int32).reshape(b, t)
    fn, vocab = _head_fn(head)
    if chunk is None:
        if vocab is None:
            vocab = jax.eval_shape(fn, jax.ShapeDtypeStruct((b, 1, d), h.dtype)).shape[-1]
        chunk = auto_chunk(b, t, vocab, chunk_bytes)
    if isinstance(chunk, bool) or int(chunk) < 1:
        raise ValueError(f"chunked_token_stats: chunk must be a positive number of positions, got {chunk!r}")
    c = min(int(chunk), t)
    n = -(-t // c)
    pad = n * c - t
    if pad:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        tg = jnp.pad(tg, ((0, 0), (0, pad)))
        w = jnp.pad(w, ((0, 0), (0, pad)))
        g = jnp.pad(g, ((0, 0), (0, pad)))
    # (n, B, c, ...): the scan walks the sequence; every chunk holds all rows (batch sharding kept)
    xs = (h.reshape(b, n, c, d).swapaxes(0, 1), tg.reshape(b, n, c).swapaxes(0, 1), w.reshape(b, n, c).swapaxes(0, 1),
          g.reshape(b, n, c).swapaxes(0, 1))
    grouped = groups is not None

    # keep only the chunk's inputs; the backward pass recomputes its logits (no CSE barrier needed in a scan)
    @functools.partial(jax.checkpoint, prevent_cse=False)
    def one(hc, tc, wc, gc):
        with jax.named_scope("lm_loss"):  # names the head and its loss in profiles
            return token_stats(fn(hc), tc, wc, gc if grouped else None, n_groups)

    def body(carry, x):
        nll, correct = one(*x)
        return (carry[0] + nll, carry[1] + correct), None

    zero = jnp.zeros((int(n_groups),) if grouped else (), jnp.float32)
    (nll, correct), _ = jax.lax.scan(body, (zero, zero), xs)
    return nll, correct


def cross_entropy(hidden, head, targets, weights, **kw):
    """The weighted mean next-token cross-entropy, ``sum(w * nll) / max(sum(w), 1)``, of
    `chunked_token_stats` (``kw``: its ``chunk`` / ``chunk_bytes``)."""
    nll, _ = chunked_token_stats(hidden, head, targets, weights, **kw)
    return nll / jnp.maximum(jnp.sum(jnp.asarray(weights, jnp.float32)), 1.0)

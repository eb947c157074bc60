"""Adapter initializers: how ``a`` and ``b`` start (and, for PiSSA-like inits, what ``w`` becomes).

Every initializer has the signature ``(key, w, layout, rank, dtype, scale) -> (a, b, w)`` where the
shapes follow `lora_jax.layout.factor_shapes`, ``scale`` is the adapter's ``alpha / r`` (or rsLoRA's
``alpha / sqrt(r)``), and the returned ``w`` is the (possibly rewritten) frozen base. Identity at
init means ``merge`` returns the original ``w`` (to the base dtype's rounding for the
SVD/QR inits, which rewrite ``w``). ``M`` below is the kernel as the matrix ``x @ M`` multiplies,
``(in, out)`` (`lora_jax.layout.to_matrix`), one per stack index:

* ``kaiming`` (PEFT's default): ``a ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` — Kaiming-uniform with
  a=sqrt(5), fan-in = the product of the input axes — and ``b = 0``.
* ``gaussian``: ``a ~ N(0, (1/r)^2)``, ``b = 0`` (PEFT's ``init_lora_weights="gaussian"``).
* ``embedding`` (what ``kaiming`` means for an ``embedding`` leaf, as in PEFT): ``a = 0``,
  ``b ~ N(0, 1)``; ``a`` holds one row per token, so gradients reach it at once.
* ``False``: both random as PyTorch's ``nn.Linear`` would leave them (``b`` bound ``1/sqrt(r)``):
  not identity, for tests (PEFT's ``init_lora_weights=False``).
* ``pissa``: the principal singular triplets ``M = U S V^T``: ``a = U_r sqrt(S_r/scale)``,
  ``b = sqrt(S_r/scale) V_r^T``, ``w = M - scale a b`` (the residual). ``pissa_niter_N`` uses a
  randomized SVD with N subspace iterations (as ``torch.svd_lowrank``), fast on large kernels.
* ``olora``: QR of ``M^T = Q R``: ``a = R_r^T``, ``b = Q_r^T``, ``w = M - scale a b``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from .layout import factor_shapes, from_matrix, to_matrix

__all__ = ["kaiming", "gaussian", "embedding", "random_both", "pissa", "olora", "get", "INITIALIZERS"]


def _fan_in(shape, layout) -> int:
    return int(np.prod([d for d, k in zip(shape, layout) if k == "i"]))


def kaiming(key, w, layout, rank, dtype, scale=1.0):
    """``a`` Kaiming-uniform (a=sqrt(5)), ``b`` zeros: PEFT's default."""
    a_shape, b_shape = factor_shapes(w.shape, layout, rank)
    bound = 1.0 / np.sqrt(_fan_in(w.shape, layout))
    a = jax.random.uniform(key, a_shape, jnp.float32, -bound, bound).astype(dtype)
    return a, jnp.zeros(b_shape, dtype), w


def gaussian(key, w, layout, rank, dtype, scale=1.0):
    """``a`` normal with std ``1/r``, ``b`` zeros."""
    a_shape, b_shape = factor_shapes(w.shape, layout, rank)
    a = (jax.random.normal(key, a_shape, jnp.float32) / rank).astype(dtype)
    return a, jnp.zeros(b_shape, dtype), w


def random_both(key, w, layout, rank, dtype, scale=1.0):
    """Both factors random (``b`` Kaiming-uniform with fan-in ``r``): not identity at init."""
    ka, kb = jax.random.split(key)
    a, _, _ = kaiming(ka, w, layout, rank, dtype)
    _, b_shape = factor_shapes(w.shape, layout, rank)
    bound = 1.0 / np.sqrt(rank)
    b = jax.random.uniform(kb, b_shape, jnp.float32, -bound, bound).astype(dtype)
    return a, b, w


def embedding(key, w, layout, rank, dtype, scale=1.0):
    """PEFT's default for embeddings: ``a`` (rows, r) zero, ``b`` standard normal."""
    a_shape, b_shape = factor_shapes(w.shape, layout, rank)
    return jnp.zeros(a_shape, dtype), jax.random.normal(key, b_shape, jnp.float32).astype(dtype), w


def _factors_from_matrix(w, layout, rank, dtype, scale, fn, key=None):
    """Apply ``fn(M) -> (A (in, r), B (r, out))`` to every stacked matrix view of ``w`` (in float32)."""
    m = to_matrix(w.astype(jnp.promote_types(w.dtype, jnp.float32)), layout)
    flat = m.reshape((-1,) + m.shape[-2:])
    keys = jax.random.split(key if key is not None else jax.random.key(0), flat.shape[0])
    a, b = jax.vmap(fn)(flat, keys)
    resid = flat - scale * jnp.einsum("nir,nro->nio", a, b, precision=jax.lax.Precision.HIGHEST)
    a_shape, b_shape = factor_shapes(w.shape, layout, rank)
    w_new = from_matrix(resid.reshape(m.shape), w.shape, layout).astype(w.dtype)
    return a.reshape(a_shape).astype(dtype), b.reshape(b_shape).astype(dtype), w_new


def pissa(key, w, layout, rank, dtype, scale=1.0, niter=None):
    """PiSSA: principal singular vectors in the adapter, the residual in the frozen base."""

    def one(m, k):
        if niter is None:
            u, sv, vt = jnp.linalg.svd(m, full_matrices=False)
        else:
            u, sv, vt = _svd_lowrank(m, rank, niter, k)
        root = jnp.sqrt(sv[:rank] / scale)
        return u[:, :rank] * root, root[:, None] * vt[:rank]

    return _factors_from_matrix(w, layout, rank, dtype, scale, one, key)


def _svd_lowrank(m, q, niter, key):
    """Randomized SVD (Halko et al.) with ``niter`` subspace iterations, as ``torch.svd_lowrank``."""
    x = m @ jax.random.normal(key, (m.shape[1], q), m.dtype)
    basis = jnp.linalg.qr(x)[0]
    for _ in range(niter):
        basis = jnp.linalg.qr(m.T @ basis)[0]
        basis = jnp.linalg.qr(m @ basis)[0]
    u, sv, vt = jnp.linalg.svd(basis.T @ m, full_matrices=False)
    return basis @ u, sv, vt


def olora(key, w, layout, rank, dtype, scale=1.0):
    """OLoRA: an orthonormal basis of the kernel (QR) in the adapter, the residual in the base."""

    def one(m, k):
        q, r = jnp.linalg.qr(m.T)
        return r[:rank].T, q[:, :rank].T

    return _factors_from_matrix(w, layout, rank, dtype, scale, one, key)


INITIALIZERS: dict[str, Callable] = {
    "kaiming": kaiming,
    "default": kaiming,
    "gaussian": gaussian,
    "embedding": embedding,
    "pissa": pissa,
    "olora": olora,
}


def get(init: Any, where: str = "") -> Callable:
    """The initializer for a name, ``True``/``False`` (PEFT's ``init_lora_weights``) or a callable."""
    if init is True:
        return kaiming
    if init is False:
        return random_both
    if callable(init):
        return init
    if isinstance(init, str) and init.lower() in INITIALIZERS:
        return INITIALIZERS[init.lower()]
    if isinstance(init, str) and init.lower().startswith("pissa_niter_") and init[12:].isdigit():
        n = int(init[12:])
        return lambda key, w, layout, rank, dtype, scale=1.0: pissa(key, w, layout, rank, dtype, scale, niter=n)
    raise ValueError(f"{where + ': ' if where else ''}unknown init {init!r}; expected one of "
                     f"{sorted(INITIALIZERS)}, 'pissa_niter_N', True, False or a callable "
                     "(key, w, layout, rank, dtype, scale) -> (a, b, w)")

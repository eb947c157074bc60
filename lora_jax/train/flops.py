"""Model FLOPs of a training step, and MFU (model FLOPs utilization), for `lora_jax.models` decoders.

The count, per step of ``B`` sequences of ``S`` tokens (``T = B*S``), for a model with ``N`` weights
in its matmuls (every projection kernel of every layer and the output head; a tied embedding
counts as the head; embedding lookups cost nothing), ``L`` layers and attention width
``D = heads * head_dim``:

* matmuls: the forward pass is ``2*N*T``; the backward pass computes the activation gradients,
  another ``2*N*T``, and the weight gradients, ``2*N*T``, only for weights that train. Full
  training (pretraining) is PaLM's ``6*N*T``; a LoRA step forms no gradient for the frozen base:
  ``4*N*T``, plus ``6*N_lora*T`` for the adapters (``N_lora``: their parameter count,
  ``r * (in + out)`` per adapted kernel and layer);
* attention (no weights, but both inputs get gradients): ``Q K^T`` and ``P V`` are ``4*B*S^2*D``
  per layer forward, halved by the causal mask, times 3 with the backward: ``6*B*S^2*D*L``
  (a sliding window is not discounted).

``MFU = FLOPs per step * steps / seconds / (peak FLOP/s per device * devices)``. The peak is the
dense bf16/fp16 figure of the device's datasheet (`PEAK_FLOPS`); it is unknown (``None``, and so
is the MFU) on a CPU, for float32 compute, and for devices not in the table. The achieved
TFLOP/s are reported either way.

Example:
  >>> from lora_jax.models import LlamaConfig, build
  >>> model = build(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
  ...                           num_attention_heads=4))
  >>> matmul_params(model)  # 2 layers x (4 * 32*32 + 3 * 32*64) + the head 32*100
  23680
  >>> step_flops(model, batch=2, seq_len=8)  # 4*N*T + 6*B*S^2*D*L
  1564672.0
"""

from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["PEAK_FLOPS", "matmul_params", "step_flops", "peak_flops", "mfu"]

# Dense bf16/fp16 peak FLOP/s per device, by a substring of jax's ``device_kind`` (NVIDIA
# datasheets, SXM parts, no sparsity; Google Cloud TPU pages). First match wins.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12,
              "TPU v6": 918e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v4": 275e12}


def _leaves(model):
    from ..models import leaves_of

    return leaves_of(model)


def matmul_params(model) -> int:
    """``N``: the weights of ``model``'s matmuls (Dense kernels of every layer, the output head;
    the embedding when it is tied to the head)."""
    c = model.config
    n_layers = int(c.num_hidden_layers)
    n = 0
    for lf in _leaves(model):
        size = int(np.prod(lf.shape)) * (n_layers if lf.layered else 1)
        if lf.path.endswith("/kernel"):
            n += size
        elif lf.path.endswith("/embedding") and getattr(c, "tie_word_embeddings", False) \
                and lf.shape[0] == c.vocab_size:
            n += size
    return n


def _attention_width(c) -> int:
    heads = int(c.num_attention_heads)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return heads * int(head_dim)


def step_flops(model, batch: int, seq_len: int, *, n_lora: int = 0, full: bool = False) -> float:
    """Model FLOPs of one training step of ``batch`` sequences of ``seq_len`` tokens (see the module
    docstring): ``full=True`` trains every weight (``6*N*T``), else the base is frozen (``4*N*T``)
    and ``n_lora`` adapter parameters train (``6*N_lora*T``); plus causal attention."""
    t = float(batch) * float(seq_len)
    n = float(matmul_params(model))
    attn = 6.0 * batch * float(seq_len) ** 2 * _attention_width(model.config) * int(model.config.num_hidden_layers)
    return (6.0 if full else 4.0) * n * t + 6.0 * float(n_lora) * t + attn


def peak_flops(device=None, dtype="bfloat16") -> Optional[float]:
    """The dense peak FLOP/s of one ``device`` (default: the first) computing in ``dtype``, or None
    when it is not known (CPU, float32, a device not in `PEAK_FLOPS`)."""
    import jax
    import jax.numpy as jnp

    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return None
    device = jax.devices()[0] if device is None else device
    if device.platform == "cpu":
        return None
    kind = str(getattr(device, "device_kind", ""))
    return next((v for k, v in PEAK_FLOPS.items() if k.lower() in kind.lower()), None)


def mfu(flops: float, seconds: float, peak_per_device: Optional[float], devices: int = 1) -> Optional[float]:
    """``flops / seconds / (peak_per_device * devices)``, or None without a known peak."""
    if not peak_per_device or seconds <= 0:
        return None
    return flops / seconds / (peak_per_device * devices)

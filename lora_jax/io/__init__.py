"""Saving and loading: adapter files for any pytree (`save_adapter`, `load_adapter`).

Hugging Face checkpoints and PEFT adapters live in `lora_jax.hf` (it imports transformers, so it
is a separate package and not loaded by ``import lora_jax``).
"""

from .adapter import load_adapter, save_adapter

__all__ = ["save_adapter", "load_adapter"]

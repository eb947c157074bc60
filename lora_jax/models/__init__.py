"""lora_jax's own Flax models: today's Hugging Face families, built for fast LoRA training.

One module per family on shared building blocks (`layers`): `llama` (Llama 2/3, Mistral, Qwen2,
Qwen3), `moe` (Qwen3-MoE, Mixtral), `gemma` (Gemma 2, Gemma 3 text), `phi3`, `gpt2`, `bert`. Each loads and writes Hugging Face
checkpoints without torch (`load`, `save`) and decodes with a KV cache (`generate`). The model code
knows nothing of LoRA: ``lora.wrap(model.apply)`` adds it.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lora_jax.models import LlamaConfig, build, init_params
  >>> model = build(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
  ...                           num_attention_heads=4))
  >>> model.apply({"params": init_params(model, jax.random.key(0))}, jnp.zeros((1, 5), jnp.int32)).shape
  (1, 5, 97)
"""

from .._lazy import require as _require

_require("lora_jax.models", "hf")

from .checkpoint import load, read_weights, save
from .family import (HEADS, SUPPORTED_MODEL_TYPES, Family, Leaf, build, config_from_hf, family_for, head_of,
                     hf_config_dict, init_params, leaves_of, params_from_state, state_from_params, torch_class)
from .generate import generate
from .llama import LlamaConfig, LlamaForCausalLM, LlamaModel
from .moe import MoeConfig, MoeForCausalLM, MoeModel

__all__ = [
    "load", "save", "read_weights", "generate",
    "build", "config_from_hf", "init_params", "family_for", "head_of", "torch_class", "hf_config_dict",
    "leaves_of", "params_from_state", "state_from_params", "Family", "Leaf", "SUPPORTED_MODEL_TYPES", "HEADS",
    "LlamaConfig", "LlamaForCausalLM", "LlamaModel", "MoeConfig", "MoeForCausalLM", "MoeModel",
]

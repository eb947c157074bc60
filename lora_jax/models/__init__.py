"""Fast Flax models for LoRA training with lora_jax (the model code knows nothing of LoRA).

>>> from lora_jax.models import LlamaConfig, LlamaForCausalLM, load_hf, generate  # doctest: +SKIP
"""

from .llama import (LlamaConfig, LlamaForCausalLM, from_hf_config, generate, hf_module_name, hf_param_name,
                    init_cache, init_params, load_hf, to_hf_state_dict)
from .safetensors_io import read_safetensors, read_checkpoint_dir

__all__ = [
    "LlamaConfig", "LlamaForCausalLM", "from_hf_config", "generate", "hf_module_name", "hf_param_name",
    "init_cache", "init_params", "load_hf", "to_hf_state_dict", "read_safetensors", "read_checkpoint_dir",
]

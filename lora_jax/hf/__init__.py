"""Hugging Face interop: transformers checkpoints and PyTorch PEFT adapters, in and out, without torch.

Example::

    import lora_jax as lora, lora_jax.hf as hf
    model, params = hf.from_pretrained("path/to/llama")      # transformers Flax model + params, no torch
    lp = lora.init(params, hf.rules_for(model, "all-linear", rank=16), 0)
    # ... train lp ...
    hf.save_peft("adapter", lp, model)       # PyTorch: PeftModel.from_pretrained(base, "adapter")
    hf.save_merged("merged", model, lp)      # PyTorch: AutoModelForCausalLM.from_pretrained("merged")
    lp = hf.load_peft("adapter_from_pytorch", params, model)

Supported architectures: GPT-2, Llama, Mistral, Qwen2 (causal LM and base model) and BERT (base
model and sequence classification), through the transformers Flax ports. See `lora_jax.hf.arch`.
"""

from .arch import SUPPORTED
from .checkpoint import from_pretrained, save_merged
from .convert import flax_to_torch, kernel_layout, torch_key, torch_module_name, torch_to_flax
from .peft import load_peft, save_peft
from .presets import PEFT_DEFAULT_TARGETS, PRESETS, rules_for

__all__ = [
    "from_pretrained", "save_merged",
    "save_peft", "load_peft",
    "rules_for", "PRESETS", "PEFT_DEFAULT_TARGETS",
    "torch_to_flax", "flax_to_torch", "torch_key", "torch_module_name", "kernel_layout",
    "SUPPORTED",
]

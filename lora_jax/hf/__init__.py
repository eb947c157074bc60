"""Hugging Face interop: checkpoints and PyTorch PEFT adapters, in and out, without torch.

Example::

    import lora_jax as lora, lora_jax.hf as hf
    model, params = hf.from_pretrained("path/to/Llama-3.2-1B")    # lora_jax's own Flax model + params
    lp = lora.init(params, hf.rules_for(model, "all-linear", rank=16), 0)
    # ... train lp through lora.wrap(model.apply) ...
    hf.save_peft("adapter", lp, model)       # PyTorch: PeftModel.from_pretrained(base, "adapter")
    hf.save_merged("merged", model, lp)      # PyTorch: AutoModelForCausalLM.from_pretrained("merged")
    lp = hf.load_peft("adapter_from_pytorch", params, model)
    hf.merge_checkpoint("path/to/Llama-3.1-8B", "adapter", "merged-8b")  # any PEFT adapter, shard by shard

Supported ``model_type`` values: `SUPPORTED` (Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3, OLMo 2, Qwen3-MoE, Mixtral, Gemma 2,
Gemma 3 text, Phi-3, GPT-2, BERT); see `lora_jax.models`.
"""

from .._lazy import require as _require

_require("lora_jax.hf", "hf")

from ..models.family import SUPPORTED_MODEL_TYPES as SUPPORTED
from .checkpoint import from_pretrained, save_merged
from .merge import merge_checkpoint
from .peft import load_peft, save_peft
from .presets import PRESETS, peft_default_targets, rules_for

__all__ = [
    "from_pretrained", "save_merged", "merge_checkpoint",
    "save_peft", "load_peft",
    "rules_for", "PRESETS", "peft_default_targets",
    "SUPPORTED",
]

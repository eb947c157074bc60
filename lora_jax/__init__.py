"""lora_jax: LoRA for JAX, the functional way.

>>> import jax, jax.numpy as jnp, optax, lora_jax as lora
>>> params = {"dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
>>> lp = lora.init(params, lora.Rules(["dense"], rank=2, alpha=4), jax.random.key(0))
>>> tx = lora.freeze(optax.adamw(3e-4), lp)
>>> y = lora.wrap(lambda p, x: x @ p["dense"]["kernel"] + p["dense"]["bias"])(lp, jnp.ones((2, 8)))
>>> merged = lora.merge(lp)
"""

from .weight import AdapterSettings, LoraWeight, Trainable, is_lora
from .rules import Rule, Rules
from .tree import init, merge, unmerge, trainable_mask, split, combine, count, summary, Count
from .optim import freeze, labels
from .interpreter import wrap, MaterializeWarning, register_rule
from .adapters import add, select, delete, adapter_names, combine_adapters
from .quant import QuantizedArray, quantize, dequantize
from .io import save_adapter, load_adapter

__version__ = "0.1.0"

__all__ = [
    "AdapterSettings", "LoraWeight", "Trainable", "is_lora",
    "Rule", "Rules",
    "init", "merge", "unmerge", "trainable_mask", "split", "combine", "count", "summary", "Count",
    "freeze", "labels",
    "wrap", "MaterializeWarning", "register_rule",
    "add", "select", "delete", "adapter_names", "combine_adapters",
    "QuantizedArray", "quantize", "dequantize",
    "save_adapter", "load_adapter",
]

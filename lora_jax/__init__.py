"""lora_jax: LoRA for JAX, the functional way.

>>> import jax, jax.numpy as jnp, optax, lora_jax as lora
>>> params = {"dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
>>> lp = lora.init(params, lora.Rules(["dense"], rank=2, alpha=4), jax.random.key(0))
>>> tx = lora.freeze(optax.adamw(3e-4), lp)
>>> y = lora.wrap(lambda p, x: x @ p["dense"]["kernel"] + p["dense"]["bias"])(lp, jnp.ones((2, 8)))
>>> merged = lora.merge(lp)
"""

from ._lazy import exports as _exports

_WHERE = {
    **dict.fromkeys(["AdapterSettings", "LoraWeight", "Trainable", "is_lora"], "weight"),
    **dict.fromkeys(["Rule", "Rules"], "rules"),
    **dict.fromkeys(["init", "merge", "unmerge", "trainable_mask", "split", "combine", "count", "summary", "Count"],
                    "tree"),
    **dict.fromkeys(["freeze", "labels"], "optim"),
    **dict.fromkeys(["wrap", "MaterializeWarning", "register_rule"], "interpreter"),
    **dict.fromkeys(["add", "select", "delete", "adapter_names", "combine_adapters"], "adapters"),
    **dict.fromkeys(["QuantizedArray", "quantize", "dequantize"], "quant"),
    **dict.fromkeys(["save_adapter", "load_adapter"], "io"),
    **dict.fromkeys(["AdapterBank", "Slot"], "bank"),
}
__getattr__, __dir__ = _exports(__name__, _WHERE)

__version__ = "0.1.0"

__all__ = list(_WHERE)

"""The public line for extension authors: primitive rules, adapter variants, storage forms.

`lora.wrap` keeps a LoRA weight factorized through every primitive it has a rule for; a new
primitive rule, adapter variant or way of storing the frozen base plugs in through these names,
which stay stable while the modules they come from are internal:

* primitive rules (the contract: `lora_jax.evaluator`'s module docstring): `register_rule`,
  `layout_rule` (a primitive that only rearranges the weight, in one line), `fallback` (give up:
  merge for this use, exact), `bind`, `primitive`, the lazy weight `Lazy` (``w + a @ b`` in a
  layout), `is_lazy`, `dense`, `Ctx`, `MaterializeWarning`;
* adapter variants: `Variant` (the interface: its own array ``m``, init, merge, unmerge, its PEFT
  names, whether it combines, and optionally its factorized form inside `lora.wrap`), and
  `register_variant` (then ``lora.Rules(..., variant=name)``, adapter files and the trainer's
  ``lora.variant`` accept it); `Lora` and `Dora` are the built-in ones, `get_variant` finds one;
* storage forms: `StoredArray` (a frozen base kept in another form: ``shape``, ``dtype``,
  ``dequantize``, ``unstacked``, ``requantize``), `is_stored`, `dense_base`.

Example (a primitive that only rearranges the weight: ``2 (w + a b) = 2 w + (2 a) b``):
  >>> import jax, jax.numpy as jnp, lora_jax as lora
  >>> from lora_jax import extend
  >>> twice_p = jax.extend.core.Primitive("twice")
  >>> _ = twice_p.def_impl(lambda x: 2 * x); _ = twice_p.def_abstract_eval(lambda x: x)
  >>> _ = extend.layout_rule(twice_p, lambda lz, eqn, others: {"a": 2 * lz.a})
  >>> lp = lora.init({"w": jnp.ones((4, 3))}, lora.Rules("w", rank=2, init=False), 0)
  >>> f = lambda p, x: x @ twice_p.bind(p["w"])
  >>> bool(jnp.allclose(lora.wrap(f)(lp, jnp.ones((1, 4))), f(lora.merge(lp), jnp.ones((1, 4)))))
  True
"""

from .evaluator import (Ctx, Lazy, MaterializeWarning, bind, dense, fallback, is_lazy, layout_rule, primitive,
                        register_rule)
from .variants import Dora, Lora, Variant, get_variant, register_variant
from .weight import StoredArray, dense_base, is_stored

__all__ = ["register_rule", "layout_rule", "fallback", "bind", "primitive", "Lazy", "is_lazy", "dense", "Ctx",
           "MaterializeWarning", "Variant", "Lora", "Dora", "register_variant", "get_variant", "StoredArray",
           "is_stored", "dense_base"]

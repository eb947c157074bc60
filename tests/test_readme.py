"""The README's Python usage runs as written, on a small attention-like Flax model."""

import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lora

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        q = nn.Dense(32, name="q_proj")(x)
        v = nn.Dense(32, name="v_proj")(x)
        h = nn.Dense(16, name="o_proj")(jax.nn.relu(q) * v)
        return nn.Dense(5, name="head")(h)


def _python_blocks():
    text = open(README, encoding="utf-8").read()
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_usage_blocks_run_and_train():
    blocks = _python_blocks()
    assert len(blocks) >= 2
    model = Block()
    x = jax.random.normal(jax.random.key(1), (8, 24))
    params = model.init(jax.random.key(0), x)["params"]
    ns = {"params": params, "key": jax.random.key(2), "model": _Apply(model), "x": x, "optax": optax, "jax": jax}
    exec(blocks[0], ns)  # the 4-line usage
    lp = ns["lora_params"]
    assert {p.split("/")[0] for p, _ in lora.tree.lora_items(lp)} == {"q_proj", "v_proj"}
    np.testing.assert_array_equal(ns["logits"], ns["model"].apply(params, x))  # identity at init
    exec(blocks[1], ns)  # the training step
    y = jnp.arange(8) % 5
    tr, fr, st = ns["trainable"], ns["frozen"], ns["opt_state"]
    losses = []
    for _ in range(20):
        tr, st, loss = ns["step"](tr, fr, st, x, y)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.05
    merged = lora.merge(lora.combine(tr, fr))
    np.testing.assert_allclose(lora.wrap(ns["model"].apply)(lora.combine(tr, fr), x),
                               ns["model"].apply(merged, x), rtol=1e-5, atol=1e-5)
    for name in ("o_proj", "head"):  # untargeted kernels are exactly the base
        np.testing.assert_array_equal(merged[name]["kernel"], params[name]["kernel"])


class _Apply:
    """``model.apply(params, x)`` over the bare params dict, as the README writes it."""

    def __init__(self, module):
        self.module = module

    def apply(self, params, x):
        return self.module.apply({"params": params}, x)

"""`jax.pmap` over a `lora.wrap` train step (with `lora.freeze` and `lax.pmean`) gives the
single-device losses and adapters (4 fake CPU devices; tests/conftest.py starts JAX with 8)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lora

from helpers import rand

DEVICES = 4


def model(p, x):
    h = jnp.tanh(x @ p["up"]["kernel"] + p["up"]["bias"])
    return h @ p["down"]["kernel"]


def test_pmap_train_step_equals_single_device():
    # tests/conftest.py gives 8 fake CPU devices; fewer means the test would prove nothing
    assert jax.local_device_count() >= DEVICES, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    params = {"up": {"kernel": rand(0, (8, 16), scale=0.3), "bias": jnp.zeros(16)},
              "down": {"kernel": rand(1, (16, 4), scale=0.3)}}
    lp = lora.init(params, lora.Rules(["up", "down"], rank=2, alpha=4), jax.random.key(0))
    tx = lora.freeze(optax.adam(1e-2), lp)
    x, y = rand(2, (16, 8)), rand(3, (16, 4))

    def loss(lp, x, y):
        return jnp.mean((lora.wrap(model)(lp, x) - y) ** 2)

    def step(lp, opt, x, y, axis=None):
        value, grads = jax.value_and_grad(loss)(lp, x, y)
        if axis is not None:
            value, grads = jax.lax.pmean((value, grads), axis)
        updates, opt = tx.update(grads, opt, lp)
        return optax.apply_updates(lp, updates), opt, value

    single = jax.jit(step)
    parallel = jax.pmap(lambda lp, opt, x, y: step(lp, opt, x, y, "d"), axis_name="d",
                        devices=jax.devices()[:DEVICES])
    replicate = lambda t: jax.tree_util.tree_map(lambda v: jnp.stack([v] * DEVICES), t)  # noqa: E731
    shard = lambda v: v.reshape((DEVICES, -1) + v.shape[1:])  # noqa: E731

    lp1, opt1 = lp, tx.init(lp)
    lpn, optn = replicate(lp), replicate(tx.init(lp))
    losses1, lossesn = [], []
    for _ in range(4):
        lp1, opt1, l1 = single(lp1, opt1, x, y)
        lpn, optn, ln = parallel(lpn, optn, shard(x), shard(y))
        losses1.append(float(l1))
        lossesn.append(np.asarray(ln))
    for l1, ln in zip(losses1, lossesn):
        np.testing.assert_allclose(ln, np.full(DEVICES, l1), rtol=2e-6)  # every replica: the global loss
    assert losses1[-1] < losses1[0]  # it trained
    for a, b in zip(jax.tree_util.tree_leaves(lp1), jax.tree_util.tree_leaves(lpn)):
        np.testing.assert_allclose(np.asarray(b), np.broadcast_to(np.asarray(a), b.shape), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(lpn["up"]["kernel"].w[0]), np.asarray(params["up"]["kernel"]))

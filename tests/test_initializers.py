"""PiSSA / OLoRA / gaussian / kaiming inits: invariants and parity with PEFT on the same weights."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import lora_jax as lora

from helpers import f64, rand


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 1e-2)])
def test_merge_at_init_reproduces_w(init, dtype, tol):
    params = {"k": rand(0, (48, 32), dtype), "stack": rand(1, (3, 16, 24), dtype)}
    rules = lora.Rules([lora.Rule(["k"]), lora.Rule(["stack"], stack_axes=1)], rank=4, alpha=8, init=init)
    lp = lora.init(params, rules, 0)
    merged = lora.merge(lp)
    for name in params:
        lw = lp[name]
        assert lw.w.dtype == dtype and not np.allclose(f64(lw.w), f64(params[name]))  # the base became a residual
        np.testing.assert_allclose(f64(merged[name]), f64(params[name]), rtol=tol, atol=tol * np.abs(f64(params[name])).max())


def test_pissa_captures_the_principal_subspace():
    w = rand(0, (40, 30))
    lp = lora.init({"k": w}, lora.Rules("k", rank=5, alpha=10, init="pissa"), 0)
    lw = lp["k"]
    s = np.linalg.svd(f64(w), compute_uv=False)
    # the adapter's delta is the best rank-5 approximation; the residual holds the rest of the spectrum
    np.testing.assert_allclose(np.linalg.svd(f64(lw.delta()), compute_uv=False)[:5], s[:5], rtol=1e-5)
    np.testing.assert_allclose(np.linalg.svd(f64(lw.w), compute_uv=False)[:25], s[5:], rtol=1e-4, atol=1e-5)
    # on a kernel with a decaying spectrum (as trained kernels have), the randomized SVD with a few
    # subspace iterations finds the same principal subspace
    u, _, vt = np.linalg.svd(f64(w), full_matrices=False)
    w2 = jnp.asarray((u * 0.7 ** np.arange(30)) @ vt, jnp.float32)
    exact = lora.init({"k": w2}, lora.Rules("k", rank=5, alpha=10, init="pissa"), 0)["k"]
    fast = lora.init({"k": w2}, lora.Rules("k", rank=5, alpha=10, init="pissa_niter_8"), 0)["k"]
    err = np.linalg.norm(f64(fast.delta()) - f64(exact.delta())) / np.linalg.norm(f64(exact.delta()))
    assert err < 1e-2  # the randomized SVD converges as (s6/s5)^(2 niter + 1) = 0.7^17 ~ 0.002


def _peft_linear(w_torch, init, r, alpha):
    from peft import LoraConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(w_torch.shape[1], w_torch.shape[0], bias=False)

    net = Net()
    with torch.no_grad():
        net.lin.weight.copy_(w_torch)
    return get_peft_model(net, LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"], init_lora_weights=init))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_same_factors_as_peft(init):
    w = rand(3, (24, 40))  # Flax layout (in, out); torch holds w.T
    r, alpha = 4, 8
    peft_model = _peft_linear(torch.tensor(np.asarray(w).T.copy()), init, r, alpha)
    layer = peft_model.base_model.model.lin
    a_t = layer.lora_A["default"].weight.detach().numpy().astype(np.float64)  # (r, in)
    b_t = layer.lora_B["default"].weight.detach().numpy().astype(np.float64)  # (out, r)
    w_t = layer.base_layer.weight.detach().numpy().astype(np.float64)  # residual (out, in)
    lw = lora.init({"k": w}, lora.Rules("k", rank=r, alpha=alpha, init=init), 0)["k"]
    # singular vectors / QR columns are defined up to sign: compare rank-1 terms, then the products
    for j in range(r):
        ours = np.outer(f64(lw.a)[:, j], f64(lw.b)[j])
        theirs = np.outer(a_t[j], b_t[:, j])
        np.testing.assert_allclose(ours, theirs, atol=2e-5)
    np.testing.assert_allclose(f64(lw.w), w_t.T, atol=2e-5)


def test_embedding_default_init_follows_peft():
    lp = lora.init({"wte": {"embedding": rand(0, (100, 32))}, "q": {"kernel": rand(1, (32, 32))}},
                   lora.Rules(["wte", "q"], rank=8), 0)
    e, q = lp["wte"]["embedding"], lp["q"]["kernel"]
    assert np.all(np.asarray(e.a) == 0) and abs(float(jnp.std(e.b)) - 1) < 0.1  # A zero, B ~ N(0, 1)
    assert np.all(np.asarray(q.b) == 0) and np.any(np.asarray(q.a) != 0)  # linear: A kaiming, B zero

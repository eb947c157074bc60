"""The same tiny run on different meshes gives the same losses and adapter; factors are sharded
like their kernels; gradient accumulation changes nothing."""

import jax
import numpy as np
import pytest

import lora_jax as lora
from lora_jax.train import sharding as shd
from lora_jax.train.model import forward, make_apply
from lora_jax.train.trainer import LoopSpec, Trainer

from train_helpers import synthetic_rows, tiny_model


def _spec(x):
    s = tuple(x.sharding.spec)
    return s + (None,) * (x.ndim - len(s))


_RUNS = {}


def _run(data, fsdp, tensor, grad_accum=1, evals=False, remat="none", dtype="float32"):
    """The tiny LoRA run on a (data, fsdp, tensor) mesh; cached, as each costs a compile."""
    key = (data, fsdp, tensor, grad_accum, remat, dtype)
    if key in _RUNS:
        return _RUNS[key]
    if dtype == "float32":
        model, params = tiny_model()
    else:
        from lora_jax.train.model import new_model
        from train_helpers import TINY_INIT, VOCAB

        model, params = new_model(TINY_INIT, vocab_size=VOCAB, seed=0, compute_dtype=dtype)
    lp = lora.init(params, lora.Rules("all-linear", rank=4, alpha=8, init=False), jax.random.key(0))
    trainable, frozen = lora.split(lp)
    apply = make_apply(model)
    # SGD, not Adam: Adam divides each update by the gradient's own scale, so a gradient component
    # that is ~0 gets a +-lr update whose sign is rounding noise (and a wrong gradient scale would go
    # unseen); SGD's updates are linear in the gradients, so the adapters must agree as tightly as the
    # gradients do.
    spec = LoopSpec(steps=4, batch_size=16, grad_accum=grad_accum, lr=0.5, optimizer="sgd", warmup_steps=0,
                    log_every=1, progress=False, remat=remat)
    tr = Trainer(spec, mesh=shd.make_mesh(data, fsdp, tensor), trainable=trainable, frozen=frozen,
                 rows=synthetic_rows(), eval_rows=synthetic_rows(6, seed=1) if evals else None,
                 logits_fn=lambda t, f, x, m, rng: forward(apply, lora.combine(t, f), x, m, rng=rng), seed=0,
                 echo=lambda *a: None)
    tr.fit()
    _RUNS[key] = tr, [l for _, l in tr.history], [e["eval_loss"] for e in tr.evals]
    return _RUNS[key]


@pytest.fixture(scope="module")
def reference():
    """One device: the reference run."""
    return _run(1, 1, 1, evals=True)


@pytest.mark.parametrize("data,fsdp,tensor,grad_accum,remat", [
    (8, 1, 1, 1, "nothing_saveable"), (2, 4, 1, 1, "none"), (1, 8, 1, 2, "none"), (2, 2, 2, 1, "dots_saveable")])
def test_same_losses_and_adapter_on_every_mesh(reference, data, fsdp, tensor, grad_accum, remat):
    """(1, 8) runs with two micro-batches of 8, two runs rematerialize: none of it may change the result."""
    ref, ref_losses, ref_evals = reference
    tr, losses, _ = _run(data, fsdp, tensor, grad_accum, remat=remat)
    assert len(losses) == 4
    assert ref_evals[-1] < ref_evals[0] - 0.01  # it learns
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    got = jax.tree_util.tree_leaves(jax.device_get(tr.trainable))
    want = jax.tree_util.tree_leaves(jax.device_get(ref.trainable))
    assert len(got) == len(want) == 2 * 7 * 2  # a and b of 7 kernels in 2 layers
    for g, w in zip(got, want):  # f32 rounding noise scales with each array's magnitude
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())
    init = jax.tree_util.tree_leaves(jax.device_get(lora.split(lora.init(
        tiny_model()[1], lora.Rules("all-linear", rank=4, alpha=8, init=False), jax.random.key(0)))[0]))
    assert max(float(np.abs(g - i).max()) for g, i in zip(got, init)) > 1e-3  # the adapter moved


def _lw(tree, layer, module):
    grp = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
    return tree["model"]["layers"][str(layer)][grp][module]["kernel"]


def test_factors_are_sharded_like_their_kernels():
    tr, _, _ = _run(2, 4, 1, 1, remat="none")
    t, f = tr.trainable, tr.frozen
    # q_proj (32, 32): fsdp on the first of two equal axes (input) -> a splits its input axis
    q, qf = _lw(t, 0, "q_proj"), _lw(f, 0, "q_proj")
    assert _spec(qf.w) == ("fsdp", None)
    assert _spec(q.a) == ("fsdp", None) and _spec(q.b) == (None, None)
    # up_proj (32, 48): the output axis is larger -> b splits its output axis, a is replicated
    u, uf = _lw(t, 1, "up_proj"), _lw(f, 1, "up_proj")
    assert _spec(uf.w) == (None, "fsdp")
    assert _spec(u.a) == (None, None) and _spec(u.b) == (None, "fsdp")
    # down_proj (48, 32): input axis larger
    d = _lw(t, 0, "down_proj")
    assert _spec(_lw(f, 0, "down_proj").w) == ("fsdp", None) and _spec(d.a) == ("fsdp", None)
    # k_proj (32, 16) with 2 kv heads of 8
    k = _lw(t, 0, "k_proj")
    assert _spec(_lw(f, 0, "k_proj").w) == ("fsdp", None) and _spec(k.a) == ("fsdp", None)
    # the optimizer moments follow their parameter
    mu = tr.state["opt_state"][1][0].trace  # chain(clip, sgd): the momentum trace
    assert _spec(_lw(mu, 1, "up_proj").b) == (None, "fsdp")
    assert _spec(_lw(mu, 0, "q_proj").a) == ("fsdp", None)
    # the embedding (97, 32): 97 does not divide by 4 -> hidden axis
    assert _spec(f["model"]["embed_tokens"]["embedding"]) == (None, "fsdp")
    # frozen vectors are replicated
    assert _spec(f["model"]["norm"]["weight"]) == (None,)


def test_tensor_axis_shards_columns_and_rows():
    tr, _, _ = _run(2, 2, 2, 1, remat="dots_saveable")
    t, f = tr.trainable, tr.frozen
    # column-parallel q_proj: output axis on tensor, input on fsdp
    assert _spec(_lw(f, 0, "q_proj").w) == ("fsdp", "tensor")
    assert _spec(_lw(t, 0, "q_proj").a) == ("fsdp", None) and _spec(_lw(t, 0, "q_proj").b) == (None, "tensor")
    # row-parallel o_proj: input axis on tensor
    assert _spec(_lw(f, 0, "o_proj").w) == ("tensor", "fsdp")
    assert _spec(_lw(t, 0, "o_proj").a) == ("tensor", None) and _spec(_lw(t, 0, "o_proj").b) == (None, "fsdp")


def test_bfloat16_compute_keeps_float32_adapter_and_optimizer_state(reference):
    _, ref_losses, _ = reference
    tr, losses, _ = _run(2, 4, 1, 1, dtype="bfloat16")
    leaves = jax.tree_util.tree_leaves(tr.state["params"]) + jax.tree_util.tree_leaves(tr.state["opt_state"])
    assert {str(x.dtype) for x in leaves if x.ndim} == {"float32"}
    assert {str(x.dtype) for x in jax.tree_util.tree_leaves(tr.frozen)} == {"float32"}  # param_dtype
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-2)  # bf16 activations: ~3 significant digits
    assert not np.allclose(losses, ref_losses, rtol=1e-6)  # and they really were bf16


def test_kernel_spec_rules():
    sizes = {"data": 1, "fsdp": 4, "tensor": 1}
    assert shd.kernel_spec("a/kernel", (6, 10), sizes) == (None, None)  # nothing divides by 4
    assert shd.kernel_spec("a/kernel", (8, 12), sizes) == (None, "fsdp")
    assert shd.kernel_spec("a/bias", (16,), sizes) == (None,)
    # stacked kernels: the stack axis is never split
    assert shd.kernel_spec("h/kernel", (16, 8, 4), sizes, layout="sio") == (None, "fsdp", None)
    a, b = shd.lora_factor_specs(("x", "fsdp", None), "sio")
    assert a == ("x", "fsdp", None) and b == ("x", None, None)
    with pytest.raises(ValueError, match="needs 16 devices but only 8"):
        shd.make_mesh(4, 4, 1)
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        shd.make_mesh(-1, -1, 1)

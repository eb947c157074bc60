"""The same tiny run on different meshes gives the same losses and adapter; factors are sharded
like their kernels; gradient accumulation changes nothing."""

import jax
import numpy as np
import pytest

import lora_jax as lora
from lora_jax.models.family import roles_of
from lora_jax.train import sharding as shd
from lora_jax.train.model import lora_logits_fn, lora_rules, stacked_paths
from lora_jax.train.trainer import LoopSpec, Trainer

from train_helpers import synthetic_rows, tiny_model


def _spec(x):
    s = tuple(x.sharding.spec)
    return s + (None,) * (x.ndim - len(s))


_RUNS = {}


def _rules(model):
    return lora_rules(model, "all-linear", rank=4, alpha=8, init=False)


def _run(data, fsdp, tensor, grad_accum=1, evals=False, remat="none", dtype="float32"):
    """The tiny LoRA run on a (data, fsdp, tensor) mesh; cached, as each costs a compile. ``remat``
    is the model's: each scanned layer rematerialized with that policy."""
    key = (data, fsdp, tensor, grad_accum, remat, dtype)
    if key in _RUNS:
        return _RUNS[key]
    if dtype == "float32" and remat == "none":
        model, params = tiny_model()
    else:
        from lora_jax.train.model import new_model
        from train_helpers import TINY_INIT, VOCAB

        model, params = new_model(TINY_INIT, vocab_size=VOCAB, seed=0, compute_dtype=dtype, remat=remat)
    assert model.config.remat_policy == (None if remat == "none" else remat)
    lp = lora.init(params, _rules(model), jax.random.key(0))
    trainable, frozen = lora.split(lp)
    # SGD, not Adam: Adam divides each update by the gradient's own scale, so a gradient component
    # that is ~0 gets a +-lr update whose sign is rounding noise (and a wrong gradient scale would go
    # unseen); SGD's updates are linear in the gradients, so the adapters must agree as tightly as the
    # gradients do.
    spec = LoopSpec(steps=4, batch_size=16, grad_accum=grad_accum, lr=0.5, optimizer="sgd", warmup_steps=0,
                    log_every=1, progress=False)
    tr = Trainer(spec, mesh=shd.make_mesh(data, fsdp, tensor), trainable=trainable, frozen=frozen,
                 rows=synthetic_rows(), eval_rows=synthetic_rows(6, seed=1) if evals else None,
                 logits_fn=lora_logits_fn(model), seed=0, echo=lambda *a: None, stacked=stacked_paths(model),
                 roles=roles_of(model))
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
    assert len(got) == len(want) == 2 * 7  # a and b of 7 kernels, each stacked over the 2 layers
    for g, w in zip(got, want):  # f32 rounding noise scales with each array's magnitude
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())
    init = jax.tree_util.tree_leaves(jax.device_get(lora.split(lora.init(
        tiny_model()[1], _rules(tiny_model()[0]), jax.random.key(0)))[0]))
    assert max(float(np.abs(g - i).max()) for g, i in zip(got, init)) > 1e-3  # the adapter moved


def _lw(tree, module):
    """The stacked ``(layers, in, out)`` kernel of ``module`` (its LoRA node in a LoRA tree)."""
    grp = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
    return tree["model"]["layers"][grp][module]["kernel"]


def test_factors_are_sharded_like_their_kernels():
    tr, _, _ = _run(2, 4, 1, 1, remat="none")
    t, f = tr.trainable, tr.frozen
    # every kernel is stacked (2 layers, in, out): the layer axis is never split
    # q_proj (2, 32, 32): fsdp on the first of two equal axes (input) -> a splits its input axis
    q, qf = _lw(t, "q_proj"), _lw(f, "q_proj")
    assert qf.w.shape == (2, 32, 32) and qf.layout == "sio"
    assert _spec(qf.w) == (None, "fsdp", None)
    assert _spec(q.a) == (None, "fsdp", None) and _spec(q.b) == (None, None, None)
    # up_proj (2, 32, 48): the output axis is larger -> b splits its output axis, a is replicated
    u, uf = _lw(t, "up_proj"), _lw(f, "up_proj")
    assert _spec(uf.w) == (None, None, "fsdp")
    assert _spec(u.a) == (None, None, None) and _spec(u.b) == (None, None, "fsdp")
    # down_proj (2, 48, 32): input axis larger
    d = _lw(t, "down_proj")
    assert _spec(_lw(f, "down_proj").w) == (None, "fsdp", None) and _spec(d.a) == (None, "fsdp", None)
    # k_proj (2, 32, 16) with 2 kv heads of 8
    k = _lw(t, "k_proj")
    assert _spec(_lw(f, "k_proj").w) == (None, "fsdp", None) and _spec(k.a) == (None, "fsdp", None)
    # the optimizer moments follow their parameter
    mu = tr.state["opt_state"][1][0].trace  # chain(clip, sgd): the momentum trace
    assert _spec(_lw(mu, "up_proj").b) == (None, None, "fsdp")
    assert _spec(_lw(mu, "q_proj").a) == (None, "fsdp", None)
    # the embedding (97, 32): 97 does not divide by 4 -> hidden axis
    assert _spec(f["model"]["embed_tokens"]["embedding"]) == (None, "fsdp")
    # frozen vectors are replicated, per layer too: the stacked norm scales (2, 32)
    assert _spec(f["model"]["norm"]["scale"]) == (None,)
    assert _spec(f["model"]["layers"]["input_layernorm"]["scale"]) == (None, None)


def test_tensor_axis_shards_columns_and_rows():
    tr, _, _ = _run(2, 2, 2, 1, remat="dots_saveable")
    t, f = tr.trainable, tr.frozen
    # column-parallel q_proj: output axis on tensor, input on fsdp
    assert _spec(_lw(f, "q_proj").w) == (None, "fsdp", "tensor")
    assert _spec(_lw(t, "q_proj").a) == (None, "fsdp", None) and _spec(_lw(t, "q_proj").b) == (None, None, "tensor")
    # row-parallel o_proj: input axis on tensor
    assert _spec(_lw(f, "o_proj").w) == (None, "tensor", "fsdp")
    assert _spec(_lw(t, "o_proj").a) == (None, "tensor", None) and _spec(_lw(t, "o_proj").b) == (None, None, "fsdp")
    # the vocab-parallel embedding; the head (not adapted: a plain leaf) is column-parallel
    assert _spec(f["model"]["embed_tokens"]["embedding"]) == (None, "fsdp")  # 97 rows: not divisible by 2
    assert _spec(f["lm_head"]["kernel"]) == ("fsdp", None)  # (32, 97): 97 does not divide by 2 either


def test_plain_stacked_kernels_keep_their_layer_axis_whole():
    """A kernel without LoRA (here k_proj when only q_proj is targeted) is a plain stacked leaf:
    its layer axis is never split, even when it is the largest axis that divides."""
    from lora_jax.train.model import new_model
    from train_helpers import TINY_INIT, VOCAB

    model, params = new_model(TINY_INIT, vocab_size=VOCAB)
    lp = lora.init(params, lora_rules(model, ["q_proj"], rank=2), 0)
    _, frozen = lora.split(lp)
    mesh = shd.make_mesh(1, 8, 1)
    sh = shd.param_shardings(frozen, mesh, stacked_paths(model))
    assert tuple(sh["model"]["layers"]["self_attn"]["k_proj"]["kernel"].spec) == (None, "fsdp", None)  # (2, 32, 16)
    assert tuple(sh["model"]["layers"]["self_attn"]["q_proj"]["kernel"].w.spec) == (None, "fsdp", None)
    # 64 layers: the layer axis is the largest; told it is stacked, fsdp goes to the next one
    tree = {"layers": {"k_proj": {"kernel": np.zeros((64, 32, 16), np.float32)}}}
    assert tuple(shd.param_shardings(tree, mesh, {"layers/k_proj/kernel"})["layers"]["k_proj"]["kernel"].spec) \
        == (None, "fsdp", None)
    assert tuple(shd.param_shardings(tree, mesh)["layers"]["k_proj"]["kernel"].spec) == ("fsdp", None, None)


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


def test_roles_pick_the_tensor_parallel_axis_and_a_missing_role_is_named():
    """The tensor axis follows the declared role, never the name: a column projection splits its
    output, a row projection its input, an embedding its rows, a router or experts nothing; a
    kernel without a role on a tensor-parallel mesh is an error naming it (a name the old regex
    did not know got no split, without a word)."""
    sizes = {"data": 1, "fsdp": 1, "tensor": 2}
    assert shd.kernel_spec("x/my_proj/kernel", (8, 4), sizes, role="column") == (None, "tensor")
    assert shd.kernel_spec("x/my_proj/kernel", (8, 4), sizes, role="row") == ("tensor", None)
    assert shd.kernel_spec("x/my_proj/kernel", (2, 8, 4), sizes, layout="sio", role="row") == (None, "tensor", None)
    assert shd.kernel_spec("e/embedding", (10, 4), sizes, role="embedding") == ("tensor", None)
    assert shd.kernel_spec("lm_head/kernel", (4, 10), sizes, role="head") == (None, "tensor")
    for role in ("router", "expert", None):
        assert shd.kernel_spec("q_proj/kernel", (8, 4), sizes, role=role) == (None, None)
    mesh = shd.make_mesh(1, 1, 2)
    tree = {"blk": {"wq": {"kernel": np.zeros((8, 4), np.float32)}, "ln": {"scale": np.zeros(8, np.float32)}}}
    with pytest.raises(ValueError, match=r"splits each kernel by its role .* 1 have none: \['blk/wq/kernel'\]"):
        shd.param_shardings(tree, mesh)
    got = shd.param_shardings(tree, mesh, roles={"blk/wq/kernel": "row"})
    assert tuple(got["blk"]["wq"]["kernel"].spec) == ("tensor", None) and tuple(got["blk"]["ln"]["scale"].spec) == (None,)
    assert tuple(shd.param_shardings(tree, shd.make_mesh(2, 1, 1))["blk"]["wq"]["kernel"].spec) == (None, None)


@pytest.mark.parametrize("model_type", ["llama", "olmo2", "gemma2", "phi3", "qwen3_moe", "gpt_oss", "gpt2", "bert"])
def test_every_kernel_of_every_family_declares_its_role(model_type):
    """Each family's table gives every kernel and embedding a role, and the roles are the
    Megatron split: q/k/v, gate/up, fused qkv/gate_up, c_attn, c_fc, BERT's query/key/value and
    intermediate are column; o, down, c_proj, BERT's output denses (and pooler) are row."""
    import lora_jax.models as M
    from lora_jax.models.family import leaves_of

    small = {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 97, "head_dim": 8, "n_layer": 2, "n_embd": 32, "n_head": 4,
             "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "num_local_experts": 4}
    head = {"bert": "seq_cls"}.get(model_type, "causal_lm")
    model = M.build(M.config_from_hf({"model_type": model_type, **small}), head)
    column = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "qkv_proj", "gate_up_proj", "c_attn", "c_fc",
              "query", "key", "value"}
    for lf in leaves_of(model):
        *_, module, leaf = lf.path.split("/")
        if len(lf.shape) < 2 or leaf.endswith("_bias"):  # GPT-OSS's expert biases (E, out): no role
            assert lf.role is None, lf
            continue
        want = ("embedding" if leaf == "embedding" else "head" if module in ("lm_head", "classifier")
                else "router" if module in ("gate", "router") else "expert" if module == "experts"
                else "column" if module in column or lf.path.endswith("intermediate/dense/kernel")
                else "row")
        assert lf.role == want, (lf.path, lf.role, want)
    # every leaf has a declared role (or none): a tensor-parallel mesh shards the whole tree
    shapes = jax.eval_shape(lambda: M.init_params(model, jax.random.key(0)))
    shd.param_shardings(shapes, shd.make_mesh(1, 1, 2), roles=roles_of(model))

"""The adapter bank: adapters of any rank <= the bank's, any subset of its targets, swapped without
recompiling; each row of a batch runs with its own slot, equal to a run with that adapter alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lora
import lora_jax.hf as hf
from lora_jax.models import LlamaConfig, build, generate, init_params
from lora_jax.tree import lora_items

from helpers import nonzero_b

CFG = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
K, R = 4, 8


@pytest.fixture(scope="module")
def model_params():
    model = build(CFG)
    return model, init_params(model, jax.random.key(0))


def _apply(model):
    return lambda p, ids, **kw: model.apply({"params": p}, ids, **kw)


def _adapters(model, params, n):
    """``n`` trained-looking adapters, differing in rank, alpha, rsLoRA, targets and layers."""
    presets = ["all-linear", "attention", "peft", "all-linear"]
    out = []
    for i in range(n):
        kw = dict(rank=1 + i % R, alpha=float(2 + 3 * (i % 5)), rslora=bool(i % 3 == 1))
        if i % 4 == 3:
            kw["layers"] = [i % CFG.num_hidden_layers]
        lp = lora.init(params, hf.rules_for(model, presets[i % 4], **kw), i)
        out.append(nonzero_b(lp, seed=i, scale=0.3))
    return out


def test_twenty_swaps_compile_once_and_each_row_is_its_adapter(model_params):
    model, params = model_params
    bank = lora.AdapterBank(params, hf.rules_for(model, "all-linear", rank=R), slots=K, rank=R)
    traces = []

    @jax.jit
    def forward(tree, ids, x):
        traces.append(1)  # runs once per trace, i.e. once per compile
        return lora.wrap(_apply(model), adapter_ids=ids)(tree, x)

    adapters = _adapters(model, params, 20)
    x = jax.random.randint(jax.random.key(1), (2 * K + 2, 7), 0, CFG.vocab_size)
    ids = jnp.asarray(list(range(K)) * 2 + [-1, -1], jnp.int32)
    base = np.asarray(model.apply({"params": params}, x))
    for i, lp in enumerate(adapters):
        k = i % K
        bank.load(k, lp, name=f"a{i}")
        assert bank.slots()[k].name == f"a{i}" and bank.slots()[k].rank == 1 + i % R
        y = np.asarray(forward(bank.tree, ids, x))
        np.testing.assert_allclose(y[-2:], base[-2:], rtol=1e-5, atol=1e-5)  # -1: the base
        if i % 5 == 4 or i >= 16:  # spot checks against the adapter alone (each costs a compile)
            alone = np.asarray(lora.wrap(_apply(model))(lp, x[ids == k]))
            np.testing.assert_allclose(y[np.asarray(ids) == k], alone, rtol=1e-5, atol=1e-5)
            assert np.abs(alone - base[np.asarray(ids) == k]).max() > 1e-3  # the adapter matters
    assert len(traces) == 1
    bank.clear(0)
    y = np.asarray(forward(bank.tree, ids, x))
    np.testing.assert_allclose(y[np.asarray(ids) == 0], base[np.asarray(ids) == 0], rtol=1e-5, atol=1e-5)
    assert bank.slots()[0] is None and len(traces) == 1


def test_refusals_name_slot_module_and_limit_and_change_nothing(model_params, tmp_path):
    model, params = model_params
    bank = lora.AdapterBank(params, hf.rules_for(model, "attention", rank=4), slots=2, rank=4)
    good = nonzero_b(lora.init(params, hf.rules_for(model, "attention", rank=2), 0), scale=0.3)
    bank.load(1, good, name="good")
    before = jax.tree_util.tree_leaves(bank.tree)

    def refused(adapter, *pieces):
        with pytest.raises(ValueError) as e:
            bank.load(1, adapter, name="bad")
        for piece in pieces:
            assert piece in str(e.value), (piece, str(e.value))
        assert bank.slots()[1].name == "good"
        assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(bank.tree), before))

    big = lora.init(params, hf.rules_for(model, "attention", rank=8), 0)
    refused(big, "slot 1", "model/layers/self_attn/q_proj/kernel", "rank 8 is above the bank's rank 4")
    mlp = lora.init(params, hf.rules_for(model, "all-linear", rank=2), 0)
    refused(mlp, "slot 1", "mlp/gate_proj/kernel", "not a kernel the bank covers")
    dora = lora.init(params, hf.rules_for(model, "attention", rank=2, use_dora=True), 0)
    refused(dora, "slot 1", "a DoRA adapter; a bank holds plain LoRA adapters")
    with pytest.raises(ValueError, match="slot must be an index in 0..1, got 2"):
        bank.load(2, good)
    with pytest.raises(ValueError, match="slot 1 already holds an adapter named 'good'"):
        bank.load(0, good, name="good")
    with pytest.raises(ValueError, match="'nope' is neither a loaded adapter"):
        bank.ids(["nope"])
    # a bank over exactly the kernels of the adapters to serve (a mapping path -> layout)
    from lora_jax.tree import lora_items
    covering = lora.AdapterBank(params, {p: lw.layout for p, lw in lora_items(good)}, slots=1, rank=2)
    assert set(covering.targets) == {p for p, _ in lora_items(good)}
    covering.load(0, good)
    with pytest.raises(ValueError, match="(?s)slot 0.*mlp/gate_proj/kernel: not a kernel the bank covers"):
        covering.load(0, mlp)
    with pytest.raises(ValueError, match=r"\['model/nope'\] kernel paths to cover"):
        lora.AdapterBank(params, {"model/nope": "io"}, slots=1, rank=2)


def test_load_from_lora_jax_and_peft_files(model_params, tmp_path):
    model, params = model_params
    bank = lora.AdapterBank(params, hf.rules_for(model, "all-linear", rank=R), slots=2, rank=R)
    one, two = _adapters(model, params, 3)[1:]
    lora.save_adapter(tmp_path / "mine", one)
    bank.load(0, tmp_path / "mine")
    hf.save_peft(tmp_path / "theirs", two, model)
    bank.load(1, hf.load_peft(tmp_path / "theirs", bank.params, model), name="theirs")
    assert [s.name for s in bank.slots()] == ["mine", "theirs"]
    x = jax.random.randint(jax.random.key(2), (4, 6), 0, CFG.vocab_size)
    y = np.asarray(lora.wrap(_apply(model), adapter_ids=bank.ids(["mine", "theirs", "theirs", None]))(bank.tree, x))
    np.testing.assert_allclose(y[0], np.asarray(lora.wrap(_apply(model))(one, x[:1]))[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y[1:3], np.asarray(lora.wrap(_apply(model))(two, x[1:3])), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y[3], np.asarray(model.apply({"params": params}, x[3:]))[0], rtol=1e-5, atol=1e-5)


def test_generate_with_a_bank_equals_each_adapter_alone(model_params):
    model, params = model_params
    bank = lora.AdapterBank(params, hf.rules_for(model, "all-linear", rank=R), slots=3, rank=R)
    adapters = _adapters(model, params, 3)
    for k, lp in enumerate(adapters):
        bank.load(k, lp, name=f"a{k}")
    rows = ["a0", "a1", None, "a2", "a1", "a0"]
    prompts = jax.random.randint(jax.random.key(3), (len(rows), 5), 1, CFG.vocab_size)
    mask = jnp.ones_like(prompts).at[1, :2].set(0).at[4, :1].set(0)  # left padding too
    out = np.asarray(generate(model, bank.tree, prompts, 6, attention_mask=mask, eos_token_id=(),
                              adapter_ids=bank.ids(rows)))
    wrapped = lora.wrap(_apply(model))
    for j, name in enumerate(rows):
        tree, fn = (params, None) if name is None else (adapters[int(name[1])], wrapped)
        alone = np.asarray(generate(model, tree, prompts[j:j + 1], 6, attention_mask=mask[j:j + 1], eos_token_id=(),
                                    apply_fn=fn))
        np.testing.assert_array_equal(out[j], alone[0])
    assert len({tuple(r[5:]) for r in out}) > 2  # the adapters decode differently
    with pytest.raises(ValueError, match="adapter_ids must be an integer array of one id per row"):
        generate(model, bank.tree, prompts, 2, adapter_ids=jnp.zeros((2,), jnp.int32))


def _token_ce(logits, x):
    """Per-row mean next-token cross-entropy."""
    lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    return -jnp.take_along_axis(lp, x[:, 1:, None], axis=-1)[..., 0].mean(axis=1)


def test_several_adapters_train_in_one_step_as_if_alone(model_params):
    """Three adapters (different targets, ranks, alphas, rsLoRA, learning rates, data) on one frozen
    base, trained together: the loss is the sum of each adapter's mean over its own rows and each
    adapter has its own optimizer, so every adapter's losses and factors equal a separate run of it."""
    import optax

    model, params = model_params
    specs = {"x": (dict(preset="all-linear", rank=2, alpha=4.0), 1e-2),
             "y": (dict(preset="attention", rank=4, alpha=8.0, rslora=True), 3e-3),
             "z": (dict(preset="peft", rank=3, alpha=3.0), 2e-2)}
    tree = params
    for j, (name, (kw, _)) in enumerate(specs.items()):
        kw = dict(kw)
        tree = lora.add(tree, name, hf.rules_for(model, kw.pop("preset"), **kw), j)
    names = lora.adapter_names(tree)
    assert names == list(specs)
    apply = _apply(model)
    steps = 3
    data = {n: jax.random.randint(jax.random.key(10 + j), (steps, 2 + j, 8), 0, CFG.vocab_size)
            for j, n in enumerate(names)}  # adapter j sees 2 + j rows per step, its own stream

    # one run, three adapters
    tx = lora.freeze({n: optax.adamw(lr, weight_decay=0.01) for n, (_, lr) in specs.items()}, tree)
    state = tx.init(tree)
    ids = jnp.concatenate([jnp.full((2 + j,), j, jnp.int32) for j in range(len(names))])

    @jax.jit
    def joint_step(tree, state, x):
        def loss(tree):
            per_row = _token_ce(lora.wrap(apply, adapter_ids=ids)(tree, x), x)
            each = jnp.stack([jnp.sum(jnp.where(ids == j, per_row, 0)) / jnp.sum(ids == j)
                              for j in range(len(names))])
            return each.sum(), each
        (_, each), g = jax.value_and_grad(loss, has_aux=True)(tree)
        upd, state = tx.update(g, state, tree)
        return optax.apply_updates(tree, upd), state, each

    joint = tree
    joint_losses = []
    for s in range(steps):
        joint, state, each = joint_step(joint, state, jnp.concatenate([data[n][s] for n in names]))
        joint_losses.append(np.asarray(each))
    joint_losses = np.stack(joint_losses)

    # each adapter alone, from the same start
    for j, name in enumerate(names):
        alone = tree
        for other in names:
            if other != name:
                alone = lora.delete(alone, other)
        tx1 = lora.freeze(optax.adamw(specs[name][1], weight_decay=0.01), alone)
        st1 = tx1.init(alone)

        @jax.jit
        def step(tree, st, x):
            l, g = jax.value_and_grad(lambda t: _token_ce(lora.wrap(apply)(t, x), x).mean())(tree)
            upd, st = tx1.update(g, st, tree)
            return optax.apply_updates(tree, upd), st, l

        for s in range(steps):
            alone, st1, l = step(alone, st1, data[name][s])
            np.testing.assert_allclose(joint_losses[s, j], l, rtol=1e-6)
        mine = [(p, n) for p, lw in lora_items(joint) for n in lw.chain() if n.name == name]
        theirs = dict(lora_items(alone))
        assert mine and len(mine) == len(theirs)
        for p, node in mine:
            np.testing.assert_allclose(node.b, theirs[p].b, rtol=1e-4, atol=1e-7)
            np.testing.assert_allclose(node.a, theirs[p].a, rtol=1e-5, atol=1e-7)
            assert np.abs(np.asarray(node.b)).max() > 1e-4  # it trained (b starts at zero)
    with pytest.raises(ValueError, match=r"no optimizer for the adapters \['z'\]"):
        lora.freeze({"x": optax.sgd(1.0), "y": optax.sgd(1.0)}, tree)
    with pytest.raises(ValueError, match=r"the adapters \['z'\] are inactive, so they would not train"):
        lora.freeze({n: optax.sgd(1.0) for n in names}, lora.select(tree, ["x", "y"]))


def test_generate_and_load_say_what_to_do(model_params, tmp_path):
    model, params = model_params
    bank = lora.AdapterBank(params, hf.rules_for(model, "attention", rank=2), slots=2, rank=2)
    one = lora.init(params, hf.rules_for(model, "attention", rank=2), 0)
    bank.load(0, one, name="one")
    prompts = jnp.ones((2, 3), jnp.int32)
    for ids in (["one", None], [0.5, 1.0]):
        with pytest.raises(ValueError, match=r"AdapterBank.ids turns adapter names into ids"):
            generate(model, bank.tree, prompts, 2, adapter_ids=ids)
    with pytest.raises(ValueError, match=r"params hold no LoRA weight \(pass an AdapterBank's .tree"):
        generate(model, bank.params, prompts, 2, adapter_ids=bank.ids(["one", None]))
    hf.save_peft(tmp_path / "peft", nonzero_b(one), model)
    with pytest.raises(ValueError, match=r"is a PEFT adapter directory; load it with lora_jax.hf.load_peft"):
        bank.load(1, tmp_path / "peft")
    with pytest.raises(ValueError, match="pass lora.merge"):
        lora.AdapterBank(one, hf.rules_for(model, "attention", rank=2), slots=1, rank=2)

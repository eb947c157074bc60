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


def test_hugging_face_block_runs(tmp_path, monkeypatch):
    """The README's Hugging Face block, on a tiny Llama saved by PyTorch transformers in place of the real one."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "Llama-3.2-1B")
    monkeypatch.chdir(tmp_path)
    block = next(b for b in _python_blocks() if "hf.from_pretrained" in b)
    block = block.replace("path/to/Llama-3.2-1B", str(tmp_path / "Llama-3.2-1B"))
    block = block.replace('"adapter-from-pytorch"', '"out/adapter"')
    ids = np.random.RandomState(0).randint(0, 97, (2, 7))
    ns = {"key": jax.random.key(0), "input_ids": ids, "prompt_ids": ids[:, :3]}
    exec(block, ns)
    assert ns["logits"].shape == (2, 7, 97) and ns["tokens"].shape == (2, 3 + 32)
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "out" / "merged" / "model.safetensors").exists()
    assert len(list(lora.tree.lora_items(ns["lora_params"]))) == 7


def test_gpu_table_is_the_committed_run():
    """The README's GPU table is `benchmarks/gpu_table.py` of the results file it cites, as committed."""
    import re
    import sys

    repo = os.path.dirname(README)
    sys.path.insert(0, os.path.join(repo, "benchmarks"))
    import gpu_table

    text = open(README, encoding="utf-8").read()
    block = re.search(r"<!-- gpu-table -->\n(.*?)<!-- /gpu-table -->", text, re.S).group(1)
    (name,) = re.findall(r"benchmarks/gpu_table\.py benchmarks/results/(\S+\.jsonl)", text)
    path = os.path.join(repo, "benchmarks", "results", name)
    assert block == gpu_table.table(path)
    assert "| 93,430 |" in block and "1.35x, 0.86x" in block


def test_adapter_bank_block_runs(tmp_path, monkeypatch):
    """The README's adapter-bank block, on a tiny lora_jax Llama with two saved adapters; each row is
    its adapter's (or the base's) output."""
    import lora_jax.hf as hf
    from lora_jax.models import LlamaConfig, build, init_params

    from helpers import nonzero_b

    model = build(LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2))
    params = init_params(model, jax.random.key(0))
    sql = nonzero_b(lora.init(params, hf.rules_for(model, "attention", rank=4), 1), scale=0.3)
    chat = nonzero_b(lora.init(params, hf.rules_for(model, "all-linear", rank=8, alpha=4), 2), seed=2, scale=0.3)
    monkeypatch.chdir(tmp_path)
    lora.save_adapter("adapters/sql", sql)
    hf.save_peft("peft/chat", chat, model)
    x = jnp.asarray(np.random.RandomState(0).randint(0, 61, (3, 6)))
    block = next(b for b in _python_blocks() if "AdapterBank" in b)
    import lora_jax

    exec(block, {"lora": lora, "lora_jax": lora_jax, "params": params, "model": model, "x": x}, ns := {})
    f = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    want = [lora.wrap(f)(sql, x[:1])[0], lora.wrap(f)(chat, x[1:2])[0], f(params, x[2:])[0]]
    for got, w in zip(ns["logits"], want):
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-5)


def test_adapters_yaml_block_is_a_valid_config(tmp_path, monkeypatch):
    """The README's ``adapters:`` example is a config `lora-jax train` accepts, and each adapter gets
    what the README says it sets, the rest the run's."""
    from lora_jax.train import load_config
    from lora_jax.train.config import adapter_configs

    text = open(README, encoding="utf-8").read()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "adapters:" in b]
    monkeypatch.chdir(tmp_path)
    for name in ("sql.jsonl", "chat.jsonl"):
        (tmp_path / name).write_text('{"text": "hello"}\n')
    (tmp_path / "run.yaml").write_text(block)
    cfg = load_config("run.yaml", ["lora.rank=4", "train.batch_size=8", "train.lr=0.001"])
    got = {name: (c.lora.rank, c.lora.targets, c.data.train, c.train.lr, c.train.batch_size)
           for name, c in adapter_configs(cfg)}
    assert got == {"sql": (8, cfg.lora.targets, "sql.jsonl", 0.0003, 8),
                   "chat": (16, ["q_proj", "v_proj"], "chat.jsonl", 0.001, 4)}

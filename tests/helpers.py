"""Small shared builders for the tests."""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def rand(key, shape, dtype=jnp.float32, scale=1.0):
    return (scale * jax.random.normal(jax.random.key(key) if isinstance(key, int) else key, shape)).astype(dtype)


def nonzero_b(tree, seed=1, scale=0.1):
    """Give every LoraWeight a random non-zero b (so deltas are visible)."""
    import lora_jax as lora

    keys = iter(jax.random.split(jax.random.key(seed), 1000))

    def f(x):
        if lora.is_lora(x):
            return x.replace(b=(scale * jax.random.normal(next(keys), x.b.shape)).astype(x.b.dtype))
        return x

    return jax.tree_util.tree_map(f, tree, is_leaf=lora.is_lora)


@functools.lru_cache(maxsize=None)
def hf_flax(arch):
    """Tiny transformers Flax models built from configs (random weights, nothing downloaded)."""
    import transformers as tf

    if arch == "gpt2":
        cfg = tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=64)
        return tf.FlaxGPT2LMHeadModel(cfg, seed=0)
    if arch == "llama":
        cfg = tf.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)
        return tf.FlaxLlamaForCausalLM(cfg, seed=0)
    if arch == "bert":
        cfg = tf.BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                            vocab_size=97, max_position_embeddings=64, num_labels=3)
        return tf.FlaxBertForSequenceClassification(cfg, seed=0)
    raise ValueError(arch)


def f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), dtype=np.float64)


def peft_linear(w, config, *adapters):
    """PyTorch PEFT on one bias-free ``Linear`` named ``lin`` holding the Flax ``(in, out)`` kernel
    ``w``, its adapters' factors set from `LoraWeight` nodes.

    Args:
      w: the kernel, ``(in, out)``.
      config: the ``LoraConfig`` of the ``"default"`` adapter.
      *adapters: ``(node, config)`` pairs: adapters to add under ``node.name`` (``config`` None for
        ``"default"``), whose ``lora_A``/``lora_B`` (and DoRA magnitude) become ``node``'s.

    Returns:
      ``(peft_model, layer)``: the PEFT model and its ``lin`` LoRA layer.
    """
    import torch
    from peft import get_peft_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(w.shape[0], w.shape[1], bias=False)

    net = Net()
    with torch.no_grad():
        net.lin.weight.copy_(torch.tensor(np.asarray(w).T.copy()))
    pm = get_peft_model(net, config)
    for node, cfg in adapters:
        if cfg is not None:
            pm.add_adapter(node.name, cfg)
    layer = pm.base_model.model.lin
    with torch.no_grad():
        for node, _ in adapters:
            layer.lora_A[node.name].weight.copy_(torch.tensor(np.asarray(node.a).T.copy()))
            layer.lora_B[node.name].weight.copy_(torch.tensor(np.asarray(node.b).T.copy()))
            if node.m is not None:
                layer.lora_magnitude_vector[node.name].weight.copy_(torch.tensor(np.asarray(node.m).copy()))
    return pm, layer

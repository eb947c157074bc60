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

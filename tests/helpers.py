"""Small shared builders for the tests."""

import functools
import re

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


# The tiny configs the tests use (PyTorch transformers' config.json fields), and the head built for each.
TINY_CONFIGS = {
    "llama": ({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 48,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 97, "max_position_embeddings": 64},
              "causal_lm"),
    "gpt2": ({"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": 97, "n_positions": 64},
             "causal_lm"),
    "bert": ({"model_type": "bert", "num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 48,
              "num_attention_heads": 4, "vocab_size": 97, "max_position_embeddings": 64, "num_labels": 3},
             "seq_cls"),
}
# where each family stacks its layers (one leading layer axis on every leaf below)
LAYER_STACKS = {"llama": "model/layers", "gpt2": "transformer/h", "bert": "bert/encoder/layer"}


class TinyModel:
    """One of lora_jax's own models (`lora_jax.models`) with random weights (nothing downloaded).

    Attributes:
      arch: ``"llama"``, ``"gpt2"`` or ``"bert"``.
      module: the linen module (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ``BertForSequenceClassification``).
      params: random parameters as transformers initializes them (kernels and embeddings normal
        with std ``initializer_range`` = 0.02), norm scales ``1 + 0.1 N(0, 1)`` and biases
        ``0.02 N(0, 1)`` so that none is an exact identity or zero; per-layer leaves are stacked on
        a leading layer axis (``model/layers/self_attn/q_proj/kernel`` is ``(L, in, out)``), every
        kernel is ``(in, out)``.
      apply: ``(params, input_ids) -> logits``, jitted (one compiled forward, not per-op dispatch).
      eager: the same, not jitted.
    """

    def __init__(self, arch):
        import lora_jax.models as models

        hf, head = TINY_CONFIGS[arch]
        self.arch = arch
        self.module = models.build(models.config_from_hf(hf), head)
        self.config = self.module.config
        self.params = _random_params(self.module)
        self.apply = jax.jit(self.eager)

    def eager(self, params, input_ids):
        return self.module.apply({"params": params}, input_ids)


def _random_params(module, seed=0):
    """Random parameters of the module's tree (shapes from ``jax.eval_shape``, values from NumPy: no
    compiled init, which costs seconds per model on CPU)."""
    shapes = jax.eval_shape(lambda k: module.init(k, jnp.zeros((1, 1), jnp.int32)), jax.random.key(0))["params"]
    rng = np.random.RandomState(seed)
    std = module.config.initializer_range

    def fill(kp, sd):
        name = str(kp[-1].key)
        if name == "scale":
            x = 1.0 + 0.1 * rng.standard_normal(sd.shape)
        elif name == "bias":
            x = 0.02 * rng.standard_normal(sd.shape)
        else:
            x = std * rng.standard_normal(sd.shape)
        return jnp.asarray(x, sd.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.lru_cache(maxsize=None)
def tiny_model(arch):
    """The cached `TinyModel` of ``arch`` (``"llama"``, ``"gpt2"``, ``"bert"``)."""
    if arch not in TINY_CONFIGS:
        raise ValueError(f"tiny_model: arch must be one of {sorted(TINY_CONFIGS)}, got {arch!r}")
    return TinyModel(arch)


def per_layer_tree(arch):
    """The tiny model's weights as an unrolled model holds them (Equinox and plain-JAX models, PEFT's
    module names): the stacked leaves split into one subtree per layer
    (``model/layers/0/self_attn/q_proj/kernel`` ``(in, out)``), GPT-2's ``Conv1D`` kernels stored
    transposed, ``(out, in)``. For rules on per-layer paths and layouts (our models run on the stacked tree).
    """
    stack = LAYER_STACKS[arch]
    out = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(tiny_model(arch).params)[0]:
        path = "/".join(str(k.key) for k in kp)
        if path.startswith(stack + "/"):
            rest = path[len(stack) + 1:]
            items = [(f"{stack}/{i}/{rest}", leaf[i].T if arch == "gpt2" and rest.endswith("kernel") else leaf[i])
                     for i in range(leaf.shape[0])]
        else:
            items = [(path, leaf)]
        for p, v in items:
            node = out
            *parents, last = p.split("/")
            for c in parents:
                node = node.setdefault(c, {})
            node[last] = v
    return out


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


def spread_torch(model, seed=0, *, norm=r"norm\.weight$"):
    """Set a PyTorch model's weights to N(0, 0.2), its norm scales (names matching ``norm``; None:
    none) to 1 + N(0, 0.2), from a seeded generator: logits O(1), so a wrong layer shows."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = 0.2 * torch.randn(p.shape, generator=g)
            p.copy_(noise + 1.0 if norm is not None and re.search(norm, name) else noise)
    return model


def save_torch_models(root, build, names) -> dict:
    """``{name: directory}``: ``build(name).save_pretrained(root / name)`` (safetensors) for each name."""
    out = {}
    for n in names:
        out[n] = root / n
        build(n).save_pretrained(out[n], safe_serialization=True)
    return out

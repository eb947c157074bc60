"""The files lora_jax writes for one tiny model of every family, reduced to a comparable record.

Issue 23.6: a refactor of the model code must leave every existing family's checkpoints,
adapters and exports bit-identical. `record()` builds, for each model type, a tiny model with
deterministic weights, a LoRA tree on all its linear layers with deterministic factors, and
writes what a user gets: the base checkpoint (`lora_jax.models.save`), a PEFT adapter
(`hf.save_peft`), a lora_jax adapter (`lora.save_adapter`) and a merged checkpoint
(`hf.save_merged`). Every value is a small multiple of 1/4 (the factors' products and sums are
then exact in float32 whatever the order of accumulation), so the merged file does not depend on
the CPU's matmul kernel. Safetensors files are recorded by SHA-256, JSON files by content (minus
library versions).

``python tests/golden_files.py OUT.json`` writes the record; `tests/test_golden_files.py`
compares today's against ``tests/data/golden_files.json``, written by this script at commit
4a65530 (before issue 23's model changes) for the families that existed then, and at the commit
that added a family for the others.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile

import numpy as np

# model_type -> (config.json fields of a tiny model, head)
_DEC = dict(num_hidden_layers=2, hidden_size=16, intermediate_size=24, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=37, max_position_embeddings=32)
CONFIGS = {
    "llama": (dict(_DEC, model_type="llama"), "causal_lm"),
    "llama_tied": (dict(_DEC, model_type="llama", tie_word_embeddings=True, attention_bias=True), "causal_lm"),
    "mistral": (dict(_DEC, model_type="mistral", sliding_window=8), "causal_lm"),
    "qwen2": (dict(_DEC, model_type="qwen2"), "causal_lm"),
    "qwen3": (dict(_DEC, model_type="qwen3", head_dim=8), "causal_lm"),
    "olmo2": (dict(_DEC, model_type="olmo2"), "causal_lm"),
    "gemma2": (dict(_DEC, model_type="gemma2", head_dim=8, sliding_window=8, query_pre_attn_scalar=8), "causal_lm"),
    "gemma3_text": (dict(_DEC, model_type="gemma3_text", head_dim=8, sliding_window=8, query_pre_attn_scalar=8),
                    "causal_lm"),
    "qwen3_moe": (dict(_DEC, model_type="qwen3_moe", head_dim=8, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=8), "causal_lm"),
    "mixtral": (dict(_DEC, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2), "causal_lm"),
    "gpt_oss": (dict(_DEC, model_type="gpt_oss", head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                     sliding_window=8), "causal_lm"),
    "phi3": (dict(_DEC, model_type="phi3"), "causal_lm"),
    "gpt2": (dict(model_type="gpt2", n_layer=2, n_embd=16, n_head=4, vocab_size=37, n_positions=32), "causal_lm"),
    "bert": (dict(model_type="bert", num_hidden_layers=2, hidden_size=16, intermediate_size=24, num_attention_heads=4,
                  vocab_size=37, max_position_embeddings=32, num_labels=3), "seq_cls"),
}
_VERSION_KEYS = ("transformers_version", "peft_version", "lora_jax_version")


def _quarters(shape, seed: int) -> np.ndarray:
    """Deterministic float32 values in {-1, -3/4, ..., 1} (numpy's legacy generator: stable)."""
    return (np.random.RandomState(seed).randint(-4, 5, size=shape) / 4).astype(np.float32)


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in _VERSION_KEYS}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _files(d: str) -> dict:
    out = {}
    for name in sorted(os.listdir(d)):
        p = os.path.join(d, name)
        if name.endswith(".safetensors"):
            with open(p, "rb") as f:
                out[name] = hashlib.sha256(f.read()).hexdigest()
        elif name.endswith(".json"):
            with open(p) as f:
                out[name] = _strip(json.load(f))
        else:
            out[name] = os.path.getsize(p)
    return out


def record_one(name: str, root: str) -> dict:
    import jax

    import lora_jax as lora
    import lora_jax.hf as hf
    import lora_jax.models as M
    from lora_jax.rules import path_str
    from lora_jax.tree import lora_items

    fields, head = CONFIGS[name]
    model = M.build(M.config_from_hf(fields), head)
    shapes = jax.eval_shape(lambda: M.init_params(model, jax.random.key(0)))
    flat, treedef = jax.tree_util.tree_flatten(shapes)
    params = jax.tree_util.tree_unflatten(treedef, [_quarters(s.shape, i) for i, s in enumerate(flat)])
    tree = lora.init(params, hf.rules_for(model, "all-linear", rank=2, alpha=4), jax.random.key(0))
    # every a/b replaced by deterministic quarter values, seeded by the node's place in the tree
    seeds = {p: 1000 + 10 * k for k, (p, _) in enumerate(lora_items(tree))}
    assert seeds, name

    def fill(kp, x):
        if not lora.is_lora(x):
            return x
        s = seeds[path_str(kp)]
        return x.replace(a=_quarters(x.a.shape, s), b=_quarters(x.b.shape, s + 1))

    tree = jax.tree_util.tree_map_with_path(fill, tree, is_leaf=lora.is_lora)
    out = {}
    for what, write in (("base", lambda d: M.save(d, model, params)),
                        ("peft", lambda d: hf.save_peft(d, tree, model)),
                        ("adapter", lambda d: lora.save_adapter(d, tree)),
                        ("merged", lambda d: hf.save_merged(d, model, tree))):
        d = os.path.join(root, name, what)
        write(d)
        out[what] = _files(d)
    return out


def record(names=None) -> dict:
    with tempfile.TemporaryDirectory() as root:
        return {n: record_one(n, root) for n in (names or CONFIGS)}


if __name__ == "__main__":
    import lora_jax.models as M

    names = [n for n in CONFIGS if CONFIGS[n][0]["model_type"] in M.SUPPORTED_MODEL_TYPES]
    with open(sys.argv[1], "w") as f:
        json.dump(record(names), f, indent=1, sort_keys=True)

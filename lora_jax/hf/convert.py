"""PyTorch state dicts <-> transformers Flax parameter trees, by renaming and transposing (no torch).

The transformers Flax ports mirror the PyTorch module tree, so a Flax leaf path names its PyTorch
parameter directly::

    Flax leaf path                                   PyTorch key                               array
    model/layers/0/self_attn/q_proj/kernel (in,out)  model.layers.0.self_attn.q_proj.weight    (out,in)  transposed
    transformer/h/0/attn/c_attn/kernel (out,in)      transformer.h.0.attn.c_attn.weight        (in,out)  transposed
    transformer/wte/embedding                        transformer.wte.weight                    as is
    transformer/ln_f/scale                           transformer.ln_f.weight                   as is (LayerNorm)
    model/norm/weight                                model.norm.weight                         as is (RMSNorm)
    .../bias                                         ....bias                                  as is

Every ``kernel`` is transposed: PyTorch ``nn.Linear`` weights are ``(out, in)`` and Flax ``Dense``
kernels ``(in, out)``; GPT-2's PyTorch ``Conv1D`` weights are ``(in, out)`` and its Flax kernels
``(out, in)``. Old BERT checkpoints' LayerNorm ``gamma``/``beta`` are read as ``weight``/``bias``.

Special cases handled per architecture (see `lora_jax.hf.arch`): a checkpoint saved from the base
model loads into a head model (and the reverse, dropping the head, as transformers does); a tied
output head missing from the checkpoint is rebuilt from the input embedding; buffers of old
checkpoints (GPT-2's ``attn.bias``, ``rotary_emb.inv_freq``, BERT's ``position_ids``) are
ignored; Qwen2's ``o_proj`` bias, which only the Flax port has, is zeros.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import jax
import numpy as np

from ..rules import path_str
from ..weight import is_lora, is_node
from .arch import Resolved, resolve

__all__ = ["torch_key", "torch_module_name", "kernel_layout", "torch_to_flax", "flax_to_torch", "expected_shapes",
           "check_tree", "flatten", "unflatten"]

_LEAF_TO_TORCH = {"kernel": "weight", "embedding": "weight", "scale": "weight", "weight": "weight", "bias": "bias"}
_LEGACY = {"scale": "gamma", "bias": "beta"}


def torch_key(flax_path: str) -> str:
    """The PyTorch state-dict key of a Flax leaf path.

    >>> torch_key("bert/encoder/layer/0/attention/output/LayerNorm/scale")
    'bert.encoder.layer.0.attention.output.LayerNorm.weight'

    Raises:
      ValueError: for a leaf name with no PyTorch counterpart.
    """
    module, _, leaf = flax_path.rpartition("/")
    if leaf not in _LEAF_TO_TORCH or not module:
        raise ValueError(f"{flax_path!r}: no PyTorch name for Flax leaf {leaf!r} (known: {sorted(_LEAF_TO_TORCH)})")
    return module.replace("/", ".") + "." + _LEAF_TO_TORCH[leaf]


def torch_module_name(flax_path: str) -> str:
    """The PyTorch module name of a Flax leaf path (what PEFT keys and ``target_modules`` use).

    >>> torch_module_name("transformer/h/0/attn/c_attn/kernel")
    'transformer.h.0.attn.c_attn'
    """
    module = flax_path.rpartition("/")[0]
    if not module:
        raise ValueError(f"{flax_path!r}: a leaf path needs a module part (e.g. 'dense/kernel')")
    return module.replace("/", ".")


def kernel_layout(model_or_config, flax_path: str) -> str:
    """The lora_jax layout of the Flax kernel at ``flax_path``: ``"io"`` for ``(in, out)``
    (Flax ``Dense``; embeddings ``(vocab, dim)`` count as ``(in, out)``), ``"oi"`` for ``(out, in)``
    (GPT-2's ``c_attn``, ``c_proj``, ``c_fc``).

    >>> kernel_layout("gpt2", "transformer/h/0/attn/c_attn/kernel")
    'oi'

    Raises:
      ValueError: when ``flax_path`` is not a kernel or embedding.
    """
    arch = resolve(model_or_config).arch
    module, _, leaf = flax_path.rpartition("/")
    if leaf == "embedding":
        return "io"
    if leaf != "kernel":
        raise ValueError(f"{flax_path!r} is not a kernel or embedding leaf, so it has no kernel layout")
    return "oi" if module.rpartition("/")[2] in arch.oi_modules else "io"


def flatten(tree) -> dict[str, Any]:
    """``{leaf path: leaf}`` of a tree (LoRA nodes kept whole)."""
    return {path_str(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)[0]}


def unflatten(flat: Mapping[str, Any]) -> dict:
    """Nested dicts from ``{"a/b/c": leaf}``."""
    out: dict = {}
    for p, v in flat.items():
        node = out
        *parents, leaf = p.split("/")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = v
    return out


def expected_shapes(res: Resolved, model=None) -> dict[str, tuple]:
    """``{leaf path: shape}`` of the Flax model's parameters (from its abstract shape tree)."""
    if model is None:
        model = res.build()
    return {p: tuple(int(d) for d in leaf.shape) for p, leaf in flatten(model.params_shape_tree).items()}


def check_tree(flat: Mapping[str, Any], expected: Mapping[str, tuple], what: str) -> None:
    """Raise one ``ValueError`` listing every missing, unexpected or misshapen leaf."""
    problems = []
    for p, shape in expected.items():
        if p not in flat:
            problems.append(f"missing: {p} {shape}")
        else:
            leaf = flat[p]
            got = tuple(leaf.base.shape) if is_lora(leaf) and leaf.base is not None else tuple(getattr(leaf, "shape", ()))
            if got != shape:
                problems.append(f"shape mismatch: {p} is {got}, the model expects {shape}")
    problems += [f"unexpected: {p} {tuple(getattr(flat[p], 'shape', ()))}" for p in flat if p not in expected]
    if problems:
        raise ValueError(f"{what}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))


def _has_prefix(keys, prefix: str, sep: str) -> bool:
    return any(k == prefix or k.startswith(prefix + sep) for k in keys)


def _align_prefix(src: dict, expected_keys, prefix: str, sep: str) -> tuple[dict, list]:
    """Add or strip the base-model prefix so ``src`` (keys joined by ``sep``) is named like the model
    (Flax paths in ``expected_keys``); returns the dropped keys (a head the model does not have)."""
    want, have = _has_prefix(expected_keys, prefix, "/"), _has_prefix(src, prefix, sep)
    if want and not have:
        return {f"{prefix}{sep}{k}": v for k, v in src.items()}, []
    if have and not want:
        n = len(prefix) + len(sep)
        kept = {k[n:]: v for k, v in src.items() if k.startswith(prefix + sep)}
        return kept, sorted(k for k in src if not k.startswith(prefix + sep))
    return src, []


def _embed_path(res: Resolved, expected) -> str:
    e = res.arch.embed
    if e in expected:
        return e
    short = e[len(res.arch.base_prefix) + 1:]
    return short if short in expected else ""


def _zero_leaf(res: Resolved, path: str) -> bool:
    return any(re.fullmatch(rx, path) for rx in res.arch.zero_in_flax)


def _cast(x: np.ndarray, dtype) -> np.ndarray:
    if dtype is None or not (np.issubdtype(x.dtype, np.floating) or x.dtype.name == "bfloat16"):
        return x
    return x.astype(dtype)


def torch_to_flax(state_dict: Mapping[str, Any], model_or_config, *, dtype=None,
                  architecture: Optional[str] = None, what: str = "torch_to_flax") -> dict:
    """A PyTorch state dict (NumPy arrays, e.g. from ``safetensors.numpy.load_file``) as the
    parameter tree of the transformers Flax model.

    Strict: every Flax parameter must be found with the right shape and every checkpoint key
    must be used (known buffers aside); all problems are reported in one ``ValueError``.

    Args:
      state_dict: ``{torch key: array}``.
      model_or_config: a transformers Flax model, or a config (its ``architectures`` picks the head).
      dtype: cast floating leaves to this dtype (default: keep the stored dtype).
      architecture: a PyTorch class name overriding the config's.

    Returns:
      Nested dicts of NumPy arrays, e.g. ``{"transformer": {"h": {"0": ...}}}``.

    Example:
      >>> import numpy as np, transformers as tf
      >>> cfg = tf.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11, n_positions=4)
      >>> from safetensors.numpy import load_file  # doctest: +SKIP
      >>> params = torch_to_flax(load_file("model.safetensors"), cfg)  # doctest: +SKIP
    """
    import transformers

    res = resolve(model_or_config, architecture=architecture, what=what)
    model = model_or_config if isinstance(model_or_config, transformers.FlaxPreTrainedModel) else None
    expected = expected_shapes(res, model)
    sd = {k: v for k, v in state_dict.items() if not any(re.search(rx, k) for rx in res.arch.ignore_torch)}
    sd, _ = _align_prefix(sd, expected, res.arch.base_prefix, ".")
    embed = _embed_path(res, expected)
    out, used, missing, mismatched = {}, set(), [], []
    fill_dtype = next((v.dtype for v in sd.values() if np.issubdtype(v.dtype, np.floating)
                       or v.dtype.name == "bfloat16"), np.float32)
    for p, shape in expected.items():
        leaf = p.rpartition("/")[2]
        key = torch_key(p)
        candidates = [key]
        if leaf in _LEGACY and "LayerNorm" in p:
            candidates.append(key.rpartition(".")[0] + "." + _LEGACY[leaf])
        found = next((k for k in candidates if k in sd), None)
        if found is None:
            if p.endswith("lm_head/kernel") and res.tied and embed and torch_key(embed) in sd:
                arr = np.asarray(sd[torch_key(embed)]).T
                used.add(torch_key(embed))
            elif _zero_leaf(res, p):
                arr = np.zeros(shape, fill_dtype)
            else:
                missing.append(f"missing: {key} (for Flax {p}, shape {shape})")
                continue
        else:
            used.add(found)
            arr = np.asarray(sd[found])
            if leaf == "kernel":
                arr = arr.T
        if tuple(arr.shape) != shape:
            src = sd[found].shape if found else arr.shape
            mismatched.append(f"shape mismatch: {found or key} is {tuple(src)} (Flax {p} needs {shape}"
                              f"{', the transpose of the PyTorch weight' if leaf == 'kernel' else ''})")
            continue
        out[p] = _cast(arr, dtype)
    allowed = set()
    if res.tied and not any(p.endswith("lm_head/kernel") for p in expected):
        allowed.add("lm_head.weight")  # tied head of GPT-2: Flax reuses the embedding
    unexpected = [f"unexpected: {k} {tuple(sd[k].shape)}" for k in sorted(set(sd) - used - allowed)]
    problems = missing + mismatched + unexpected
    if problems:
        raise ValueError(f"{what}: the checkpoint does not fit {res.flax_class} ({res.arch.name}); "
                         f"{len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return unflatten(out)


def flax_to_torch(params, model_or_config, *, what: str = "flax_to_torch") -> dict[str, np.ndarray]:
    """The PyTorch state dict (NumPy arrays) of a transformers Flax parameter tree.

    The tree is checked strictly against the model's parameters first. A tied output head is
    left out when it equals the input embedding (PyTorch ties it on load); when it differs (a
    merged adapter on the embedding), ``lm_head.weight`` is written and the caller must untie
    the config (`lora_jax.hf.save_merged` does).

    Raises:
      ValueError: listing every missing/unexpected/misshapen leaf, a `LoraWeight` in the tree
        (merge it first), or a Qwen2 ``o_proj`` bias that is not zero.
    """
    import transformers

    res = resolve(model_or_config, what=what)
    model = model_or_config if isinstance(model_or_config, transformers.FlaxPreTrainedModel) else None
    flat = flatten(params)
    lora_paths = [p for p, v in flat.items() if is_lora(v)]
    if lora_paths:
        raise ValueError(f"{what}: the tree holds LoraWeight nodes ({lora_paths[:3]}...); lora.merge() it first")
    expected = expected_shapes(res, model)
    check_tree(flat, expected, f"{what}: the parameters do not fit {res.flax_class}")
    out, problems = {}, []
    for p, v in flat.items():
        arr = np.asarray(v)
        if _zero_leaf(res, p):
            if np.any(arr != 0):
                problems.append(f"{p} is not zero, but PyTorch {res.torch_class} has no such parameter")
            continue
        if p.rpartition("/")[2] == "kernel":
            arr = arr.T
        out[torch_key(p)] = arr
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))
    embed = _embed_path(res, expected)
    if res.tied and "lm_head.weight" in out and embed:
        if np.array_equal(out["lm_head.weight"], out[torch_key(embed)]):
            del out["lm_head.weight"]
    return out

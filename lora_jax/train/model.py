"""Everything the trainer needs from a model, behind a few small functions.

This module is the one place that talks to transformers and decides how LoRA enters the forward
pass, so that the rest of `lora_jax.train` stays model-agnostic:

* `build_tokenizer`: a byte-level BPE trained on some text (for a model built from scratch);
* `new_model` / `load_model` / `save_model`: a transformers Flax causal LM from a config, or a
  local checkpoint, and back to disk;
* `make_apply`: ``apply(params, inputs, mask) -> logits``;
* `forward`: ``apply`` on a LoRA tree;
* `export_peft` / `load_peft`: the adapter as a PEFT directory;
* `save_merged`: base + adapter folded, as an HF checkpoint.

# TODO(hf): `load_model`, `export_peft`, `load_peft` and `save_merged` switch to
# `lora_jax.hf.from_pretrained` / `save_peft` / `load_peft` / `save_merged` (safetensors, PyTorch
# checkpoints) when that module lands. Until then a checkpoint is a transformers *Flax* directory
# (``config.json`` + ``flax_model.msgpack``) and the adapter a PEFT-named safetensors file.
# TODO(wrap): `forward` switches to ``lora.wrap(apply, rng=rng)(lora_params, ...)`` (factorized,
# with LoRA dropout); it merges for now.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging as pylogging
import os
from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .. import tree as _tree
from ..weight import is_lora
from .files import atomic_dir

__all__ = ["FORWARD_SUPPORTS_DROPOUT", "SPECIAL_TOKENS", "CHAT_TEMPLATE", "build_tokenizer", "load_tokenizer",
           "new_model", "load_model", "save_model", "make_apply", "forward", "export_peft", "load_peft",
           "save_merged", "default_layout", "to_host", "ADAPTER_WEIGHTS", "ADAPTER_CONFIG"]

# TODO(wrap): True once `forward` goes through lora.wrap (it applies LoRA dropout; merging cannot).
FORWARD_SUPPORTS_DROPOUT = False

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@contextlib.contextmanager
def _quiet_transformers():
    """Mute transformers' notice that its Flax classes are deprecated while we build one (the
    trainer depends on them until lora_jax's own models replace them); other messages pass."""
    from transformers.utils import logging as tlog

    class _Drop(pylogging.Filter):
        def filter(self, record):
            return "TensorFlow and JAX classes are deprecated" not in record.getMessage()

    log = tlog.get_logger("transformers.modeling_flax_utils")
    f = _Drop()
    log.addFilter(f)
    try:
        yield
    finally:
        log.removeFilter(f)


# ------------------------------------------------------------------------------------------
# tokenizer
# ------------------------------------------------------------------------------------------


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on ``texts``, as a transformers fast tokenizer.

    Every byte is in the alphabet, so any text encodes. Special tokens: ``<|pad|>``, ``<|bos|>``,
    ``<|eos|>`` and the chat markers of `CHAT_TEMPLATE` (``<|user|>`` ... ``<|end|>``).

    Example:
      >>> tok = build_tokenizer(["the river runs to the sea"] * 10, vocab_size=300)
      >>> tok.decode(tok.encode("the sea", add_special_tokens=False))
      'the sea'
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", additional_special_tokens=list(SPECIAL_TOKENS[3:]),
                                   chat_template=CHAT_TEMPLATE)


def load_tokenizer(path: str):
    """The tokenizer saved in ``path`` (a checkpoint or tokenizer directory)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


# ------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------


def _cast(params, dtype):
    dt = jnp.dtype(dtype)
    return jax.tree_util.tree_map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


_INIT_FNS: dict = {}


def new_model(init: dict, *, vocab_size: int, seed: int = 0, compute_dtype="float32", param_dtype="float32"):
    """A transformers Flax causal LM built from a config with random weights.

    Args:
      init: ``{"arch": "llama", **config_kwargs}``.
      vocab_size: the tokenizer's size (overrides any ``vocab_size`` in ``init``).
      seed: the weight-init seed.
      compute_dtype: the activation dtype the module computes in.
      param_dtype: the weights' dtype.

    Returns:
      ``(model, params)``.
    """
    import transformers
    from transformers import FlaxAutoModelForCausalLM

    kw = dict(init)
    arch = kw.pop("arch")
    kw["vocab_size"] = int(vocab_size)
    config = transformers.AutoConfig.for_model(arch, **kw)
    # TODO(hf): lora_jax.models / lora_jax.hf may give a faster model for the same config.
    with _quiet_transformers():
        model = FlaxAutoModelForCausalLM.from_config(config, dtype=jnp.dtype(compute_dtype), seed=seed,
                                                     _do_init=False)
    key = (type(model).__name__, config.to_json_string(), str(jnp.dtype(compute_dtype)))
    init_fn = _INIT_FNS.get(key)
    if init_fn is None:  # one compile per model config and process (tests build many runs)
        init_fn = _INIT_FNS[key] = jax.jit(functools.partial(model.init_weights, input_shape=(1, 8)))
    params = init_fn(jax.random.PRNGKey(seed))
    return model, _cast(params, param_dtype)


def load_model(path: str, *, compute_dtype="float32", param_dtype="float32"):
    """``(model, params)`` of a local transformers Flax checkpoint directory.

    # TODO(hf): lora_jax.hf.from_pretrained (PyTorch safetensors checkpoints, sharded loading).

    Raises:
      ValueError: if ``path`` holds no Flax weights (the files present are listed).
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_flax_auto import FLAX_MODEL_FOR_CAUSAL_LM_MAPPING

    if not os.path.isfile(os.path.join(path, "flax_model.msgpack")):
        files = sorted(os.listdir(path)) if os.path.isdir(path) else []
        raise ValueError(f"{path}: expected a transformers Flax checkpoint (config.json + flax_model.msgpack); "
                         f"found {files}. PyTorch checkpoints load once lora_jax.hf lands.")
    config = AutoConfig.from_pretrained(path)
    if type(config) not in FLAX_MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"{path}: model type {config.model_type!r} has no transformers Flax causal-LM class")
    cls = FLAX_MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    with _quiet_transformers():
        # the concrete class, with the config given: through the Auto class, `dtype` would be
        # taken for a config field (transformers 4.57)
        model, params = cls.from_pretrained(path, config=config, dtype=jnp.dtype(compute_dtype), _do_init=False)
    return model, _cast(params, param_dtype)


def to_host(tree):
    """Arrays on the host as NumPy (gathered across processes when there are several)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def save_model(model, params, tokenizer, path: str) -> None:
    """Write ``params`` with ``model``'s config (and the tokenizer) as an HF Flax checkpoint dir.

    The directory appears complete or not at all (written beside it, then renamed).
    """
    params = to_host(params)
    if jax.process_index() != 0:
        return
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, params=params)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def default_layout(model) -> str:
    """Kernel layout of a transformers Flax model's projections: GPT-2's are ``(out, in)``."""
    return "out_in" if getattr(model.config, "model_type", "") == "gpt2" else "in_out"


def make_apply(model) -> Callable:
    """``apply(params, inputs, mask) -> logits`` for a transformers Flax causal LM (no dropout)."""
    module = model.module

    def apply(params, inputs, mask):
        pos = jnp.broadcast_to(jnp.arange(inputs.shape[-1], dtype=jnp.int32), inputs.shape)
        out = module.apply({"params": params}, inputs, attention_mask=mask, position_ids=pos, deterministic=True)
        return out.logits

    return apply


def forward(apply: Callable, lora_params, inputs, mask, *, rng=None):
    """Logits of the LoRA model.

    # TODO(wrap): ``return lora.wrap(apply, rng=rng)(lora_params, inputs, mask)``: factorized,
    # with LoRA dropout driven by ``rng``. Until then the adapter is merged inside the function
    # (same values and gradients; costs a full weight gradient) and ``rng`` is unused.
    """
    del rng
    return apply(_tree.merge(lora_params), inputs, mask)


# ------------------------------------------------------------------------------------------
# adapters
# ------------------------------------------------------------------------------------------


def _peft_module(path: str) -> str:
    return path.rpartition("/")[0].replace("/", ".")


def export_peft(lora_params, out_dir: str, *, base_model: Optional[str] = None, task_type: str = "CAUSAL_LM") -> None:
    """Write the adapter as a PEFT directory: ``adapter_model.safetensors`` + ``adapter_config.json``.

    Keys follow PEFT: ``base_model.model.<module>.lora_A.weight`` = ``a.T`` ``(r, in)`` and
    ``...lora_B.weight`` = ``b.T`` ``(out, r)``, where ``<module>`` is the Flax path with dots
    (transformers names its Flax and PyTorch modules alike).

    # TODO(hf): lora_jax.hf.save_peft (stacked and N-d kernels, embeddings, checked against PEFT).

    Raises:
      ValueError: for a stacked or N-d LoRA kernel (the path is named), which this writer cannot map.
    """
    from safetensors.numpy import save_file

    items = list(_tree.lora_items(lora_params))
    if not items:
        raise ValueError("export_peft: the tree holds no LoraWeight")
    tensors = {}
    ranks, alphas, modules = {}, {}, []
    for path, lw in items:
        if lw.layout not in ("io", "oi"):
            raise ValueError(f"export_peft: {path} has layout {lw.layout!r}; this writer handles 2-D kernels only")
        a, b = to_host((lw.a, lw.b))
        mod = _peft_module(path)
        tensors[f"base_model.model.{mod}.lora_A.weight"] = np.ascontiguousarray(np.asarray(a, np.float32).T)
        tensors[f"base_model.model.{mod}.lora_B.weight"] = np.ascontiguousarray(np.asarray(b, np.float32).T)
        ranks[mod], alphas[mod] = lw.rank, lw.alpha
        modules.append(mod.rpartition(".")[2])
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    first = items[0][1]
    config = {
        "peft_type": "LORA", "task_type": task_type, "r": r, "lora_alpha": alpha,
        "lora_dropout": first.dropout, "use_rslora": first.rslora, "bias": "none",
        "fan_in_fan_out": first.layout == "oi", "target_modules": sorted(set(modules)),
        "rank_pattern": {m: v for m, v in ranks.items() if v != r},
        "alpha_pattern": {m: v for m, v in alphas.items() if v != alpha},
        "base_model_name_or_path": base_model, "inference_mode": True, "init_lora_weights": True,
    }
    if jax.process_index() != 0:
        return
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=2, sort_keys=True)


def load_peft(lora_params, adapter_dir: str):
    """``lora_params`` with ``a``, ``b`` replaced by those of an adapter written by `export_peft`.

    # TODO(hf): lora_jax.hf.load_peft.

    Raises:
      ValueError: naming missing keys or shape mismatches (both shapes).
    """
    from safetensors.numpy import load_file

    path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        raise ValueError(f"no adapter in {adapter_dir!r}: {ADAPTER_WEIGHTS} not found")
    tensors = load_file(path)

    def put(kp, x):
        if not is_lora(x):
            return x
        from ..rules import path_str

        mod = _peft_module(path_str(kp))
        out = {}
        for name, cur in (("A", x.a), ("B", x.b)):
            key = f"base_model.model.{mod}.lora_{name}.weight"
            if key not in tensors:
                raise ValueError(f"{path}: missing {key}")
            t = tensors[key].T
            if tuple(t.shape) != tuple(cur.shape):
                raise ValueError(f"{path}: {key} has shape {tuple(tensors[key].shape)} (transposed "
                                 f"{tuple(t.shape)}); the model's lora_{name.lower()} is {tuple(cur.shape)}")
            out[name.lower()] = jnp.asarray(t, cur.dtype)
        return x.replace(**out)

    return jax.tree_util.tree_map_with_path(put, lora_params, is_leaf=is_lora)


def save_merged(model, lora_params, tokenizer, out_dir: str) -> None:
    """Fold the adapter into the base and write an HF checkpoint (Flax format for now).

    # TODO(hf): lora_jax.hf.save_merged (PyTorch safetensors, loadable by transformers' AutoModel).
    """
    save_model(model, _tree.merge(lora_params), tokenizer, out_dir)

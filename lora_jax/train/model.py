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

Checkpoints and adapters go through `lora_jax.hf` (Hugging Face and PEFT formats); the forward
pass through `lora.wrap`.
"""

from __future__ import annotations

import contextlib
import functools
import logging as pylogging
import os
from typing import Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .. import tree as _tree
from ..weight import is_lora
from .files import atomic_dir

__all__ = ["FORWARD_SUPPORTS_DROPOUT", "SPECIAL_TOKENS", "CHAT_TEMPLATE", "build_tokenizer", "load_tokenizer",
           "new_model", "load_model", "save_model", "make_apply", "forward", "export_peft", "load_peft",
           "base_only", "save_merged", "default_layout", "to_host"]

# `forward` goes through lora.wrap, which applies LoRA dropout.
FORWARD_SUPPORTS_DROPOUT = True

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


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
    """``(model, params)`` of a local Hugging Face checkpoint directory (`lora_jax.hf.from_pretrained`:
    Flax msgpack, PyTorch safetensors or sharded safetensors; no torch needed).

    Raises:
      ValueError: unsupported architecture, no weights, or weights that do not fit the config.
    """
    from ..hf import from_pretrained
    from ..hf.arch import resolve

    try:
        with _quiet_transformers():
            model, params = from_pretrained(path)
            # the same class and config, computing in ``compute_dtype``; the weights keep ``param_dtype``
            res = resolve(model)
            model = res.build(dtype=jnp.dtype(compute_dtype))
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    if getattr(model.config, "is_encoder_decoder", False) or res.task_type != "CAUSAL_LM":
        raise ValueError(f"{path}: {type(model).__name__} is not a causal language model; lora-jax train needs one")
    return model, _cast(params, param_dtype)


def to_host(tree):
    """Arrays on the host as NumPy (gathered across processes when there are several)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def save_model(model, params, tokenizer, path: str) -> None:
    """Write ``params`` (plain or a LoRA tree, merged with ``safe=True``) with ``model``'s config and
    the tokenizer as a Hugging Face checkpoint directory that transformers loads in PyTorch and
    Flax (`lora_jax.hf.save_merged`). The directory appears complete or not at all (written beside
    it, then renamed); an existing one is replaced.
    """
    from ..hf import save_merged as _hf_save_merged

    params = to_host(params)
    if jax.process_index() != 0:
        return
    with atomic_dir(path) as tmp:
        _hf_save_merged(tmp, model, params, overwrite=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def default_layout(model) -> str:
    """Kernel layout of a transformers Flax model's projections, from `lora_jax.hf`'s architecture
    table: ``"out_in"`` where it stores them ``(out, in)`` (GPT-2), else ``"in_out"``."""
    from ..hf.arch import resolve

    return "out_in" if resolve(model).arch.oi_modules else "in_out"


def make_apply(model) -> Callable:
    """``apply(params, inputs, mask) -> logits`` for a transformers Flax causal LM (no dropout)."""
    module = model.module

    def apply(params, inputs, mask):
        pos = jnp.broadcast_to(jnp.arange(inputs.shape[-1], dtype=jnp.int32), inputs.shape)
        out = module.apply({"params": params}, inputs, attention_mask=mask, position_ids=pos, deterministic=True)
        return out.logits

    return apply


def forward(apply: Callable, lora_params, inputs, mask, *, rng=None):
    """Logits of the LoRA model: ``lora.wrap(apply, rng=rng)`` (factorized ``x@W + s(x@A)@B``, no
    weight-sized gradient for the frozen base; LoRA dropout driven by ``rng``, none without it)."""
    from ..interpreter import wrap

    return wrap(apply, rng=rng)(lora_params, inputs, mask)


# ------------------------------------------------------------------------------------------
# adapters
# ------------------------------------------------------------------------------------------


def export_peft(model, lora_params, out_dir: str, *, base_model: Optional[str] = None,
                overwrite: bool = True) -> None:
    """Write the adapter as a PEFT directory (`lora_jax.hf.save_peft`): ``adapter_model.safetensors``
    with PEFT's key names and ``adapter_config.json``; ``PeftModel.from_pretrained`` loads it.

    Raises:
      ValueError: a non-empty ``out_dir`` without ``overwrite``, or a non-finite factor (nothing is
        written then).
    """
    from ..hf import save_peft

    lora_params = to_host(lora_params)
    bad = [p for p, lw in _tree.lora_items(lora_params)
           if not (np.isfinite(np.asarray(lw.a, np.float32)).all() and np.isfinite(np.asarray(lw.b, np.float32)).all())]
    if bad:
        raise ValueError(f"export_peft: non-finite LoRA factors at {bad[:5]}{' ...' if len(bad) > 5 else ''}; "
                         "nothing written")
    if jax.process_index() != 0:
        return
    save_peft(out_dir, lora_params, model, overwrite=overwrite, base_model_name_or_path=base_model)


def load_peft(model, lora_params, adapter_dir: str):
    """``lora_params`` with the adapter of a PEFT directory (`lora_jax.hf.load_peft`, strict: every
    missing, unexpected or misshapen key is reported in one ``ValueError``)."""
    from ..hf import load_peft as _hf_load_peft

    if not os.path.isdir(adapter_dir):
        raise ValueError(f"no adapter directory {adapter_dir!r}")
    return _hf_load_peft(adapter_dir, base_only(lora_params), model)


def base_only(lora_params):
    """The frozen base of a LoRA tree: each `LoraWeight` replaced by its base kernel."""
    return jax.tree_util.tree_map(lambda x: x.base if is_lora(x) else x, lora_params, is_leaf=is_lora)


def save_merged(model, lora_params, tokenizer, out_dir: str) -> None:
    """Fold the adapter into the base (``merge(safe=True)``: a non-finite result raises and writes
    nothing) and write a Hugging Face checkpoint with the tokenizer (see `save_model`)."""
    save_model(model, _tree.merge(lora_params, safe=True), tokenizer, out_dir)

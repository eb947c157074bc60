"""Hugging Face checkpoints in and out: `from_pretrained`, `save_merged`.

`from_pretrained` reads a local directory (``config.json`` plus ``model.safetensors``, a sharded
``model.safetensors.index.json`` or transformers' old ``flax_model.msgpack``) into one of lora_jax's
own models (`lora_jax.models`) and its parameter tree, without torch. `save_merged` folds a LoRA
tree into its base and writes ``config.json`` + ``model.safetensors`` that PyTorch transformers 5
loads with the same outputs.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from ..io._files import atomic_directory, local_model_dir
from ..models import checkpoint as _ckpt
from ..tree import merge
from ..weight import is_lora, is_node
from .verify import check_merged_files

__all__ = ["from_pretrained", "save_merged"]



def from_pretrained(path, *, dtype=None, architecture: Optional[str] = None, prefer: str = "auto",
                    revision: Optional[str] = None, **overrides):
    """Load a Hugging Face checkpoint directory as a lora_jax model and its parameters.

    The model is a Flax linen module of `lora_jax.models` (``LlamaForCausalLM``,
    ``GemmaForCausalLM``, ``BertForSequenceClassification``, ...): call it as
    ``model.apply({"params": params}, input_ids, attention_mask=None)`` for the logits. Loading is
    strict (every missing, unexpected or misshapen tensor is reported) and needs no torch.

    Args:
      path: a local directory (``~`` expanded), or a Hugging Face hub id (``org/name``, or
        ``org/name@revision``) read from the local hub cache, or downloaded when the hub is online
        (`lora_jax.io.local_model_dir`).
      dtype: the parameters' and the compute dtype (default float32); e.g. ``"bfloat16"``.
      architecture: a PyTorch class name or head (``"BertModel"``, ``"causal_lm"``) overriding
        ``config.architectures``.
      prefer: ``"auto"`` (safetensors, then shards, then msgpack), ``"safetensors"`` or ``"flax"``.
      revision: the hub revision (branch, tag or commit) of a hub id.
      **overrides: model config fields (``remat_policy="dots_with_no_batch_dims_saveable"``,
        ``attention_impl="cudnn"``, ``param_dtype=...``).

    Returns:
      ``(model, params)``: the module and a nested dict of ``jax.Array``; per-layer parameters are
      stacked on a leading layer axis (the layers run under ``nn.scan``).

    Raises:
      FileNotFoundError: no such directory (offline: naming the path tried), no config or weights.
      ValueError: unsupported ``model_type`` (the supported ones are listed) or config feature (the
        field is named), or weights that do not fit the config.

    Example:
      >>> import lora_jax.hf as hf  # doctest: +SKIP
      >>> model, params = hf.from_pretrained("path/to/Llama-3.2-1B", dtype="bfloat16")  # doctest: +SKIP
      >>> logits = model.apply({"params": params}, ids)  # doctest: +SKIP
    """
    d = local_model_dir(path, revision, what="from_pretrained", patterns=[
        "*.json", "*.safetensors", _ckpt.FLAX_MSGPACK, "*.txt", "*.model", "*.jinja"])
    model, params = _ckpt.load(d, architecture=architecture, dtype=dtype, prefer=prefer, **overrides)
    return model, jax.tree_util.tree_map(jnp.asarray, params)


def save_merged(path, model, params, *, overwrite: bool = False) -> None:
    """Write a checkpoint directory that PyTorch transformers loads (``from_pretrained(path)``).

    ``params`` may be a LoRA tree: it is merged first with ``lora.merge(tree, safe=True)`` (the
    input is not modified; a non-finite or implausibly large result raises and nothing is
    written). `lora.Trainable` leaves are written with their values. The directory gets
    ``config.json`` and ``model.safetensors`` (PyTorch names and layout), written under a temporary
    name beside ``path``, read back and compared with the merged parameters
    (`lora_jax.hf.verify.check_merged_files`), then renamed into place.

    Raises:
      ValueError: parameters that do not fit the model (all problems listed), non-finite or
        implausibly large merged kernels, files that do not read back as written, or a non-empty
        ``path`` without ``overwrite``.

    Example:
      >>> hf.save_merged("out/merged", model, lora_params)  # doctest: +SKIP
      >>> AutoModelForCausalLM.from_pretrained("out/merged")  # PyTorch  # doctest: +SKIP
    """
    if any(is_lora(x) for x in jax.tree_util.tree_leaves(params, is_leaf=is_lora)):
        params = merge(params, safe=True)
    params = jax.tree_util.tree_map(lambda x: x.value if is_node(x) else x, params, is_leaf=is_node)
    params = jax.device_get(params)
    with atomic_directory(path, overwrite=overwrite, what="save_merged") as tmp:
        _ckpt.save(tmp, model, params, overwrite=True)
        check_merged_files(tmp, model, params)  # read back before it is renamed into place

"""Hugging Face checkpoints in and out: `from_pretrained`, `save_merged`.

`from_pretrained` reads a local directory (``config.json`` plus ``model.safetensors``, a sharded
``model.safetensors.index.json`` or transformers' old ``flax_model.msgpack``) into one of lora_jax's
own models (`lora_jax.models`) and its parameter tree, without torch. `save_merged` folds a LoRA
tree into its base and writes ``config.json`` + ``model.safetensors`` that PyTorch transformers 5
loads with the same outputs.
"""

from __future__ import annotations

import os
import re
from typing import Optional

import jax
import jax.numpy as jnp

from ..io._files import atomic_directory
from ..models import checkpoint as _ckpt
from ..tree import merge
from ..weight import is_lora, is_node
from .verify import check_merged_files

__all__ = ["from_pretrained", "save_merged"]

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def _hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return True


def _local_dir(path) -> str:
    """``path`` if it is a directory; else a hub snapshot when online; else a clear error."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return path
    where = os.path.abspath(path)
    if os.path.exists(path):
        raise ValueError(f"from_pretrained: {where!r} is a file; pass the checkpoint directory")
    if not _HUB_ID.fullmatch(path) or path.startswith((".", "/")):
        raise FileNotFoundError(f"from_pretrained: no directory at {where!r}")
    if _hub_offline():
        raise FileNotFoundError(f"from_pretrained: no local directory at {where!r}, and the Hugging Face hub is "
                                f"offline (HF_HUB_OFFLINE is set), so the hub id {path!r} was not downloaded")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id=path, allow_patterns=["*.json", "*.safetensors", _ckpt.FLAX_MSGPACK,
                                                                "*.txt", "*.model", "*.jinja"])
    except Exception as e:  # the hub client raises many unrelated types
        raise FileNotFoundError(f"from_pretrained: no local directory at {where!r}, and downloading the hub id "
                                f"{path!r} failed: {type(e).__name__}: {e}") from None


def from_pretrained(path, *, dtype=None, architecture: Optional[str] = None, prefer: str = "auto", **overrides):
    """Load a Hugging Face checkpoint directory as a lora_jax model and its parameters.

    The model is a Flax linen module of `lora_jax.models` (``LlamaForCausalLM``,
    ``GemmaForCausalLM``, ``BertForSequenceClassification``, ...): call it as
    ``model.apply({"params": params}, input_ids, attention_mask=None)`` for the logits. Loading is
    strict (every missing, unexpected or misshapen tensor is reported) and needs no torch.

    Args:
      path: a local directory; a Hugging Face hub id is downloaded with
        ``huggingface_hub.snapshot_download`` only when the hub is online.
      dtype: the parameters' and the compute dtype (default float32); e.g. ``"bfloat16"``.
      architecture: a PyTorch class name or head (``"BertModel"``, ``"causal_lm"``) overriding
        ``config.architectures``.
      prefer: ``"auto"`` (safetensors, then shards, then msgpack), ``"safetensors"`` or ``"flax"``.
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
    d = _local_dir(path)
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

"""Hugging Face checkpoints in and out: `from_pretrained`, `save_merged`.

`from_pretrained` reads a local directory (``config.json`` plus ``flax_model.msgpack``,
``model.safetensors`` or a sharded ``model.safetensors.index.json``) into a transformers Flax
model built without random init and its parameter tree. `save_merged` writes a directory both
PyTorch and Flax transformers load: ``config.json``, ``model.safetensors`` (PyTorch names and
layout) and ``flax_model.msgpack``.
"""

from __future__ import annotations

import os
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ..io._files import atomic_directory, contained, read_json, read_safetensors, write_safetensors
from ..tree import merge
from ..weight import is_lora
from .arch import resolve
from .convert import _align_prefix, _cast, check_tree, expected_shapes, flatten, flax_to_torch, torch_to_flax, \
    unflatten

__all__ = ["from_pretrained", "save_merged", "CONFIG", "SAFETENSORS", "SAFETENSORS_INDEX", "FLAX_MSGPACK"]

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
FLAX_MSGPACK = "flax_model.msgpack"

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
        return snapshot_download(repo_id=path, allow_patterns=["*.json", "*.safetensors", FLAX_MSGPACK, "*.txt",
                                                                "*.model"])
    except Exception as e:
        raise FileNotFoundError(f"from_pretrained: no local directory at {where!r}, and downloading the hub id "
                                f"{path!r} failed: {type(e).__name__}: {e}") from None


def _read_sharded(d: str) -> dict:
    index_file = os.path.join(d, SAFETENSORS_INDEX)
    index = read_json(index_file, what="safetensors index")
    wmap = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
        raise ValueError(f"{index_file!r}: expected an object with a 'weight_map' of key -> file name")
    files = sorted(set(wmap.values()))
    paths = {f: contained(d, f, what=f"shard named in {SAFETENSORS_INDEX}") for f in files}
    sd, problems = {}, []
    for f in files:
        tensors, _ = read_safetensors(paths[f])
        for k, v in tensors.items():
            if k in sd:
                problems.append(f"{k} appears in more than one shard")
            sd[k] = v
        problems += [f"{k}: the index puts it in {f}, which does not hold it"
                     for k, g in wmap.items() if g == f and k not in tensors]
    if problems:
        raise ValueError(f"{index_file!r}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return sd


def _read_msgpack(file: str) -> dict:
    from flax.serialization import msgpack_restore

    with open(file, "rb") as f:
        data = f.read()
    try:
        tree = msgpack_restore(data)
    except Exception as e:
        raise ValueError(f"{file!r} is not a readable Flax msgpack file: {type(e).__name__}: {e}") from None
    if not isinstance(tree, dict):
        raise ValueError(f"{file!r}: expected a parameter dict, got {type(tree).__name__}")
    if set(tree) == {"params"} and isinstance(tree["params"], dict):
        tree = tree["params"]
    return tree


def from_pretrained(path, *, dtype=None, architecture: Optional[str] = None, prefer: str = "auto"):
    """Load a Hugging Face checkpoint directory as a transformers Flax model and its parameters.

    The model is built with ``_do_init=False`` (no random init, whatever its size); call it as
    ``model(input_ids, attention_mask=..., params=params)``. The weights come from
    ``flax_model.msgpack`` when present (``prefer="auto"``), else ``model.safetensors``, else the
    shards of ``model.safetensors.index.json``; PyTorch weights are renamed and transposed by
    `lora_jax.hf.convert` (no torch needed). Loading is strict.

    Args:
      path: a local directory; a Hugging Face hub id is downloaded with
        ``huggingface_hub.snapshot_download`` only when the hub is online.
      dtype: cast floating parameters to this dtype and compute in it (the Flax model's ``dtype``);
        default: keep the stored dtype, compute in float32.
      architecture: a PyTorch class name overriding ``config.architectures`` (e.g. ``"BertModel"``).
      prefer: ``"auto"``, ``"flax"`` (msgpack only) or ``"safetensors"`` (PyTorch weights only).

    Returns:
      ``(model, params)``: the transformers Flax model and a nested dict of ``jax.Array``.

    Raises:
      FileNotFoundError: no such directory (offline: naming the path tried), or no weights file.
      ValueError: unsupported architecture (the supported ones are listed), a config the Flax port
        cannot compute faithfully, or a checkpoint that does not fit the model: every missing,
        unexpected and misshapen key in one message.

    Example:
      >>> import lora_jax.hf as hf  # doctest: +SKIP
      >>> model, params = hf.from_pretrained("path/to/tiny-llama")  # doctest: +SKIP
      >>> logits = model(ids, params=params).logits  # doctest: +SKIP
    """
    import transformers

    if prefer not in ("auto", "flax", "safetensors"):
        raise ValueError(f"from_pretrained: prefer must be 'auto', 'flax' or 'safetensors', got {prefer!r}")
    d = _local_dir(path)
    cfg_file = os.path.join(d, CONFIG)
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"from_pretrained: no {CONFIG} in {os.path.abspath(d)!r}")
    config = transformers.AutoConfig.from_pretrained(d)
    res = resolve(config, architecture=architecture, what="from_pretrained")
    model = res.build(dtype=dtype)
    expected = expected_shapes(res, model)
    files = {n: os.path.join(d, n) for n in (FLAX_MSGPACK, SAFETENSORS, SAFETENSORS_INDEX)}
    have = {n for n, f in files.items() if os.path.isfile(f)}
    use_flax = FLAX_MSGPACK in have and prefer in ("auto", "flax")
    if use_flax:
        tree = _read_msgpack(files[FLAX_MSGPACK])
        flat = flatten(tree)
        flat, _ = _align_prefix(flat, expected, res.arch.base_prefix, "/")
        check_tree(flat, expected, f"from_pretrained: {files[FLAX_MSGPACK]!r} does not fit {res.flax_class}")
        params = unflatten({p: _cast(np.asarray(v), dtype) for p, v in flat.items()})
    else:
        if prefer == "flax":
            raise FileNotFoundError(f"from_pretrained: no {FLAX_MSGPACK} in {os.path.abspath(d)!r}")
        if SAFETENSORS in have:
            sd, _ = read_safetensors(files[SAFETENSORS])
            source = files[SAFETENSORS]
        elif SAFETENSORS_INDEX in have:
            sd = _read_sharded(d)
            source = files[SAFETENSORS_INDEX]
        else:
            others = sorted(f for f in os.listdir(d) if f.endswith((".bin", ".pt", ".pth", ".h5", ".msgpack")))
            hint = f" (found {others}: pickled/TF weights are not read; convert them to safetensors)" if others else ""
            raise FileNotFoundError(f"from_pretrained: no {FLAX_MSGPACK}, {SAFETENSORS} or {SAFETENSORS_INDEX} in "
                                    f"{os.path.abspath(d)!r}{hint}")
        params = torch_to_flax(sd, model, dtype=dtype, what=f"from_pretrained({source!r})")
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return model, params


def _numpy_tree(tree):
    return jax.tree_util.tree_map(lambda x: np.asarray(x), tree)


def save_merged(path, model, params, *, overwrite: bool = False) -> None:
    """Write a checkpoint directory that transformers loads in PyTorch and in Flax.

    ``params`` may be a LoRA tree: it is merged first with ``lora.merge(tree, safe=True)`` (the
    input is not modified). The directory gets ``config.json``, ``model.safetensors`` (PyTorch
    names and layout, ``format: pt``) and ``flax_model.msgpack`` (Flax serialization). It is
    written under a temporary name beside ``path`` and renamed into place.

    A tied output head that no longer equals the input embedding (an adapter merged into the
    embedding) is written as ``lm_head.weight`` with ``tie_word_embeddings: false``, so PyTorch
    computes what the Flax model computes.

    Args:
      path: the directory to create.
      model: the transformers Flax model (from `from_pretrained` or built by you).
      params: its parameters, plain or with `LoraWeight` nodes.
      overwrite: replace a non-empty ``path``.

    Raises:
      ValueError: parameters that do not fit the model (all problems listed), non-finite merged
        kernels, or a non-empty ``path`` without ``overwrite``.

    Example:
      >>> hf.save_merged("out/merged", model, lora_params)  # doctest: +SKIP
      >>> AutoModelForCausalLM.from_pretrained("out/merged")  # PyTorch  # doctest: +SKIP
    """
    from flax.serialization import msgpack_serialize

    res = resolve(model, what="save_merged")
    if any(is_lora(x) for x in jax.tree_util.tree_leaves(params, is_leaf=is_lora)):
        params = merge(params, safe=True)
    sd = flax_to_torch(params, model, what="save_merged")
    cfg = res.torch_config()
    if res.tied and "lm_head.weight" in sd:
        cfg.tie_word_embeddings = False
    float_dtypes = {a.dtype.name for a in sd.values() if a.dtype.kind == "f" or a.dtype.name == "bfloat16"}
    if len(float_dtypes) == 1:
        cfg.dtype = float_dtypes.pop()  # what PyTorch's save_pretrained records (and dtype="auto" loads)
    tree = _numpy_tree(unflatten(flatten(params)))
    with atomic_directory(path, overwrite=overwrite, what="save_merged") as tmp:
        cfg.to_json_file(os.path.join(tmp, CONFIG), use_diff=True)
        write_safetensors(os.path.join(tmp, SAFETENSORS), sd, {"format": "pt"})
        with open(os.path.join(tmp, FLAX_MSGPACK), "wb") as f:
            f.write(msgpack_serialize(tree))

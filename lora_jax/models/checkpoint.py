"""Hugging Face checkpoint directories in and out, for every family, without torch.

`load` reads ``config.json`` and the weights (``model.safetensors``, a sharded
``model.safetensors.index.json``, or transformers' old Flax ``flax_model.msgpack``) into one of our
modules and its parameter tree; `save` writes ``config.json`` + ``model.safetensors`` that PyTorch
transformers 5 loads (``AutoModelForCausalLM.from_pretrained``) with the same outputs. Tensor
names and layouts come from the family's checkpoint table (`lora_jax.models.family`).

Example:
  >>> model, params = load("path/to/Qwen2.5-0.5B", dtype="bfloat16")  # doctest: +SKIP
  >>> save("out/copy", model, params)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Optional


from ..io._files import atomic_directory, contained, read_json, read_safetensors, write_json, write_safetensors
from .family import (build, config_from_hf, flax_msgpack_state, hf_config_dict, params_from_state, read_hf_config,
                     resolve_head, state_from_params)

__all__ = ["load", "save", "read_weights", "CONFIG", "SAFETENSORS", "SAFETENSORS_INDEX", "FLAX_MSGPACK"]

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
FLAX_MSGPACK = "flax_model.msgpack"
_PREFER = ("auto", "flax", "safetensors")


def _read_sharded(d: str) -> dict:
    index_file = os.path.join(d, SAFETENSORS_INDEX)
    index = read_json(index_file, what="safetensors index")
    wmap = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
        raise ValueError(f"{index_file!r}: expected an object with a 'weight_map' of tensor name -> file name")
    files = sorted(set(wmap.values()))
    paths = {f: contained(d, f, what=f"shard named in {SAFETENSORS_INDEX}") for f in files}
    missing = [f for f in files if not os.path.isfile(paths[f])]
    if missing:
        raise FileNotFoundError(f"{index_file!r} names shards that do not exist in {d!r}: {missing}")
    sd, problems = {}, []
    for f in files:
        tensors, _ = read_safetensors(paths[f])
        for k, v in tensors.items():
            if k in sd:
                problems.append(f"{k} appears in more than one shard (again in {f})")
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
    except Exception as e:  # msgpack raises several unrelated types on a bad file
        raise ValueError(f"{file!r} is not a readable Flax msgpack file: {type(e).__name__}: {e}") from None
    if not isinstance(tree, dict):
        raise ValueError(f"{file!r}: expected a parameter dict, got {type(tree).__name__}")
    if set(tree) == {"params"} and isinstance(tree["params"], dict):
        tree = tree["params"]
    return flax_msgpack_state(tree)


def read_weights(d, prefer: str = "auto") -> tuple[dict, str]:
    """``(state dict with PyTorch names, the file read)`` of a checkpoint directory.

    ``prefer="auto"`` reads ``model.safetensors``, else the shards of
    ``model.safetensors.index.json``, else ``flax_model.msgpack``; ``"safetensors"`` and ``"flax"``
    read only that format.

    Raises:
      FileNotFoundError: no weights of the preferred kind (the directory's weight files are named).
      ValueError: a malformed file or index, or a shard outside the directory.
    """
    if prefer not in _PREFER:
        raise ValueError(f"prefer must be one of {_PREFER}, got {prefer!r}")
    d = os.fspath(d)
    files = {n: os.path.join(d, n) for n in (SAFETENSORS, SAFETENSORS_INDEX, FLAX_MSGPACK)}
    have = {n for n, f in files.items() if os.path.isfile(f)}
    if prefer in ("auto", "safetensors") and SAFETENSORS in have:
        return read_safetensors(files[SAFETENSORS])[0], files[SAFETENSORS]
    if prefer in ("auto", "safetensors") and SAFETENSORS_INDEX in have:
        return _read_sharded(d), files[SAFETENSORS_INDEX]
    if prefer in ("auto", "flax") and FLAX_MSGPACK in have:
        return _read_msgpack(files[FLAX_MSGPACK]), files[FLAX_MSGPACK]
    wanted = {"auto": f"{SAFETENSORS}, {SAFETENSORS_INDEX} or {FLAX_MSGPACK}", "flax": FLAX_MSGPACK,
              "safetensors": f"{SAFETENSORS} or {SAFETENSORS_INDEX}"}[prefer]
    others = sorted(f for f in os.listdir(d) if f.endswith((".bin", ".pt", ".pth", ".h5", ".msgpack", ".safetensors")))
    hint = f" (found {others}; pickled and TF weights are not read: convert them to safetensors)" if others else ""
    raise FileNotFoundError(f"no {wanted} in {os.path.abspath(d)!r}{hint}")


def load(path, *, architecture: Optional[str] = None, dtype=None, prefer: str = "auto", seed: int = 0,
         **overrides) -> tuple:
    """``(model, params)`` of a local Hugging Face checkpoint directory.

    Args:
      path: the directory (``config.json`` and weights).
      architecture: a PyTorch class name (``"BertForSequenceClassification"``) or a head
        (``"causal_lm"``, ``"base"``, ``"seq_cls"``) overriding ``config.architectures``.
      dtype: the parameters' dtype and the compute dtype (default: float32 for both).
      prefer: ``"auto"``, ``"safetensors"`` or ``"flax"`` (see `read_weights`).
      seed: initializes a sequence-classification head that the checkpoint lacks (a pretrained
        base loaded as ``BertForSequenceClassification``; a warning names it).
      **overrides: config fields to change (``remat_policy="dots_saveable"``, ``attention_impl=...``).

    Returns:
      ``(model, params)``: a linen module (``model.apply({"params": params}, input_ids, ...)``) and
      a nested dict of NumPy arrays (``jax.device_put`` it with any sharding).

    Raises:
      FileNotFoundError: no directory, no config.json or no weights.
      ValueError: an unsupported model_type or config feature, or weights that do not fit the
        config: every missing, unexpected and misshapen tensor in one message.
    """
    d = os.fspath(path)
    if not os.path.isdir(d):
        raise FileNotFoundError(f"no checkpoint directory at {os.path.abspath(d)!r}")
    hf = read_hf_config(d)
    if dtype is not None:
        overrides = {"dtype": dtype, "param_dtype": dtype, **overrides}
    config = config_from_hf(hf, **overrides)
    model = build(config, resolve_head(config, hf.get("architectures") or (), architecture))
    state, source = read_weights(d, prefer)
    import jax

    params = params_from_state(state, model, what=f"load({source!r})", new_head_key=jax.random.key(seed))
    return model, params


def save(path, model, params, *, overwrite: bool = False, extra_files: Optional[dict] = None) -> None:
    """Write ``config.json`` + ``model.safetensors`` for ``model`` (PyTorch names and layout).

    ``params`` must be plain arrays (``lora.merge`` a LoRA tree first). The directory is written
    under a temporary name beside ``path`` and renamed into place, so it appears complete or not
    at all. ``extra_files`` maps file names to JSON-able objects written beside (e.g. a
    ``generation_config.json``).

    Raises:
      ValueError: parameters that do not fit the model (all problems listed) or a non-empty
        ``path`` without ``overwrite``.
    """
    sd = state_from_params(params, model, what="save", disk=True)
    cfg = hf_config_dict(model)
    float_dtypes = {a.dtype.name for a in sd.values() if a.dtype.kind == "f" or a.dtype.name == "bfloat16"}
    if len(float_dtypes) == 1:
        cfg["dtype"] = float_dtypes.pop()  # what save_pretrained records (and dtype="auto" loads)
    with atomic_directory(path, overwrite=overwrite, what="save") as tmp:
        write_json(os.path.join(tmp, CONFIG), cfg)
        write_safetensors(os.path.join(tmp, SAFETENSORS), sd, {"format": "pt"})
        for name, obj in (extra_files or {}).items():
            write_json(contained(tmp, name, what="extra file"), obj)

"""Read safetensors files into NumPy arrays, bfloat16 and float8 included, without torch.

``safetensors.numpy.load_file`` cannot return bfloat16 tensors (NumPy has no bfloat16 of its own),
and most published checkpoints are bfloat16. The format is simple enough to read directly: an
8-byte little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}}``, then
the raw little-endian bytes. Arrays are views of a read-only memory map (nothing is copied until
the caller converts them); the extra dtypes come from ``ml_dtypes``, which JAX depends on.

Example:
  >>> import numpy as np, tempfile, os
  >>> from safetensors.numpy import save_file
  >>> path = os.path.join(tempfile.mkdtemp(), "x.safetensors")
  >>> save_file({"w": np.ones((2, 3), np.float32)}, path)
  >>> read_safetensors(path)["w"].shape
  (2, 3)
"""

from __future__ import annotations

import json
import os
import struct
from typing import Union

import ml_dtypes
import numpy as np

__all__ = ["read_safetensors", "read_checkpoint_dir", "SAFETENSORS_DTYPES"]

SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}

PathLike = Union[str, os.PathLike]


def read_safetensors(path: PathLike) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file as read-only NumPy arrays (memory-mapped).

    Raises:
      ValueError: if the file is not a valid safetensors file (the path and the problem are named).
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"{path}: not a safetensors file (header length {n} exceeds the file size {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (header is {type(header).__name__}, expected an object)")
    data_len = size - 8 - n
    mm = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n, shape=(data_len,)) if data_len else \
        np.zeros((0,), np.uint8)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r} has an unsupported or malformed header entry {info!r} "
                             f"(dtypes: {sorted(SAFETENSORS_DTYPES)})") from None
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if not 0 <= begin <= end <= data_len or end - begin != nbytes:
            raise ValueError(f"{path}: tensor {name!r} ({info['dtype']}{list(shape)}) has data offsets "
                             f"[{begin}, {end}) that do not fit its size {nbytes} or the data length {data_len}")
        out[name] = mm[begin:end].view(dtype).reshape(shape)
    return out


def read_checkpoint_dir(path: PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a Hugging Face checkpoint directory (``model.safetensors`` or a sharded index).

    A path to a single ``.safetensors`` file is read as that file.

    Raises:
      FileNotFoundError: if neither ``model.safetensors`` nor ``model.safetensors.index.json`` exists
        (the directory listing is shown), or a shard named by the index is missing.
      ValueError: if two shards hold the same tensor name.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        return read_safetensors(path)
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        return read_safetensors(single)
    if not os.path.isfile(index):
        listing = sorted(os.listdir(path)) if os.path.isdir(path) else "not a directory"
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                                f"(contents: {listing}); only safetensors checkpoints are read")
    with open(index) as f:
        weight_map = json.load(f).get("weight_map", {})
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        file = os.path.join(path, shard)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{index} names shard {shard!r}, which does not exist in {path}")
        tensors = read_safetensors(file)
        dup = sorted(set(tensors) & set(out))
        if dup:
            raise ValueError(f"{path}: tensors {dup} appear in more than one shard (again in {shard!r})")
        out.update(tensors)
    return out

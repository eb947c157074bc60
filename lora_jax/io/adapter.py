"""Adapter files for any pytree: `save_adapter` / `load_adapter`.

An adapter directory holds two files:

* ``adapter.safetensors``: each `LoraWeight`'s factors keyed by its tree path, ``<path>.lora_a``,
  ``<path>.lora_b`` (and ``<path>.m`` for DoRA), stored bit for bit in their own dtype;
* ``adapter.json``: the static data per path (layout, rank, alpha, rslora, dropout, layer_mask)
  and the kernel shape the adapter was made for.

The base weights are not saved: `load_adapter` takes them from the params it is given, checks
every path and shape against them, and reports every problem in one error. No pickle.

Example:
  >>> import os, tempfile, jax, jax.numpy as jnp, lora_jax as lora
  >>> from lora_jax.io import save_adapter, load_adapter
  >>> params = {"dense": {"kernel": jnp.ones((8, 4))}}
  >>> lp = lora.init(params, lora.Rules(["dense"], rank=2), 0)
  >>> d = os.path.join(tempfile.mkdtemp(), "adapter")
  >>> save_adapter(d, lp)
  >>> back = load_adapter(d, params)
  >>> bool((back["dense"]["kernel"].a == lp["dense"]["kernel"].a).all())
  True
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..rules import path_str
from ..weight import LoraWeight, check_layout, factor_shapes, is_lora
from ._files import atomic_directory, read_json, read_safetensors, to_numpy, write_json, write_safetensors

__all__ = ["save_adapter", "load_adapter", "TENSORS", "META", "FORMAT"]

TENSORS = "adapter.safetensors"
META = "adapter.json"
FORMAT = "lora_jax.adapter"
VERSION = 1


def _m_shape(w_shape, layout):
    return tuple(int(d) for d, k in zip(w_shape, layout) if k == "s") + \
        tuple(int(d) for d, k in zip(w_shape, layout) if k == "o")


def save_adapter(path, tree, *, overwrite: bool = False) -> None:
    """Write every `LoraWeight`'s factors and static data of ``tree`` to the directory ``path``.

    Works for any pytree (linen params, ``nnx.State``, tuples, ...) and for the trainable half
    from `lora.split` (the base ``w`` is not needed). The directory is written under a temporary
    name and renamed into place.

    Args:
      path: the directory to create.
      tree: a LoRA tree.
      overwrite: replace a non-empty ``path``.

    Raises:
      ValueError: when ``tree`` holds no `LoraWeight`, a factor is missing, or ``path`` is a
        non-empty directory and ``overwrite`` is False.
    """
    tensors, entries, problems = {}, {}, []
    for p, lw in _items(tree):
        if lw.a is None or lw.b is None:
            problems.append(f"{p}: factor a or b is None (save the trainable half or the full tree)")
            continue
        entry = {"layout": lw.layout, "rank": lw.rank, "alpha": lw.alpha, "rslora": lw.rslora,
                 "dropout": lw.dropout, "layer_mask": None if lw.layer_mask is None else list(lw.layer_mask),
                 "a": f"{p}.lora_a", "b": f"{p}.lora_b", "m": None,
                 "w_shape": None if lw.w is None else [int(d) for d in lw.w.shape]}
        tensors[entry["a"]], tensors[entry["b"]] = to_numpy(lw.a), to_numpy(lw.b)
        if lw.m is not None:
            entry["m"] = f"{p}.m"
            tensors[entry["m"]] = to_numpy(lw.m)
        entries[p] = entry
    if problems:
        raise ValueError("save_adapter: cannot save this tree:\n  " + "\n  ".join(problems))
    if not entries:
        raise ValueError("save_adapter: the tree holds no LoraWeight; call lora.init first")
    if len(tensors) != sum(2 + (e["m"] is not None) for e in entries.values()):
        raise ValueError("save_adapter: two tree paths produce the same tensor name; paths must be unique")
    meta = {"format": FORMAT, "version": VERSION, "weights": entries}
    with atomic_directory(path, overwrite=overwrite, what="save_adapter") as tmp:
        write_safetensors(os.path.join(tmp, TENSORS), tensors, {"format": FORMAT})
        write_json(os.path.join(tmp, META), meta)


def _items(tree):
    for kp, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_lora)[0]:
        if is_lora(leaf):
            yield path_str(kp), leaf


def _static_problems(p, e) -> list[str]:
    """Problems with one metadata entry (types and ranges), before shapes are looked at."""
    out = []
    if not isinstance(e, dict):
        return [f"{p}: metadata entry must be an object, got {type(e).__name__}"]
    for field in ("layout", "rank", "alpha", "a", "b"):
        if field not in e:
            out.append(f"{p}: metadata lacks {field!r}")
    if out:
        return out
    lay = e["layout"]
    if not isinstance(lay, str) or not lay or set(lay) - set("sio"):
        out.append(f"{p}: layout must be letters 's'/'i'/'o', got {lay!r}")
    r = e["rank"]
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        out.append(f"{p}: rank must be a positive integer, got {r!r}")
    al = e["alpha"]
    if isinstance(al, bool) or not isinstance(al, (int, float)) or not math.isfinite(al) or al <= 0:
        out.append(f"{p}: alpha must be a positive number, got {al!r}")
    d = e.get("dropout", 0.0)
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d < 1:
        out.append(f"{p}: dropout must be in [0, 1), got {d!r}")
    mask = e.get("layer_mask")
    if mask is not None and (not isinstance(mask, list) or not all(isinstance(v, bool) for v in mask)):
        out.append(f"{p}: layer_mask must be null or a list of booleans, got {mask!r}")
    return out


def load_adapter(path, params) -> Any:
    """Rebuild the LoRA tree saved by `save_adapter` on top of ``params``.

    Each saved path must exist in ``params`` as a plain array (the base kernel ``w``); its
    layout must fit ``w``'s shape and the saved factors must have exactly the shapes
    ``factor_shapes(w.shape, layout, rank)`` (and DoRA's ``m`` the shape ``(*stack, *out)``).
    Every problem (paths missing from ``params``, tensors missing from or extra in the file,
    wrong shapes, malformed metadata) is collected and raised in one ``ValueError``; nothing is
    loaded partially. ``params`` itself is not modified.

    Args:
      path: a directory written by `save_adapter`.
      params: the base parameter tree (no `LoraWeight` at the saved paths).

    Returns:
      ``params`` with the saved paths replaced by `LoraWeight` nodes (factors in their saved
      dtype, as JAX arrays).

    Raises:
      FileNotFoundError: when ``path`` or one of its two files does not exist.
      ValueError: listing every problem found.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"load_adapter: no adapter directory at {path!r}")
    meta = read_json(os.path.join(path, META), what="lora_jax adapter metadata")
    tensors, _ = read_safetensors(os.path.join(path, TENSORS))
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("weights"), dict):
        raise ValueError(f"load_adapter: {os.path.join(path, META)!r} is not a lora_jax adapter file "
                         f"(expected an object with format {FORMAT!r} and a 'weights' object)")
    if meta.get("version") != VERSION:
        raise ValueError(f"load_adapter: adapter format version {meta.get('version')!r} is not supported "
                         f"(this lora_jax reads version {VERSION})")

    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lora)
    index = {path_str(kp): j for j, (kp, _) in enumerate(flat)}
    problems, built, used = [], {}, set()
    for p, e in meta["weights"].items():
        bad = _static_problems(p, e)
        if bad:
            problems += bad
            continue
        names = {"a": e["a"], "b": e["b"]}
        if e.get("m") is not None:
            names["m"] = e["m"]
        arrays = {}
        for role, name in names.items():
            used.add(name)
            if name not in tensors:
                problems.append(f"{p}: tensor {name!r} ({role}) is missing from {TENSORS}")
            else:
                arrays[role] = tensors[name]
        if p not in index:
            problems.append(f"{p}: no such path in params")
            continue
        w = flat[index[p]][1]
        if is_lora(w):
            problems.append(f"{p}: params already hold a LoraWeight here; pass the base params (lora.merge or "
                            "the original tree)")
            continue
        if not hasattr(w, "shape"):
            problems.append(f"{p}: params hold {type(w).__name__} here, not an array")
            continue
        if e.get("w_shape") is not None and list(w.shape) != list(e["w_shape"]):
            problems.append(f"{p}: the adapter was saved for a kernel of shape {tuple(e['w_shape'])}, "
                            f"params have {tuple(w.shape)}")
            continue
        try:
            check_layout(e["layout"], w.shape, where=p)
        except ValueError as err:
            problems.append(str(err))
            continue
        want_a, want_b = factor_shapes(w.shape, e["layout"], e["rank"])
        want = {"a": want_a, "b": want_b, "m": _m_shape(w.shape, e["layout"])}
        for role, arr in arrays.items():
            if tuple(arr.shape) != tuple(want[role]):
                problems.append(f"{p}: {role} {names[role]!r} has shape {tuple(arr.shape)}, expected "
                                f"{tuple(want[role])} for w{tuple(w.shape)} layout {e['layout']!r} rank {e['rank']}")
        n_stack = e["layout"].count("s")
        mask = e.get("layer_mask")
        if mask is not None:
            n_layers = int(np.prod([d for d, k in zip(w.shape, e["layout"]) if k == "s"])) if n_stack else 0
            if n_stack != 1 or len(mask) != n_layers:
                problems.append(f"{p}: layer_mask of length {len(mask)} does not fit layout {e['layout']!r} "
                                f"and shape {tuple(w.shape)} (needs one stack axis of that length)")
        if len(arrays) == len(names):
            built[p] = (w, arrays, e)
    extra = sorted(set(tensors) - used)
    problems += [f"{k}: tensor in {TENSORS} that no metadata entry names" for k in extra]
    if problems:
        raise ValueError(f"load_adapter: {len(problems)} problem(s) in {path!r}:\n  " + "\n  ".join(problems))

    leaves = [leaf for _, leaf in flat]
    for p, (w, arrays, e) in built.items():
        leaves[index[p]] = LoraWeight(
            w, jnp.asarray(arrays["a"]), jnp.asarray(arrays["b"]),
            m=None if "m" not in arrays else jnp.asarray(arrays["m"]),
            layout=e["layout"], rank=e["rank"], alpha=e["alpha"], rslora=bool(e.get("rslora", False)),
            dropout=float(e.get("dropout", 0.0)),
            layer_mask=None if e.get("layer_mask") is None else tuple(e["layer_mask"]))
    return jax.tree_util.tree_unflatten(treedef, leaves)

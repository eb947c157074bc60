"""Adapter files for any pytree: `save_adapter` / `load_adapter`.

An adapter directory holds two files:

* ``adapter.safetensors``: each `LoraWeight`'s factors keyed by its tree path, ``<path>.lora_a``,
  ``<path>.lora_b`` (and ``<path>.m`` for DoRA), stored bit for bit in their own dtype;
* ``adapter.json``: the static data per path (name, active, layout, rank, alpha, rslora, dropout,
  layer_mask, out_slices) and the kernel shape the adapter was made for; a kernel with several
  adapters has a ``chain`` of such entries (tensors ``<path>.<name>.lora_a`` ...), and a
  `lora.Trainable` leaf is stored whole as ``<path>.value``.

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
from ..weight import LoraWeight, Trainable, check_layout, factor_shapes, is_node, is_trainable
from ._files import atomic_directory, read_json, read_safetensors, to_numpy, write_json, write_safetensors

__all__ = ["save_adapter", "load_adapter", "TENSORS", "META", "FORMAT"]

TENSORS = "adapter.safetensors"
META = "adapter.json"
FORMAT = "lora_jax.adapter"
VERSION = 1


def _m_shape(w_shape, layout):
    return tuple(int(d) for d, k in zip(w_shape, layout) if k == "s") + \
        tuple(int(d) for d, k in zip(w_shape, layout) if k == "o")


def _entry(p, lw, prefix, tensors):
    """Metadata of one adapter node; its tensors go to ``tensors`` under ``prefix``."""
    entry = {"name": lw.name, "active": lw.active, "layout": lw.layout, "rank": lw.rank, "alpha": lw.alpha,
             "rslora": lw.rslora, "dropout": lw.dropout,
             "layer_mask": None if lw.layer_mask is None else list(lw.layer_mask),
             "out_slices": None if lw.out_slices is None else list(lw.out_slices),
             "a": f"{prefix}.lora_a", "b": f"{prefix}.lora_b", "m": None}
    tensors[entry["a"]], tensors[entry["b"]] = to_numpy(lw.a), to_numpy(lw.b)
    if lw.m is not None:
        entry["m"] = f"{prefix}.m"
        tensors[entry["m"]] = to_numpy(lw.m)
    return entry


def save_adapter(path, tree, *, overwrite: bool = False) -> None:
    """Write every adapter of ``tree`` (and every `lora.Trainable` leaf) to the directory ``path``.

    Works for any pytree (linen params, ``nnx.State``, tuples, ...) and for the trainable half
    from `lora.split` (the base ``w`` is not needed). A kernel with several adapters (`lora.add`)
    keeps them all, with their names and ``active`` flags. The directory is written under a
    temporary name and renamed into place.

    Args:
      path: the directory to create.
      tree: a LoRA tree.
      overwrite: replace a non-empty ``path``.

    Raises:
      ValueError: when ``tree`` holds no adapter, a factor is missing, or ``path`` is a
        non-empty directory and ``overwrite`` is False.
    """
    tensors, entries, problems = {}, {}, []
    for p, node in _items(tree):
        if is_trainable(node):
            if node.value is None:
                problems.append(f"{p}: a Trainable leaf without its value")
                continue
            entries[p] = {"full": f"{p}.value", "w_shape": [int(d) for d in node.value.shape]}
            tensors[f"{p}.value"] = to_numpy(node.value)
            continue
        chain = node.chain()
        if any(n.a is None or n.b is None for n in chain):
            problems.append(f"{p}: factor a or b is None (save the trainable half or the full tree)")
            continue
        base = node.base
        w_shape = None if base is None else [int(d) for d in base.shape]
        if len(chain) == 1 and chain[0].name == "default":
            entries[p] = dict(_entry(p, chain[0], p, tensors), w_shape=w_shape)
        else:
            entries[p] = {"chain": [_entry(p, n, f"{p}.{n.name}", tensors) for n in chain], "w_shape": w_shape}
    if problems:
        raise ValueError("save_adapter: cannot save this tree:\n  " + "\n  ".join(problems))
    if not entries:
        raise ValueError("save_adapter: the tree holds no LoraWeight; call lora.init first")
    n_named = sum(1 if "full" in e else sum(2 + (c["m"] is not None) for c in e.get("chain", [e]))
                  for e in entries.values())
    if len(tensors) != n_named:
        raise ValueError("save_adapter: two tree paths produce the same tensor name; paths must be unique")
    meta = {"format": FORMAT, "version": VERSION, "weights": entries}
    with atomic_directory(path, overwrite=overwrite, what="save_adapter") as tmp:
        write_safetensors(os.path.join(tmp, TENSORS), tensors, {"format": FORMAT})
        write_json(os.path.join(tmp, META), meta)


def _is_stop(x) -> bool:
    return is_node(x) or (hasattr(x, "dequantize") and hasattr(x, "scheme"))


def _items(tree):
    for kp, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_stop)[0]:
        if is_node(leaf):
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
    for field in ("layer_mask", "out_slices"):
        mask = e.get(field)
        if mask is not None and (not isinstance(mask, list) or not mask or not all(isinstance(v, bool) for v in mask)):
            out.append(f"{p}: {field} must be null or a non-empty list of booleans, got {mask!r}")
    name = e.get("name", "default")
    if not isinstance(name, str) or not name:
        out.append(f"{p}: adapter name must be a non-empty string, got {name!r}")
    if not isinstance(e.get("active", True), bool):
        out.append(f"{p}: active must be a boolean, got {e.get('active')!r}")
    return out


def _check_node(p, e, w_shape, tensors, used, problems):
    """Validate one adapter entry against the kernel shape; its arrays when all is well, else None."""
    bad = _static_problems(p, e)
    if bad:
        problems += bad
        return None
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
    try:
        check_layout(e["layout"], w_shape, where=p)
    except ValueError as err:
        problems.append(str(err))
        return None
    want_a, want_b = factor_shapes(w_shape, e["layout"], e["rank"])
    want = {"a": want_a, "b": want_b, "m": _m_shape(w_shape, e["layout"])}
    ok = len(arrays) == len(names)
    for role, arr in arrays.items():
        if not (np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == "bfloat16"):
            problems.append(f"{p}: {role} {names[role]!r} has dtype {arr.dtype}, expected a floating dtype")
            ok = False
        if tuple(arr.shape) != tuple(want[role]):
            problems.append(f"{p}: {role} {names[role]!r} has shape {tuple(arr.shape)}, expected "
                            f"{tuple(want[role])} for w{tuple(w_shape)} layout {e['layout']!r} rank {e['rank']}")
            ok = False
    n_stack = e["layout"].count("s")
    mask = e.get("layer_mask")
    if mask is not None:
        n_layers = int(np.prod([d for d, k in zip(w_shape, e["layout"]) if k == "s"])) if n_stack else 0
        if n_stack != 1 or len(mask) != n_layers:
            problems.append(f"{p}: layer_mask of length {len(mask)} does not fit layout {e['layout']!r} "
                            f"and shape {tuple(w_shape)} (needs one stack axis of that length)")
            ok = False
    slices = e.get("out_slices")
    n_out = int(np.prod([d for d, k in zip(w_shape, e["layout"]) if k == "o"]))
    if slices is not None and n_out % len(slices):
        problems.append(f"{p}: out_slices of length {len(slices)} does not divide the {n_out} output features")
        ok = False
    return arrays if ok else None


def _node(w, arrays, e):
    return LoraWeight(
        w, jnp.asarray(arrays["a"]), jnp.asarray(arrays["b"]),
        m=None if "m" not in arrays else jnp.asarray(arrays["m"]),
        layout=e["layout"], rank=e["rank"], alpha=e["alpha"], rslora=bool(e.get("rslora", False)),
        dropout=float(e.get("dropout", 0.0)),
        layer_mask=None if e.get("layer_mask") is None else tuple(e["layer_mask"]),
        out_slices=None if e.get("out_slices") is None else tuple(e["out_slices"]),
        name=e.get("name", "default"), active=e.get("active", True))


def load_adapter(path, params) -> Any:
    """Rebuild the LoRA tree saved by `save_adapter` on top of ``params``.

    Each saved path must exist in ``params`` as a plain (or `lora.quantize`-d) array: the base
    kernel ``w``. Its layout must fit ``w``'s shape and the saved factors must have exactly the
    shapes ``factor_shapes(w.shape, layout, rank)`` (DoRA's ``m``: ``(*stack, *out)``); a
    fully trained leaf must have ``w``'s shape. Every problem (paths missing from ``params``,
    tensors missing from or extra in the file, wrong shapes, malformed metadata) is collected and
    raised in one ``ValueError``; nothing is loaded partially. ``params`` itself is not modified.

    Args:
      path: a directory written by `save_adapter`.
      params: the base parameter tree (no adapter at the saved paths).

    Returns:
      ``params`` with the saved paths replaced by `LoraWeight` nodes (a chain when several
      adapters were saved for one kernel) or `lora.Trainable` leaves; factors in their saved
      dtype, as JAX arrays.

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

    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_stop)
    index = {path_str(kp): j for j, (kp, _) in enumerate(flat)}
    problems, built, used = [], {}, set()
    for p, e in meta["weights"].items():
        if not isinstance(e, dict):
            problems.append(f"{p}: metadata entry must be an object, got {type(e).__name__}")
            continue
        # every tensor an entry names counts as named, whatever else is wrong with it
        used.update(e.get(k) for k in ("a", "b", "m", "full"))
        for c in e.get("chain", []) if isinstance(e.get("chain"), list) else []:
            if isinstance(c, dict):
                used.update(c.get(k) for k in ("a", "b", "m"))
        if p not in index:
            problems.append(f"{p}: no such path in params")
            continue
        w = flat[index[p]][1]
        if is_node(w):
            problems.append(f"{p}: params already hold a LoraWeight or Trainable here; pass the base params "
                            "(lora.merge or the original tree)")
            continue
        if not hasattr(w, "shape"):
            problems.append(f"{p}: params hold {type(w).__name__} here, not an array")
            continue
        if e.get("w_shape") is not None and list(w.shape) != list(e["w_shape"]):
            problems.append(f"{p}: the adapter was saved for a kernel of shape {tuple(e['w_shape'])}, "
                            f"params have {tuple(w.shape)}")
            continue
        if "full" in e:
            used.add(e["full"])
            if e["full"] not in tensors:
                problems.append(f"{p}: tensor {e['full']!r} (fully trained leaf) is missing from {TENSORS}")
            elif tensors[e["full"]].dtype != np.dtype(w.dtype):
                problems.append(f"{p}: fully trained leaf has dtype {tensors[e['full']].dtype}, params have {w.dtype}")
            elif tuple(tensors[e["full"]].shape) != tuple(w.shape):
                problems.append(f"{p}: fully trained leaf has shape {tuple(tensors[e['full']].shape)}, params have "
                                f"{tuple(w.shape)}")
            else:
                built[p] = ("full", tensors[e["full"]])
            continue
        chain = e["chain"] if "chain" in e else [e]
        if not isinstance(chain, list) or not chain:
            problems.append(f"{p}: 'chain' must be a non-empty list of adapter entries")
            continue
        nodes = [(c, _check_node(p, c, tuple(w.shape), tensors, used, problems)) for c in chain]
        names = [c.get("name", "default") for c in chain if isinstance(c, dict)]
        if len(set(names)) != len(names):
            problems.append(f"{p}: adapter names repeat in its chain: {names}")
            continue
        if all(arrays is not None for _, arrays in nodes):
            built[p] = ("chain", w, nodes)
    extra = sorted(set(tensors) - used)
    problems += [f"{k}: tensor in {TENSORS} that no metadata entry names" for k in extra]
    if problems:
        raise ValueError(f"load_adapter: {len(problems)} problem(s) in {path!r}:\n  " + "\n  ".join(problems))

    leaves = [leaf for _, leaf in flat]
    for p, item in built.items():
        if item[0] == "full":
            leaves[index[p]] = Trainable(jnp.asarray(item[1]))
            continue
        _, w, nodes = item
        node = w
        for e, arrays in nodes:
            node = _node(node, arrays, e)
        leaves[index[p]] = node
    return jax.tree_util.tree_unflatten(treedef, leaves)

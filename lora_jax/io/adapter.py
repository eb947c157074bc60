"""Adapter files for any pytree: `save_adapter` / `load_adapter`.

An adapter directory holds two files:

* ``adapter.safetensors``: each `LoraWeight`'s factors keyed by its tree path, ``<path>.lora_a``,
  ``<path>.lora_b`` (and ``<path>.m``, a variant's own array: DoRA's magnitude), stored bit for bit in their own dtype;
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

import dataclasses
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ..layout import check_layout, factor_shapes
from ..rules import path_str
from ..weight import AdapterSettings, LoraWeight, Trainable, is_node, is_trainable, is_unit
from ._files import atomic_directory, nonfinite, read_json, read_safetensors, to_numpy, write_json, write_safetensors

__all__ = ["save_adapter", "load_adapter", "TENSORS", "META", "FORMAT"]

TENSORS = "adapter.safetensors"
META = "adapter.json"
FORMAT = "lora_jax.adapter"
VERSION = 1


def _m_shape(w_shape, layout):
    return tuple(int(d) for d, k in zip(w_shape, layout) if k == "s") + \
        tuple(int(d) for d, k in zip(w_shape, layout) if k == "o")


def _entry(lw, prefix, tensors):
    """Metadata of one adapter node (its `AdapterSettings` fields by name, its layout and tensor
    names); its tensors go to ``tensors`` under ``prefix``."""
    entry = {**lw.settings.to_json(), "layout": lw.layout, "a": f"{prefix}.lora_a", "b": f"{prefix}.lora_b", "m": None}
    tensors[entry["a"]], tensors[entry["b"]] = to_numpy(lw.a), to_numpy(lw.b)
    if lw.m is not None:
        entry["m"] = f"{prefix}.m"
        tensors[entry["m"]] = to_numpy(lw.m)
    return entry


def save_adapter(path, tree, *, overwrite: bool = False) -> None:
    """Write every adapter of ``tree`` (and every `lora.Trainable` leaf) to the directory ``path``.

    Works for any pytree (linen params, ``nnx.State``, tuples, ...) and for the trainable half
    from `lora.split` when every adapter is active (the base ``w`` is not needed; an inactive
    adapter's factors are in the frozen half). A kernel with several adapters (`lora.add`)
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
        if p in entries:
            problems.append(f"{p}: two tree paths join to this same name (e.g. a key 'a/b' beside a nested a -> b); "
                            "paths must be unique once joined with '/'")
            continue
        chain = node.chain()
        if any(n.a is None or n.b is None for n in chain):
            problems.append(f"{p}: factor a or b is None (save the full tree, or the trainable half of one whose "
                            "adapters are all active: lora.split puts an inactive adapter's factors in the frozen half)")
            continue
        base = node.base
        w_shape = None if base is None else [int(d) for d in base.shape]
        bad = [] if w_shape is None else [
            f"{p}: adapter {n.name!r} has factors a{tuple(n.a.shape)}, b{tuple(n.b.shape)}; a kernel {tuple(w_shape)} "
            f"with layout {n.layout!r} at rank {n.rank} needs a{tuple(want[0])}, b{tuple(want[1])}"
            for n in chain for want in [factor_shapes(w_shape, n.layout, n.rank)]
            if (tuple(n.a.shape), tuple(n.b.shape)) != (tuple(want[0]), tuple(want[1]))]
        if bad:
            problems += bad
            continue
        if len(chain) == 1 and chain[0].name == "default":
            entries[p] = dict(_entry(chain[0], p, tensors), w_shape=w_shape)
        else:
            entries[p] = {"chain": [_entry(n, f"{p}.{n.name}", tensors) for n in chain], "w_shape": w_shape}
    problems += nonfinite(tensors)  # nothing is written then
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


def _items(tree):
    for kp, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_unit)[0]:
        if is_node(leaf):
            yield path_str(kp), leaf


# -- load_adapter: parse, then validate (collecting every problem), then build ------------------


def _parse(path) -> tuple[dict, dict]:
    """The metadata and the tensors of the adapter directory ``path``; a file that is not an
    adapter file at all (missing, unreadable, another format or version) raises at once."""
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
    return meta["weights"], tensors


def _named_tensors(e) -> set:
    """Every tensor name an entry mentions (counted as named whatever else is wrong with it)."""
    names = {e.get(k) for k in ("a", "b", "m", "full")}
    for c in e.get("chain", []) if isinstance(e.get("chain"), list) else []:
        if isinstance(c, dict):
            names |= {c.get(k) for k in ("a", "b", "m")}
    return names


def _node_plan(p, e, w_shape, tensors, problems) -> Optional[tuple]:
    """One adapter entry checked against the kernel shape: ``(settings, layout, arrays)``, or None
    with its problems appended."""
    if not isinstance(e, dict):
        problems.append(f"{p}: metadata entry must be an object, got {type(e).__name__}")
        return None
    lacks = [f"{p}: metadata lacks {k!r}" for k in ("layout", "rank", "alpha", "a", "b") if e.get(k) is None]
    if lacks:
        problems += lacks
        return None
    n = len(problems)
    settings, bad = AdapterSettings.parse({k: e[k] for k in AdapterSettings.names() if k in e}, where=p)
    problems += bad
    layout = e["layout"]
    try:
        check_layout(layout, w_shape, where=p)
    except ValueError as err:
        problems.append(str(err))
    names = {role: e[role] for role in ("a", "b", "m") if e.get(role) is not None}
    if settings is not None and "m" in names and "variant" not in e:
        settings = dataclasses.replace(settings, variant="dora")  # written before variants had names
    if settings is not None and settings.kind.has_m != ("m" in names):
        problems.append(f"{p}: the {settings.variant} variant " + ("needs its m tensor, which the entry does not name"
                        if settings.kind.has_m else f"has no m tensor, but the entry names {names['m']!r}"))
    arrays = {role: tensors[name] for role, name in names.items() if name in tensors}
    problems += [f"{p}: tensor {names[role]!r} ({role}) is missing from {TENSORS}" for role in names if role not in arrays]
    if len(problems) > n:
        return None
    want_a, want_b = factor_shapes(w_shape, layout, settings.rank)
    want = {"a": want_a, "b": want_b, "m": _m_shape(w_shape, layout)}
    for role, arr in arrays.items():
        if not (np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == "bfloat16"):
            problems.append(f"{p}: {role} {names[role]!r} has dtype {arr.dtype}, expected a floating dtype")
        if tuple(arr.shape) != tuple(want[role]):
            problems.append(f"{p}: {role} {names[role]!r} has shape {tuple(arr.shape)}, expected "
                            f"{tuple(want[role])} for w{tuple(w_shape)} layout {layout!r} rank {settings.rank}")
    stack = [d for d, k in zip(w_shape, layout) if k == "s"]
    if settings.layer_mask is not None and (len(stack) != 1 or len(settings.layer_mask) != stack[0]):
        problems.append(f"{p}: layer_mask of length {len(settings.layer_mask)} does not fit layout {layout!r} "
                        f"and shape {tuple(w_shape)} (needs one stack axis of that length)")
    n_out = int(np.prod([d for d, k in zip(w_shape, layout) if k == "o"]))
    if settings.out_slices is not None and n_out % len(settings.out_slices):
        problems.append(f"{p}: out_slices of length {len(settings.out_slices)} does not divide the {n_out} output "
                        "features")
    return None if len(problems) > n else (settings, layout, arrays)


def _entry_plan(p, e, w, tensors, problems) -> Optional[tuple]:
    """One saved path checked against its base leaf ``w``: ``("full", array)`` or
    ``("chain", [node plans])``, or None with its problems appended."""
    if is_node(w):
        problems.append(f"{p}: params already hold a LoraWeight or Trainable here; pass the base params "
                        "(lora.merge or the original tree)")
        return None
    if not hasattr(w, "shape"):
        problems.append(f"{p}: params hold {type(w).__name__} here, not an array")
        return None
    if e.get("w_shape") is not None and list(w.shape) != list(e["w_shape"]):
        problems.append(f"{p}: the adapter was saved for a kernel of shape {tuple(e['w_shape'])}, "
                        f"params have {tuple(w.shape)}")
        return None
    dt = np.dtype(getattr(w, "dtype", np.float32))
    if "full" not in e and not (np.issubdtype(dt, np.floating) or dt.name == "bfloat16"):
        problems.append(f"{p}: params hold a {dt.name} kernel here; LoRA adapts floating kernels only (lora.init "
                        "refuses this leaf too)")
        return None
    if "full" in e:
        arr = tensors.get(e["full"])
        if arr is None:
            problems.append(f"{p}: tensor {e['full']!r} (fully trained leaf) is missing from {TENSORS}")
        elif arr.dtype != np.dtype(w.dtype):
            problems.append(f"{p}: fully trained leaf has dtype {arr.dtype}, params have {w.dtype}")
        elif tuple(arr.shape) != tuple(w.shape):
            problems.append(f"{p}: fully trained leaf has shape {tuple(arr.shape)}, params have {tuple(w.shape)}")
        else:
            return "full", arr
        return None
    chain = e["chain"] if "chain" in e else [e]
    if not isinstance(chain, list) or not chain:
        problems.append(f"{p}: 'chain' must be a non-empty list of adapter entries")
        return None
    nodes = [_node_plan(p, c, tuple(w.shape), tensors, problems) for c in chain]
    names = [c.get("name", "default") for c in chain if isinstance(c, dict)]
    if len(set(names)) != len(names):
        problems.append(f"{p}: adapter names repeat in its chain: {names}")
        return None
    return ("chain", nodes) if all(n is not None for n in nodes) else None


def _validate(entries: dict, tensors: dict, leaves: dict) -> tuple[dict, list[str]]:
    """Every saved path against ``leaves`` (path -> base leaf): ``(plans, problems)``."""
    plans, problems, named = {}, [], set()
    for p, e in entries.items():
        if not isinstance(e, dict):
            problems.append(f"{p}: metadata entry must be an object, got {type(e).__name__}")
            continue
        named |= _named_tensors(e)
        if p not in leaves:
            problems.append(f"{p}: no such path in params")
            continue
        plan = _entry_plan(p, e, leaves[p], tensors, problems)
        if plan is not None:
            plans[p] = plan
    problems += [f"{k}: tensor in {TENSORS} that no metadata entry names" for k in sorted(set(tensors) - named)]
    return plans, problems


def _build(plan, w):
    """The node for one saved path over its base leaf ``w``."""
    kind, item = plan
    if kind == "full":
        return Trainable(jnp.asarray(item))
    node = w
    for settings, layout, arrays in item:
        node = LoraWeight(node, jnp.asarray(arrays["a"]), jnp.asarray(arrays["b"]),
                          m=None if "m" not in arrays else jnp.asarray(arrays["m"]), layout=layout, settings=settings)
    return node


def load_adapter(path, params) -> Any:
    """Rebuild the LoRA tree saved by `save_adapter` on top of ``params``.

    Each saved path must exist in ``params`` as a plain (or `lora.quantize`-d) array: the base
    kernel ``w``. Its layout must fit ``w``'s shape and the saved factors must have exactly the
    shapes ``factor_shapes(w.shape, layout, rank)`` (DoRA's ``m``: ``(*stack, *out)``); a
    fully trained leaf must have ``w``'s shape. Every problem (paths missing from ``params``,
    tensors missing from or extra in the file, wrong shapes, malformed metadata) is collected and
    raised in one ``ValueError``; nothing is loaded partially. ``params`` itself is not modified.
    Settings a file does not spell (files from older versions) take `lora.AdapterSettings`'
    defaults.

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
    entries, tensors = _parse(path)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_unit)
    paths = [path_str(kp) for kp, _ in flat]
    plans, problems = _validate(entries, tensors, {p: leaf for p, (_, leaf) in zip(paths, flat)})
    problems += nonfinite(tensors)
    if problems:
        raise ValueError(f"load_adapter: {len(problems)} problem(s) in {os.fspath(path)!r}:\n  " +
                         "\n  ".join(problems))
    leaves = [_build(plans[p], leaf) if p in plans else leaf for p, (_, leaf) in zip(paths, flat)]
    return jax.tree_util.tree_unflatten(treedef, leaves)

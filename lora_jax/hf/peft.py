"""PEFT LoRA adapters in and out: `save_peft`, `load_peft`.

A PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys
are the PyTorch module names behind ``base_model.model.`` (the adapter name stripped, as PEFT's
``get_peft_model_state_dict`` does)::

    base_model.model.<module>.lora_A.weight         (r, in)          = a.T
    base_model.model.<module>.lora_B.weight         (out, r)         = b.T
    base_model.model.<module>.lora_embedding_A      (r, num_embeddings) = a.T   (embeddings)
    base_model.model.<module>.lora_embedding_B      (dim, r)         = b.T
    base_model.model.<module>.lora_magnitude_vector (out,)           = m      (DoRA)
    base_model.model.<head>.weight / .bias          full weights of ``modules_to_save`` (SEQ_CLS heads)

``a``/``b`` are lora_jax's factors, ``(in, r)`` and ``(r, out)`` whatever the Flax kernel's layout,
so the same formula serves GPT-2, whose PyTorch ``Conv1D`` weight is ``(in, out)``: PEFT marks it
``fan_in_fan_out`` and transposes only the merged delta, never ``lora_A``/``lora_B``.
"""

from __future__ import annotations

import collections
import os
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ..rules import path_str
from ..io._files import atomic_directory, read_json, read_safetensors, write_json, write_safetensors
from ..weight import LoraWeight, Trainable, factor_shapes, is_lora, is_node, is_trainable
from .arch import Resolved, resolve
from .convert import check_tree, expected_shapes, flatten, kernel_layout, torch_key, torch_module_name
from .presets import PEFT_DEFAULT_TARGETS

__all__ = ["save_peft", "load_peft", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "PREFIX"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."

# LoraConfig fields whose non-default values change the model in ways lora_jax does not load
_UNSUPPORTED = {
    "lora_bias": (False, None), "layer_replication": (None,), "target_parameters": (None, []),
    "trainable_token_indices": (None,), "use_qalora": (False, None), "alora_invocation_tokens": (None,),
    "use_bdlora": (None, False), "megatron_config": (None,), "bias": ("none", "all", "lora_only", None),
}


def _one_adapter(tree, adapter: Optional[str]):
    """The tree with each chain of adapters reduced to the one PEFT file to write."""
    names = set()
    for leaf in jax.tree_util.tree_leaves(tree, is_leaf=is_lora):
        if is_lora(leaf):
            names.update(n.name for n in leaf.chain())
    if adapter is None:
        active = set()
        for leaf in jax.tree_util.tree_leaves(tree, is_leaf=is_lora):
            if is_lora(leaf):
                active.update(n.name for n in leaf.chain() if n.active)
        if len(names) <= 1:
            return tree
        if len(active) != 1:
            raise ValueError(f"save_peft: the tree holds adapters {sorted(names)} ({sorted(active)} active); a PEFT "
                             "directory holds one: pass adapter=<name>")
        adapter = active.pop()
    if adapter not in names:
        raise ValueError(f"save_peft: no adapter named {adapter!r}; the tree has {sorted(names)}")

    def pick(x):
        if not is_lora(x):
            return x
        node = next((n for n in x.chain() if n.name == adapter), None)
        return x.base if node is None else node.replace(w=x.base, active=True)

    return jax.tree_util.tree_map(pick, tree, is_leaf=is_lora)


def _lora_modules(expected: dict) -> dict[str, str]:
    """``{PyTorch module name: Flax leaf path}`` for every kernel and embedding of the model."""
    return {torch_module_name(p): p for p in expected if p.rpartition("/")[2] in ("kernel", "embedding")}


def _head_modules(res: Resolved, expected) -> list[str]:
    """Top-level modules outside the base model of a sequence classifier (PEFT's modules_to_save)."""
    if res.task_type != "SEQ_CLS":
        return []
    return sorted({p.split("/")[0] for p in expected if p.split("/")[0] != res.arch.base_prefix})


def _tied_embedding_problem(res: Resolved, expected, path: str) -> Optional[str]:
    # transformers' Flax GPT-2 reuses the embedding matrix as its output head, while PEFT adapts the
    # input lookup only: the two models would disagree.
    if path.rpartition("/")[2] == "embedding" and res.tied and path == res.arch.embed \
            and not any(p.endswith("lm_head/kernel") for p in expected):
        return (f"{path}: an adapter on the tied input embedding of {res.flax_class} also changes its output head "
                "in Flax, but only the input lookup in PEFT; the models would disagree")
    return None


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def _target_names(targeted: list[str], all_modules: list[str]) -> list[str]:
    """PEFT target_modules for exactly ``targeted``: a short name when it selects all modules of that
    name, else the full module name."""
    chosen = set(targeted)
    out = set()
    for name in targeted:
        short = name.rpartition(".")[2]
        same = [m for m in all_modules if m == short or m.endswith("." + short)]
        out.add(short if set(same) <= chosen else name)
    return sorted(out)


def save_peft(path, tree, model, *, overwrite: bool = False, base_model_name_or_path: Optional[str] = None,
              adapter: Optional[str] = None) -> None:
    """Write the adapters of a LoRA tree as a PEFT LoRA adapter directory.

    ``adapter_config.json`` is derived from the `LoraWeight` nodes: the most common rank and
    alpha become ``r`` and ``lora_alpha``, the others go to ``rank_pattern``/``alpha_pattern``
    keyed by module name; ``use_rslora``/``use_dora`` must be the same for all targets.
    ``task_type`` follows the model class (CAUSAL_LM, SEQ_CLS, FEATURE_EXTRACTION); for SEQ_CLS
    the classifier head is saved in full as ``modules_to_save`` (merged, if it holds an adapter),
    as PEFT does. `lora.Trainable` leaves are written in full: a module whose every leaf is
    trainable goes to ``modules_to_save``, trainable biases set ``bias`` (``"all"`` when every bias
    of the model trains, ``"lora_only"`` when exactly those of the adapted modules do). Factors are
    written in float32. A tree with several adapters writes the one named ``adapter`` (default:
    the only active one).

    Load it in PyTorch with
    ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), path)``.

    Args:
      path: the directory to create (written under a temporary name, then renamed).
      tree: the LoRA tree over ``model``'s parameters.
      model: the transformers Flax model.
      overwrite: replace a non-empty ``path``.
      base_model_name_or_path: recorded in the config (default: the model config's ``_name_or_path``).

    Raises:
      ValueError: listing every adapter PEFT cannot express (stacked/per-layer masks, a layout
        other than the kernel's, mixed rsLoRA/DoRA, DoRA on an embedding, ...), a tree that does
        not fit the model, or a non-empty ``path`` without ``overwrite``.
    """
    res = resolve(model, what="save_peft")
    expected = expected_shapes(res, model)
    flat = flatten(_one_adapter(tree, adapter))
    check_tree(flat, expected, f"save_peft: the tree does not fit {res.flax_class}")
    heads = _head_modules(res, expected)
    items = [(p, v) for p, v in flat.items() if is_lora(v) and p.split("/")[0] not in heads]
    full = {p for p, v in flat.items() if is_trainable(v) and p.split("/")[0] not in heads}
    saved_modules, bias_mode, full_problems = _full_leaves(
        full, [p for p in expected if p.split("/")[0] not in heads], {p for p, _ in items})
    if not items:
        raise ValueError("save_peft: the tree holds no LoraWeight outside the classifier head; call lora.init first")
    problems = []
    for p, lw in items:
        leaf = p.rpartition("/")[2]
        if leaf not in ("kernel", "embedding"):
            problems.append(f"{p}: PEFT adapts kernels and embeddings only, not a {leaf!r} leaf")
            continue
        want = kernel_layout(model, p)
        if lw.layout != want:
            problems.append(f"{p}: layout {lw.layout!r}, but this Flax {leaf} is {want!r}; use lora_jax.hf.rules_for")
        if lw.layer_mask is not None:
            problems.append(f"{p}: a per-layer mask has no PEFT form")
        if lw.m is not None and leaf == "embedding":
            problems.append(f"{p}: DoRA on an embedding is not exported (PEFT's embedding magnitude has another shape)")
        tied = _tied_embedding_problem(res, expected, p)
        if tied:
            problems.append(tied)
    for field, values in (("use_rslora", {lw.rslora for _, lw in items}),
                          ("use_dora", {lw.m is not None for _, lw in items})):
        if len(values) > 1:
            problems.append(f"{field} differs between targets; PEFT has one {field} per adapter")
    problems += full_problems
    if problems:
        raise ValueError(f"save_peft: {len(problems)} adapter(s) cannot be written in PEFT format:\n  "
                         + "\n  ".join(problems))

    names = {p: torch_module_name(p) for p, _ in items}
    r = collections.Counter(lw.rank for _, lw in items).most_common(1)[0][0]
    alpha = collections.Counter(lw.alpha for _, lw in items).most_common(1)[0][0]
    dropout = collections.Counter(lw.dropout for _, lw in items).most_common(1)[0][0]
    tensors = {}
    for p, lw in items:
        key = PREFIX + names[p]
        a, b = np.asarray(lw.effective_a(), np.float32).T, np.asarray(lw.effective_b(), np.float32).T
        if p.endswith("/embedding"):
            tensors[key + ".lora_embedding_A"], tensors[key + ".lora_embedding_B"] = a, b
        else:
            tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"] = a, b
        if lw.m is not None:
            tensors[key + ".lora_magnitude_vector"] = np.asarray(lw.m, np.float32)
    lora_modules = {p.rpartition("/")[0] for p, _ in items}
    for p, v in flat.items():
        if p.split("/")[0] in heads or p in full:
            arr = np.asarray(v.merge() if is_lora(v) else (v.value if is_trainable(v) else v))
            key = PREFIX + torch_key(p)
            if p.rpartition("/")[0] in lora_modules and p.endswith("/bias"):  # PEFT wraps it: base_layer.bias
                key = f"{PREFIX}{torch_module_name(p)}.base_layer.bias"
            tensors[key] = arr.T if p.endswith("/kernel") else arr
    fan_in_fan_out = any(kernel_layout(model, p) == "oi" for p, _ in items)
    config = {
        "peft_type": "LORA",
        "task_type": res.task_type,
        "r": r,
        "lora_alpha": _number(alpha),
        "target_modules": _target_names(list(names.values()), list(_lora_modules(expected))),
        "rank_pattern": {names[p]: lw.rank for p, lw in items if lw.rank != r},
        "alpha_pattern": {names[p]: _number(lw.alpha) for p, lw in items if lw.alpha != alpha},
        "use_rslora": items[0][1].rslora,
        "use_dora": items[0][1].m is not None,
        "fan_in_fan_out": fan_in_fan_out,
        "lora_dropout": dropout,
        "bias": bias_mode,
        "init_lora_weights": True,
        "modules_to_save": (heads + saved_modules) or None,
        "base_model_name_or_path": base_model_name_or_path or getattr(res.config, "_name_or_path", None) or None,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    with atomic_directory(path, overwrite=overwrite, what="save_peft") as tmp:
        write_safetensors(os.path.join(tmp, ADAPTER_WEIGHTS), tensors, {"format": "pt"})
        write_json(os.path.join(tmp, ADAPTER_CONFIG), config)


def _full_leaves(full: set, expected, lora_paths: set):
    """Fully trained leaves in PEFT terms: (modules_to_save, bias mode, problems)."""
    by_module = collections.defaultdict(set)
    for p in expected:
        by_module[p.rpartition("/")[0]].add(p)
    whole = sorted({p.rpartition("/")[0] for p in full if by_module[p.rpartition("/")[0]] <= full})
    rest = {p for p in full if p.rpartition("/")[0] not in whole}
    biases = {p for p in rest if p.endswith("/bias")}
    problems = [f"{p}: a fully trained leaf PEFT cannot hold (only whole modules, as modules_to_save, or biases)"
                for p in sorted(rest - biases)]
    all_biases = {p for p in expected if p.endswith("/bias") and p.rpartition("/")[0] not in whole}
    lora_modules = {q.rpartition("/")[0] for q in lora_paths}
    lora_biases = {p for p in all_biases if p.rpartition("/")[0] in lora_modules}
    mode = "none"
    if biases == lora_biases and biases:
        mode = "lora_only"
    elif biases == all_biases and biases:
        mode = "all"
    elif biases:
        problems.append(f"trainable biases {sorted(biases)[:3]} are neither every bias nor those of the adapted "
                        "modules; PEFT's bias is 'none', 'all' or 'lora_only'")
    return [torch_module_name(m + "/kernel") for m in whole], mode, problems


# -- loading ---------------------------------------------------------------------------------

def _pattern_value(patterns: dict, module: str, default):
    """PEFT's ``get_pattern_key``: the first pattern that matches the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _layer_index(module: str, layers_pattern) -> Optional[int]:
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        pats = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        m = None
        for pat in pats:
            m = re.match(rf"(?:^|.*?\.){pat}\.(?P<idx>\d+)\.", module)
            if m:
                break
    return int(m.group("idx")) if m else None


def _peft_targets(cfg: dict, res: Resolved, modules: list[str], heads: list[str], expected) -> set[str]:
    """The module names PEFT would put LoRA on for this config (PEFT's ``check_target_module_exists``)."""
    targets = cfg.get("target_modules")
    if targets is None:
        targets = list(PEFT_DEFAULT_TARGETS.get(res.arch.name, ()))
    exclude = cfg.get("exclude_modules")
    saved = list(cfg.get("modules_to_save") or []) + heads
    layers, layers_pattern = cfg.get("layers_to_transform"), cfg.get("layers_pattern")
    out = set()
    for name in modules:
        if isinstance(exclude, str) and re.fullmatch(exclude, name):
            continue
        if isinstance(exclude, list) and any(name == e or name.endswith("." + e) for e in exclude):
            continue
        if any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in saved):
            continue
        if isinstance(targets, str):
            if targets.lower() == "all-linear":
                path = next(p for p in expected if torch_module_name(p) == name)
                hit = path.endswith("/kernel") and not name.startswith("lm_head")
            else:
                hit = bool(re.fullmatch(targets, name))
        else:
            hit = name in targets or any(name.endswith("." + t) for t in targets)
            if hit and layers is not None and layers != []:
                idx = _layer_index(name, layers_pattern)
                want = [layers] if isinstance(layers, int) else list(layers)
                hit = idx is not None and idx in want
        if hit:
            out.add(name)
    return out


def _config_problems(cfg) -> list[str]:
    if not isinstance(cfg, dict):
        return [f"the config must be a JSON object, got {type(cfg).__name__}"]
    out = []
    if cfg.get("peft_type") != "LORA":
        out.append(f"peft_type is {cfg.get('peft_type')!r}; only 'LORA' adapters are read")
    for field, ok in _UNSUPPORTED.items():
        if field in cfg and cfg[field] not in ok:
            out.append(f"{field}={cfg[field]!r} is not supported (allowed: {list(ok)})")
    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        out.append(f"r must be a positive integer, got {r!r}")
    a = cfg.get("lora_alpha")
    if isinstance(a, bool) or not isinstance(a, (int, float)) or a <= 0:
        out.append(f"lora_alpha must be a positive number, got {a!r}")
    for field in ("rank_pattern", "alpha_pattern"):
        if cfg.get(field) is not None and not isinstance(cfg[field], dict):
            out.append(f"{field} must be an object, got {cfg[field]!r}")
    return out


def load_peft(path, params, model, *, allow_missing: bool = False) -> Any:
    """Build a LoRA tree from a PEFT LoRA adapter directory (e.g. trained in PyTorch).

    Each adapted module becomes a `LoraWeight` whose ``w`` comes from ``params`` and ``a``, ``b``
    from the file, with rank and alpha from the config (``rank_pattern``/``alpha_pattern``
    resolved as PEFT does) and ``use_rslora``; DoRA's ``lora_magnitude_vector`` becomes ``m``.
    Full weights the adapter carries replace those of ``params``, as in PEFT: ``modules_to_save``
    modules and biases (``bias="all"``/``"lora_only"``) come back as `lora.Trainable` leaves (they
    trained and keep training), an embedding's ``base_layer`` as a plain array.

    Strict: keys the model has no place for, factors of the wrong shape (both shapes named) and
    modules the config targets but the file lacks are all reported in one ``ValueError``;
    ``allow_missing=True`` accepts targeted modules that are absent from the file (they get no
    adapter). ``params`` is never modified.

    Args:
      path: the PEFT adapter directory.
      params: the base parameters (plain arrays) of ``model``.
      model: the transformers Flax model.
      allow_missing: accept targeted modules missing from the file.

    Returns:
      ``params`` with `LoraWeight` nodes at the adapted kernels.

    Example:
      >>> tree = hf.load_peft("adapter_dir", params, model)  # doctest: +SKIP
      >>> logits = model(ids, params=lora.merge(tree)).logits  # doctest: +SKIP
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"load_peft: no adapter directory at {os.path.abspath(path)!r}")
    weights_file = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights_file) and os.path.isfile(os.path.join(path, "adapter_model.bin")):
        raise ValueError(f"load_peft: {path!r} holds adapter_model.bin (pickle), which lora_jax never reads; "
                         "re-save it in PyTorch with save_pretrained(..., safe_serialization=True)")
    cfg = read_json(os.path.join(path, ADAPTER_CONFIG), what="PEFT adapter config")
    problems = _config_problems(cfg)
    if problems:
        raise ValueError(f"load_peft: {os.path.join(path, ADAPTER_CONFIG)!r}: " + "; ".join(problems))
    tensors, _ = read_safetensors(weights_file)

    res = resolve(model, what="load_peft")
    expected = expected_shapes(res, model)
    flat_kp, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lora)
    flat = flatten(params)
    if any(is_node(v) for v in flat.values()):
        raise ValueError("load_peft: params already hold LoraWeight or Trainable nodes; pass the base parameters")
    check_tree(flat, expected, f"load_peft: params do not fit {res.flax_class}")
    modules = _lora_modules(expected)
    by_torch_key = {torch_key(p): p for p in expected}
    heads = _head_modules(res, expected)
    saved = list(cfg.get("modules_to_save") or []) + heads

    r0, alpha0 = cfg["r"], cfg["lora_alpha"]
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    rslora, dora = bool(cfg.get("use_rslora", False)), bool(cfg.get("use_dora", False))

    factors: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    replace: dict[str, np.ndarray] = {}
    trained: set[str] = set()  # full weights that train (modules_to_save, biases): lora.Trainable
    unexpected = []
    factor_modules = set()
    for k in tensors:
        m = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)", k[len(PREFIX):])
        if k.startswith(PREFIX) and m:
            factor_modules.add(m.group(1))
    for key, arr in tensors.items():
        if not key.startswith(PREFIX):
            unexpected.append(f"unexpected: {key} (PEFT keys start with {PREFIX!r})")
            continue
        rest = key[len(PREFIX):]
        m = (re.fullmatch(r"(?P<mod>.+)\.lora_(?P<f>A|B)\.weight", rest)
             or re.fullmatch(r"(?P<mod>.+)\.lora_embedding_(?P<f>A|B)", rest)
             or re.fullmatch(r"(?P<mod>.+)\.lora_magnitude_vector(\.weight)?", rest))
        if m:
            mod, role = m.group("mod"), m.groupdict().get("f") or "m"
            emb_key = "lora_embedding_" in rest
            if mod not in modules:
                unexpected.append(f"unexpected: {key} (no kernel or embedding module {mod!r} in {res.flax_class})")
            elif emb_key != modules[mod].endswith("/embedding") and role != "m":
                kind = "embedding" if modules[mod].endswith("/embedding") else "linear"
                unexpected.append(f"unexpected: {key} ({mod!r} is a {kind} module)")
            else:
                factors[mod][role] = arr
            continue
        base = re.fullmatch(r"(?P<mod>.+)\.base_layer\.(?P<leaf>weight|bias)", rest)
        tk = f"{base.group('mod')}.{base.group('leaf')}" if base else rest
        if base and base.group("leaf") == "bias":  # a LoRA layer's own bias (bias="all"/"lora_only")
            base = None
        fp = by_torch_key.get(tk)
        if fp is None:
            unexpected.append(f"unexpected: {key} (no parameter {tk!r} in {res.flax_class})")
            continue
        mod = tk.rpartition(".")[0]
        in_saved = any(re.match(rf"(^|.*\.){s}($|\..*)", mod) for s in saved)
        bias_ok = tk.endswith(".bias") and (cfg.get("bias") == "all" or (
            cfg.get("bias") == "lora_only" and mod in factor_modules))
        if not base and not in_saved and not bias_ok:
            unexpected.append(f"unexpected: {key} (full weight of {mod!r}, which is not in modules_to_save; bias is "
                              f"{cfg.get('bias', 'none')!r})")
            continue
        replace[fp] = np.asarray(arr).T if fp.endswith("/kernel") else np.asarray(arr)
        if not base:
            trained.add(fp)

    problems = list(unexpected)
    built = {}
    for mod, fs in sorted(factors.items()):
        p = modules[mod]
        w = flat[p]
        if "A" not in fs or "B" not in fs:
            problems.append(f"incomplete: {mod} has only {sorted(k for k in fs if k != 'm')} of lora A/B")
            continue
        layout = kernel_layout(model, p)
        rank = _pattern_value(rank_pattern, mod, r0)
        alpha = _pattern_value(alpha_pattern, mod, alpha0)
        a, b = np.asarray(fs["A"]).T, np.asarray(fs["B"]).T
        want_a, want_b = factor_shapes(w.shape, layout, rank)
        bad = False
        for name, got, want in (("A", fs["A"].shape, want_a[::-1]), ("B", fs["B"].shape, want_b[::-1])):
            if tuple(got) != tuple(want):
                problems.append(f"shape mismatch: {mod} lora_{name} is {tuple(got)}, expected {tuple(want)} "
                                f"(rank {rank}, Flax kernel {p} {tuple(w.shape)})")
                bad = True
        mvec = fs.get("m")
        if dora and p.endswith("/embedding"):
            problems.append(f"unsupported: DoRA on embedding {mod}")
            bad = True
        elif dora and mvec is None:
            problems.append(f"missing: {PREFIX}{mod}.lora_magnitude_vector (use_dora is true)")
            bad = True
        elif not dora and mvec is not None:
            problems.append(f"unexpected: {PREFIX}{mod}.lora_magnitude_vector (use_dora is false)")
            bad = True
        elif mvec is not None and tuple(mvec.shape) != (want_b[-1],):
            problems.append(f"shape mismatch: {mod} lora_magnitude_vector is {tuple(mvec.shape)}, "
                            f"expected {(want_b[-1],)}")
            bad = True
        tied = _tied_embedding_problem(res, expected, p)
        if tied:
            problems.append(tied)
            bad = True
        if not bad:
            built[p] = LoraWeight(w, jnp.asarray(a), jnp.asarray(b), m=None if mvec is None else jnp.asarray(mvec),
                                  layout=layout, rank=rank, alpha=alpha, rslora=rslora,
                                  dropout=float(cfg.get("lora_dropout") or 0.0))
    for fp, arr in replace.items():
        if tuple(arr.shape) != tuple(expected[fp]):
            problems.append(f"shape mismatch: full weight for {fp} is {tuple(arr.shape)} (as Flax), "
                            f"expected {tuple(expected[fp])}")
    if not allow_missing:
        wanted = _peft_targets(cfg, res, list(modules), heads, expected)
        problems += [f"missing: {PREFIX}{mod}.lora_A/lora_B (targeted by target_modules "
                     f"{cfg.get('target_modules')!r})" for mod in sorted(wanted - set(factors))]
    if problems:
        raise ValueError(f"load_peft: {len(problems)} problem(s) in {path!r}:\n  " + "\n  ".join(problems))
    if not built:
        raise ValueError(f"load_peft: {path!r} holds no LoRA factors")

    leaves = []
    for kp, leaf in flat_kp:
        p = path_str(kp)
        if p in built:
            lw = built[p]
            if p in replace:
                lw = lw.replace(w=jnp.asarray(replace[p], dtype=leaf.dtype))
            leaves.append(lw)
        elif p in replace:
            value = jnp.asarray(replace[p], dtype=leaf.dtype)
            leaves.append(Trainable(value) if p in trained else value)
        else:
            leaves.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, leaves)

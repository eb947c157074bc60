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

``a``/``b`` are lora_jax's factors, ``(in, r)`` and ``(r, out)``. lora_jax's models stack the
layers' kernels on a leading axis, so one `LoraWeight` over ``(L, in, out)`` holds the adapters of
``L`` PEFT modules (``model.layers.{i}.self_attn.q_proj``): ``a[i]``, ``b[i]`` are layer ``i``'s.
A PEFT adapter whose layers have different ranks or alphas (``rank_pattern`` per layer) loads
exactly: the stacked factors are zero-padded to the largest rank and each layer's scale relative
to the stack's is folded into its ``b`` (zero rows add nothing; ``s_i (x a_i) b_i`` is kept).
Layers an adapter leaves out get no delta (the weight's ``layer_mask``).

Mixture-of-experts weights are PEFT ``target_parameters`` (``"mlp.experts.gate_up_proj"``; the router
``"mlp.gate.weight"``, a 2-D parameter whose factors are a Linear's): one ``ParamWrapper`` per
parameter, with one LoRA per expert of a ``(E, out, in)`` one stored as::

    base_model.model.<module>[.base_layer]*.lora_A.weight   (E*r, in)   row e*r + k    = a[e, :, k]
    base_model.model.<module>[.base_layer]*.lora_B.weight   (out, E*r)  column k*E + e = b[e, k, :]

(expert-major rows of A, rank-major columns of B, as PEFT reshapes them). Several targeted
parameters of one module nest, the first in PyTorch's parameter order innermost: it gets one
``.base_layer`` per targeted parameter after it. Here they are one `LoraWeight` over the stacked
experts ``(L, E, in, out)`` with layout ``"ssio"``. Adapters saved against transformers 4's per-expert
modules (``block_sparse_moe.experts.{j}.w1``, ``mlp.experts.{j}.gate_proj``) load fused as PEFT fuses
them: the parts of ``gate_up_proj`` stacked on the rank axis of ``A``, block-diagonally in ``B``.

Both functions parse, then check collecting every problem, then build: a bad adapter is reported
whole in one ``ValueError`` and nothing is written or returned.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ..io._files import atomic_directory, read_json, read_safetensors, write_json, write_safetensors
from ..models.family import TASK_TYPES, Leaf, family_of, head_of, leaves_of, torch_class
from ..rules import path_str
from ..variants import get_variant, peft_variants
from ..weight import LoraWeight, Trainable, is_lora, is_node, is_trainable
from .verify import check_peft_files

__all__ = ["save_peft", "load_peft", "config_problems", "pattern_value", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "PREFIX"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."

# LoraConfig fields whose non-default values change the model in ways lora_jax does not load
_UNSUPPORTED = {
    "lora_bias": (False, None), "layer_replication": (None,),
    "trainable_token_indices": (None,), "use_qalora": (False, None), "alora_invocation_tokens": (None,),
    "use_bdlora": (None, False), "megatron_config": (None,), "bias": ("none", "all", "lora_only", None),
}
_FACTOR_LEAVES = ("kernel", "embedding")


# -- the model's PEFT view ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _View:
    """The model as PEFT sees it: PyTorch module and parameter names mapped onto our leaves."""

    model: Any
    leaves: dict  # our path -> Leaf
    n_layers: int
    heads: tuple  # top-level modules outside the base model (SEQ_CLS: modules_to_save)
    tied_embedding: Optional[str]  # our path of an input embedding that is also the output head
    not_linear: tuple = ()  # module names PyTorch does not hold as nn.Linear (an MoE router)

    @classmethod
    def of(cls, model) -> "_View":
        table = {lf.path: lf for lf in leaves_of(model)}
        head = head_of(model)
        heads = ()
        if head == "seq_cls":
            base = {p.split("/")[0] for p, lf in table.items() if lf.layered}
            heads = tuple(sorted({p.split("/")[0] for p in table} - base))
        tied = None
        if head == "causal_lm" and getattr(model.config, "tie_word_embeddings", False):
            tied = next((p for p in table if p.endswith("/embedding")), None)
        return cls(model, table, model.config.num_hidden_layers, heads, tied, family_of(model).not_linear)

    def expected(self) -> dict[str, tuple]:
        return {p: ((self.n_layers,) if lf.layered else ()) + tuple(lf.shape) for p, lf in self.leaves.items()}

    def layers_of(self, lf: Leaf):
        return range(self.n_layers) if lf.layered else (None,)

    def modules(self) -> dict[str, tuple[str, Optional[int]]]:
        """``{PyTorch module name: (our leaf path, layer)}`` of every kernel and embedding."""
        return {lf.module(i): (p, i) for p, lf in self.leaves.items() if p.rpartition("/")[2] in _FACTOR_LEAVES
                for i in self.layers_of(lf)}

    def params(self) -> dict[str, tuple[str, Optional[int]]]:
        """``{PyTorch parameter name: (our leaf path, layer)}`` of every parameter."""
        return {lf.hf_name(i): (p, i) for p, lf in self.leaves.items() for i in self.layers_of(lf)}

    def is_parameter(self, path: str) -> bool:
        """Whether PEFT reaches this leaf only as a ``target_parameters`` entry: fused MoE experts
        ``(E, out, in)`` and the kernels of modules that are no ``nn.Linear`` (an MoE router)."""
        return _is_expert(self.leaves[path]) or (path.endswith("/kernel") and
                                                 path.rpartition("/")[0].rpartition("/")[2] in self.not_linear)

    def parameters(self) -> dict[str, tuple[str, Optional[int]]]:
        """``{PyTorch parameter name: (our leaf path, layer)}`` of the `is_parameter` leaves, in
        PyTorch's order (the table's)."""
        return {lf.hf_name(i): (p, i) for p, lf in self.leaves.items() if self.is_parameter(p)
                for i in self.layers_of(lf)}

    def expert_modules(self) -> dict[str, tuple[str, int, int, int]]:
        """``{per-expert module name: (fused parameter name, expert, part, parts)}``: the modules of
        transformers 4's MoE layers (``block_sparse_moe.experts.3.w1``, ``mlp.experts.3.gate_proj``),
        which PEFT adapters of that era name; ``part`` is the slice of the fused output axis."""
        out = {}
        for lf in self.leaves.values():
            if not (_is_expert(lf) and lf.disk):
                continue
            for i in self.layers_of(lf):
                for j, names in enumerate(lf.disk_names(i)):
                    for k, name in enumerate(names):
                        out[name.rpartition(".")[0]] = (lf.hf_name(i), j, k, len(names))
        return out

    def layout(self, path: str) -> str:
        lf = self.leaves[path]
        return ("s" if lf.layered else "") + "s" * (len(lf.shape) - 2) + "io"

    def in_head(self, path: str) -> bool:
        return path.split("/")[0] in self.heads

    @property
    def task_type(self) -> str:
        return TASK_TYPES[head_of(self.model)]


def _is_expert(lf: Leaf) -> bool:
    return lf.role == "expert"


def _param_keys(targeted: set, view: _View) -> dict[str, str]:
    """``{PEFT key module: parameter name}`` for the targeted expert parameters: on each module the
    first (in PyTorch's order) is innermost, one ``.base_layer`` per targeted parameter after it."""
    by_module = collections.defaultdict(list)
    for name in view.parameters():  # PyTorch's order
        if name in targeted:
            by_module[name.rpartition(".")[0]].append(name)
    return {module + ".base_layer" * (len(names) - 1 - j): name
            for module, names in by_module.items() for j, name in enumerate(names)}


def _flatten(tree) -> dict[str, Any]:
    return {path_str(kp): v for kp, v in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)[0]}


def _fit_problems(flat: dict, view: _View) -> list[str]:
    expected = view.expected()
    out = [f"missing leaf {p}" for p in sorted(set(expected) - set(flat))]
    out += [f"unexpected leaf {p}" for p in sorted(set(flat) - set(expected))]
    out += [f"{p}: shape {tuple(np.shape(flat[p]))}, expected {expected[p]}" for p in sorted(set(expected) & set(flat))
            if tuple(np.shape(flat[p])) != expected[p]]
    return out


def _tied_problem(view: _View, path: str) -> Optional[str]:
    # our tied model reuses the embedding matrix as its output head (through lora.wrap too), while
    # PEFT adapts the input lookup only: the two models would disagree
    if path == view.tied_embedding:
        return (f"{path}: an adapter on the tied input embedding also changes the output head in lora_jax, but only "
                "the input lookup in PEFT; the models would disagree")
    return None


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def _scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


# -- saving ------------------------------------------------------------------------------------

def _one_adapter(tree, adapter: Optional[str]):
    """The tree with each chain of adapters reduced to the one PEFT file to write."""
    lws = [x for x in jax.tree_util.tree_leaves(tree, is_leaf=is_lora) if is_lora(x)]
    names = {n.name for lw in lws for n in lw.chain()}
    if adapter is None:
        if len(names) <= 1:
            return tree
        active = {n.name for lw in lws for n in lw.chain() if n.active}
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


def _m_suffixes() -> str:
    """A regex alternative of the PEFT tensor suffixes of variants' own arrays."""
    return "|".join(re.escape(v.peft[1]) for v in peft_variants() if v.has_m) or "(?!)"


def peft_variant(cfg: dict):
    """The variant an ``adapter_config`` selects by its flags (plain LoRA when none is set).

    Raises:
      ValueError: when two variants' flags are set.
    """
    on = [v for v in peft_variants() if cfg.get(v.peft[0])]
    if len(on) > 1:
        raise ValueError(f"adapter_config sets {[v.peft[0] for v in on]}: PEFT adapters have one variant")
    return on[0] if on else get_variant("lora")


def _lora_problems(view: _View, items) -> list[str]:
    problems = []
    for p, lw in items:
        leaf = p.rpartition("/")[2]
        param = view.is_parameter(p)
        if leaf not in _FACTOR_LEAVES and not param:
            problems.append(f"{p}: PEFT adapts kernels, embeddings and expert parameters only, not a {leaf!r} leaf")
            continue
        if lw.kind.peft is None:
            problems.append(f"{p}: the {lw.variant!r} variant has no PEFT form")
        elif param and lw.kind.has_m:
            problems.append(f"{p}: {lw.kind.label} on a PEFT target parameter has no PEFT form (its ParamWrapper "
                            f"refuses {lw.kind.peft[0]})")
        if param and lw.dropout:
            problems.append(f"{p}: LoRA dropout {lw.dropout} on a PEFT target parameter has no PEFT form (its "
                            "ParamWrapper refuses lora_dropout != 0)")
        if lw.layout != view.layout(p):
            problems.append(f"{p}: layout {lw.layout!r}, but this leaf is {view.layout(p)!r} (stacked layers "
                            "need stack_axes=1); use lora_jax.hf.rules_for")
        if lw.out_slices is not None:
            problems.append(f"{p}: enable_lora output slices have no PEFT LoRA form")
        if lw.kind.has_m and leaf == "embedding":
            problems.append(f"{p}: {lw.kind.label} on an embedding is not exported (PEFT's embedding "
                            f"{lw.kind.peft and lw.kind.peft[1]} has another shape)")
        tied = _tied_problem(view, p)
        if tied:
            problems.append(tied)
    for field, values in (("use_rslora", {lw.rslora for _, lw in items}),
                          ("the variant (use_dora, ...)", {lw.variant for _, lw in items})):
        if len(values) > 1:
            problems.append(f"{field} differs between targets; PEFT has one {field} per adapter")
    return problems


def _full_leaves(view: _View, full: set, lora_paths: set):
    """Fully trained leaves in PEFT terms: (modules_to_save paths, bias mode, problems)."""
    paths = [p for p in view.leaves if not view.in_head(p)]
    by_module = collections.defaultdict(set)
    for p in paths:
        by_module[p.rpartition("/")[0]].add(p)
    whole = sorted({p.rpartition("/")[0] for p in full if by_module[p.rpartition("/")[0]] <= full})
    rest = {p for p in full if p.rpartition("/")[0] not in whole}
    biases = {p for p in rest if p.endswith("/bias")}
    problems = [f"{p}: a fully trained leaf PEFT cannot hold (only whole modules, as modules_to_save, or biases)"
                for p in sorted(rest - biases)]
    all_biases = {p for p in paths if p.endswith("/bias") and p.rpartition("/")[0] not in whole}
    lora_modules = {q.rpartition("/")[0] for q in lora_paths}
    lora_biases = {p for p in all_biases if p.rpartition("/")[0] in lora_modules}
    mode = "none"
    if biases and biases == lora_biases:
        mode = "lora_only"
    elif biases and biases == all_biases:
        mode = "all"
    elif biases:
        problems.append(f"trainable biases {sorted(biases)[:3]} are neither every bias nor those of the adapted "
                        "modules; PEFT's bias is 'none', 'all' or 'lora_only'")
    return whole, mode, problems


def _torch_arrays(view: _View, path: str, arr) -> dict[str, np.ndarray]:
    """One of our leaves as PyTorch parameters (one per layer for a stacked leaf)."""
    lf = view.leaves[path]
    arr = np.asarray(arr)
    out = {}
    for i in view.layers_of(lf):
        x = arr if i is None else arr[i]
        out[lf.hf_name(i)] = np.ascontiguousarray(lf.to_torch(x))
    return out


def _peft_files(view: _View, flat: dict, items: list, full: set, whole: list, bias_mode: str,
                base_model_name_or_path: Optional[str]) -> tuple[dict, dict]:
    """``(safetensors tensors, adapter_config)`` of a validated tree."""
    tensors, modules, params = {}, {}, {}
    targeted = {view.leaves[p].hf_name(i) for p, lw in items if view.is_parameter(p)
                for i in view.layers_of(view.leaves[p]) if i is None or lw.layer_mask is None or lw.layer_mask[i]}
    key_of = {name: key for key, name in _param_keys(targeted, view).items()}
    for p, lw in items:
        lf = view.leaves[p]
        a, b = np.asarray(lw.a, np.float32), np.asarray(lw.b, np.float32)
        m = None if lw.m is None else np.asarray(lw.m, np.float32)
        for i in view.layers_of(lf):
            if i is not None and lw.layer_mask is not None and not lw.layer_mask[i]:
                continue
            ai, bi, mi = (a, b, m) if i is None else (a[i], b[i], None if m is None else m[i])
            if view.is_parameter(p):
                name = lf.hf_name(i)
                params[name] = lw
                key = PREFIX + key_of[name]
                if _is_expert(lf):  # ai (E, in, r) -> (E*r, in); bi (E, r, out) -> (out, r*E)
                    e, n_in, r = ai.shape
                    tensors[key + ".lora_A.weight"] = ai.transpose(0, 2, 1).reshape(e * r, n_in)
                    tensors[key + ".lora_B.weight"] = bi.transpose(2, 1, 0).reshape(bi.shape[2], r * e)
                else:  # a 2-D parameter: as a Linear's
                    tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"] = ai.T, bi.T
                continue
            key = PREFIX + lf.module(i)
            modules[lf.module(i)] = lw
            if p.endswith("/embedding"):
                tensors[key + ".lora_embedding_A"], tensors[key + ".lora_embedding_B"] = ai.T, bi.T
            else:
                tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"] = ai.T, bi.T
            if mi is not None:
                tensors[key + "." + lw.kind.peft[1]] = mi  # has_m and a PEFT form: checked in _lora_problems
    lora_modules = {p.rpartition("/")[0] for p, _ in items}
    for p, v in flat.items():
        if view.in_head(p) or p in full:
            arr = v.merge() if is_lora(v) else (v.value if is_trainable(v) else v)
            for name, x in _torch_arrays(view, p, arr).items():
                if p.rpartition("/")[0] in lora_modules and p.endswith("/bias"):  # PEFT wraps it: base_layer.bias
                    name = f"{name.rpartition('.')[0]}.base_layer.bias"
                tensors[PREFIX + name] = x
    saved_modules = sorted({view.leaves[q].module(i) for m in whole for q in view.leaves
                            if q.rpartition("/")[0] == m for i in view.layers_of(view.leaves[q])})
    adapters = {**modules, **params}
    r = collections.Counter(lw.rank for lw in adapters.values()).most_common(1)[0][0]
    alpha = collections.Counter(lw.alpha for lw in adapters.values()).most_common(1)[0][0]
    dropout = collections.Counter(lw.dropout for lw in adapters.values()).most_common(1)[0][0]
    head_modules = sorted({view.leaves[q].module(None) for q in view.leaves if view.in_head(q)})
    config = {
        "peft_type": "LORA",
        "task_type": view.task_type,
        "r": r,
        "lora_alpha": _number(alpha),
        "target_modules": _target_names(list(modules), list(view.modules())) if modules or not params else [],
        "rank_pattern": {name: lw.rank for name, lw in adapters.items() if lw.rank != r},
        "alpha_pattern": {name: _number(lw.alpha) for name, lw in adapters.items() if lw.alpha != alpha},
        "use_rslora": items[0][1].rslora,
        # PEFT's LoraConfig always carries use_dora; another variant's flag only when it is the one
        **{v.peft[0]: items[0][1].kind is v for v in peft_variants() if v.peft[0] == "use_dora"
           or items[0][1].kind is v},
        "fan_in_fan_out": False,
        "lora_dropout": dropout,
        "bias": bias_mode,
        "init_lora_weights": True,
        "modules_to_save": (head_modules + saved_modules) or None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    if params:
        config["target_parameters"] = _parameter_names(list(params), view)
    return tensors, config


def _parameter_names(targeted: list[str], view: _View) -> list[str]:
    """PEFT target_parameters for exactly ``targeted``: the name below the layer
    (``mlp.experts.gate_up_proj``) when every layer's is targeted, else the full names."""
    chosen, out = set(targeted), set()
    by_leaf = collections.defaultdict(set)
    for name, (p, _) in view.parameters().items():
        by_leaf[p].add(name)
    for p, names in by_leaf.items():
        picked = names & chosen
        if not picked:
            continue
        lf = view.leaves[p]
        short = lf.hf.split("{i}.", 1)[-1]
        out |= {short} if picked == names else picked
    return sorted(out)


def save_peft(path, tree, model, *, overwrite: bool = False, base_model_name_or_path: Optional[str] = None,
              adapter: Optional[str] = None) -> None:
    """Write the adapters of a LoRA tree as a PEFT LoRA adapter directory.

    ``adapter_config.json`` is derived from the `LoraWeight` nodes: the most common rank and
    alpha become ``r`` and ``lora_alpha``, the others go to ``rank_pattern``/``alpha_pattern``
    keyed by module name; ``use_rslora``/``use_dora`` must be the same for all targets. A stacked
    weight writes one PEFT module per layer (only the layers of its ``layer_mask``).
    ``task_type`` follows the model's head (CAUSAL_LM, SEQ_CLS, FEATURE_EXTRACTION); for SEQ_CLS
    the classifier head is saved in full as ``modules_to_save`` (merged, if it holds an adapter),
    as PEFT does. `lora.Trainable` leaves are written in full: a module whose every leaf is
    trainable goes to ``modules_to_save``, trainable biases set ``bias`` (``"all"`` when every bias
    of the model trains, ``"lora_only"`` when exactly those of the adapted modules do). Factors are
    written in float32. A tree with several adapters writes the one named ``adapter`` (default:
    the only active one). Adapters on mixture-of-experts tensors (layout ``"ssio"``: one per layer
    and expert) and on an MoE router are written as PEFT ``target_parameters`` (module docstring);
    PEFT's ParamWrapper allows neither dropout nor DoRA on them.

    Load it in PyTorch with
    ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), path)``.

    Args:
      path: the directory to create (written under a temporary name, then renamed).
      tree: the LoRA tree over ``model``'s parameters.
      model: the lora_jax model (from `lora_jax.hf.from_pretrained`).
      overwrite: replace a non-empty ``path``.
      base_model_name_or_path: recorded in the config.
      adapter: which adapter of a multi-adapter tree to write.

    Raises:
      ValueError: listing every adapter PEFT cannot express (a layout other than the kernel's,
        output slices, mixed rsLoRA/DoRA, DoRA on an embedding, non-finite factors, ...), a tree
        that does not fit the model, or a non-empty ``path`` without ``overwrite``.

    Example:
      >>> hf.save_peft("adapter", lora_params, model)  # doctest: +SKIP
    """
    view = _View.of(model)
    # parse: the tree in PEFT terms
    flat = _flatten(_one_adapter(tree, adapter))
    items = [(p, v) for p, v in flat.items() if is_lora(v) and not view.in_head(p)]
    full = {p for p, v in flat.items() if is_trainable(v) and not view.in_head(p)}
    # validate, collecting every problem
    problems = _fit_problems(flat, view)
    if not problems and not items:
        problems.append("the tree holds no LoraWeight outside the classifier head; call lora.init first")
    if not problems:
        whole, bias_mode, more = _full_leaves(view, full, {p for p, _ in items})
        problems += _lora_problems(view, items) + more
        for p, lw in items:
            for name, x in (("A", lw.a), ("B", lw.b)) + ((("magnitude", lw.m),) if lw.m is not None else ()):
                if not np.isfinite(np.asarray(x, np.float32)).all():
                    problems.append(f"{p}: lora {name} holds NaN or Inf")
    if problems:
        raise ValueError(f"save_peft: {len(problems)} problem(s); the adapter cannot be written in PEFT format for "
                         f"{torch_class(model)}:\n  " + "\n  ".join(problems))
    # build
    tensors, config = _peft_files(view, flat, items, full, whole, bias_mode, base_model_name_or_path)
    with atomic_directory(path, overwrite=overwrite, what="save_peft") as tmp:
        write_safetensors(os.path.join(tmp, ADAPTER_WEIGHTS), tensors, {"format": "pt"})
        write_json(os.path.join(tmp, ADAPTER_CONFIG), config)
        check_peft_files(tmp, model, tensors, config)  # read back before it is renamed into place


# -- loading -----------------------------------------------------------------------------------

def pattern_value(patterns: dict, module: str, default):
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


def selects(cfg: dict, name: str, default_targets=()) -> bool:
    """Whether an adapter config puts LoRA on module ``name`` by its ``target_modules`` (``None``:
    ``default_targets``, the model type's defaults), ``exclude_modules`` and ``layers_to_transform``
    / ``layers_pattern`` (PEFT's ``check_target_module_exists``). ``"all-linear"`` selects every
    name here; which modules are linear is the caller's to know.

    Example:
      >>> selects({"target_modules": ["q_proj"], "layers_to_transform": [1]}, "model.layers.1.self_attn.q_proj")
      True
      >>> selects({"target_modules": ["q_proj"], "layers_to_transform": [1]}, "model.layers.0.self_attn.q_proj")
      False
    """
    targets = cfg.get("target_modules")
    if targets is None:
        targets = list(default_targets)
    exclude = cfg.get("exclude_modules")
    if isinstance(exclude, str) and re.fullmatch(exclude, name):
        return False
    if isinstance(exclude, list) and any(name == e or name.endswith("." + e) for e in exclude):
        return False
    if isinstance(targets, str):
        return targets.lower() == "all-linear" or bool(re.fullmatch(targets, name))
    if name in targets:  # as PEFT: a full name is not filtered by layer
        return True
    if not any(name.endswith("." + t) for t in targets):
        return False
    layers = cfg.get("layers_to_transform")
    if layers is not None and layers != []:
        idx = _layer_index(name, cfg.get("layers_pattern"))
        return idx is not None and idx in ([layers] if isinstance(layers, int) else list(layers))
    return True


def selection_of(cfg: dict) -> str:
    """How an adapter config selects modules, for messages: ``target_modules ['q_proj'],
    layers_to_transform [1]`` (the fields that narrow it only where set)."""
    out = f"target_modules {cfg.get('target_modules')!r}"
    if cfg.get("layers_to_transform") not in (None, []):
        out += f", layers_to_transform {cfg['layers_to_transform']!r}"
    if cfg.get("exclude_modules"):
        out += f", exclude_modules {cfg['exclude_modules']!r}"
    return out


def _default_targets(view: _View) -> list:
    return list(family_of(view.model).peft_targets[view.model.config.model_type])


def _peft_targets(cfg: dict, view: _View) -> set[str]:
    """The module names PEFT would put LoRA on for this config (PEFT's ``check_target_module_exists``)."""
    every = isinstance(cfg.get("target_modules"), str) and cfg["target_modules"].lower() == "all-linear"
    heads = [view.leaves[q].module(None) for q in view.leaves if view.in_head(q)]
    saved = list(cfg.get("modules_to_save") or []) + heads
    default = _default_targets(view)
    out = set()
    for name, (p, _) in view.modules().items():
        if any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in saved):
            continue
        if every and (not p.endswith("/kernel") or name.startswith("lm_head")
                      or p.rpartition("/")[0].rpartition("/")[2] in view.not_linear):
            continue
        if selects(cfg, name, default):
            out.add(name)
    return out


def _regex_problem(field: str, pattern) -> Optional[str]:
    try:
        re.compile(pattern)
    except (re.error, TypeError, ValueError, OverflowError, RecursionError) as e:
        return f"{field}: {pattern!r} is not a valid regular expression ({e})"
    return None


def config_problems(cfg) -> list[str]:
    """Every problem of a PEFT LoRA ``adapter_config.json`` (parsed), named by field, at once.

    The one reader of adapter configs: `load_peft` and the streaming merge both check with it, so
    a config is accepted or refused alike everywhere. Checks the type and range of ``r``,
    ``lora_alpha``, ``lora_dropout``, ``rank_pattern``/``alpha_pattern`` (keys regular
    expressions, ranks positive integers, alphas positive numbers), ``target_modules`` /
    ``exclude_modules`` (a regular expression or a list of names), ``modules_to_save``,
    ``layers_to_transform``, ``target_parameters``, booleans, and the features lora_jax does not
    read.
    """
    if not isinstance(cfg, dict):
        return [f"the config must be a JSON object, got {type(cfg).__name__}"]
    out = []
    if cfg.get("peft_type") != "LORA":
        out.append(f"peft_type is {cfg.get('peft_type')!r}; only 'LORA' adapters are read")
    for field, ok in _UNSUPPORTED.items():
        if field in cfg and not any(cfg[field] is v or (cfg[field] == v and type(cfg[field]) is type(v)) for v in ok):
            out.append(f"{field}={cfg[field]!r} is not supported (allowed: {list(ok)})")
    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        out.append(f"r must be a positive integer, got {r!r}")
    a = cfg.get("lora_alpha")
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not a > 0 or a == float("inf"):
        out.append(f"lora_alpha must be a positive number, got {a!r}")
    d = cfg.get("lora_dropout", 0.0)
    if d is not None and (isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d < 1):
        out.append(f"lora_dropout must be a number in [0, 1), got {d!r}")
    for field in ("use_rslora", *(v.peft[0] for v in peft_variants()), "fan_in_fan_out", "inference_mode"):
        if cfg.get(field) is not None and not isinstance(cfg[field], bool):
            out.append(f"{field} must be true or false, got {cfg[field]!r}")
    flags = [v.peft[0] for v in peft_variants() if cfg.get(v.peft[0]) is True]
    if len(flags) > 1:
        out.append(f"{' and '.join(flags)} are all true; a PEFT adapter has one variant")
    for field, what in (("rank_pattern", "rank"), ("alpha_pattern", "alpha")):
        pat = cfg.get(field)
        if pat is None:
            continue
        if not isinstance(pat, dict):
            out.append(f"{field} must be an object of module pattern -> {what}, got {pat!r}")
            continue
        for key, value in pat.items():
            bad = _regex_problem(f"{field} key", key)
            if bad:
                out.append(bad)
            if what == "rank":
                ok = not isinstance(value, bool) and isinstance(value, int) and value > 0
            else:
                ok = not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value < float("inf")
            if not ok:
                out.append(f"{field}[{key!r}] must be a positive {'integer' if what == 'rank' else 'number'}, "
                           f"got {value!r}")
    for field in ("target_modules", "exclude_modules"):
        v = cfg.get(field)
        if v is None:
            continue
        if isinstance(v, str):
            if not (field == "target_modules" and v.lower() == "all-linear"):
                bad = _regex_problem(field, v)
                if bad:
                    out.append(bad)
        elif not (isinstance(v, list) and all(isinstance(t, str) and t for t in v)):
            out.append(f"{field} must be a regular expression or a list of module names, got {v!r}")
    mts = cfg.get("modules_to_save")
    if mts is not None and not (isinstance(mts, list) and all(isinstance(t, str) and t for t in mts)):
        out.append(f"modules_to_save must be a list of module names, got {mts!r}")
    layers = cfg.get("layers_to_transform")
    if layers is not None and not (
            (isinstance(layers, int) and not isinstance(layers, bool) and layers >= 0)
            or (isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                 for i in layers))):
        out.append(f"layers_to_transform must be a layer index or a list of them, got {layers!r}")
    lp = cfg.get("layers_pattern")
    if lp is not None and not (isinstance(lp, str) or (isinstance(lp, list) and all(isinstance(p, str) for p in lp))):
        out.append(f"layers_pattern must be a string or a list of strings, got {lp!r}")
    elif lp is not None:
        for p in [lp] if isinstance(lp, str) else lp:
            bad = _regex_problem("layers_pattern", p)
            if bad:
                out.append(bad)
    tp = cfg.get("target_parameters")
    if tp is not None and not (isinstance(tp, list) and all(isinstance(t, str) for t in tp)):
        out.append(f"target_parameters must be a list of parameter names, got {tp!r}")
    return out


def _peft_parameters(cfg: dict, view: _View) -> set[str]:
    """The parameters PEFT wraps for ``target_parameters`` (a name, or its end after a ``.``). PEFT
    resolves ``target_modules="all-linear"`` on a mixture-of-experts model against transformers 4's
    modules and converts them to transformers 5's parameters: every expert tensor and the router."""
    targets = cfg.get("target_parameters") or []
    every = isinstance(cfg.get("target_modules"), str) and cfg["target_modules"].lower() == "all-linear"
    return {name for name in view.parameters() if every or any(name == t or name.endswith("." + t) for t in targets)}


def _read_adapter(path: str) -> tuple[dict, dict]:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"load_peft: no adapter directory at {os.path.abspath(path)!r}")
    weights_file = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights_file) and os.path.isfile(os.path.join(path, "adapter_model.bin")):
        raise ValueError(f"load_peft: {path!r} holds adapter_model.bin (pickle), which lora_jax never reads; "
                         "re-save it in PyTorch with save_pretrained(..., safe_serialization=True)")
    cfg = read_json(os.path.join(path, ADAPTER_CONFIG), what="PEFT adapter config")
    tensors, _ = read_safetensors(weights_file)
    return cfg, tensors


@dataclasses.dataclass
class _Parsed:
    factors: dict  # module name (or expert parameter name) -> {"A"|"B"|"m": array}
    per_expert: dict  # fused parameter name -> {(expert, part): (module, {"A"|"B": array})} (transformers 4)
    full: dict  # our path -> {layer: array in our layout}
    trained: set  # our paths of full weights that train (modules_to_save, biases)
    problems: list


def _parse(cfg: dict, tensors: dict, view: _View) -> _Parsed:
    modules, params = view.modules(), view.params()
    param_keys = _param_keys(_peft_parameters(cfg, view), view)
    heads = [view.leaves[q].module(None) for q in view.leaves if view.in_head(q)]
    saved = list(cfg.get("modules_to_save") or []) + heads
    factor_modules = {m.group(1) for k in tensors if k.startswith(PREFIX) for m in [re.fullmatch(
        r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)", k[len(PREFIX):])] if m}
    legacy = view.expert_modules()
    out = _Parsed(collections.defaultdict(dict), collections.defaultdict(dict), collections.defaultdict(dict), set(),
                  [])
    cls = torch_class(view.model)
    for key, arr in tensors.items():
        if not key.startswith(PREFIX):
            out.problems.append(f"unexpected: {key} (PEFT keys start with {PREFIX!r})")
            continue
        rest = key[len(PREFIX):]
        m = (re.fullmatch(r"(?P<mod>.+)\.lora_(?P<f>A|B)\.weight", rest)
             or re.fullmatch(r"(?P<mod>.+)\.lora_embedding_(?P<f>A|B)", rest)
             or re.fullmatch(rf"(?P<mod>.+)\.(?:{_m_suffixes()})(\.weight)?", rest))
        if m:
            mod, role = m.group("mod"), m.groupdict().get("f") or "m"
            if mod in param_keys and "lora_embedding_" not in rest:
                out.factors[param_keys[mod]][role] = np.asarray(arr)
            elif mod in legacy and role != "m" and "lora_embedding_" not in rest:
                name, j, k, _ = legacy[mod]
                out.per_expert[name].setdefault((j, k), (mod, {}))[1][role] = np.asarray(arr)
            elif mod not in modules:
                out.problems.append(f"unexpected: {key} (no kernel or embedding module {mod!r} in {cls})")
            elif ("lora_embedding_" in rest) != modules[mod][0].endswith("/embedding") and role != "m":
                kind = "embedding" if modules[mod][0].endswith("/embedding") else "linear"
                out.problems.append(f"unexpected: {key} ({mod!r} is a {kind} module)")
            elif not selects(cfg, mod, _default_targets(view)):  # PEFT would not have made them
                out.problems.append(f"unexpected: {key} ({mod!r} is not selected by {selection_of(cfg)})")
            else:
                out.factors[mod][role] = np.asarray(arr)
            continue
        base = re.fullmatch(r"(?P<mod>.+)\.base_layer\.(?P<leaf>weight|bias)", rest)
        tk = f"{base.group('mod')}.{base.group('leaf')}" if base else rest
        if base and base.group("leaf") == "bias":  # a LoRA layer's own bias (bias="all"/"lora_only")
            base = None
        if tk not in params:
            out.problems.append(f"unexpected: {key} (no parameter {tk!r} in {cls})")
            continue
        mod = tk.rpartition(".")[0]
        in_saved = any(re.match(rf"(^|.*\.){re.escape(s)}($|\..*)", mod) for s in saved)
        bias_ok = tk.endswith(".bias") and (cfg.get("bias") == "all" or (
            cfg.get("bias") == "lora_only" and mod in factor_modules))
        if not base and not in_saved and not bias_ok:
            out.problems.append(f"unexpected: {key} (full weight of {mod!r}, which is not in modules_to_save; bias "
                                f"is {cfg.get('bias', 'none')!r})")
            continue
        p, layer = params[tk]
        lf = view.leaves[p]
        arr = np.asarray(arr)
        if arr.shape != lf.torch_shape():
            out.problems.append(f"shape mismatch: {key} is {arr.shape}, expected {lf.torch_shape()}")
            continue
        out.full[p][layer] = lf.from_torch(arr)
        if not base:
            out.trained.add(p)
    return out


def _check_factors(cfg: dict, parsed: _Parsed, view: _View) -> dict:
    """``{our path: {layer: (a, b, m, rank, alpha)}}`` of the well-formed factors; problems appended."""
    modules = {**view.modules(), **view.parameters()}
    r0, alpha0 = cfg["r"], cfg["lora_alpha"]
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    variant = peft_variant(cfg)
    m_name = variant.peft[1] if variant.has_m else "m"
    good = collections.defaultdict(dict)
    _fuse_per_expert(cfg, parsed, view, good)
    for mod, fs in sorted(parsed.factors.items()):
        p, layer = modules[mod]
        lf = view.leaves[p]
        if "A" not in fs or "B" not in fs:
            parsed.problems.append(f"incomplete: {mod} has only {sorted(k for k in fs if k != 'm')} of lora A/B")
            continue
        rank = pattern_value(rank_pattern, mod, r0)
        alpha = pattern_value(alpha_pattern, mod, alpha0)
        n_in, n_out = lf.shape[-2:]
        n_exp = lf.shape[0] if _is_expert(lf) else 1
        bad = False
        if view.is_parameter(p) and fs.get("m") is not None:
            parsed.problems.append(f"unexpected: {PREFIX}{mod}.{m_name} (PEFT has no {variant.label} on parameters)")
            bad = True
        for name, got, want in (("A", fs["A"].shape, (n_exp * rank, n_in)),
                                ("B", fs["B"].shape, (n_out, n_exp * rank))):
            if tuple(got) != want:
                parsed.problems.append(f"shape mismatch: {mod} lora_{name} is {tuple(got)}, expected {want} "
                                       f"(rank {rank}, {p} of one layer {tuple(lf.shape)})")
                bad = True
        mvec = fs.get("m")
        if variant.has_m and p.endswith("/embedding"):
            parsed.problems.append(f"unsupported: {variant.label} on embedding {mod}")
            bad = True
        elif variant.has_m and mvec is None:
            parsed.problems.append(f"missing: {PREFIX}{mod}.{m_name} ({variant.peft[0]} is true)")
            bad = True
        elif not variant.has_m and mvec is not None:
            parsed.problems.append(f"unexpected: {PREFIX}{mod}'s {_m_suffixes()} tensor (no variant that has one is "
                                   "set in adapter_config: use_dora is false)")
            bad = True
        elif mvec is not None and tuple(mvec.shape) != (n_out,):
            parsed.problems.append(f"shape mismatch: {mod} {m_name} is {tuple(mvec.shape)}, "
                                   f"expected {(n_out,)}")
            bad = True
        tied = _tied_problem(view, p)
        if tied:
            parsed.problems.append(tied)
            bad = True
        for name, x in (("A", fs["A"]), ("B", fs["B"])):
            if not np.isfinite(np.asarray(x, np.float32)).all():
                parsed.problems.append(f"non-finite: {mod} lora_{name} holds NaN or Inf")
                bad = True
        if bad:
            continue
        if _is_expert(lf):  # (E*r, in) -> (E, in, r); (out, r*E) -> (E, r, out); see the module docstring
            a = fs["A"].reshape(n_exp, rank, n_in).transpose(0, 2, 1)
            b = fs["B"].reshape(n_out, rank, n_exp).transpose(2, 1, 0)
            good[p][layer] = (a, b, None, rank, alpha)
        else:
            good[p][layer] = (fs["A"].T, fs["B"].T, mvec, rank, alpha)
    for p, layers in good.items():
        if variant.has_m and view.leaves[p].layered and len(layers) != view.n_layers:
            parsed.problems.append(f"unsupported: {variant.label} on some layers only of {p} ({sorted(layers)})")
    return good


def _fuse_per_expert(cfg: dict, parsed: _Parsed, view: _View, good: dict) -> None:
    """Adapters of transformers 4's per-expert modules, fused as PEFT fuses them on load: each
    expert's parts (``gate_proj``, ``up_proj`` of one ``gate_up_proj``) stack their ``A`` on the
    rank axis and their ``B`` block-diagonally, so the fused rank is the parts' sum and the scale
    stays the parts' (``s (x A_e) B_e`` with ``A_e = [A_g; A_u]``, ``B_e = diag(B_g, B_u)``)."""
    rslora = bool(cfg.get("use_rslora", False))
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    for name, got in sorted(parsed.per_expert.items()):
        p, layer = view.parameters()[name]
        lf = view.leaves[p]
        n_exp, n_in, n_out = lf.shape
        parts = next(v for v in view.expert_modules().values() if v[0] == name)[3]
        missing = [f"expert {j} part {k}" for j in range(n_exp) for k in range(parts) if (j, k) not in got]
        incomplete = [m for m, fs in got.values() if set(fs) != {"A", "B"}]
        if missing or incomplete:
            parsed.problems.append(f"incomplete: {name} per expert (transformers 4 names): missing {missing[:4]}, "
                                   f"without lora A or B {sorted(incomplete)[:4]}")
            continue
        settings = {(pattern_value(rank_pattern, m, cfg["r"]), pattern_value(alpha_pattern, m, cfg["lora_alpha"]))
                    for m, _ in got.values()}
        if len(settings) != 1:
            parsed.problems.append(f"unsupported: the per-expert adapters of {name} differ in rank or alpha "
                                   f"{sorted(settings)}; PEFT fuses only equal ones")
            continue
        ((rank, alpha),) = settings
        size = n_out // parts
        bad = [f"{m} lora_{f} is {tuple(fs[f].shape)}, expected {want}" for m, fs in got.values()
               for f, want in (("A", (rank, n_in)), ("B", (size, rank))) if tuple(fs[f].shape) != want]
        bad += [f"{m} lora_{f} holds NaN or Inf" for m, fs in got.values() for f in "AB"
                if not np.isfinite(np.asarray(fs[f], np.float32)).all()]
        if bad:
            parsed.problems += [f"shape mismatch or non-finite: {b}" for b in bad]
            continue
        a = np.zeros((n_exp, n_in, parts * rank), np.float32)
        b = np.zeros((n_exp, parts * rank, n_out), np.float32)
        for (j, k), (_, fs) in got.items():
            a[j, :, k * rank:(k + 1) * rank] = fs["A"].T
            b[j, k * rank:(k + 1) * rank, k * size:(k + 1) * size] = fs["B"].T
        fused = parts * rank
        alpha_fused = alpha * (math.sqrt(fused / rank) if rslora else fused / rank)  # the parts' scale kept
        good[p][layer] = (a, b, None, fused, alpha_fused)


def _build_weight(view: _View, p: str, w, layers: dict, cfg: dict) -> LoraWeight:
    """One `LoraWeight` from the factors of its layers (stacked, rank-padded, scale folded into b).

    Each layer's ``a`` is ``(*experts, in, r_i)`` and ``b`` ``(*experts, r_i, out)``."""
    rslora = bool(cfg.get("use_rslora", False))
    dropout = float(cfg.get("lora_dropout") or 0.0)
    variant = peft_variant(cfg).name
    lf = view.leaves[p]
    if not lf.layered:
        a, b, m, rank, alpha = layers[None]
        return LoraWeight(w, jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
                          m=None if m is None else jnp.asarray(m, jnp.float32), layout=view.layout(p), rank=rank,
                          alpha=alpha, rslora=rslora, dropout=dropout, variant=variant)
    *pre, n_in, n_out = lf.shape
    r_max = max(v[3] for v in layers.values())
    first = layers[min(layers)]
    scale = _scale(first[4], first[3], rslora)
    alpha = scale * (math.sqrt(r_max) if rslora else r_max)
    a = np.zeros((view.n_layers, *pre, n_in, r_max), np.float32)
    b = np.zeros((view.n_layers, *pre, r_max, n_out), np.float32)
    m = None
    for i, (ai, bi, mi, rank, alpha_i) in layers.items():
        a[i, ..., :rank] = ai
        ratio = _scale(alpha_i, rank, rslora) / scale
        b[i, ..., :rank, :] = bi if ratio == 1.0 else bi * np.float32(ratio)
        if mi is not None:
            m = np.zeros((view.n_layers, n_out), np.float32) if m is None else m
            m[i] = mi
    mask = None if len(layers) == view.n_layers else tuple(i in layers for i in range(view.n_layers))
    return LoraWeight(w, jnp.asarray(a), jnp.asarray(b), m=None if m is None else jnp.asarray(m),
                      layout=view.layout(p), rank=r_max, alpha=_number(alpha), rslora=rslora, dropout=dropout,
                      layer_mask=mask, variant=variant)


def load_peft(path, params, model, *, allow_missing: bool = False) -> Any:
    """Build a LoRA tree from a PEFT LoRA adapter directory (e.g. trained in PyTorch).

    Each adapted leaf becomes a `LoraWeight` whose ``w`` comes from ``params`` and ``a``, ``b``
    from the file (stacked over layers for the scanned layer kernels), with rank and alpha from
    the config (``rank_pattern``/``alpha_pattern`` resolved as PEFT does) and ``use_rslora``;
    DoRA's ``lora_magnitude_vector`` becomes ``m``. ``target_parameters`` (mixture-of-experts
    tensors, a router) load as one `LoraWeight` per stacked tensor with one adapter per layer and
    expert (layout ``"ssio"``); parameters they name that the model lacks are an error, never a
    silent no-op. Full weights the adapter carries replace those
    of ``params``, as in PEFT: ``modules_to_save`` modules and biases (``bias="all"``/
    ``"lora_only"``) come back as `lora.Trainable` leaves (they trained and keep training), an
    embedding's ``base_layer`` as a plain array.

    Strict: keys the model has no place for, factors of the wrong shape (both shapes named),
    non-finite factors and modules the config targets but the file lacks are all reported in one
    ``ValueError``; ``allow_missing=True`` accepts targeted modules that are absent from the file
    (they get no adapter). ``params`` is never modified.

    Args:
      path: the PEFT adapter directory.
      params: the base parameters (plain arrays) of ``model``.
      model: the lora_jax model (from `lora_jax.hf.from_pretrained`).
      allow_missing: accept targeted modules missing from the file.

    Returns:
      ``params`` with `LoraWeight` nodes at the adapted kernels.

    Example:
      >>> tree = hf.load_peft("adapter_dir", params, model)  # doctest: +SKIP
      >>> logits = lora.wrap(lambda p, x: model.apply({"params": p}, x))(tree, ids)  # doctest: +SKIP
    """
    path = os.fspath(path)
    # parse
    cfg, tensors = _read_adapter(path)
    view = _View.of(model)
    flat = _flatten(params)
    if any(is_node(v) for v in flat.values()):
        raise ValueError("load_peft: params already hold LoraWeight or Trainable nodes; pass the base parameters")
    # validate, collecting every problem
    bad_config = config_problems(cfg)
    problems = [f"{ADAPTER_CONFIG}: " + "; ".join(bad_config)] if bad_config else []
    problems += [f"params do not fit {torch_class(model)}: {p}" for p in _fit_problems(flat, view)]
    good, parsed = {}, None
    if not problems:
        parsed = _parse(cfg, tensors, view)
        good = _check_factors(cfg, parsed, view)
        for p, layers in parsed.full.items():
            if view.leaves[p].layered and p in parsed.trained and len(layers) != view.n_layers:
                parsed.problems.append(f"unsupported: full weights for some layers only of {p} ({sorted(layers)})")
        wanted_params = _peft_parameters(cfg, view)
        if cfg.get("target_parameters") and not wanted_params:
            parsed.problems.append(f"target_parameters {cfg['target_parameters']!r} match no parameter of "
                                   f"{torch_class(model)}; some it has: {sorted(view.parameters())[:4]}")
        default = _default_targets(view)
        names = [*view.modules(), *view.expert_modules()]  # the latter: transformers 4's per-expert modules
        if not cfg.get("target_parameters") and not any(selects(cfg, name, default) for name in names):
            parsed.problems.append(f"{selection_of(cfg)} select no module of {torch_class(model)} (PEFT refuses such "
                                   f"a config); some it has: {sorted(view.modules())[:4]}")
        if not allow_missing:
            wanted = _peft_targets(cfg, view)
            parsed.problems += [f"missing: {PREFIX}{mod}.lora_A/lora_B (targeted by target_modules "
                                f"{cfg.get('target_modules')!r})" for mod in sorted(wanted - set(parsed.factors))]
            parsed.problems += [f"missing: the lora_A/lora_B of parameter {name} (targeted by target_parameters "
                                f"{cfg.get('target_parameters')!r})"
                                for name in sorted(wanted_params - set(parsed.factors))]
        problems += parsed.problems
    if problems:
        raise ValueError(f"load_peft: {len(problems)} problem(s) in {path!r}:\n  " + "\n  ".join(problems))
    if not good:
        raise ValueError(f"load_peft: {path!r} holds no LoRA factors")

    # build
    def full_value(p, leaf):
        layers = parsed.full[p]
        if None in layers:
            return jnp.asarray(layers[None], dtype=leaf.dtype)
        arr = np.array(leaf)
        for i, x in layers.items():
            arr[i] = x
        return jnp.asarray(arr, dtype=leaf.dtype)

    flat_kp, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = []
    for kp, leaf in flat_kp:
        p = path_str(kp)
        value = full_value(p, leaf) if p in parsed.full else leaf
        if p in good:
            leaves.append(_build_weight(view, p, value, good[p], cfg))
        elif p in parsed.full:
            leaves.append(Trainable(value) if p in parsed.trained else value)
        else:
            leaves.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, leaves)

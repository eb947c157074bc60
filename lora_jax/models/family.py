"""The model families and the one mapping between their parameter trees and Hugging Face checkpoints.

Each family module (`llama`, `moe`, `gemma`, `phi3`, `gpt2`, `bert`) defines a hashable config dataclass,
Flax linen modules (one per head: ``"causal_lm"``, ``"base"``, ``"seq_cls"``) and a module-level
``FAMILY = Family(...)`` that says which ``model_type`` values it serves and how its tree maps onto
the PyTorch state dict. Everything that reads or writes checkpoints and adapters (`lora_jax.hf`,
the trainer) goes through this module, so adding a family is one module plus one line in
`_FAMILY_MODULES`.

The checkpoint table is a list of `Leaf`: our tree path, the PyTorch name (``{i}`` stands for the
layer index of per-layer tensors, which we stack on a leading axis under ``nn.scan``), the shape
of one layer's leaf, and whether PyTorch stores the transpose (``nn.Linear`` keeps ``(out, in)``;
our kernels are always ``(in, out)``).

Example:
  >>> cfg = config_from_hf({"model_type": "qwen2", "hidden_size": 32, "num_attention_heads": 4,
  ...                       "num_hidden_layers": 2, "intermediate_size": 64, "vocab_size": 100})
  >>> model = build(cfg)
  >>> type(model).__name__, torch_class(model)
  ('LlamaForCausalLM', 'Qwen2ForCausalLM')
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np

__all__ = ["param_count", "Leaf", "ROLES", "roles_of", "Family", "SUPPORTED_MODEL_TYPES", "HEADS", "TASK_TYPES", "family_for", "read_hf_config",
           "config_from_hf", "build", "head_of", "family_of", "torch_class", "hf_config_dict", "leaves_of",
           "params_from_state", "state_from_params", "from_disk", "to_disk", "flax_msgpack_state", "init_params",
           "strip_prefix", "base_prefix", "resolve_head"]

# model_type -> the module of lora_jax.models that implements it
_FAMILY_MODULES = {
    "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "olmo2": "llama",
    "gemma2": "gemma", "gemma3_text": "gemma",
    "qwen3_moe": "moe", "mixtral": "moe", "gpt_oss": "moe",
    "phi3": "phi3",
    "gpt2": "gpt2",
    "bert": "bert",
}
SUPPORTED_MODEL_TYPES = tuple(_FAMILY_MODULES)
HEADS = ("causal_lm", "base", "seq_cls")
ROLES = ("column", "row", "embedding", "head", "router", "expert")  # see `Leaf.role`
# PEFT task_type of each head
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "base": "FEATURE_EXTRACTION", "seq_cls": "SEQ_CLS"}


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One parameter of a checkpoint table.

    Attributes:
      path: the leaf's path in our parameter tree (``"model/layers/self_attn/q_proj/kernel"``).
      hf: its PyTorch (transformers 5, in memory) parameter name; ``{i}`` marks a per-layer tensor
        (stacked here on a leading layer axis): ``"model.layers.{i}.self_attn.q_proj.weight"``.
      shape: the shape of one layer's leaf in our tree.
      transpose: PyTorch stores the last two axes swapped (``nn.Linear`` weights ``(out, in)``,
        fused experts ``(E, out, in)``; our kernels are ``(..., in, out)``).
      disk: the names ``save_pretrained`` writes instead of ``hf`` when they differ (transformers 5
        converts them on load): one name is a rename (Mixtral's ``block_sparse_moe.gate``); names
        with ``{j}`` are per-expert tensors ``(out_part, in)`` of the fused ``(E, out, in)``
        parameter, concatenated on the output axis in the order given (``gate_proj``, ``up_proj``).
      role: what the parameter is, for everything that treats parameters by kind (the
        ``all-linear`` preset, expert detection, tensor-parallel specs), so that nothing matches
        names: ``"column"`` (a projection whose output axis splits over a tensor-parallel group:
        q/k/v, gate/up), ``"row"`` (one whose input axis splits: o, down), ``"embedding"``
        (rows split), ``"head"`` (the output head: not ``all-linear``; vocab axis split),
        ``"router"`` (a mixture-of-experts router: not ``all-linear``, never split),
        ``"expert"`` (per-expert tensors ``(E, in, out)``); None for norms and biases.
    """

    path: str
    hf: str
    shape: tuple
    transpose: bool = False
    disk: tuple = ()
    role: Optional[str] = None

    def __post_init__(self):
        if self.role not in ROLES + (None,):
            raise ValueError(f"Leaf {self.path!r}: role must be one of {ROLES} or None, got {self.role!r}")

    @property
    def layered(self) -> bool:
        return "{i}" in self.hf

    def hf_name(self, layer: Optional[int] = None) -> str:
        """The PyTorch parameter name (of ``layer`` for a per-layer leaf)."""
        if self.layered != (layer is not None):
            raise ValueError(f"{self.hf!r}: a layer index is needed exactly for per-layer tensors, got layer={layer!r}")
        return self.hf.replace("{i}", str(layer)) if self.layered else self.hf

    def module(self, layer: Optional[int] = None) -> str:
        """The PyTorch module name (the parameter name without ``.weight``/``.bias``)."""
        return self.hf_name(layer).rpartition(".")[0]

    def torch_shape(self) -> tuple:
        s = tuple(self.shape)
        return s[:-2] + (s[-1], s[-2]) if self.transpose and len(s) >= 2 else s

    def to_torch(self, arr):
        """One layer's array in our layout -> PyTorch's."""
        return np.swapaxes(arr, -1, -2) if self.transpose and np.ndim(arr) >= 2 else arr

    from_torch = to_torch  # swapping the last two axes is its own inverse

    def disk_names(self, layer: Optional[int] = None) -> list[list[str]]:
        """``disk`` for ``layer``: one list of names per expert (``{j}``), or one list (a rename)."""
        names = [n.replace("{i}", str(layer)) if layer is not None else n for n in self.disk]
        if not any("{j}" in n for n in names):
            return [names]
        return [[n.replace("{j}", str(j)) for n in names] for j in range(self.shape[0])]


@dataclasses.dataclass(frozen=True)
class Family:
    """What lora_jax knows of one family of architectures.

    Attributes:
      name: the module name (``"llama"``).
      torch_classes: ``model_type -> {head: PyTorch class name}``; the first head listed is the
        default when a config names no architecture.
      config_from_hf: HF ``config.json`` dict -> the family's config (a ValueError names every
        field whose feature is not implemented).
      modules: ``head -> linen Module class`` (constructed as ``cls(config)``).
      leaves: ``(config, head) -> [Leaf]``, the checkpoint table.
      peft_targets: ``model_type -> PEFT's default target_modules``.
      attention: the attention projections' module names (the ``"attention"`` preset).
      ignore: ``config -> regexes`` of checkpoint names that are not parameters (buffers, a stored
        ``lm_head.weight`` under tied embeddings); they are skipped on load.
      not_linear: module names whose kernels PyTorch does not hold as ``nn.Linear`` (an MoE
        router), which PEFT's ``"all-linear"`` therefore leaves out.
    """

    name: str
    torch_classes: Mapping[str, Mapping[str, str]]
    config_from_hf: Callable[[Mapping[str, Any]], Any]
    modules: Mapping[str, type]
    leaves: Callable[[Any, str], Sequence[Leaf]]
    peft_targets: Mapping[str, tuple]
    attention: tuple
    ignore: Callable[[Any], tuple] = lambda config: ()
    not_linear: tuple = ()


def family_for(model_type: str) -> Family:
    """The `Family` serving ``model_type``; a ValueError lists the supported ones."""
    mod = _FAMILY_MODULES.get(model_type)
    if mod is None:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {list(SUPPORTED_MODEL_TYPES)}")
    return importlib.import_module(f"{__package__}.{mod}").FAMILY


def read_hf_config(source) -> dict:
    """A HF config as a dict: from a dict, a ``config.json`` path or its directory, or a
    transformers ``PretrainedConfig`` (``to_dict``)."""
    if isinstance(source, Mapping):
        return dict(source)
    if isinstance(source, (str, os.PathLike)):
        p = os.fspath(source)
        if os.path.isdir(p):
            p = os.path.join(p, "config.json")
        if not os.path.isfile(p):
            raise FileNotFoundError(f"no config.json at {os.path.abspath(p)!r}")
        from ..io._files import read_json

        d = read_json(p, what="model config")
        if not isinstance(d, dict):
            raise ValueError(f"{p!r}: expected a JSON object, got {type(d).__name__}")
        return d
    if hasattr(source, "to_dict"):
        return source.to_dict()
    raise TypeError(f"expected a config dict, a path to config.json (or its directory) or a transformers "
                    f"PretrainedConfig, got {type(source).__name__}")


def config_from_hf(source, **overrides):
    """The family config for a HF config (dict, path or ``PretrainedConfig``), ``overrides`` applied
    (``dtype="bfloat16"``, ``remat_policy=...``)."""
    d = read_hf_config(source)
    if "model_type" not in d:
        raise ValueError(f"the config has no model_type; supported: {list(SUPPORTED_MODEL_TYPES)}")
    from .layers import check_rope_mappings

    check_rope_mappings(d, f"{d['model_type']} config: ")
    cfg = family_for(d["model_type"]).config_from_hf(d)
    _check_numbers(cfg, d["model_type"])
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def _check_numbers(cfg, model_type: str) -> None:
    """Every float of a family config is finite, and epsilons and rotary bases are > 0: a NaN
    ``rms_norm_eps`` or a negative ``rope_theta`` would load and give NaN logits."""
    bad = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, bool) or not isinstance(v, (float, np.floating)):
            continue
        if not np.isfinite(v):
            bad.append(f"{f.name} must be finite, got {v!r}")
        elif any(t in f.name for t in ("eps", "theta", "base_freq")) and v <= 0:
            bad.append(f"{f.name} must be > 0, got {v!r}")
    if bad:
        raise ValueError(f"{model_type} config: " + "; ".join(bad))


def _head_for_class(fam: Family, model_type: str, cls_name: str) -> Optional[str]:
    return next((h for h, c in fam.torch_classes[model_type].items() if c == cls_name), None)


def resolve_head(config, architectures: Sequence[str] = (), architecture: Optional[str] = None) -> str:
    """The head to build for ``config``: ``architecture`` (a PyTorch class name or a head name)
    if given, else the first of ``architectures`` this family knows, else the family's default."""
    fam = family_for(config.model_type)
    classes = fam.torch_classes[config.model_type]
    if architecture is not None:
        if architecture in classes:
            return architecture
        head = _head_for_class(fam, config.model_type, architecture)
        if head is None:
            raise ValueError(f"architecture {architecture!r} is not supported for model_type {config.model_type!r}; "
                             f"supported: {sorted(classes.values())} (or a head: {sorted(classes)})")
        return head
    for name in architectures or ():
        head = _head_for_class(fam, config.model_type, name)
        if head is not None:
            return head
    return next(iter(classes))


def build(config, head: str = "causal_lm"):
    """The linen module of ``head`` for ``config``."""
    fam = family_for(config.model_type)
    if head not in fam.modules or head not in fam.torch_classes[config.model_type]:
        raise ValueError(f"model_type {config.model_type!r} has no {head!r} head; heads: "
                         f"{sorted(fam.torch_classes[config.model_type])}")
    return fam.modules[head](config)


def head_of(model) -> str:
    """The head of one of our modules (its class attribute ``head``)."""
    head = getattr(type(model), "head", None)
    if head not in HEADS or not hasattr(model, "config"):
        raise TypeError(f"expected a lora_jax.models module (built by lora_jax.hf.from_pretrained or "
                        f"lora_jax.models.build), got {type(model).__name__}")
    return head


def family_of(model) -> Family:
    head_of(model)
    return family_for(model.config.model_type)


def torch_class(model) -> str:
    """The PyTorch transformers class matching one of our modules (``"Qwen2ForCausalLM"``)."""
    return family_of(model).torch_classes[model.config.model_type][head_of(model)]


def hf_config_dict(model) -> dict:
    """The ``config.json`` dict PyTorch transformers builds ``torch_class(model)`` from."""
    d = model.config.to_hf_config()
    d["architectures"] = [torch_class(model)]
    return d


def leaves_of(model) -> list[Leaf]:
    """The checkpoint table of one of our modules."""
    return list(family_of(model).leaves(model.config, head_of(model)))


def roles_of(model) -> dict[str, Optional[str]]:
    """``{leaf path: role}`` of every leaf of one of our modules (`Leaf.role`; None for norms and
    biases, GPT-OSS's per-expert ``(E, out)`` biases among them: split by no role)."""
    return {lf.path: lf.role for lf in leaves_of(model)}


def strip_prefix(leaves: Sequence[Leaf], path_prefix: str, hf_prefix: str) -> list[Leaf]:
    """The leaves under ``path_prefix``/``hf_prefix`` with those prefixes removed (a base model's
    table from its head model's: ``model/``, ``model.``)."""
    return [dataclasses.replace(lf, path=lf.path[len(path_prefix):], hf=lf.hf[len(hf_prefix):],
                                disk=tuple(d[len(hf_prefix):] for d in lf.disk))
            for lf in leaves if lf.path.startswith(path_prefix) and lf.hf.startswith(hf_prefix)]


def _set_path(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def base_prefix(model) -> str:
    """The PyTorch name prefix of the base model inside ``model``'s head (``"model."``,
    ``"transformer."``, ``"bert."``; ``""`` for a base head)."""
    head = head_of(model)
    if head == "base":
        return ""
    fam = family_of(model)
    base = {lf.hf for lf in fam.leaves(model.config, "base")}
    for lf in fam.leaves(model.config, head):
        for b in base:
            if lf.hf != b and lf.hf.endswith("." + b):
                return lf.hf[:-len(b)]
    return ""


def _legacy(name: str) -> str:
    # original BERT-era checkpoints name LayerNorm parameters gamma/beta (transformers renames them too)
    if name.endswith(".gamma"):
        return name[:-len("gamma")] + "weight"
    if name.endswith(".beta"):
        return name[:-len("beta")] + "bias"
    return name


def _align_names(state: Mapping[str, Any], model, expected: set) -> dict:
    """``state`` renamed to fit ``model`` as transformers does: legacy ``gamma``/``beta`` names, a
    base-model checkpoint loaded into a head model (names gain the base prefix) and a head
    checkpoint loaded into the base model (the prefix is dropped, and so are the head's tensors)."""
    state = {(_legacy(k) if _legacy(k) in expected and k not in expected else k): v for k, v in state.items()}
    if expected & set(state):
        return state
    prefix = base_prefix(model)
    if prefix:
        added = {prefix + k: v for k, v in state.items()}
        if expected & set(added):
            return added
    else:
        prefixes = {k.split(".", 1)[0] + "." for k in state if "." in k}
        for p in sorted(prefixes):
            stripped = {k[len(p):]: v for k, v in state.items() if k.startswith(p)}
            if expected & set(stripped):
                return stripped
    return state


_FLOAT_NAMES = ("bfloat16", "float8_e4m3fn", "float8_e5m2")


def param_count(model) -> int:
    """The number of parameters ``model`` has, from its checkpoint table (nothing is built)."""
    n = model.config.num_hidden_layers
    return sum(int(np.prod(lf.shape, dtype=object)) * (n if lf.layered else 1) for lf in leaves_of(model))


def params_from_state(state: Mapping[str, Any], model, *, dtype=None, what: str = "load",
                      new_head_key=None) -> dict:
    """Our parameter tree (NumPy arrays) from a PyTorch-named state dict, strictly.

    Per-layer tensors are stacked on a leading layer axis, ``(out, in)`` weights transposed.
    Floating tensors are cast to ``dtype`` (default: ``model.config.param_dtype``). Names are
    aligned as transformers aligns them (legacy ``gamma``/``beta``; a base checkpoint into a head
    model and back). Every missing, unexpected and misshapen tensor is reported in one ValueError.

    A sequence classifier loaded from a checkpoint without its head (a pretrained base, as when
    fine-tuning BERT for classification) gets a newly initialized head when ``new_head_key`` (a
    ``jax.random`` key) is given, with a warning naming the new tensors, as transformers does;
    without it the missing head is an error like any other missing tensor.
    """
    config = model.config
    layered = sum(lf.layered for lf in leaves_of(model))
    if config.num_hidden_layers * layered > 4 * len(state) + 64:  # before any per-layer name is built
        raise ValueError(f"{what}: the config claims {config.num_hidden_layers:,} layers ({layered} tensors each), "
                         f"but the checkpoint holds {len(state):,} tensors in all; config.json does not describe "
                         "these weights")
    table_names = {lf.hf_name(i) for lf in leaves_of(model)
                   for i in (range(config.num_hidden_layers) if lf.layered else (None,))}
    state = from_disk(_align_names(state, model, table_names), leaves_of(model), config.num_hidden_layers)
    fam = family_of(model)
    out_dtype = np.dtype(config.param_dtype if dtype is None else dtype)
    n_layers = config.num_hidden_layers
    ignore = [re.compile(p) for p in fam.ignore(config)]
    used, missing, bad = set(), [], []
    params: dict = {}

    def fetch(lf: Leaf, name: str):
        if name not in state:
            missing.append(name)
            return None
        used.add(name)
        arr = np.asarray(state[name])
        if arr.shape != lf.torch_shape():
            bad.append(f"{name}: expected {lf.torch_shape()}, got {arr.shape}")
            return None
        if not (arr.dtype.kind == "f" or arr.dtype.name in _FLOAT_NAMES):
            # every weight of these models is a float: an int or bool tensor here is a damaged or
            # relabelled file, and casting it would silently change every number
            bad.append(f"{name}: dtype {arr.dtype.name}, expected a floating-point weight")
            return None
        return lf.from_torch(arr).astype(out_dtype)

    for lf in leaves_of(model):
        if not lf.layered:
            arr = fetch(lf, lf.hf)
            if arr is not None:
                _set_path(params, lf.path, arr)
            continue
        per_layer = [fetch(lf, lf.hf_name(i)) for i in range(n_layers)]
        if all(a is not None for a in per_layer):
            _set_path(params, lf.path, np.stack(per_layer))
    unexpected = sorted(n for n in state if n not in used and not any(p.search(n) for p in ignore))
    prefix = base_prefix(model)
    head_only = prefix and missing and not bad and all(not n.startswith(prefix) for n in missing)
    if head_only and new_head_key is not None and head_of(model) == "seq_cls":
        import warnings

        fresh = _flat(init_params(model, new_head_key, dtype=out_dtype))
        for lf in leaves_of(model):
            if lf.hf in missing:
                _set_path(params, lf.path, np.asarray(fresh[lf.path]))
        warnings.warn(f"{what}: {torch_class(model)}'s head {missing} is not in the checkpoint and was newly "
                      "initialized; train it (it is saved in PEFT's modules_to_save)", stacklevel=2)
        missing = []
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {missing}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {unexpected}")
        if bad:
            parts.append(f"shape or dtype mismatches (PyTorch layout) {len(bad)}: {bad}")
        raise ValueError(f"{what}: the checkpoint does not match {torch_class(model)} ({config.model_type}, "
                         f"{n_layers} layers): " + "; ".join(parts))
    return params


def _layers(lf: Leaf, n_layers: int):
    return range(n_layers) if lf.layered else (None,)


def from_disk(state: Mapping[str, Any], leaves: Sequence[Leaf], n_layers: int) -> dict:
    """``state`` with the tensors of each leaf's `Leaf.disk` names converted to its ``hf`` name, as
    transformers 5 converts them on load (renamed, or per-expert tensors stacked and concatenated).
    A leaf whose disk tensors are incomplete is left alone (reported by the strict loader)."""
    state = dict(state)
    for lf in leaves:
        if not lf.disk:
            continue
        for i in _layers(lf, n_layers):
            groups = lf.disk_names(i)
            if lf.hf_name(i) in state or not all(n in state for g in groups for n in g):
                continue
            parts = [np.concatenate([np.asarray(state.pop(n)) for n in g], axis=0) for g in groups]
            state[lf.hf_name(i)] = np.stack(parts) if any("{j}" in n for n in lf.disk) else parts[0]
    return state


def to_disk(state: Mapping[str, Any], leaves: Sequence[Leaf], n_layers: int) -> dict:
    """The inverse of `from_disk`: in-memory names -> what ``save_pretrained`` writes."""
    state = dict(state)
    for lf in leaves:
        if not lf.disk:
            continue
        for i in _layers(lf, n_layers):
            arr = state.pop(lf.hf_name(i))
            groups = lf.disk_names(i)
            per_expert = any("{j}" in n for n in lf.disk)
            for j, names in enumerate(groups):
                x = arr[j] if per_expert else arr
                cuts = np.cumsum([x.shape[0] // len(names)] * (len(names) - 1))
                for name, part in zip(names, np.split(x, cuts, axis=0)):
                    state[name] = np.ascontiguousarray(part)
    return state


def _flat(params) -> dict[str, Any]:
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]
    out = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        out["/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in kp)] = leaf
    return out


def state_from_params(params, model, *, what: str = "export", disk: bool = False) -> dict[str, np.ndarray]:
    """The inverse of `params_from_state`: ``{PyTorch name: np.ndarray}``, dtypes kept.

    ``params`` must be plain arrays (``lora.merge`` a LoRA tree first), exactly this model's tree.
    The names are transformers 5's in-memory ones (``model.state_dict()``); ``disk=True`` gives
    those ``save_pretrained`` writes (per-expert MoE tensors, see `Leaf`), which every transformers
    version and serving engine reads.
    """
    flat = _flat(params)
    n = model.config.num_hidden_layers
    table = {lf.path: lf for lf in leaves_of(model)}
    expected = {p: ((n,) if lf.layered else ()) + tuple(lf.shape) for p, lf in table.items()}
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    bad = [f"{p}: expected {expected[p]}, got {tuple(np.shape(flat[p]))}" for p in sorted(set(expected) & set(flat))
           if tuple(np.shape(flat[p])) != expected[p]]
    if missing or unexpected or bad:
        raise ValueError(f"{what}: the parameters do not match {torch_class(model)}: missing {missing}; "
                         f"unexpected {unexpected}; shape mismatches {bad}")
    out = {}
    for p, lf in table.items():
        arr = np.asarray(flat[p])
        if lf.layered:
            for i in range(n):
                out[lf.hf_name(i)] = np.ascontiguousarray(lf.to_torch(arr[i]))
        else:
            out[lf.hf] = np.ascontiguousarray(lf.to_torch(arr))
    return to_disk(out, leaves_of(model), n) if disk else out


_MSGPACK_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def flax_msgpack_state(tree: Mapping) -> dict[str, np.ndarray]:
    """A transformers Flax parameter tree (``flax_model.msgpack``, restored) as a PyTorch-named
    state dict: path components joined by ``.``, ``kernel``/``scale``/``embedding`` -> ``weight``,
    kernels transposed (transformers' Flax kernels are the transpose of PyTorch's weights)."""
    out = {}
    for path, leaf in _flat(tree).items():
        parts = path.split("/")
        last = parts[-1]
        arr = np.asarray(leaf)
        if last == "kernel":
            arr = arr.T
        parts[-1] = _MSGPACK_LEAF.get(last, last)
        out[".".join(parts)] = arr
    return out


def init_params(model, key, dtype=None) -> dict:
    """Random parameters of ``model`` (transformers' init: normal(initializer_range) kernels)."""
    import jax.numpy as jnp

    ids = jnp.zeros((1, 1), jnp.int32)
    params = jax.jit(lambda k: model.init(k, ids)["params"])(key)
    if dtype is not None:
        params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
    return params

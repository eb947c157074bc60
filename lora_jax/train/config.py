"""The run configuration: a tree of dataclasses, loaded from YAML plus ``key=value`` overrides.

Every value is checked before any work starts (and before anything is written): an unknown key
gets a "did you mean" suggestion, a wrong type or an out-of-range value names the key and what is
allowed, a missing file names the path. All problems found are reported together in one
`ConfigError` (a ``ValueError``).

The dataclass defaults *are* the default run; ``lora_jax/conf/default.yaml`` spells them out with
comments (a test keeps the two equal). A user YAML file only needs the keys it changes.

Example:
  >>> from lora_jax.train.config import load_config
  >>> cfg = load_config(None, ["train.steps=20", "lora.rank=4"])
  >>> cfg.train.steps, cfg.lora.rank
  (20, 4)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from importlib import resources
from typing import Optional, Union

import numpy as np
import yaml

from ..variants import variant_names
from ..weight import AdapterSettings
from . import data as _data
from . import readers as _readers
from . import records as _records

__all__ = [
    "Config", "ModelConfig", "PretrainConfig", "TokenizerConfig", "DataConfig", "LoraConfig", "TrainConfig",
    "MeshConfig", "ConfigError", "load_config", "from_dict", "to_dict", "to_yaml", "config_names", "resolve_path",
    "deep_update", "adapter_configs", "ADAPTER_KEYS",
    "BUILTIN_PREFIX", "REMAT_POLICIES",
]

BUILTIN_PREFIX = "builtin:"
DTYPES = ("float32", "bfloat16", "float16")
INT_MAX = 2**31 - 1


def _remat_policies() -> tuple:
    from ..models.layers import REMAT_POLICIES as policies  # the one list, shared with the models

    return ("none",) + tuple(policies)


REMAT_POLICIES = _remat_policies()


class ConfigError(ValueError):
    """An invalid run configuration; the message lists every problem, one per line."""

    def __init__(self, problems):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            msg = self.problems[0]
        else:
            msg = f"{len(self.problems)} problems in the config:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(msg)


# the most values one YAML document may expand to, aliases counted at every use (a few KB of nested
# aliases can stand for billions of values: an "alias bomb")
MAX_YAML_VALUES = 100_000


def yaml_size_problem(data, what: str) -> Optional[str]:
    """A problem naming ``what`` when ``data`` (parsed YAML) holds more than `MAX_YAML_VALUES`
    values, counting each use of an alias; None otherwise. Stops counting at the limit."""
    n, stack = 0, [data]
    while stack:
        x = stack.pop()
        n += 1
        if n > MAX_YAML_VALUES:
            return (f"{what}: the YAML expands to more than {MAX_YAML_VALUES:,} values (aliases such as *name "
                    "repeated inside nested lists?); refusing it")
        if isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return None


def load_yaml(source, what: str):
    """``yaml.safe_load(source)`` (a string or an open file), refusing alias bombs (`yaml_size_problem`).

    Raises:
      ConfigError: the document expands past `MAX_YAML_VALUES` values.
      yaml.YAMLError: not YAML.
    """
    data = yaml.safe_load(source)
    problem = yaml_size_problem(data, what)
    if problem:
        raise ConfigError(problem)
    return data


def _meta(doc: str = "", *, choices=None, min=None, max=None, gt=None, lt=None, file=False, numbers_too=False):
    # numbers_too: a field taking one of ``choices`` (words) or a number within the bounds
    return {"doc": doc, "choices": choices, "min": min, "max": max, "gt": gt, "lt": lt, "file": file,
            "numbers_too": numbers_too}


def _f(default, doc="", **kw):
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: yaml.safe_load(yaml.safe_dump(d)), metadata=_meta(doc, **kw))
    return field(default=default, metadata=_meta(doc, **kw))


def _default_init() -> dict:
    return {"arch": "llama", "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
            "tie_word_embeddings": False}


@dataclass
class PretrainConfig:
    """Brief full-parameter pretraining of a model built from ``model.init`` (no download needed)."""

    data: str = _f(BUILTIN_PREFIX + "pretrain.txt", "text the fresh base model is pretrained on", file=True)
    steps: int = _f(150, "optimizer steps", min=0)
    batch_size: int = _f(16, "sequences per step", min=1)
    lr: float = _f(3e-3, "peak learning rate (warmup + cosine)", gt=0)
    warmup_steps: int = _f(15, "linear warmup steps", min=0)


@dataclass
class ModelConfig:
    """The base model: a local HF checkpoint, or one built from a config and pretrained here."""

    path: Optional[str] = _f(None, "local HF checkpoint dir; null: build from model.init and pretrain it", file=True)
    compute_dtype: str = _f("auto", "activations/matmul dtype; auto: bfloat16 on GPU/TPU, float32 on CPU",
                            choices=("auto",) + DTYPES)
    param_dtype: str = _f("float32", "dtype of the frozen base weights", choices=DTYPES)
    init: dict = field(default_factory=_default_init, metadata=_meta(
        "config.json fields of the fresh model (key 'arch' is its model_type); used when path is null"))
    pretrain: PretrainConfig = field(default_factory=PretrainConfig, metadata=_meta("used when path is null"))


@dataclass
class TokenizerConfig:
    """The tokenizer: the checkpoint's own, or a byte-level BPE trained on the pretraining text."""

    path: Optional[str] = _f(None, "tokenizer dir; null: model.path's, or trained here for a fresh model", file=True)
    vocab_size: int = _f(512, "BPE vocabulary trained for a fresh model (256 bytes + 7 special tokens at least)",
                         min=263, max=1_000_000)


@dataclass
class DataConfig:
    """Fine-tuning data."""

    train: Union[str, list] = _f(BUILTIN_PREFIX + "finetune.txt",
                                 "text or JSONL file(s), or a dir (each .txt file one document)", file=True)
    eval: Optional[Union[str, list]] = _f(None, "eval file(s); null: hold out data.eval_fraction of train",
                                          file=True)
    eval_fraction: float = _f(0.1, "share of train documents held out for eval (the last ones)", min=0.0, lt=1.0)
    format: str = _f("auto", "file format; auto picks by extension (.jsonl/.json JSONL, .parquet, .arrow; else "
                     "text); directories (and datasets save_to_disk directories) are read file by file",
                     choices=_readers.FORMATS)
    columns: Optional[dict] = _f(None, "the dataset's field names for ours, e.g. {prompt: question, completion: "
                                 "answer} (fields: " + ", ".join(_records.FIELDS) + ")")
    seq_len: int = _f(128, "tokens per training row", min=2)
    packing: str = _f("documents", "documents: whole documents per row (best-fit decreasing), attention and positions "
                      "per document; stream: concatenated and cut, attention across documents; none: one document "
                      "per row, truncated", choices=_data.PACKING)
    cache: Optional[str] = _f("auto", "the tokenized cache directory (auto: $LORA_JAX_CACHE/tokenized or "
                              "~/.cache/lora_jax/tokenized); null: none kept (a temporary one for the run)")
    workers: int = _f(0, "tokenizing processes on a cache miss; 0: one per core (data under 4 MB: in-process)",
                      min=0)


def _setting(name: str, **kw):
    """A ``lora`` key that is a `lora_jax.AdapterSettings` field: its default, help line and bounds
    come from there (the one place they are spelled); ``kw``: more of `_meta` (``choices``)."""
    f = next(f for f in dataclasses.fields(AdapterSettings) if f.name == name)
    return _f(f.default, f.metadata["doc"], **{k: f.metadata[k] for k in ("min", "max", "gt", "lt") if k in f.metadata},
              **kw)


@dataclass
class LoraConfig:
    """The adapter: `lora_jax.Rules` options; the adapter settings are `lora_jax.AdapterSettings` fields."""

    targets: Union[str, list] = _f("all-linear", "module names, a regex, or all-linear")
    rank: int = _setting("rank")
    alpha: float = _setting("alpha")
    dropout: float = _setting("dropout")
    rslora: bool = _setting("rslora")
    variant: str = _setting("variant", choices=variant_names)
    init: str = _f("kaiming", "adapter init", choices=("kaiming", "gaussian"))
    exclude: Optional[Union[str, list]] = _f(None, "names/regex never adapted")
    modules_to_save: Optional[Union[str, list]] = _f(
        None, "module names/regex trained in full and saved whole (PEFT modules_to_save), e.g. [gate]: an MoE "
        "router, frozen otherwise")

    def rules_kwargs(self) -> dict:
        """The section as `lora_jax.Rules` keyword arguments (``targets`` included)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass
class TrainConfig:
    """The optimization loop."""

    steps: int = _f(100, "optimizer steps", min=1)
    batch_size: int = _f(16, "global batch in sequences per optimizer step", min=1)
    grad_accum: int = _f(1, "micro-batches per step (batch_size must divide by it)", min=1)
    lr: float = _f(3e-3, "peak learning rate", gt=0)
    schedule: str = _f("cosine", "after warmup", choices=("cosine", "linear", "constant"))
    warmup_steps: int = _f(10, "linear warmup from 0", min=0)
    end_lr_ratio: float = _f(0.1, "final lr / peak lr (cosine, linear)", min=0.0, max=1.0)
    optimizer: str = _f("adamw", "", choices=("adamw", "adam", "sgd", "lion"))
    b1: float = _f(0.9, "Adam/Lion beta1 (SGD momentum)", min=0.0, lt=1.0)
    b2: float = _f(0.999, "Adam/Lion beta2", min=0.0, lt=1.0)
    weight_decay: float = _f(0.0, "decoupled weight decay on the adapter", min=0.0)
    clip_norm: float = _f(1.0, "clip gradients to this global norm; 0: off", min=0.0)
    remat: str = _f("auto", "rematerialize each scanned decoder layer with this jax.checkpoint policy (the model's "
                    "remat_policy); none: keep every activation; auto: the fastest that fits in memory "
                    "(lora_jax.train.tuning)", choices=("auto",) + REMAT_POLICIES)
    loss: str = _f("auto", "the cross-entropy: plain (the log-softmax of the full (batch, seq, vocab) float32 "
                   "logits), chunked (over chunks of the sequence from the final hidden states and the head, "
                   "lora_jax.train.loss: those logits and their gradient are never held), or auto: plain where it "
                   "fits in memory on a GPU/TPU, chunked on a CPU", choices=("auto", "plain", "chunked"))
    unroll: Union[int, str] = _f("auto", "decoder layers per iteration of the layer scan; all: no loop (no "
                                 "per-layer copies, a longer compile); auto: all on a GPU/TPU where it fits, 1 on "
                                 "a CPU", choices=("auto", "all"), min=1, numbers_too=True)
    loss_chunk: int = _f(0, "positions per chunk of the chunked loss (all rows of a micro-batch together); 0: auto "
                         "(each chunk's float32 logits within 256 MiB)", min=0)
    eval_every: int = _f(25, "steps between evals; 0: only before and after", min=0)
    eval_batches: int = _f(0, "batches per eval; 0: the whole eval set", min=0)
    log_every: int = _f(5, "steps between metric lines", min=1)
    checkpoint_every: int = _f(50, "steps between checkpoints; 0: only at the end", min=0)
    keep_checkpoints: int = _f(2, "newest checkpoints kept", min=1)
    async_checkpoint: bool = _f(True, "write checkpoints in the background")
    on_nonfinite: str = _f("stop", "a NaN/inf loss or gradient: stop (last good checkpoint kept) or skip the update",
                           choices=("stop", "skip"))
    max_skipped: int = _f(10, "with on_nonfinite=skip: stop after this many skipped steps in a row", min=1)
    resume: bool = _f(False, "continue from the newest finalized checkpoint in out_dir")
    progress: bool = _f(True, "show a progress bar")
    export: bool = _f(True, "export the adapter (PEFT format) at the end")
    plot: bool = _f(True, "write loss.png at the end")


@dataclass
class MeshConfig:
    """Device mesh; -1 takes the remaining devices (at most one axis)."""

    data: int = _f(-1, "data-parallel axis", min=-1)
    fsdp: int = _f(1, "fully-sharded data-parallel axis (base params sharded on it)", min=-1)
    tensor: int = _f(1, "tensor-parallel axis (attention/MLP kernels split Megatron-style)", min=-1)


@dataclass
class Config:
    """A whole run."""

    seed: int = _f(0, "seeds the model init, adapter init, data order and dropout", min=0)
    out_dir: Optional[str] = _f(None, "run directory; null: runs/<config name>-<timestamp>")
    distributed: bool = _f(False, "call jax.distributed.initialize() first (multi-host)")
    peer_timeout: int = _f(100, "distributed: seconds without a peer's heartbeat before the other processes stop "
                           "(exit status 4, naming the lost peer)", min=5)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    name: str = _f("default", "the config's name (used for the run directory)")
    adapters: Optional[list] = _f(None, "several adapters trained side by side on the one frozen base, in one "
                                  "step: a list of {name, lora: {...}, data: {...}, train: {...}}, each section "
                                  "overriding the run's own (ADAPTER_KEYS); null: one adapter")


# what each entry of ``adapters`` may set (everything else is shared by all adapters of the run)
ADAPTER_KEYS = {
    "lora": ("targets", "rank", "alpha", "dropout", "rslora", "variant", "init", "exclude"),
    "data": ("train", "eval", "eval_fraction", "format", "columns"),
    "train": ("batch_size", "lr", "schedule", "warmup_steps", "end_lr_ratio", "optimizer", "b1", "b2",
              "weight_decay", "clip_norm"),
}


# ------------------------------------------------------------------------------------------
# dict <-> dataclass with validation
# ------------------------------------------------------------------------------------------


def _hints(cls):
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        names = " or ".join(_type_name(a) for a in args)
        return names + (" or null" if type(None) in typing.get_args(tp) else "")
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string", list: "a list",
            dict: "a mapping"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value, tp, key, problems):
    """``value`` converted to ``tp`` or a problem appended (returns the sentinel ``_BAD``)."""
    origin = typing.get_origin(tp)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            sub = []
            out = _coerce(value, a, key, sub)
            if not sub:
                return out
        problems.append(f"{key}: expected {_type_name(tp)}, got {_short(value)} ({type(value).__name__})")
        return _BAD
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an integer beyond float range
                pass
        elif isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is list:
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
    elif tp is dict:
        if isinstance(value, dict):
            return dict(value)
    else:
        raise TypeError(f"internal: unsupported config type {tp}")
    problems.append(f"{key}: expected {_type_name(tp)}, got {_short(value)} ({type(value).__name__})")
    return _BAD


_BAD = object()


def _check_range(value, meta, key, problems):
    if value is None or value is _BAD:
        return
    choices = meta.get("choices")
    if callable(choices):  # known when checked (adapter variants are registered at run time)
        choices = choices()
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if choices is not None and value not in choices and not (numeric and meta.get("numbers_too")):
        hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        problems.append(f"{key}: {value!r} is not allowed; expected one of {', '.join(map(str, choices))}"
                        + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        return
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{key}: must be a finite number, got {value!r}")
            return
        lo, hi, gt, lt = meta.get("min"), meta.get("max"), meta.get("gt"), meta.get("lt")
        if isinstance(value, int) and hi is None:
            hi = INT_MAX  # counters and sizes live in int32 on the device
        bounds = []
        if lo is not None:
            bounds.append(f">= {lo}")
        if gt is not None:
            bounds.append(f"> {gt}")
        if hi is not None:
            bounds.append(f"<= {hi}")
        if lt is not None:
            bounds.append(f"< {lt}")
        ok = ((lo is None or value >= lo) and (gt is None or value > gt) and (hi is None or value <= hi)
              and (lt is None or value < lt))
        if not ok:
            problems.append(f"{key}: {value!r} is out of range; expected a value {' and '.join(bounds)}")


def _short(value) -> str:
    """A bounded repr (a YAML document can nest deeply or alias itself into an exponential tree)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother, r.maxlist, r.maxdict, r.maxtuple, r.maxset = 3, 80, 80, 6, 6, 6, 6
    return r.repr(value)


def _suggest(name, options):
    hint = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f"; did you mean {hint[0]!r}?" if hint else ""


def _build(cls, data: dict, prefix: str, problems: list):
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    if not isinstance(data, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {_short(data)}")
        return cls()
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in fields:
            hint = difflib.get_close_matches(str(k), list(fields), n=1, cutoff=0.6)
            where = f"keys in {prefix.rstrip('.')}" if prefix else "top-level keys"
            problems.append(f"unknown key {key!r}" + (f"; did you mean {prefix + hint[0]!r}?" if hint else "")
                            + f" ({where}: {', '.join(fields)})")
            continue
        tp = hints[k]
        if cls is Config and k == "adapters":  # a list of mappings, checked whole by `_check_adapters`
            if v is not None and not (isinstance(v, list) and all(isinstance(x, dict) for x in v)):
                problems.append(f"adapters: expected a list of mappings ({{name: ..., lora: ..., data: ..., train: "
                                f"...}}), got {_short(v)}")
                continue
            kwargs[k] = None if v is None else yaml.safe_load(yaml.safe_dump(v))
            continue
        if dataclasses.is_dataclass(tp):
            kwargs[k] = _build(tp, v if v is not None else {}, key + ".", problems)
            continue
        out = _coerce(v, tp, key, problems)
        if out is _BAD:
            continue
        _check_range(out, fields[k].metadata, key, problems)
        kwargs[k] = out
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    """The config as plain nested dicts (what is saved as YAML)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg) -> str:
    """The config as YAML text."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


# ------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------


def resolve_path(p: str) -> str:
    """A ``builtin:NAME`` path to the shipped file ``lora_jax/data/NAME``; ``~`` expanded in others."""
    if isinstance(p, str) and p.startswith(BUILTIN_PREFIX):
        return str(resources.files("lora_jax").joinpath("data", p[len(BUILTIN_PREFIX):]))
    return os.path.expanduser(p) if isinstance(p, str) else p


def _builtin_names() -> list[str]:
    d = resources.files("lora_jax").joinpath("data")
    return sorted(BUILTIN_PREFIX + f.name for f in d.iterdir() if f.is_file() and not f.name.startswith("_"))


def _check_file(value, key, problems, *, want_dir=False):
    paths = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        problems.append(f"{key}: the list of files is empty")
    for p in paths:
        if p is None:
            continue
        real = resolve_path(p)
        if want_dir:  # a checkpoint or tokenizer: a directory, or a hub id in the local cache
            from ..io._files import hub_id, local_model_dir

            try:
                local_model_dir(real, what=key)
            except FileNotFoundError as e:
                parsed = hub_id(p)  # org/name: the cache's own message; a path: not found
                problems.append(str(e) if parsed and "/" in parsed[0] else f"{key}: directory not found: {p!r}")
            except ValueError:
                problems.append(f"{key}: {p!r} is not a directory")
        elif not os.path.exists(real):
            extra = f" (shipped files: {', '.join(_builtin_names())})" if p.startswith(BUILTIN_PREFIX) else ""
            problems.append(f"{key}: file not found: {p!r}{extra}")


_ARCH_CACHE: dict = {}


def causal_lm_archs() -> tuple:
    """The ``model_type`` values `lora_jax.models` builds a causal LM for (``model.init.arch``)."""
    if "archs" not in _ARCH_CACHE:
        from ..models import SUPPORTED_MODEL_TYPES, family_for

        archs = []
        for mt in SUPPORTED_MODEL_TYPES:
            try:
                fam = family_for(mt)
            except Exception:  # noqa: BLE001 - a family that does not import is not offered
                continue
            if "causal_lm" in fam.torch_classes.get(mt, {}) and "causal_lm" in fam.modules:
                archs.append(mt)
        _ARCH_CACHE["archs"] = tuple(archs)
    return _ARCH_CACHE["archs"]


# config.json keys that are not the model's: the dtypes come from model.compute_dtype/param_dtype
_NOT_INIT_KEYS = ("model_type", "dtype", "torch_dtype", "architectures", "transformers_version")


def _init_defaults(arch: str) -> dict:
    """The ``config.json`` fields of ``arch`` lora_jax reads, with their defaults (the values of
    the family's default config; rope_theta / rope_scaling as the older spelling of
    rope_parameters)."""
    key = ("defaults", arch)
    if key not in _ARCH_CACHE:
        from ..models import config_from_hf

        default = config_from_hf({"model_type": arch})
        d = {k: v for k, v in default.to_hf_config().items() if k not in _NOT_INIT_KEYS}
        if "rope_parameters" in d:
            d.setdefault("rope_theta", float(getattr(default, "rope_theta", None) or 10000.0))
            d.setdefault("rope_scaling", None)
        _ARCH_CACHE[key] = d
    return _ARCH_CACHE[key]


def _check_model_init(init: dict, problems):
    init = dict(init)
    arch = init.pop("arch", None)
    archs = causal_lm_archs()
    if arch not in archs:
        problems.append(f"model.init.arch: {arch!r} is not allowed; expected one of {', '.join(archs)}"
                        + (_suggest(str(arch), archs) if arch else ""))
        return
    defaults = _init_defaults(arch)
    for k, v in init.items():
        if not isinstance(k, str) or k not in defaults:
            extra = ""
            if k in ("dtype", "torch_dtype"):
                extra = " (the dtypes are model.compute_dtype and model.param_dtype)"
            problems.append(f"unknown key 'model.init.{k}' for a {arch} config{_suggest(str(k), defaults)}{extra}")
            continue
        d = defaults[k]
        if isinstance(d, bool):
            if not isinstance(v, bool):
                problems.append(f"model.init.{k}: expected true/false, got {_short(v)}")
        elif isinstance(d, int):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v > INT_MAX:
                problems.append(f"model.init.{k}: expected a positive integer (at most {INT_MAX}), got {_short(v)}")
        elif isinstance(d, float):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
                problems.append(f"model.init.{k}: expected a finite number, got {_short(v)}")


def _check_family_config(init: dict, problems, param_dtype: str = "float32"):
    """The model family's own validation of the fresh model's config (rope settings, head counts,
    features lora_jax does not implement, ...)."""
    from ..models import config_from_hf

    init = dict(init)
    arch = init.pop("arch")
    try:
        config = config_from_hf({**init, "model_type": arch})
    except Exception as e:  # noqa: BLE001 - whatever the family raises, it is a problem with model.init
        problems.append(f"model.init: lora_jax's {arch} config rejects it: {type(e).__name__}: {e}")
        return
    from ..models import build
    from ..models.family import param_count

    n = param_count(build(config))
    need = n * np.dtype(param_dtype).itemsize
    have = _host_memory()
    if have and need > have:
        problems.append(f"model.init: describes a model of {n:,} parameters, {need / 2**30:,.1f} GiB of {param_dtype} "
                        f"weights alone, more than this machine's {have / 2**30:,.1f} GiB of memory (check "
                        "num_hidden_layers, hidden_size, intermediate_size, vocab_size)")


def _host_memory() -> Optional[int]:
    """Bytes of physical memory (None where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _check_lora_patterns(lc, problems):
    """lora.targets / lora.exclude as `lora_jax.Rules` reads them (an invalid regex is named), and
    the whole section as `lora_jax.Rules` takes it."""
    from ..rules import ALL_LINEAR, Rules

    n = len(problems)
    for key, kw in (("lora.targets", {"targets": lc.targets}),
                    ("lora.exclude", {"targets": ALL_LINEAR, "exclude": lc.exclude})):
        if key == "lora.exclude" and lc.exclude is None:
            continue
        try:
            Rules(**kw)
        except (ValueError, TypeError) as e:
            problems.append(f"{key}: {e}")
    if len(problems) == n:
        try:
            Rules(**lc.rules_kwargs())
        except (ValueError, TypeError) as e:
            problems.append(f"lora: {e}")


def _check_names(cfg: Config, problems):
    name = cfg.name
    if not name or name in (".", "..") or any(c in name for c in "/\\\x00"):
        problems.append(f"name: {name!r} cannot name a run directory; expected a non-empty name without '/', '\\' "
                        "or NUL")
    for key, value in (("out_dir", cfg.out_dir), ("model.path", cfg.model.path), ("tokenizer.path", cfg.tokenizer.path)):
        if isinstance(value, str) and ("\x00" in value or not value):
            problems.append(f"{key}: {value!r} is not a usable path")


def _cross_checks(cfg: Config, problems: list):
    t, m = cfg.train, cfg.mesh
    if t.batch_size % t.grad_accum:
        problems.append(f"train.batch_size: {t.batch_size} does not divide by train.grad_accum={t.grad_accum}")
    if t.warmup_steps > t.steps:
        problems.append(f"train.warmup_steps: {t.warmup_steps} is more than train.steps={t.steps}; expected a value "
                        f"<= {t.steps} (e.g. train.warmup_steps={t.steps // 10})")
    for k in ("data", "fsdp", "tensor"):
        if getattr(m, k) == 0:
            problems.append(f"mesh.{k}: 0 is not allowed; expected a positive size or -1 (the remaining devices)")
    if sum(getattr(m, k) == -1 for k in ("data", "fsdp", "tensor")) > 1:
        problems.append("mesh: at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    _check_file(cfg.data.train, "data.train", problems)
    try:
        _records.check_columns(cfg.data.columns)
    except ValueError as e:
        problems.append(f"data.{e}")
    if cfg.data.eval is not None:
        _check_file(cfg.data.eval, "data.eval", problems)
    if cfg.model.path is not None:
        _check_file(cfg.model.path, "model.path", problems, want_dir=True)
    else:
        _check_file(cfg.model.pretrain.data, "model.pretrain.data", problems)
        n = len(problems)
        _check_model_init(cfg.model.init, problems)
        if len(problems) == n:
            _check_family_config(cfg.model.init, problems, cfg.model.param_dtype)
        if cfg.model.pretrain.warmup_steps > cfg.model.pretrain.steps:
            problems.append(f"model.pretrain.warmup_steps: {cfg.model.pretrain.warmup_steps} is more than "
                            f"model.pretrain.steps={cfg.model.pretrain.steps}; expected a value <= "
                            f"{cfg.model.pretrain.steps}")
    if cfg.tokenizer.path is not None:
        _check_file(cfg.tokenizer.path, "tokenizer.path", problems, want_dir=True)


def _drop_removed_keys(data: dict, problems: list) -> None:
    """Keys of older configs: ``lora.layout`` no longer means anything (the kernels of lora_jax's
    models are always ``(in, out)``): its old default ``auto`` is dropped silently (a saved run's
    config.yaml), any other value is a problem, since it would now be ignored.
    ``train.chunked_loss`` became ``train.loss``: true reads as ``chunked``, false as ``plain``.
    ``data.packing`` true/false reads as ``documents``/``none``."""
    lora = data.get("lora")
    if isinstance(lora, dict) and "layout" in lora:
        lora = dict(lora)
        value = lora.pop("layout")
        data["lora"] = lora
        if value != "auto":
            problems.append(f"lora.layout: {_short(value)} is no longer a setting: lora_jax's models store every "
                            "kernel (in, out) and their layer stacks are known, so the layout is never ambiguous; "
                            "remove the key")
    d = data.get("data")
    if isinstance(d, dict) and isinstance(d.get("packing"), bool):  # became documents | stream | none
        data["data"] = {**d, "packing": "documents" if d["packing"] else "none"}
    train = data.get("train")
    if isinstance(train, dict) and "chunked_loss" in train:  # became train.loss (chunked | plain | auto)
        train = dict(train)
        value = train.pop("chunked_loss")
        data["train"] = train
        if not isinstance(value, bool):
            problems.append(f"train.chunked_loss: {_short(value)} is no longer a setting; use train.loss (chunked, "
                            "plain or auto)")
        elif train.setdefault("loss", "chunked" if value else "plain") != ("chunked" if value else "plain"):
            problems.append(f"train.chunked_loss: {value} contradicts train.loss={train['loss']!r}; "
                            "train.chunked_loss is no longer a setting, remove it")


def from_dict(data: dict, *, check_files: bool = True) -> Config:
    """Build and validate a `Config` from nested dicts (missing keys keep their defaults).

    Raises:
      ConfigError: listing every problem found.
    """
    problems: list[str] = []
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping of sections (model, data, lora, train, ...), got "
                          f"{type(data).__name__} {_short(data)}")
    data = dict(data or {})
    _drop_removed_keys(data, problems)
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("init"), dict):
        init = model["init"]
        if init.get("arch", _default_init()["arch"]) == _default_init()["arch"]:
            # keys given for the default family merge into its defaults; another family starts empty
            data["model"] = {**model, "init": {**_default_init(), **init}}
    cfg = _build(Config, data, "", problems)
    if isinstance(cfg.out_dir, str):  # ~ in every path setting (the others expand where they are read)
        cfg.out_dir = os.path.expanduser(cfg.out_dir)
    if not problems:
        _check_names(cfg, problems)
        _check_lora_patterns(cfg.lora, problems)
    if not problems and check_files:
        _cross_checks(cfg, problems)
    if not problems and cfg.adapters is not None:
        _check_adapters(cfg, problems, check_files)
    if problems:
        raise ConfigError(problems)
    return cfg


def _adapter_entry(cfg: Config, j: int, entry: dict, problems: list, check_files: bool) -> Optional[tuple]:
    """``(name, Config)`` of ``adapters[j]``: the run's config with the entry's sections over it
    (problems appended, named ``adapters[j]``; None when there are any)."""
    from ..optim import FROZEN
    from ..weight import AdapterSettings

    where = f"adapters[{j}]"
    name = entry.get("name")
    try:
        AdapterSettings.of({"name": name}, where=where)
    except (TypeError, ValueError) as e:
        problems.append(f"{where}.name: {e} (each adapter needs a name: it names its export, adapters/<name>)")
        return None
    if name in (".", "..", FROZEN) or any(c in name for c in "/\\\x00") or name.startswith("-"):
        problems.append(f"adapters[{j}].name: {name!r} cannot name an adapter of a run (its export is "
                        f"adapters/<name>, --adapter <name> chooses it); expected a name without '/', '\\' or "
                        f"NUL, not starting with '-', not '.', '..' or {FROZEN!r}")
        return None
    where = f"adapters[{j}] ({name})"
    n = len(problems)
    over = {}
    for section, v in entry.items():
        if section == "name":
            continue
        if section not in ADAPTER_KEYS:
            problems.append(f"{where}: unknown key {section!r}; an adapter sets name and "
                            f"{', '.join(ADAPTER_KEYS)} (the rest is shared by every adapter of the run)"
                            + _suggest(str(section), ADAPTER_KEYS))
            continue
        if not isinstance(v, dict):
            problems.append(f"{where}.{section}: expected a mapping, got {_short(v)}")
            continue
        for key in v:
            if key not in ADAPTER_KEYS[section]:
                problems.append(f"{where}.{section}.{key}: not set per adapter; an adapter sets {section}."
                                f"{{{', '.join(ADAPTER_KEYS[section])}}}, the rest of {section} is the run's own"
                                + _suggest(str(key), ADAPTER_KEYS[section]))
        over[section] = dict(v)
    if len(problems) > n:
        return None
    data = deep_update(yaml.safe_load(yaml.safe_dump({**to_dict(cfg), "adapters": None})), over)
    try:
        return name, from_dict(data, check_files=check_files)
    except ConfigError as e:
        problems.extend(f"{where}: {p}" for p in e.problems)
        return None


def _check_adapters(cfg: Config, problems: list, check_files: bool = True) -> None:
    """The ``adapters`` list: each entry valid over the run's config, names unique, and what
    several adapters in one step cannot do refused."""
    from ..variants import LORA, get_variant

    if not cfg.adapters:
        problems.append("adapters: an empty list; give at least one adapter, or null for the run's one adapter")
        return
    if cfg.lora.modules_to_save:
        problems.append(f"lora.modules_to_save: {cfg.lora.modules_to_save!r} with adapters: modules trained in full "
                        "belong to no one adapter; train them in a run of one adapter")
    seen = {}
    for j, entry in enumerate(cfg.adapters):
        got = _adapter_entry(cfg, j, entry, problems, check_files)
        if got is None:
            continue
        name, one = got
        if name in seen:
            problems.append(f"adapters[{j}].name: {name!r} is also adapters[{seen[name]}]'s name; names must differ")
        seen.setdefault(name, j)
        kind = get_variant(one.lora.variant)
        if not (kind is LORA or (kind.factorized and kind.combines)):
            problems.append(f"adapters[{j}] ({name}).lora.variant: {one.lora.variant!r} cannot share a batch with "
                            "other adapters (per-row routing needs a factorized variant, e.g. lora)")


def adapter_configs(cfg: Config) -> list[tuple[str, Config]]:
    """``[(name, Config)]`` of a run with ``adapters``: each adapter's whole config (the run's, with
    the entry's ``lora``/``data``/``train`` keys over it; what its run alone would be);
    ``[]`` for a run of one adapter.

    Raises:
      ConfigError: an entry that is not valid (`load_config` has checked them already).
    """
    if cfg.adapters is None:
        return []
    problems: list[str] = []
    out = [_adapter_entry(cfg, j, e, problems, False) for j, e in enumerate(cfg.adapters)]
    if problems:
        raise ConfigError(problems)
    return out


# ------------------------------------------------------------------------------------------
# names, files, overrides
# ------------------------------------------------------------------------------------------


def _conf_dir():
    return resources.files("lora_jax").joinpath("conf")


def config_names() -> list[str]:
    """Names of the shipped configs (``lora_jax/conf/*.yaml``)."""
    return sorted(f.name[:-5] for f in _conf_dir().iterdir() if f.name.endswith(".yaml"))


def _locate(name_or_path: str) -> tuple[str, str]:
    """``(path, name)`` of a config given by name (shipped or ``./conf/NAME.yaml``) or by path."""
    if name_or_path.endswith((".yaml", ".yml")) or os.sep in name_or_path:
        if not os.path.isfile(name_or_path):
            raise ConfigError(f"config file not found: {name_or_path!r}")
        return name_or_path, os.path.splitext(os.path.basename(name_or_path))[0]
    local = os.path.join("conf", name_or_path + ".yaml")
    if os.path.isfile(local):
        return local, name_or_path
    shipped = _conf_dir().joinpath(name_or_path + ".yaml")
    if shipped.is_file():
        return str(shipped), name_or_path
    names = config_names()
    raise ConfigError(f"unknown config {name_or_path!r}{_suggest(name_or_path, names)} "
                      f"(shipped configs: {', '.join(names)}; or give a path to a .yaml file)")


def _set_dotted(tree: dict, dotted: str, value, problems):
    parts = dotted.split(".")
    node = tree
    for j, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            problems.append(f"override {dotted!r}: {'.'.join(parts[:j + 1])!r} is not a section")
            return
        node = nxt
    node[parts[-1]] = value


def _hint_of(dotted: str):
    """``(type, field metadata)`` of the setting ``dotted`` names (``train.lr`` -> float), or None when it names none
    (a key inside ``model.init``, an unknown key: those are reported by `from_dict`)."""
    cls, tp, meta = Config, None, {}
    for part in dotted.split("."):
        if cls is None or not dataclasses.is_dataclass(cls):
            return None, {}
        tp = _hints(cls).get(part)
        if tp is None:
            return None, {}
        meta = next((dict(f.metadata) for f in dataclasses.fields(cls) if f.name == part), {})
        cls = tp if dataclasses.is_dataclass(tp) else None
    return tp, meta


def _override_value(key: str, raw: str):
    """An override's value. A text setting (a path, a name: a string, or a list of them) takes it as
    typed, so ``out_dir=runs/exp #2`` keeps its ``#2``, ``~`` stays the home directory and a newline
    stays a newline; ``null``, a quoted string and a ``[list]`` are read as YAML there too. Every
    other value is read as YAML (``train.lr=1e-4``, ``lora.rslora=true``); text that is not YAML
    stays text."""
    tp, meta = _hint_of(key)
    args = set(typing.get_args(tp)) if typing.get_origin(tp) is Union else {tp}
    args.discard(type(None))
    # a setting of fixed choices (data.packing=false, as before) is read as YAML
    text = bool(args) and args <= {str, list} and str in args and not meta.get("choices")
    s = raw.strip()
    if text and s != "null" and not s.startswith(("'", '"')) and not (s.startswith("[") and list in args):
        return raw
    try:
        return yaml.safe_load(raw) if s else None
    except Exception:  # noqa: BLE001 - not YAML (PyYAML also raises ValueError, RecursionError): a string
        return raw


def parse_overrides(overrides) -> tuple[dict, list[str]]:
    """``["a.b=1", ...]`` to a nested dict (see `_override_value`), plus the problems found."""
    out: dict = {}
    problems = []
    for o in overrides or ():
        key, sep, raw = o.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"override {o!r}: expected key=value, e.g. train.steps=20")
            continue
        value = _override_value(key, raw)
        big = yaml_size_problem(value, f"override {key}")
        if big:
            problems.append(big)
            continue
        _set_dotted(out, key, value, problems)
    return out, problems


def deep_update(base: dict, new: dict) -> dict:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = v
    return base


def load_config(name_or_path: Optional[str] = None, overrides=(), *, check_files: bool = True) -> Config:
    """The config for ``lora-jax train [CONFIG] [key=value ...]``.

    Args:
      name_or_path: a shipped config name (``default``), ``./conf/NAME.yaml``, or a YAML path;
        None is the default run.
      overrides: dotted ``key=value`` strings: text settings take the value as typed, others read
        it as YAML (``lora.targets=[q_proj,v_proj]``, ``train.lr=1e-4``).
      check_files: check that data/model paths exist.

    Raises:
      ConfigError: one error listing every problem (unknown keys with suggestions, types, ranges,
        missing files).
    """
    data: dict = {}
    name = "default"
    if name_or_path is not None:
        path, name = _locate(name_or_path)
        try:
            with open(path, encoding="utf-8") as fh:
                data = load_yaml(fh, path)
        except ConfigError:
            raise
        except OSError as e:
            raise ConfigError(f"{path}: cannot read it ({e})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        except RecursionError:
            raise ConfigError(f"{path}: not usable YAML (nested too deeply)") from None
        except Exception as e:  # noqa: BLE001 - PyYAML's constructors raise e.g. ValueError for 2021-02-30
            raise ConfigError(f"{path}: not valid YAML ({type(e).__name__}: {e})") from None
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top, got {type(data).__name__}")
    over, problems = parse_overrides(overrides)
    if problems:
        raise ConfigError(problems)
    data = deep_update(data, over)
    data.setdefault("name", name)
    return from_dict(data, check_files=check_files)

"""Which leaves of a parameter tree get LoRA, and with which rank, alpha, init and layout.

A leaf is addressed by its *path*: the ``/``-joined keys from the root, e.g.
``transformer/h/0/attn/c_attn/kernel``. (An ``nnx.State`` leaf's trailing ``value`` is dropped, so
``linear/kernel/value`` reads ``linear/kernel``.) The *module path* is the path without its last
component (``transformer/h/0/attn/c_attn``) and the *leaf name* is that last component.

Targets are given three ways, as in PEFT:

* a list of module names, matched as a suffix of the module path (or the leaf path) at ``/``
  boundaries: ``["q_proj", "v_proj"]`` or ``["attn/c_attn"]`` (``.`` works as a separator too);
* one string: a plain name (letters, digits, ``_ . / -``) is a module name as above; any other
  string is a regular expression that must match the whole module path or the whole leaf path
  (PEFT's rule for a string ``target_modules``);
* ``"all-linear"``: every floating ``kernel``/``weight`` leaf with at least two (unstacked) axes,
  except embeddings and output heads (``lm_head``, ``classifier``, ``score``, ...) unless
  ``include_head=True``.

A match on a module path selects that module's kernel-like leaves (``kernel``, ``weight``, ``w``,
``embedding``); a match on a full leaf path selects that leaf whatever its name. Only floating
leaves with at least two axes beyond the stack axes are ever selected.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import jax
import numpy as np

from .weight import AdapterSettings

__all__ = ["Rule", "Rules", "Target", "path_str", "key_str", "ALL_LINEAR"]

ALL_LINEAR = "all-linear"
_KERNEL_NAMES = frozenset({"kernel", "weight", "w"})
_EMBED_NAMES = frozenset({"embedding", "embeddings"})
_HEAD_NAMES = frozenset({"lm_head", "head", "classifier", "score", "qa_outputs", "embed_out", "output_layer",
                         "logits", "output_head", "cls"})
_EMBED_MODULE = re.compile(r"(^|_)(embed|embeddings|embed_tokens|wte|wpe|word_embeddings|position_embeddings|"
                           r"token_type_embeddings|tok_embeddings)($|_)")
_DEFAULT_LAYER_PATTERNS = ("layers", "layer", "h", "block", "blocks", "decoder_layers", "encoder_layers")
_LAYOUTS = ("in_out", "out_in")
_PLAIN_NAME = re.compile(r"[\w./-]+")

TargetSpec = Union[str, Sequence[Union[str, "Rule"]], "Rule"]


def key_str(k) -> str:
    """One key-path entry as text: a dict key, a sequence index or an attribute name."""
    tu = jax.tree_util
    if isinstance(k, tu.DictKey):
        return str(k.key)
    if isinstance(k, tu.SequenceKey):
        return str(k.idx)
    if isinstance(k, tu.GetAttrKey):
        return str(k.name)
    if isinstance(k, tu.FlattenedIndexKey):
        return str(k.key)
    return str(k).strip(".[]'\"")


def path_str(keypath: Sequence[Any]) -> str:
    """The ``/``-joined path of a JAX key path (nnx ``Variable.value`` suffix dropped).

    >>> import jax
    >>> path_str(jax.tree_util.tree_flatten_with_path({"a": [0, {"kernel": 1}]})[0][1][0])
    'a/1/kernel'
    """
    parts = [key_str(k) for k in keypath]
    if len(parts) > 1 and parts[-1] in ("value", "raw_value") and isinstance(keypath[-1], jax.tree_util.GetAttrKey):
        parts = parts[:-1]
    return "/".join(parts)


def _names(x) -> tuple[str, ...]:
    if x is None:
        return ()
    if isinstance(x, str):
        return (x,)
    return tuple(x)


def _compile(pattern: str, what: str) -> re.Pattern:
    if not isinstance(pattern, str):
        raise TypeError(f"{what}: expected a string pattern, got {type(pattern).__name__} {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{what}: {pattern!r} is not a valid regular expression ({e})") from None


def _suffix_match(name: str, path: str) -> bool:
    name = name.replace(".", "/").strip("/")
    if not name:
        return False
    return path == name or path.endswith("/" + name)


class _Matcher:
    """A compiled target: regex (full match), module names (suffix), or all-linear."""

    def __init__(self, spec, what: str):
        self.spec = spec
        if isinstance(spec, str):
            if spec == ALL_LINEAR:
                self.kind, self.regex, self.names = "all", None, ()
            elif _PLAIN_NAME.fullmatch(spec):
                self.kind, self.regex, self.names = "names", None, (spec,)
            else:
                self.kind, self.regex, self.names = "regex", _compile(spec, what), ()
        elif isinstance(spec, (list, tuple, set, frozenset)):
            names = tuple(spec)
            bad = [n for n in names if not isinstance(n, str) or not n]
            if bad:
                raise TypeError(f"{what}: module names must be non-empty strings, got {bad!r}")
            self.kind, self.regex, self.names = "names", None, names
        else:
            raise TypeError(f"{what}: expected a regex string, a list of module names or {ALL_LINEAR!r}, "
                            f"got {type(spec).__name__} {spec!r}")

    def __call__(self, path: str, include_head: bool = False) -> bool:
        module = path.rpartition("/")[0]
        leaf = path.rpartition("/")[2]
        # a match on the module path selects its kernel-like leaves (not a 2-D DenseGeneral bias);
        # a match on the leaf path itself selects that leaf whatever its name
        kernel_like = leaf in _KERNEL_NAMES or leaf in _EMBED_NAMES
        if self.kind == "regex":
            return bool(self.regex.fullmatch(path) or (kernel_like and module and self.regex.fullmatch(module)))
        if self.kind == "names":
            return any(_suffix_match(n, path) or (kernel_like and _suffix_match(n, module)) for n in self.names)
        # all-linear
        if leaf not in _KERNEL_NAMES:
            return False
        comps = module.split("/") if module else []
        if any(_EMBED_MODULE.search(c) for c in comps):
            return False
        if not include_head and any(c in _HEAD_NAMES for c in comps):
            return False
        return True

    def under(self, path: str) -> bool:
        """True when a module on ``path`` (any ancestor of the leaf, or the leaf itself) matches."""
        comps = path.split("/")
        prefixes = ["/".join(comps[:k]) for k in range(1, len(comps) + 1)]
        if self.kind == "regex":
            return any(self.regex.fullmatch(p) for p in prefixes)
        if self.kind == "names":
            return any(_suffix_match(n, p) for n in self.names for p in prefixes)
        return False

    def describe(self) -> str:
        if self.kind == "all":
            return repr(ALL_LINEAR)
        if self.kind == "regex":
            return f"regex {self.spec!r}"
        return f"names {list(self.names)!r}"


def _layer_index(path: str, patterns: Sequence[str]) -> Optional[int]:
    comps = path.split("/")
    for j, c in enumerate(comps):
        for p in patterns:
            if c == p and j + 1 < len(comps) and comps[j + 1].isdigit():
                return int(comps[j + 1])
            m = re.fullmatch(re.escape(p) + r"_(\d+)", c)
            if m:
                return int(m.group(1))
    return None


_RULE_FREE = ("layer_mask", "name", "active")  # settings that rules do not set: `layers`, `lora.add` do


def _rule_settings(settings: Mapping[str, Any], what: str) -> tuple[tuple[str, Any], ...]:
    """Adapter settings given to a `Rule` or `Rules` by name (or alias), validated; canonical items."""
    unknown = [k for k in settings if AdapterSettings.field_of(k) not in AdapterSettings.names()]
    if unknown:
        raise TypeError(f"{what}: unknown option(s) {unknown}; adapter settings are "
                        f"{[n for n in AdapterSettings.names() if n not in _RULE_FREE]} (or "
                        f"{sorted(AdapterSettings.ALIASES) + sorted(AdapterSettings.flags())})")
    bad = [k for k in settings if AdapterSettings.field_of(k) in _RULE_FREE]
    if bad:
        raise TypeError(f"{what}: {bad} cannot be given to rules (layers=... selects layers; lora.add names "
                        "adapters and sets active)")
    parsed, problems = AdapterSettings.parse(settings, where=what)
    if problems:
        raise ValueError("; ".join(problems))
    return tuple((AdapterSettings.field_of(k), getattr(parsed, AdapterSettings.field_of(k)))
                 for k in settings)


@dataclasses.dataclass(frozen=True, init=False)
class Rule:
    """One target with its own options; what it leaves out comes from the enclosing `Rules`.

    Args:
      targets: module names (suffix match), a regex (full match) or ``"all-linear"``.
      init: as in `Rules`.
      layout: ``"in_out"`` (Flax: ``(in, out)``; N-d: every axis but the last is input),
        ``"out_in"`` (transformers' Flax GPT-2 kernels and PyTorch/Equinox weights: ``(out, in)``),
        or explicit letters ``i``/``o`` per unstacked axis (``"ioo"`` for a ``DenseGeneral`` kernel
        ``(in, heads, head_dim)``).
      in_axes: input axes of the unstacked kernel (overrides ``layout``; the rest are outputs).
      stack_axes: number of leading stack axes (``nn.scan`` layer stacks): one adapter per index.
      exclude: names/regex this rule never matches.
      **settings: `lora.AdapterSettings` fields for these targets (``rank``, ``alpha``, ``rslora``,
        ``dropout``, ``out_slices``; the older ``use_rslora``, ``enable_lora`` too).

    Example:
      >>> import lora_jax as lora
      >>> rules = lora.Rules([lora.Rule(["c_attn", "c_proj"], layout="out_in"), lora.Rule("wte", rank=4)], rank=8)
    """

    targets: Any
    settings: tuple = ()
    init: Any = None
    layout: Optional[str] = None
    in_axes: Optional[tuple[int, ...]] = None
    stack_axes: Optional[int] = None
    exclude: Any = None

    def __init__(self, targets, *, init=None, layout=None, in_axes=None, stack_axes=None, exclude=None,
                 settings=(), **more):
        values = {**dict(settings), **more}
        for k, v in (("targets", targets), ("settings", _rule_settings(values, f"Rule({targets!r})")),
                     ("init", init), ("layout", layout), ("in_axes", None if in_axes is None else tuple(in_axes)),
                     ("stack_axes", stack_axes), ("exclude", exclude)):
            object.__setattr__(self, k, v)


@dataclasses.dataclass(frozen=True)
class Target:
    """What `lora.init` builds a `LoraWeight` from: one selected leaf's resolved options."""

    path: str
    settings: AdapterSettings
    layout: str
    init: Any = "kaiming"
    a_dtype: Any = "float32"


def _check_init(init, what):
    if init is False or callable(init) or isinstance(init, str):
        return init
    raise TypeError(f"{what}: init must be a name (e.g. 'kaiming', 'gaussian'), False or a callable, got {init!r}")


class Rules:
    """Which leaves get LoRA and how.

    Args:
      targets: module names (PEFT-style suffix match), a regex (full match on the module or leaf
        path), ``"all-linear"``, a `Rule`, or a list mixing `Rule` objects and names.
      init: ``"kaiming"`` (PEFT's default: ``a`` Kaiming-uniform with a=sqrt(5), ``b`` zero),
        ``"gaussian"`` (``a`` normal with std ``1/r``), ``False`` (both random: a non-identity
        start, for tests), ``"pissa"``, ``"pissa_niter_N"``, ``"olora"``, or a callable
        ``(key, w, layout, rank, dtype, scale) -> (a, b, w)`` (see `lora_jax.initializers`).
      exclude: names or a regex never to match.
      rank_pattern, alpha_pattern: ``{name_or_regex: value}`` overrides, first match wins.
      layers: only these layer indices (an int or a list). The index is read from the path
        (``.../layers/3/...``, ``.../h/3/...``, ``layers_3``); for stacked kernels it selects
        stack indices and the others get no delta (the adapter's ``layer_mask``).
      layers_pattern: the path component that precedes the layer index (default: common names).
      layout, in_axes, stack_axes: kernel layout defaults (see `Rule`).
      a_dtype: dtype of ``a``/``b``: ``"float32"`` (default, even for a bf16 base) or ``"base"``.
      include_head: let ``"all-linear"`` select output heads too.
      bias: ``"none"``, ``"all"`` (every ``bias`` leaf trains in full) or ``"lora_only"`` (the
        biases of the modules that get LoRA), as PEFT.
      modules_to_save: module names (or a regex) whose every leaf trains in full and is saved with
        the adapter (a classification head), as PEFT.
      **settings: the adapter's `lora.AdapterSettings` (defaults as there, PEFT's):

        * ``rank`` (PEFT ``r``; 8), ``alpha`` (``lora_alpha``; 8): the delta is scaled by ``alpha / r``;
        * ``rslora`` (or ``use_rslora``): scale by ``alpha / sqrt(r)``;
        * ``dropout``: LoRA dropout on the adapter's input (applied by `lora.wrap` given an rng);
        * ``out_slices`` (or loralib's ``enable_lora``): split the output features into equal
          slices and give a delta only to the True ones (``[True, False, True]``: q and v of a
          fused q|k|v);
        * ``variant``: ``"lora"`` (plain), ``"dora"`` (or PEFT's ``use_dora=True``: a trainable
          magnitude ``m`` per output feature, initialised to the kernel's norm over its input
          axes, so the model starts unchanged) or a variant added with
          `lora_jax.extend.register_variant`.

    Example:
      >>> import lora_jax as lora
      >>> rules = lora.Rules(["q_proj", "v_proj"], rank=16, alpha=32)
      >>> rules.resolve("model/layers/0/self_attn/q_proj/kernel", (64, 64)).settings.rank
      16
    """

    def __init__(self, targets: TargetSpec = ALL_LINEAR, *, init: Any = "kaiming", exclude: Any = None,
                 rank_pattern: Optional[Mapping[str, int]] = None, alpha_pattern: Optional[Mapping[str, float]] = None,
                 layers: Union[int, Sequence[int], None] = None, layers_pattern: Union[str, Sequence[str], None] = None,
                 layout: str = "in_out", in_axes: Optional[Sequence[int]] = None, stack_axes: int = 0,
                 a_dtype: Any = "float32", include_head: bool = False, bias: str = "none",
                 modules_to_save: Any = None, **settings):
        self.settings = AdapterSettings(**dict(_rule_settings(settings, "Rules")))
        self.init = _check_init(init, "Rules")
        if bias not in ("none", "all", "lora_only"):
            raise ValueError(f"Rules: bias must be 'none', 'all' or 'lora_only', got {bias!r}")
        self.bias = bias
        self.modules_to_save = None if modules_to_save is None else _Matcher(modules_to_save,
                                                                              "Rules(modules_to_save=...)")
        self.layout = layout
        self.in_axes = None if in_axes is None else tuple(int(a) for a in in_axes)
        if isinstance(stack_axes, bool) or not isinstance(stack_axes, (int, np.integer)) or stack_axes < 0:
            raise ValueError(f"Rules: stack_axes must be a non-negative integer, got {stack_axes!r}")
        self.stack_axes = int(stack_axes)
        if a_dtype not in ("float32", "base"):
            try:
                a_dtype = np.dtype(a_dtype)
            except TypeError:
                raise ValueError(f"Rules: a_dtype must be 'float32', 'base' or a dtype, got {a_dtype!r}") from None
        self.a_dtype = a_dtype
        self.include_head = bool(include_head)
        self.exclude = None if exclude is None else _Matcher(exclude, "Rules(exclude=...)")
        if layers is None:
            self.layers = None
        else:
            ls = (layers,) if isinstance(layers, (int, np.integer)) else tuple(layers)
            if not ls or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0 for v in ls):
                raise ValueError(f"Rules: layers must be a non-negative int or a non-empty list of them, got {layers!r}")
            self.layers = frozenset(int(v) for v in ls)
        self.layers_pattern = _DEFAULT_LAYER_PATTERNS if layers_pattern is None else _names(layers_pattern)
        self.rank_pattern = self._patterns(rank_pattern, "rank")
        self.alpha_pattern = self._patterns(alpha_pattern, "alpha")

        if isinstance(targets, Rule):
            targets = [targets]
        if isinstance(targets, (list, tuple)) and any(isinstance(t, Rule) for t in targets):
            rules = [t if isinstance(t, Rule) else Rule([t]) for t in targets]
        else:
            rules = [Rule(targets)]
        self.rules = tuple(rules)
        self._matchers = []
        for j, r in enumerate(self.rules):
            what = f"Rules rule {j} ({r.targets!r})"
            if r.init is not None:
                _check_init(r.init, what)
            ex = None if r.exclude is None else _Matcher(r.exclude, what + " exclude")
            self._matchers.append((_Matcher(r.targets, what), ex))
        # layout strings are checked here for their letters; their fit is checked per leaf
        for lay in [self.layout] + [r.layout for r in self.rules if r.layout is not None]:
            if not isinstance(lay, str) or (lay not in _LAYOUTS and set(lay) - set("sio")):
                raise ValueError(f"Rules: layout must be 'in_out', 'out_in' or letters 's'/'i'/'o' per axis, got {lay!r}")

    @staticmethod
    def _patterns(patterns, field):
        what = f"{field}_pattern"
        if patterns is None:
            return ()
        if not isinstance(patterns, Mapping):
            raise TypeError(f"Rules: {what} must be a mapping of name/regex -> value, got {type(patterns).__name__}")
        out = []
        for k, v in patterns.items():
            value = getattr(AdapterSettings.of({field: v}, where=f"Rules({what}[{k!r}])"), field)
            out.append((k, _compile(k, f"Rules({what})") if not _PLAIN_NAME.fullmatch(k) else None, value))
        return tuple(out)

    # -- description ------------------------------------------------------------------------
    def describe(self) -> str:
        """The target patterns, for error messages."""
        parts = [m.describe() for m, _ in self._matchers]
        if self.exclude is not None:
            parts.append(f"exclude {self.exclude.describe()}")
        if self.layers is not None:
            parts.append(f"layers {sorted(self.layers)}")
        return "; ".join(parts)

    def __repr__(self) -> str:
        return f"Rules({self.describe()}, rank={self.settings.rank}, alpha={self.settings.alpha:g})"

    # -- resolution -------------------------------------------------------------------------
    def _pattern_value(self, table, path, default):
        module = path.rpartition("/")[0]
        for key, rx, value in table:
            if rx is None:
                if _suffix_match(key, module) or _suffix_match(key, path):
                    return value
            elif rx.fullmatch(path) or (module and rx.fullmatch(module)):
                return value
        return default

    def matches(self, path: str) -> Optional[int]:
        """Index of the first rule whose targets match ``path`` (exclusions applied), else None."""
        if self.exclude is not None and self.exclude(path, True):
            return None
        for j, (m, ex) in enumerate(self._matchers):
            if ex is not None and ex(path, True):
                continue
            if m(path, self.include_head):
                return j
        return None

    def _match(self, path: str, shape: Sequence[int], dtype: Any):
        """``(rule index, stack axes, layer mask)`` when the leaf is selected, else None."""
        j = self.matches(path)
        if j is None:
            return None
        rule = self.rules[j]
        if not np.issubdtype(np.dtype(dtype), np.floating) and np.dtype(dtype).name != "bfloat16":
            return None
        stack = self.stack_axes if rule.stack_axes is None else int(rule.stack_axes)
        if len(shape) - stack < 2:
            return None
        layer_mask = None
        if self.layers is not None:
            if stack:
                layer_mask = tuple(k in self.layers for k in range(int(shape[0])))
                if not any(layer_mask):
                    return None
            else:
                idx = _layer_index(path, self.layers_pattern)
                if idx is None or idx not in self.layers:
                    return None
        return j, stack, layer_mask

    def selects(self, path: str, shape: Sequence[int], dtype: Any = np.float32) -> Optional[int]:
        """The number of stack axes of the leaf at ``path`` when the rules select it (targets,
        exclusions, a floating dtype, two axes beyond the stack, ``layers``), else None."""
        found = self._match(path, tuple(shape), dtype)
        return None if found is None else found[1]

    def resolve(self, path: str, shape: Sequence[int], dtype: Any = np.float32) -> Optional[Target]:
        """The options for the leaf at ``path`` with ``shape``, or None when it is not selected.

        Raises:
          ValueError: when the leaf is selected but its options do not fit it (rank too large,
            layout of the wrong length, ...). The message names the leaf.
        """
        shape = tuple(int(d) for d in shape)
        found = self._match(path, shape, dtype)
        if found is None:
            return None
        j, stack, layer_mask = found
        rule = self.rules[j]
        layout = self._layout(path, shape, stack, rule)
        base = dataclasses.replace(self.settings, **dict(rule.settings))
        settings = dataclasses.replace(base, layer_mask=layer_mask,
                                       rank=self._pattern_value(self.rank_pattern, path, base.rank),
                                       alpha=self._pattern_value(self.alpha_pattern, path, base.alpha))
        n_in = int(np.prod([d for d, k in zip(shape, layout) if k == "i"]))
        n_out = int(np.prod([d for d, k in zip(shape, layout) if k == "o"]))
        if settings.rank > min(n_in, n_out):
            raise ValueError(f"{path}: rank {settings.rank} is larger than min(in={n_in}, out={n_out}) for a kernel "
                             f"of shape {shape} with layout {layout!r}")
        slices = settings.out_slices
        if slices is not None and n_out % len(slices):
            raise ValueError(f"{path}: out_slices/enable_lora has {len(slices)} slices but the kernel has {n_out} "
                             f"output features (shape {shape}, layout {layout!r}), which they do not divide")
        return Target(path=path, settings=settings, layout=layout,
                      init=self._init_for(path, self.init if rule.init is None else rule.init),
                      a_dtype=self.a_dtype)

    @staticmethod
    def _init_for(path, init):
        # PEFT starts an embedding's adapter the other way round: A zero, B normal
        if path.rpartition("/")[2] in _EMBED_NAMES and (init is True or (isinstance(init, str) and
                                                                          init.lower() in ("kaiming", "default"))):
            return "embedding"
        return init

    def _layout(self, path, shape, stack, rule) -> str:
        n = len(shape) - stack
        in_axes = rule.in_axes if rule.in_axes is not None else (self.in_axes if rule.layout is None else None)
        layout = rule.layout if rule.layout is not None else self.layout
        if in_axes is not None:
            ax = set()
            for a in in_axes:
                if not -n <= a < n:
                    raise ValueError(f"{path}: in_axes {tuple(in_axes)} out of range for the unstacked kernel shape "
                                     f"{shape[stack:]}")
                ax.add(a % n)
            body = "".join("i" if k in ax else "o" for k in range(n))
        elif layout == "in_out":
            body = "i" * (n - 1) + "o"
        elif layout == "out_in":
            body = "o" + "i" * (n - 1)
        elif len(layout) == len(shape):
            return self._check(path, shape, layout)
        elif len(layout) == n:
            body = layout
        else:
            raise ValueError(f"{path}: layout {layout!r} has {len(layout)} letters but the kernel has shape {shape} "
                             f"({n} unstacked axes after {stack} stack axes)")
        return self._check(path, shape, "s" * stack + body)

    @staticmethod
    def _check(path, shape, layout):
        if "i" not in layout or "o" not in layout or set(layout) - set("sio"):
            raise ValueError(f"{path}: layout {layout!r} for shape {shape} needs at least one 'i' and one 'o' axis")
        return layout

    def fully_trained(self, leaves: Iterable[tuple[str, Sequence[int], Any]], lora_paths) -> set[str]:
        """Paths trained in full: leaves under ``modules_to_save`` modules and the biases ``bias`` asks for.

        Raises:
          ValueError: if a leaf is both a LoRA target and in ``modules_to_save``, or if
            ``modules_to_save`` matches nothing.
        """
        lora_modules = {p.rpartition("/")[0] for p in lora_paths}
        out = set()
        saved = set()
        for path, shape, dtype in leaves:
            module = path.rpartition("/")[0]
            if self.modules_to_save is not None and self.modules_to_save.under(path):
                if path in lora_paths:
                    raise ValueError(f"{path} is both a LoRA target and in modules_to_save; choose one")
                saved.add(path)
                out.add(path)
            elif path.rpartition("/")[2] == "bias" and path not in lora_paths and (
                    self.bias == "all" or (self.bias == "lora_only" and module in lora_modules)):
                out.add(path)
        if self.modules_to_save is not None and not saved:
            sample = [p for p, _, _ in leaves][:12]
            raise ValueError(f"modules_to_save {self.modules_to_save.describe()} matched no leaf; some paths that "
                             f"exist: {sample}")
        return out

    def resolve_all(self, leaves: Iterable[tuple[str, Sequence[int], Any]]) -> dict[str, Target]:
        """Resolve every ``(path, shape, dtype)``; raise if nothing is selected.

        Raises:
          ValueError: naming the patterns and a sample of the paths that exist.
        """
        leaves = list(leaves)
        out = {}
        for path, shape, dtype in leaves:
            t = self.resolve(path, shape, dtype)
            if t is not None:
                out[path] = t
        if not out:
            sample = [p for p, s, _ in leaves if len(s) >= 2][:12] or [p for p, _, _ in leaves][:12]
            raise ValueError(
                f"LoRA rules matched no kernel. Patterns: {self.describe()}. "
                f"Only floating leaves with >= 2 axes (after {self.stack_axes} stack axes) can be selected. "
                f"Some paths that exist: {sample}"
            )
        return out

"""An adapter bank: many adapters on one base, in one compiled program, swapped without recompiling.

A bank has ``slots`` slots over a fixed set of target kernels (chosen by `lora.Rules`) at a maximum
rank ``R``. Its tree (`AdapterBank.tree`) gives every target kernel a chain of ``slots`` adapters
named ``slot0``, ``slot1``, ... each of rank ``R`` and scale 1, so its structure, shapes and dtypes
never change: an adapter of rank ``r <= R`` goes into a slot as

    a_slot = [a, 0]         (rank columns r..R-1 zero)
    b_slot = [scale * b; 0] (its scale folded in: alpha / r, or alpha / sqrt(r) with rsLoRA)

so ``a_slot @ b_slot = scale * a @ b`` exactly, and a target it does not adapt gets zeros. A
per-layer ``layer_mask`` or ``out_slices`` is folded in the same way (zeros where it gives no delta).
Loading, swapping and clearing replace arrays only, so a function jitted over the tree compiles
once. ``lora.wrap(fn, adapter_ids=ids)`` runs each example with the adapter of its slot (``-1``,
or any id outside ``0..slots-1``, runs the base) in one batched computation; always route: without
``adapter_ids``, `lora.wrap` applies every slot at once (their sum). `lora_jax.models.generate`
takes ``adapter_ids`` too.

Example:
  >>> import jax, jax.numpy as jnp, numpy as np, lora_jax as lora
  >>> params = {"w": jnp.ones((4, 3))}
  >>> bank = lora.AdapterBank(params, lora.Rules("w", rank=2), slots=2, rank=4)
  >>> one = lora.init(params, lora.Rules("w", rank=2, alpha=4, init=False), 0)
  >>> bank.load(0, one, name="one")
  >>> f = lambda p, x: x @ p["w"]
  >>> x = jnp.ones((2, 4))
  >>> y = lora.wrap(f, adapter_ids=bank.ids(["one", None]))(bank.tree, x)
  >>> bool(np.allclose(y[0], lora.wrap(f)(one, x)[0], atol=1e-5)), bool(np.allclose(y[1], f(params, x)[1]))
  (True, True)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from .io.adapter import load_adapter
from .layout import check_layout, factor_shapes, pad_rank
from .rules import Rules, path_str
from .tree import is_array, lora_items
from .weight import AdapterSettings, LoraWeight, is_node, is_trainable

__all__ = ["AdapterBank", "Slot"]


@dataclasses.dataclass(frozen=True)
class Slot:
    """What one slot holds: the adapter's ``name``, where it came from (``source``), the kernels it
    adapts (``modules``, tree paths), its largest ``rank`` and its scales (one per distinct
    ``alpha / rank``)."""

    name: str
    source: str
    modules: tuple[str, ...]
    rank: int
    scales: tuple[float, ...]


def _positive_int(v, what):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"AdapterBank: {what} must be a positive integer, got {v!r}")
    return int(v)


class AdapterBank:
    """``slots`` adapters of rank at most ``rank`` on the kernels ``rules`` selects in ``params``.

    Args:
      params: the base parameters (plain arrays; no LoRA nodes).
      rules: a `lora.Rules` (or what `lora.Rules` takes as targets): which kernels the bank covers
        and their layouts. Its alpha is not used (each slot holds its adapter's own scale) and its
        rank only as `lora.Rules` checks it against each kernel. Or a mapping ``{tree path:
        layout}`` of the kernels (e.g. the union of the adapters to serve).
      slots: the number of slots ``K``.
      rank: the largest rank a slot holds, ``R``.
      dtype: the dtype of the slots' factors (float32).

    Raises:
      ValueError: for a non-positive ``slots`` or ``rank``, LoRA nodes in ``params``, or rules
        that select nothing.
    """

    def __init__(self, params, rules: Union[Rules, Mapping[str, str], Any], *, slots: int, rank: int,
                 dtype: Any = jnp.float32):
        self.n_slots = _positive_int(slots, "slots")
        self.rank = _positive_int(rank, "rank")
        self.dtype = jnp.dtype(dtype)
        flat, self._treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_node)
        nodes = [path_str(kp) for kp, leaf in flat if is_node(leaf)]
        if nodes:
            raise ValueError(f"AdapterBank: params must be the base model's, but hold LoRA nodes at {nodes[:3]}; "
                             "pass lora.merge(tree) for a merged base, or the params the adapters were made on")
        self._paths = [path_str(kp) for kp, _ in flat]
        self._leaves = [leaf for _, leaf in flat]
        self.params = params
        candidates = [(p, tuple(leaf.shape), leaf.dtype) for p, leaf in zip(self._paths, self._leaves)
                      if is_array(leaf)]
        if isinstance(rules, Mapping):
            shapes = {p: s for p, s, _ in candidates}
            bad = [p for p in rules if p not in shapes]
            if bad or not rules:
                raise ValueError(f"AdapterBank: {bad[:3] if bad else 'no'} kernel paths to cover; the paths must be "
                                 f"array leaves of params (e.g. {list(shapes)[:3]})")
            targets = {p: check_layout(lay, shapes[p], where=p) for p, lay in rules.items()}
        else:
            rules = rules if isinstance(rules, Rules) else Rules(rules)
            targets = {p: t.layout for p, t in rules.resolve_all(candidates).items()}
        self._layouts = targets
        self._shapes = {p: tuple(leaf.shape) for p, leaf in zip(self._paths, self._leaves) if p in targets}
        self._zeros = {p: tuple(jnp.zeros(s, self.dtype) for s in factor_shapes(self._shapes[p], self._layouts[p],
                                                                                 self.rank))
                       for p in targets}
        self._factors = [{} for _ in range(self.n_slots)]  # slot -> {path: (a, b)}; absent: zeros
        self._slots: list[Optional[Slot]] = [None] * self.n_slots
        self._settings = [AdapterSettings(rank=self.rank, alpha=float(self.rank), name=f"slot{k}")
                          for k in range(self.n_slots)]
        self.tree = self._build()

    # -- what it holds -------------------------------------------------------------------------
    @property
    def targets(self) -> tuple[str, ...]:
        """The tree paths of the kernels the bank covers."""
        return tuple(self._layouts)

    def slots(self) -> list[Optional[Slot]]:
        """What each slot holds (None: empty, it runs the base)."""
        return list(self._slots)

    def ids(self, names: Sequence[Optional[Union[str, int]]]) -> jax.Array:
        """Per-example slot ids for ``lora.wrap(adapter_ids=...)`` / ``generate``: each entry an
        adapter's name, a slot index, or None (the base, id ``-1``).

        Raises:
          ValueError: naming an entry that is no loaded adapter's name or a slot index.
        """
        by_name = {s.name: k for k, s in enumerate(self._slots) if s is not None}
        out = []
        for n in names:
            if n is None:
                out.append(-1)
            elif isinstance(n, str) and n in by_name:
                out.append(by_name[n])
            elif isinstance(n, (int, np.integer)) and not isinstance(n, bool) and 0 <= n < self.n_slots:
                out.append(int(n))
            else:
                raise ValueError(f"AdapterBank.ids: {n!r} is neither a loaded adapter ({sorted(by_name)}) nor a slot "
                                 f"index 0..{self.n_slots - 1} nor None (the base)")
        return jnp.asarray(out, jnp.int32)

    # -- changing what it holds ----------------------------------------------------------------
    def load(self, slot: int, adapter, *, name: Optional[str] = None) -> None:
        """Put an adapter into ``slot`` (replacing what it held), all of it or nothing.

        Args:
          slot: the slot index.
          adapter: a LoRA tree over these params (`lora.init`, `lora.load_adapter`,
            `lora_jax.hf.load_peft`, ...) with one active plain-LoRA adapter per kernel, or the
            path of a lora_jax adapter directory (`lora.save_adapter`). A PEFT directory loads
            with ``lora_jax.hf.load_peft(path, bank.params, model)``.
          name: the name to find it by in `ids` (default: the directory's name, else
            ``"slot<k>"``); unique in the bank.

        Raises:
          ValueError: naming the slot, the module and the limit, for an adapter of rank above the
            bank's, a kernel the bank does not cover, a variant other than plain LoRA, several
            active adapters on a kernel, fully trained leaves, a kernel of another shape or layout,
            or no adapter at all; nothing changes then.
          FileNotFoundError: for a path that is no adapter directory.
        """
        k = self._slot_index(slot, "load")
        source = "tree"
        if isinstance(adapter, (str, os.PathLike)):
            source = os.fspath(adapter)
            if os.path.isfile(os.path.join(source, "adapter_config.json")):
                raise ValueError(f"AdapterBank.load(slot {k}): {source!r} is a PEFT adapter directory; load it with "
                                 f"lora_jax.hf.load_peft(path, bank.params, model) and pass the tree")
            adapter = load_adapter(source, self.params)
        name = name if name is not None else (os.path.basename(os.path.normpath(source)) if source != "tree"
                                              else f"slot{k}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"AdapterBank.load(slot {k}): name must be a non-empty string, got {name!r}")
        taken = [j for j, s in enumerate(self._slots) if s is not None and s.name == name and j != k]
        if taken:
            raise ValueError(f"AdapterBank.load(slot {k}): slot {taken[0]} already holds an adapter named {name!r}; "
                             f"pass another name= or clear slot {taken[0]}")
        factors, ranks, scales, problems = {}, [], set(), []
        full = [path_str(kp) for kp, leaf in jax.tree_util.tree_flatten_with_path(adapter, is_leaf=is_node)[0]
                if is_trainable(leaf)]
        if full:
            problems.append(f"fully trained leaves (modules_to_save) {full[:3]} cannot go into a bank")
        for p, lw in lora_items(adapter):
            problem = self._check(p, lw)
            if problem:
                problems.append(f"{p}: {problem}")
                continue
            node = next(n for n in lw.chain() if n.active)
            factors[p] = self._padded(node)
            ranks.append(node.rank)
            scales.add(node.scale)
        if not factors and not problems:
            problems.append("the tree holds no LoRA weight")
        if problems:
            raise ValueError(f"AdapterBank.load(slot {k}): the adapter does not fit the bank ({len(self._layouts)} "
                             f"kernels, rank <= {self.rank}); slot {k} is unchanged:\n  " + "\n  ".join(problems))
        self._factors[k] = factors
        self._slots[k] = Slot(name, source, tuple(factors), max(ranks), tuple(sorted(scales)))
        self.tree = self._build()

    def clear(self, slot: int) -> None:
        """Empty ``slot``: its rows run the base model."""
        k = self._slot_index(slot, "clear")
        self._factors[k], self._slots[k] = {}, None
        self.tree = self._build()

    # -- internals -----------------------------------------------------------------------------
    def _slot_index(self, slot, what) -> int:
        if isinstance(slot, bool) or not isinstance(slot, (int, np.integer)) or not 0 <= slot < self.n_slots:
            raise ValueError(f"AdapterBank.{what}: slot must be an index in 0..{self.n_slots - 1}, got {slot!r}")
        return int(slot)

    def _check(self, p: str, lw: LoraWeight) -> Optional[str]:
        """Why the adapter ``lw`` at ``p`` cannot go into a slot (None: it can)."""
        if p not in self._layouts:
            sample = ", ".join(list(self._layouts)[:3])
            return f"not a kernel the bank covers (its {len(self._layouts)} targets: {sample}, ...)"
        active = [n for n in lw.chain() if n.active]
        if len(active) != 1:
            return (f"{len(active)} active adapters on this kernel ({[n.name for n in lw.chain()]}); load one "
                    "(lora.select)")
        node = active[0]
        if node.variant != "lora":
            return f"a {node.kind.label} adapter; a bank holds plain LoRA adapters"
        if tuple(lw.shape) != self._shapes[p]:
            return f"kernel shape {tuple(lw.shape)}, the bank's is {self._shapes[p]}"
        if node.layout != self._layouts[p]:
            return f"layout {node.layout!r}, the bank's is {self._layouts[p]!r}"
        if node.rank > self.rank:
            return f"rank {node.rank} is above the bank's rank {self.rank}"
        return None

    def _padded(self, node: LoraWeight) -> tuple[jax.Array, jax.Array]:
        """``(a, b)`` of ``node`` at the bank's rank: masks applied, its scale folded into ``b``."""
        a, b = pad_rank(node.effective_a().astype(jnp.float32),
                        node.effective_b().astype(jnp.float32) * jnp.float32(node.scale), node.layout, self.rank)
        return a.astype(self.dtype), b.astype(self.dtype)

    def _build(self):
        leaves = []
        for p, leaf in zip(self._paths, self._leaves):
            if p in self._layouts:
                for k in range(self.n_slots):
                    a, b = self._factors[k].get(p, self._zeros[p])
                    leaf = LoraWeight(leaf, a, b, layout=self._layouts[p], settings=self._settings[k])
            leaves.append(leaf)
        return jax.tree_util.tree_unflatten(self._treedef, leaves)

    def __repr__(self) -> str:
        held = ", ".join(f"{k}: {s.name}" for k, s in enumerate(self._slots) if s is not None) or "empty"
        return f"AdapterBank({len(self._layouts)} kernels, {self.n_slots} slots, rank {self.rank}; {held})"

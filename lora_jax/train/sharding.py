"""Device mesh and sharding rules for training: base params, LoRA factors, optimizer state, batches.

The mesh has the axes ``("data", "fsdp", "tensor")``. Rules:

* batches are split over ``data`` and ``fsdp`` together (their leading batch axis);
* a leading layer axis (the ``nn.scan`` stacks of `lora_jax.models`: a LoRA node's ``s`` layout
  letters, or a path in ``stacked``) is never split, so each scanned step reads its own layer
  locally; the rules below apply to the axes after it;
* a base kernel (2+ axes) is split on ``tensor`` Megatron-style when the mesh has a tensor axis:
  the output axis of column-parallel projections (``q_proj``, ``k_proj``, ``v_proj``,
  ``gate_proj``, ``up_proj``, ``c_attn``, ``c_fc``, ``lm_head``, ...), the input axis of
  row-parallel ones (``o_proj``, ``down_proj``, ``c_proj``, ...); then on ``fsdp`` along its
  largest remaining axis whose size divides by the ``fsdp`` size (the first one on a tie);
  vectors and scalars (per layer: a stacked norm scale ``(L, D)`` too) are replicated;
* a LoRA factor follows its kernel: ``a`` (``(*stack, *in, r)``) takes the kernel's stack and
  input-axis shardings, ``b`` (``(*stack, r, *out)``) its stack and output-axis shardings; the
  rank axis is replicated, so ``x @ a`` needs no more communication than ``x @ w``;
* optimizer state follows the parameter it belongs to (matched by key path and shape).

Example:
  >>> mesh = make_mesh(data=-1)
  >>> mesh.axis_names
  ('data', 'fsdp', 'tensor')
"""

from __future__ import annotations

import math
from typing import Collection, Mapping, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ..rules import path_str
from ..weight import LoraWeight, is_lora, map_chain

__all__ = ["AXES", "BATCH_AXES", "make_mesh", "kernel_spec", "lora_factor_specs", "param_shardings",
           "state_shardings", "batch_sharding", "replicated", "mesh_shape", "place"]

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
_SPLIT = {"embedding": "rows", "column": "o", "head": "o", "row": "i"}  # tensor-parallel axis by `Leaf.role`


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A ``("data", "fsdp", "tensor")`` mesh; one size may be -1 (the remaining devices).

    When the sizes multiply to fewer devices than there are, the first ones are used.

    Raises:
      ValueError: a size is 0 or below -1, more than one is -1, the product exceeds the device
        count, or -1 cannot be filled evenly.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    bad = {k: v for k, v in sizes.items() if not isinstance(v, (int, np.integer)) or v == 0 or v < -1}
    if bad:
        raise ValueError(f"mesh sizes must be positive or -1, got {bad}")
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {free}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if len(devices) % fixed:
            raise ValueError(f"mesh {sizes}: {len(devices)} devices do not divide by the fixed sizes' product {fixed}")
        sizes[free[0]] = len(devices) // fixed
    n = math.prod(sizes.values())
    if n > len(devices):
        raise ValueError(f"mesh {sizes} needs {n} devices but only {len(devices)} are available")
    arr = np.array(devices[:n], dtype=object).reshape(tuple(sizes[a] for a in AXES))
    auto = (jax.sharding.AxisType.Auto,) * len(AXES)
    return Mesh(arr, AXES, axis_types=auto)


def mesh_shape(mesh: Mesh) -> dict[str, int]:
    """``{"data": ..., "fsdp": ..., "tensor": ...}``."""
    return {a: int(mesh.shape[a]) for a in mesh.axis_names}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, *, accum: bool = False) -> NamedSharding:
    """Rows split over ``data`` x ``fsdp``; with ``accum`` the leading micro-batch axis stays whole."""
    return NamedSharding(mesh, P(None, BATCH_AXES) if accum else P(BATCH_AXES))


def _axis_kinds(ndim: int, layout: Optional[str], stack: int) -> str:
    if layout is not None and len(layout) == ndim:
        return layout
    # plain kernels: Flax Dense kernels are (in, out): every axis but the last is input
    return "s" * stack + "i" * (ndim - stack - 1) + "o"


def kernel_spec(path: str, shape, mesh_sizes: dict[str, int], layout: Optional[str] = None,
                stack: int = 0, role: Optional[str] = None) -> tuple:
    """The partition spec (a tuple, one entry per axis) of a base parameter.

    Over ``"tensor"``, the role picks the axis: a ``column`` projection or the ``head`` splits its
    output, a ``row`` projection its input, an ``embedding`` its rows; other roles (router,
    experts) and None are not split. Over ``"fsdp"``, the largest remaining axis that divides
    (never a layer axis).

    Args:
      path: the leaf's ``/``-joined path (for messages).
      shape: its shape.
      mesh_sizes: ``{"fsdp": n, "tensor": m, ...}``.
      layout: the ``s``/``i``/``o`` letters of a LoRA kernel; plain kernels are taken as
        ``(*stack, in, out)``.
      stack: the number of leading layer axes of a plain leaf (ignored when ``layout`` is given).
      role: the leaf's `lora_jax.models.family.Leaf.role`.
    """
    shape = tuple(int(d) for d in shape)
    spec: list = [None] * len(shape)
    stack = layout.count("s") if layout is not None and len(layout) == len(shape) else int(stack)
    if len(shape) - stack < 2:
        return tuple(spec)
    kinds = _axis_kinds(len(shape), layout, stack)
    tp = mesh_sizes.get("tensor", 1)
    if tp > 1 and role in _SPLIT:
        want = [stack] if _SPLIT[role] == "rows" else [j for j, k in enumerate(kinds) if k == _SPLIT[role]]
        if want:
            j = max(want, key=lambda a: shape[a])
            if shape[j] % tp == 0:
                spec[j] = "tensor"
    fs = mesh_sizes.get("fsdp", 1)
    if fs > 1:
        cands = [j for j in range(len(shape)) if spec[j] is None and kinds[j] != "s" and shape[j] % fs == 0]
        if cands:
            j = max(cands, key=lambda a: (shape[a], -a))
            spec[j] = "fsdp"
    return tuple(spec)


def lora_factor_specs(w_spec: tuple, layout: str) -> tuple[tuple, tuple]:
    """Specs of ``a`` and ``b`` from the kernel's spec: ``a`` = stack + input axes + rank (replicated),
    ``b`` = stack + rank + output axes."""
    stack = [s for s, k in zip(w_spec, layout) if k == "s"]
    ins = [s for s, k in zip(w_spec, layout) if k == "i"]
    outs = [s for s, k in zip(w_spec, layout) if k == "o"]
    return tuple(stack + ins + [None]), tuple(stack + [None] + outs)


def param_shardings(tree, mesh: Mesh, stacked: Collection[str] = (), roles: Optional[Mapping[str, str]] = None):
    """A tree of `NamedSharding` for a parameter tree, a LoRA tree, or either `lora.split` half.

    `LoraWeight` nodes get a `LoraWeight` of shardings (None where the child is None), so the
    result can be passed to ``jax.device_put`` and ``jax.jit`` as is. ``stacked`` names the
    ``/``-joined paths of plain leaves that carry a leading layer axis (`train.model.stacked_paths`);
    LoRA nodes say it with their layout. ``roles`` maps paths to `Leaf.role` (a model of
    `lora_jax.models`: `lora_jax.models.family.roles_of`); on a mesh with a ``tensor`` axis over
    one device, every kernel (two or more axes besides the layer axes) needs one.

    Raises:
      ValueError: a ``tensor`` axis, and kernels without a role (named).
    """
    sizes = mesh_shape(mesh)
    stacked = frozenset(stacked)
    roles = dict(roles or {})
    missing: list[str] = []

    def role(path, ndim, stack):
        if path not in roles and sizes.get("tensor", 1) > 1 and ndim - stack >= 2:
            missing.append(path)
        return roles.get(path)

    def leaf(kp, x):
        path = path_str(kp)
        if is_lora(x):  # one adapter, or a chain of them on one kernel (lora.add): all sharded alike
            with_factors = [n for n in x.chain() if n.a is not None]
            shape = x.base.shape if x.base is not None else _w_shape(with_factors[0] if with_factors else x)
            ws = kernel_spec(path, shape, sizes, x.layout, role=role(path, len(shape), x.layout.count("s")))
            a_s, b_s = lora_factor_specs(ws, x.layout)
            ns = lambda s: NamedSharding(mesh, P(*s))  # noqa: E731
            return map_chain(x, lambda n, w: n.replace(w=w, a=None if n.a is None else ns(a_s),
                                                       b=None if n.b is None else ns(b_s),
                                                       m=None if n.m is None else NamedSharding(mesh, P())),
                             lambda base: None if base is None else ns(ws))
        if x is None:
            return None
        stack = int(path in stacked)
        return NamedSharding(mesh, P(*kernel_spec(path, np.shape(x), sizes, stack=stack,
                                                  role=role(path, np.ndim(x), stack))))

    out = jax.tree_util.tree_map_with_path(leaf, tree, is_leaf=lambda x: is_lora(x) or x is None)
    if missing:
        raise ValueError(f"a tensor-parallel mesh (tensor={sizes['tensor']}) splits each kernel by its role "
                         f"(column, row, embedding, head, router, expert), and {len(missing)} have none: "
                         f"{missing[:8]}{' ...' if len(missing) > 8 else ''}; pass roles={{path: role}} (a model of "
                         "lora_jax.models declares them: lora_jax.models.family.roles_of(model))")
    return out


def _w_shape(lw: LoraWeight):
    """The kernel shape of a LoRA node whose ``w`` was split off, from ``a``, ``b`` and the layout."""
    a, b = np.shape(lw.a), np.shape(lw.b)
    n_s = lw.layout.count("s")
    stack, ins, outs = list(a[:n_s]), list(a[n_s:-1]), list(b[n_s + 1:])
    shape = []
    for k in lw.layout:
        shape.append((stack if k == "s" else ins if k == "i" else outs).pop(0))
    return tuple(shape)


def state_shardings(abstract_state, params, params_shardings, mesh: Mesh):
    """Shardings for an optimizer state: each leaf whose key path ends with a parameter's key path
    (and has its shape) takes that parameter's sharding; every other leaf is replicated."""
    table = {}
    for (kp, x), (_, s) in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                               jax.tree_util.tree_flatten_with_path(params_shardings)[0]):
        table[tuple(kp)] = (tuple(np.shape(x)), s)
    rep = NamedSharding(mesh, P())

    def pick(kp, x):
        kp = tuple(kp)
        for j in range(len(kp)):
            hit = table.get(kp[j:])
            if hit is not None and hit[0] == tuple(np.shape(x)):
                return hit[1]
        return rep

    return jax.tree_util.tree_map_with_path(pick, abstract_state)


def place(tree, shardings):
    """Put every array of ``tree`` on its sharding; works with one process or many.

    Arrays already so placed are kept; global arrays are resharded by a jitted identity; host or
    single-device arrays (the same on every process) are cut with ``jax.make_array_from_callback``,
    so each process provides only its own devices' shards (``jax.device_put`` cannot target
    other processes' devices).
    """

    def put(x, s):
        if isinstance(x, jax.Array):
            if x.sharding == s:
                return x
            if not x.is_fully_addressable:
                return jax.jit(lambda v: v, out_shardings=s)(x)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

    return jax.tree_util.tree_map(put, tree, shardings)

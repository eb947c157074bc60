"""Exports that prove themselves: read what was written back and check it against what was meant.

* `check_peft_files`: a PEFT adapter directory holds exactly the tensors written (bit for bit),
  every one finite, and every key lands on a module or parameter of the model (an adapter tensor
  that lands nowhere would be a silent no-op in PEFT).
* `check_merged_files`: a merged checkpoint directory reads back, through the model's own
  checkpoint table, as exactly the merged parameters, all finite.
* `check_probe`: on a short probe batch, the factorized forward (`lora.wrap`) of a LoRA tree and
  the plain forward of merged parameters agree within the dtype's tolerance,
  ``max|a - b| <= sqrt(eps) * max(1, max|b|)`` (float32: 3.5e-4, bfloat16: 0.088 of the logits'
  scale): far above rounding, far below what a transposed, misplaced or dropped factor does.

Each raises ``ValueError`` naming the file or tensor; the exporters call them on the temporary
directory before it is renamed into place, so a failed check leaves nothing.

Example:
  >>> check_probe(model, lora_tree, lora.merge(lora_tree), what="export")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ..io._files import read_json, read_safetensors
from ..models.checkpoint import read_weights
from ..models.family import leaves_of, params_from_state
from ..rules import path_str
from ..variants import peft_variants

__all__ = ["check_peft_files", "check_merged_files", "check_probe", "probe_tolerance"]

def _peft_key(key: str):
    """The match of a PEFT adapter tensor name: a factor, or a variant's own array (DoRA's magnitude)."""
    own = "|".join(re.escape(v.peft[1]) for v in peft_variants() if v.has_m)
    return re.fullmatch(r"(?P<mod>.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B"
                        + (f"|{own}" if own else "") + ")", key)


def _same_bits(x, y) -> bool:
    x, y = np.ascontiguousarray(x), np.ascontiguousarray(y)
    return x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x.reshape(-1).view(np.uint8),
                                                                        y.reshape(-1).view(np.uint8))


def _finite(x) -> bool:
    x = np.asarray(x)
    return not (x.dtype.kind == "f" or x.dtype.name == "bfloat16") or bool(np.isfinite(x.astype(np.float32)).all())


def _model_names(model) -> tuple[set, set]:
    """(PyTorch module names, PyTorch parameter names) of the model."""
    n = model.config.num_hidden_layers
    params = {lf.hf_name(i) for lf in leaves_of(model) for i in (range(n) if lf.layered else (None,))}
    return {p.rpartition(".")[0] for p in params}, params


def check_peft_files(path, model, tensors: Mapping[str, Any], config: Optional[Mapping] = None, *,
                     weights: str = "adapter_model.safetensors", config_file: str = "adapter_config.json",
                     prefix: str = "base_model.model.") -> None:
    """Check a written PEFT adapter directory against the ``tensors`` (and ``config``) meant.

    Raises:
      ValueError: listing every tensor missing, unexpected, different from what was written,
        non-finite, or landing on no module/parameter of ``model``; or a config that reads back
        different.
    """
    path = os.fspath(path)
    file = os.path.join(path, weights)
    back, _ = read_safetensors(file)
    modules, params = _model_names(model)
    problems = [f"{k} is missing" for k in sorted(set(tensors) - set(back))]
    problems += [f"{k} was not written" for k in sorted(set(back) - set(tensors))]
    for k, got in sorted(back.items()):
        if k in tensors and not _same_bits(got, tensors[k]):
            problems.append(f"{k} reads back different from what was written")
        if not _finite(got):
            problems.append(f"{k} holds NaN or Inf")
        rest = k[len(prefix):] if k.startswith(prefix) else None
        m = _peft_key(rest or "")
        if m:  # a factor: its module (PEFT nests target_parameters under .base_layer) must exist
            lands = re.sub(r"(\.base_layer)+$", "", m.group("mod")) in modules
        else:  # a full weight (modules_to_save, a bias): its parameter must exist
            lands = (rest or "").replace(".base_layer.", ".") in params
        if not lands:
            problems.append(f"{k} lands on no module or parameter of the model (it would change nothing)")
    if config is not None:
        cfg_back = read_json(os.path.join(path, config_file), what="PEFT adapter config")
        if cfg_back != json.loads(json.dumps(dict(config))):
            problems.append(f"{config_file} reads back different from what was written")
    if problems:
        raise ValueError(f"{file!r} does not verify: {len(problems)} problem(s):\n  " + "\n  ".join(problems[:20]))


def check_merged_files(path, model, params) -> None:
    """Check that a written checkpoint directory reads back as exactly ``params`` (plain arrays), all finite.

    The files are read back through the model's checkpoint table (`params_from_state`, the inverse
    of what the writer used) in the parameters' dtype and compared exactly, one leaf at a time.

    Raises:
      ValueError: naming every parameter that differs or is not finite, or a file that does not fit
        the model.
    """
    state, source = read_weights(os.fspath(path), "safetensors")
    back = params_from_state(state, model, what=f"verify({source!r})")
    want = {path_str(kp): v for kp, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    got = {path_str(kp): v for kp, v in jax.tree_util.tree_flatten_with_path(back)[0]}
    problems = [f"{p} is missing" for p in sorted(set(want) - set(got))]
    problems += [f"{p} is unexpected" for p in sorted(set(got) - set(want))]
    for p in sorted(set(want) & set(got)):
        w, g = np.asarray(jax.device_get(want[p])), np.asarray(got[p])
        if w.dtype != g.dtype:  # a model whose param_dtype differs from the tree's: compare exactly in float32
            w, g = w.astype(np.float32), g.astype(np.float32)
        if not _finite(g):
            problems.append(f"{p} holds NaN or Inf")
        elif w.shape != g.shape or not np.array_equal(w, g):
            problems.append(f"{p} reads back different from the merged parameters")
    if problems:
        raise ValueError(f"{source!r} does not verify: {len(problems)} problem(s):\n  " + "\n  ".join(problems[:20]))


def probe_tolerance(dtype) -> float:
    """``sqrt(eps)`` of ``dtype``: the relative tolerance of `check_probe`."""
    return float(np.sqrt(np.finfo(np.dtype(dtype)).eps))


def _probe_ids(model, batch: int = 2, length: int = 8) -> np.ndarray:
    vocab = int(getattr(model.config, "vocab_size", 2))
    return ((np.arange(batch * length).reshape(batch, length) * 7919 + 1) % vocab).astype(np.int32)


def _narrowest_dtype(model, tree) -> np.dtype:
    """The narrowest float dtype among the parameters and the model's compute dtype."""
    from ..weight import is_lora

    kinds = [np.dtype(x.dtype) for x in jax.tree_util.tree_leaves(tree, is_leaf=is_lora)
             if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]
    compute = getattr(getattr(model, "config", None), "dtype", None)
    if compute is not None:
        kinds.append(np.dtype(compute))
    return max(kinds, key=lambda d: np.finfo(d).eps) if kinds else np.dtype(np.float32)


def check_probe(model, tree, merged, *, what: str = "export", also=None) -> float:
    """Factorized logits of ``tree`` vs plain logits of ``merged`` on a 2 x 8 probe batch.

    ``also``: a second LoRA tree (e.g. the adapter read back from the files) whose factorized
    logits must agree with ``tree``'s too. The tolerance is `probe_tolerance` of the narrowest float dtype
    among the parameters and the model's compute dtype, relative to ``max(1, max|logits|)``.

    Returns:
      The largest relative difference seen.

    Raises:
      ValueError: when they disagree, with the difference and the tolerance.
    """
    from ..interpreter import wrap

    ids = jnp.asarray(_probe_ids(model))

    def apply(p, x):
        return model.apply({"params": p}, x)

    factorized_fn = jax.jit(wrap(apply))
    factorized = np.asarray(factorized_fn(tree, ids), np.float32)
    plain = np.asarray(jax.jit(apply)(merged, ids), np.float32)
    tol = probe_tolerance(_narrowest_dtype(model, tree))
    scale = max(1.0, float(np.abs(plain).max()))
    pairs = [("factorized (lora.wrap) and merged", factorized, plain)]
    if also is not None:
        pairs.append(("the adapter written and the one read back", np.asarray(factorized_fn(also, ids), np.float32),
                      factorized))
    worst = 0.0
    for desc, a, b in pairs:
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise ValueError(f"{what}: the probe logits of {desc} are not finite (an adapter whose values "
                             "overflow the model: a diverged run?)")
        diff = float(np.abs(a - b).max()) / scale
        if diff > tol:
            raise ValueError(f"{what}: the probe logits of {desc} disagree: max |diff| = {diff:.3g} of the logits' "
                             f"scale, tolerance {tol:.3g}")
        worst = max(worst, diff)
    return worst

"""Streaming merge: a PEFT LoRA adapter folded into a Hugging Face safetensors checkpoint, shard by shard.

`merge_checkpoint` never builds a model: it matches the adapter's PEFT module names directly
against the checkpoint's tensor names (``base_model.model.<module>.lora_A.weight`` belongs to the
tensor ``<module>.weight``) and rewrites one shard at a time, so a checkpoint far larger than host
memory merges with at most about two shards resident above the process's own footprint (the
shard's untouched tensors, memory-mapped straight into the new file, and its merged tensors, each
computed from a mapping of its own that is dropped at once: about one shard in all). Per adapted
tensor, in float32 and cast back to the tensor's own dtype, exactly PEFT's ``merge_and_unload``::

    linear     W (out, in)  += s * B @ A            A = lora_A.weight (r, in), B = lora_B.weight (out, r)
    Conv1D     W (in, out)  += s * (B @ A).T        GPT-2's Conv1D layers
    embedding  W (num, dim) += s * (B @ A).T        A = lora_embedding_A (r, num), B = lora_embedding_B (dim, r)

Which layout a weight has is the module's, as in PEFT (which ignores ``fan_in_fan_out`` where it
does not fit the module, with a warning): for the model types lora_jax knows, its checkpoint table
says which weights PyTorch stores ``(in, out)`` (Conv1D); for others, ``fan_in_fan_out`` decides.

with ``s = alpha / r`` (``use_rslora``: ``alpha / sqrt(r)``) and ``r``/``alpha`` per module from
``rank_pattern``/``alpha_pattern``. Full weights an adapter carries (``modules_to_save``, trained
biases, an adapted embedding's ``base_layer``) replace the base's tensor of that name, cast to its
dtype (the delta, if any, adds to them). Shard names, the index file
(``model.safetensors.index.json``), tensor names, dtypes and shapes are kept; every other file of
the base directory (config, tokenizer, generation config) is copied. DoRA, LoRA on parameters
(``target_parameters``), convolution LoRA and the other adapter features lora_jax does not merge are
refused with an error naming them; so is any adapter tensor that lands on no tensor of the base.

Example:
  >>> from lora_jax.hf.merge import merge_checkpoint  # doctest: +SKIP
  >>> merge_checkpoint("Llama-3.1-8B", "my-adapter", "Llama-3.1-8B-merged")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import zlib
from typing import Callable, Optional

import numpy as np

from ..io._files import atomic_directory, contained, local_model_dir, read_json, read_safetensors, refuse_overlap, write_safetensors
from ..models.checkpoint import CONFIG, SAFETENSORS, SAFETENSORS_INDEX
from ..tree import MERGE_MAGNITUDE_LIMIT
from ..variants import peft_variants
from .peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX, config_problems, pattern_value, selection_of, selects

__all__ = ["merge_checkpoint"]

# weight files of other formats are not copied: they would hold the unmerged weights
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
_BLOCK_BYTES = 64 << 20  # float32 rows merged per step (bounds the temporaries of one huge tensor)
_FACTOR = re.compile(r"(?P<mod>.+)\.(?:lora_(?P<f>A|B)\.weight|lora_embedding_(?P<e>A|B))")


@dataclasses.dataclass
class _Delta:
    """``s * left @ right`` in the layout of the base tensor it is added to."""

    module: str
    left: np.ndarray  # (rows of W, r)
    right: np.ndarray  # (r, cols of W)
    scale: float


def _shards(base: str) -> tuple[list[str], Optional[str]]:
    """The base's weight files (in index order) and its index file, if sharded."""
    single, index = os.path.join(base, SAFETENSORS), os.path.join(base, SAFETENSORS_INDEX)
    if os.path.isfile(single):
        return [SAFETENSORS], None
    if not os.path.isfile(index):
        raise FileNotFoundError(f"merge: no {SAFETENSORS} or {SAFETENSORS_INDEX} in {os.path.abspath(base)!r} "
                                "(the streaming merge reads safetensors checkpoints only)")
    wmap = read_json(index, what="safetensors index")
    wmap = wmap.get("weight_map") if isinstance(wmap, dict) else None
    if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
        raise ValueError(f"{index!r}: expected an object with a 'weight_map' of tensor name -> file name")
    files = list(dict.fromkeys(wmap.values()))
    for f in files:
        if not os.path.isfile(contained(base, f, what=f"shard named in {SAFETENSORS_INDEX}")):
            raise FileNotFoundError(f"{index!r} names shard {f!r}, which does not exist in {base!r}")
    return files, index


def _headers(base: str, files: list[str]) -> dict[str, tuple[str, tuple, np.dtype]]:
    """``{tensor name: (shard, shape, dtype)}``, reading only the headers (the data stays mapped, untouched)."""
    out, dup = {}, []
    for f in files:
        tensors, _ = read_safetensors(os.path.join(base, f))
        for k, v in tensors.items():
            if k in out:
                dup.append(f"{k} (in {out[k][0]} and {f})")
            out[k] = (f, tuple(v.shape), v.dtype)
        del tensors
    if dup:
        raise ValueError(f"merge: tensors stored in more than one shard of {base!r}: {dup[:5]}")
    return out


def _conv1d_weights(base: str) -> Optional[list]:
    """Patterns of the base's 2-d weights that PyTorch stores ``(in, out)`` (GPT-2's Conv1D), from
    lora_jax's checkpoint table of its ``model_type``; None when lora_jax does not know the model."""
    from ..models.family import build, config_from_hf, leaves_of, read_hf_config, resolve_head

    try:
        hf = read_hf_config(base)
        config = config_from_hf(hf)
        model = build(config, resolve_head(config, hf.get("architectures") or ()))
    except (ValueError, TypeError, KeyError, OSError):
        return None
    return [re.compile(r"(?:^|.*\.)" + re.escape(lf.hf).replace(r"\{i\}", r"\d+") + "$")
            for lf in leaves_of(model) if not lf.transpose and len(lf.shape) == 2 and lf.hf.endswith(".weight")
            and not lf.path.endswith("/embedding")]


def _is_float(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2")


def _plan(cfg: dict, tensors: dict, base_tensors: dict, adapter: str, conv1d: Optional[list] = None):
    """``({tensor: _Delta}, {tensor: replacement array})`` or one ValueError listing every problem."""
    problems = list(config_problems(cfg))
    if not isinstance(cfg, dict):
        raise ValueError(f"merge: {os.path.join(adapter, ADAPTER_CONFIG)!r}: " + "; ".join(problems))
    for v in peft_variants():
        if v.peft[0] and cfg.get(v.peft[0]) is True:
            problems.append(f"{v.peft[0]}=true: {v.label} is not merged by the streaming merge (merge it with PEFT, "
                            "or load it with lora_jax.hf.load_peft and save_merged)")
    if cfg.get("target_parameters"):
        problems.append(f"target_parameters={cfg['target_parameters']!r}: LoRA on parameters is not merged by the "
                        "streaming merge")
    if problems:
        raise ValueError(f"merge: {os.path.join(adapter, ADAPTER_CONFIG)!r}: " + "; ".join(problems))
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
    rslora = bool(cfg.get("use_rslora", False))
    r0, alpha0 = cfg["r"], cfg["lora_alpha"]
    factors, full = {}, {}
    for key, arr in tensors.items():
        if not key.startswith(PREFIX):
            problems.append(f"{key}: not a PEFT key (PEFT keys start with {PREFIX!r})")
            continue
        rest = key[len(PREFIX):]
        m = _FACTOR.fullmatch(rest)
        if m:
            factors.setdefault(m.group("mod"), {})[(m.group("f") or m.group("e"), m.group("e") is not None)] = arr
        elif any(re.fullmatch(rf".+\.{re.escape(v.peft[1])}(\.weight)?", rest) for v in peft_variants() if v.has_m):
            problems.append(f"{key}: a variant's own tensor (DoRA's magnitude vector) is not merged by the streaming "
                            "merge")
        elif ".lora_" in rest or rest.startswith("lora_"):
            problems.append(f"{key}: an adapter tensor the streaming merge does not know (lora_bias, trainable "
                            "tokens, ... are not supported)")
        else:
            full[rest.replace(".base_layer.", ".")] = (key, arr)
    deltas = {}
    for mod, fs in sorted(factors.items()):
        embedding = {e for _, e in fs}
        if len(embedding) > 1 or set(f for f, _ in fs) != {"A", "B"}:
            problems.append(f"{PREFIX}{mod}: expected lora_A/lora_B (or lora_embedding_A/B), got "
                            f"{sorted(('lora_embedding_' if e else 'lora_') + f for f, e in fs)}")
            continue
        if cfg.get("target_modules") is not None and not selects(cfg, mod):  # PEFT would not have made them
            problems.append(f"{PREFIX}{mod}: factors of a module that {selection_of(cfg)} do not select")
            continue
        emb = embedding.pop()
        a, b = fs[("A", emb)], fs[("B", emb)]
        name = f"{mod}.weight"
        if name not in base_tensors:
            problems.append(f"{PREFIX}{mod}: no tensor {name!r} in the base checkpoint, so the adapter would "
                            "change nothing there (an adapter for another model, or another name prefix?)")
            continue
        _, shape, dtype = base_tensors[name]
        rank = pattern_value(cfg.get("rank_pattern") or {}, mod, r0)
        alpha = pattern_value(cfg.get("alpha_pattern") or {}, mod, alpha0)
        if a.ndim != 2 or b.ndim != 2 or len(shape) != 2:
            problems.append(f"{PREFIX}{mod}: lora factors {a.shape}, {b.shape} on a {len(shape)}-d weight {shape}; "
                            "only linear and embedding LoRA (2-d) is merged (no convolution LoRA)")
            continue
        if not _is_float(dtype):
            problems.append(f"{name}: dtype {dtype.name} is not a float (quantized checkpoints are not merged)")
            continue
        # the module's layout decides, as in PEFT; the config's flag only where the model is unknown
        in_out = fan_in_fan_out if conv1d is None else any(p.match(name) for p in conv1d)
        if emb or in_out:  # W holds (B @ A).T: W (rows, cols) = A.T (rows, r) @ B.T (r, cols)
            left, right = a.T, b.T
        else:
            left, right = b, a
        want = (shape[0], rank), (rank, shape[1])
        if left.shape != want[0] or right.shape != want[1]:
            alt = (b, a) if in_out else (a.T, b.T)  # the other linear layout
            hint = "" if emb or conv1d is not None or (alt[0].shape, alt[1].shape) != want else (
                "; fan_in_fan_out is true but the weight is stored (out, in)" if in_out else
                "; the weight is stored (in, out) as in a Conv1D: the adapter needs fan_in_fan_out=true")
            problems.append(f"{PREFIX}{mod}: lora_A {a.shape}, lora_B {b.shape} do not fit {name} {shape} at rank "
                            f"{rank}{hint}")
            continue
        for f, x in (("A", a), ("B", b)):
            if not np.isfinite(np.asarray(x, np.float32)).all():
                problems.append(f"{PREFIX}{mod}: lora_{f} holds NaN or Inf")
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        deltas[name] = _Delta(mod, left, right, scale)
    replace = {}
    for name, (key, arr) in sorted(full.items()):
        if name not in base_tensors:
            problems.append(f"{key}: no tensor {name!r} in the base checkpoint")
        elif tuple(arr.shape) != base_tensors[name][1]:
            problems.append(f"{key}: shape {tuple(arr.shape)}, but {name} is {base_tensors[name][1]}")
        else:  # with factors too (PEFT saves an adapted embedding's base_layer), the delta adds to it
            replace[name] = arr
    if not problems and not deltas and not replace:
        problems.append("the adapter holds no LoRA factors")
    if problems:
        raise ValueError(f"merge: {len(problems)} problem(s) merging {adapter!r} into the base:\n  "
                         + "\n  ".join(problems))
    return deltas, replace


def _merged(w: np.ndarray, d: _Delta, name: str) -> np.ndarray:
    """``w + s * left @ right`` in float32, a block of rows at a time, returned in ``w``'s dtype."""
    out = np.empty(w.shape, w.dtype)
    left = np.asarray(d.left, np.float32)
    right = np.asarray(d.right, np.float32)
    rows = max(1, _BLOCK_BYTES // (4 * max(1, w.shape[1])))
    w_max = m_max = 0.0
    for i in range(0, w.shape[0], rows):
        wf = np.asarray(w[i:i + rows], np.float32)
        block = wf + np.float32(d.scale) * (left[i:i + rows] @ right)
        if not np.isfinite(block).all():
            raise ValueError(f"merge: the merged {name} holds NaN or Inf (adapter module {d.module})")
        w_max = max(w_max, float(np.abs(wf).max(initial=0.0)))
        m_max = max(m_max, float(np.abs(block).max(initial=0.0)))
        out[i:i + rows] = block.astype(w.dtype)
    if m_max > MERGE_MAGNITUDE_LIMIT * max(w_max, 1.0):
        raise ValueError(f"merge: the merged {name} reaches |w| = {m_max:.3g}, more than {MERGE_MAGNITUDE_LIMIT:g} x "
                         f"max(max |base| = {w_max:.3g}, 1): no trained weight is that large (a corrupt adapter?)")
    return out


def _other_files(base: str) -> list[tuple[str, str]]:
    """``(name, resolved source)`` of the base's files that are not weights (config, tokenizer, ...).

    A link is followed only where it stays inside the base (or, in a hub cache snapshot, its
    repository's blobs): a link to a file elsewhere (a token file, a key) is refused, not copied
    into the output as a readable file."""
    out = []
    for name in sorted(os.listdir(base)):
        src = os.path.join(base, name)
        if name.startswith(".") or not os.path.isfile(src) or name.endswith(_WEIGHT_SUFFIXES):
            continue
        out.append((name, contained(base, name, what="merge: the base's file")))
    return out


def _check_index(index: str, where: dict[str, str]) -> None:
    """The index's weight_map names exactly the tensors the shards hold, each in its shard
    (``where``: tensor name -> shard read from the shards themselves)."""
    wmap = read_json(index, what="safetensors index").get("weight_map", {})
    problems = [f"{k} is in {where[k]!r} but the index says {wmap[k]!r}" for k in where if k in wmap and wmap[k] != where[k]]
    problems += [f"{k} (in {where[k]!r}) is missing from the index" for k in where if k not in wmap]
    problems += [f"{k} is in the index (shard {wmap[k]!r}) but in no shard" for k in wmap if k not in where]
    if problems:
        raise ValueError(f"merge: {index!r} does not match its shards ({len(problems)} problem(s)): "
                         + "; ".join(problems[:5]))


def merge_checkpoint(base, adapter, out, *, overwrite: bool = False,
                     echo: Optional[Callable[[str], None]] = None) -> dict:
    """Fold a PEFT LoRA adapter into a safetensors checkpoint directory, one shard in memory at a time.

    See the module docstring for the arithmetic. The output directory is written under a
    temporary name beside ``out`` and renamed into place: it appears complete or not at all.
    After each shard is written it is read back and compared with what was meant (names, shapes,
    dtypes; merged tensors bit for bit).

    Args:
      base: a Hugging Face checkpoint directory (``model.safetensors`` or a sharded
        ``model.safetensors.index.json``).
      adapter: a PEFT LoRA adapter directory (``adapter_config.json``, ``adapter_model.safetensors``).
      out: the directory to write; may not be, contain or lie inside ``base`` or ``adapter``.
      overwrite: replace a non-empty ``out``.
      echo: called with one progress line per shard.

    Returns:
      ``{"shards": n, "merged": [tensor names], "replaced": [tensor names], "copied": [file names]}``.

    Raises:
      ValueError: an adapter feature the merge does not support, adapter tensors that land on no
        tensor of the base or do not fit it (all problems in one message), a merged tensor that is
        not finite or implausibly large (`lora_jax.tree.MERGE_MAGNITUDE_LIMIT`), an ``out``
        overlapping the inputs, or a non-empty ``out`` without ``overwrite``.
      FileNotFoundError / OSError: missing inputs, or the output cannot be written (nothing is left).

    Example:
      >>> merge_checkpoint("base", "adapter", "merged")  # doctest: +SKIP
      {'shards': 4, 'merged': [...], 'replaced': [], 'copied': ['config.json', ...]}
    """
    base, adapter, out = os.fspath(base), os.fspath(adapter), os.fspath(out)
    base = local_model_dir(base, what="merge: the base checkpoint")  # a directory, ~ or a cached hub id
    if not os.path.isdir(adapter):
        raise FileNotFoundError(f"merge: no adapter directory at {os.path.abspath(adapter)!r}")
    refuse_overlap(out, {"the base checkpoint": base, "the adapter": adapter}, what="merge")
    if not os.path.isfile(os.path.join(base, CONFIG)):
        raise FileNotFoundError(f"merge: no {CONFIG} in {os.path.abspath(base)!r}; is it a Hugging Face checkpoint?")
    cfg = read_json(os.path.join(adapter, ADAPTER_CONFIG), what="PEFT adapter config")
    adapter_tensors, _ = read_safetensors(os.path.join(adapter, ADAPTER_WEIGHTS))
    files, index = _shards(base)
    base_tensors = _headers(base, files)
    if index is not None:
        _check_index(index, {k: v[0] for k, v in base_tensors.items()})
    others = _other_files(base)
    deltas, replace = _plan(cfg, adapter_tensors, base_tensors, adapter, _conv1d_weights(base))
    say = echo or (lambda s: None)
    with atomic_directory(out, overwrite=overwrite, what="merge") as tmp:
        written_in = {}  # tensor name -> the shard it was written to (as read back by _check_shard)
        for n, f in enumerate(files, 1):
            # the shard's name comes from the base's index: checked again where it is written
            src, dest = os.path.join(base, f), contained(tmp, f, what=f"shard named in {SAFETENSORS_INDEX}")
            names = [k for k in base_tensors if base_tensors[k][0] == f]
            changed = {}
            for name in names:
                if name in deltas or name in replace:
                    changed[name] = _new_tensor(src, name, deltas.get(name), replace.get(name))
            # the untouched tensors go from a fresh mapping straight into the new file: with the
            # changed ones computed above (each from a mapping dropped at once), about one shard is
            # resident here
            tensors, meta = read_safetensors(src)
            written = {k: changed.get(k, v) for k, v in tensors.items()}
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            write_safetensors(dest, written, meta or {"format": "pt"})
            layout = {k: (v.shape, v.dtype) for k, v in written.items()}
            sums = {k: _crc(v) for k, v in changed.items()}
            del tensors, written, changed  # unmap the input, free the merged tensors, then read the output back
            _check_shard(dest, layout, sums)
            written_in.update(dict.fromkeys(layout, f))
            say(f"merge: shard {n}/{len(files)} {f}: {sum(k in deltas for k in names)} tensor(s) merged")
        if index is not None:  # copied, then read back against the shards written
            shutil.copyfile(index, os.path.join(tmp, SAFETENSORS_INDEX))
            _check_index(os.path.join(tmp, SAFETENSORS_INDEX), written_in)
        for name, src in others:
            shutil.copyfile(src, os.path.join(tmp, name))
    return {"shards": len(files), "merged": sorted(deltas), "replaced": sorted(replace),
            "copied": [name for name, _ in others]}


def _new_tensor(src: str, name: str, delta: Optional[_Delta], full) -> np.ndarray:
    """One changed tensor of shard ``src``: the adapter's full weight and/or the merged delta."""
    w = read_safetensors(src)[0][name]  # a mapping of its own, dropped on return
    if full is not None:
        w = np.asarray(full).astype(w.dtype)
    return w if delta is None else _merged(w, delta, name)


def _crc(x) -> int:
    return zlib.crc32(np.ascontiguousarray(x).reshape(-1).view(np.uint8))


def _check_shard(file: str, layout: dict, changed: dict) -> None:
    """Read a written shard back: every tensor present with its shape and dtype, changed ones with
    the CRC-32 of what was written (``changed``: name -> CRC)."""
    back, _ = read_safetensors(file)
    problems = [f"{k} is missing" for k in layout if k not in back]
    problems += [f"{k} is unexpected" for k in back if k not in layout]
    for k, (shape, dtype) in layout.items():
        if k not in back:
            continue
        got = back[k]
        if got.shape != shape or got.dtype != dtype:
            problems.append(f"{k} reads back as {got.dtype}{list(got.shape)}, written as {dtype}{list(shape)}")
        elif k in changed and _crc(got) != changed[k]:
            problems.append(f"{k} reads back different from what was written")
    if problems:
        raise ValueError(f"merge: {file!r} does not read back as written: " + "; ".join(problems[:5]))

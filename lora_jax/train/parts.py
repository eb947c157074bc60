"""The pieces of a run that the run (`pipeline`) and a finished run's readers (`runs`) share:
the compute dtype, the checkpoint directory and what a checkpoint holds, the LoRA rules, the
base's remat policy, the loss settings outside the train step, and the data phase (tokenized
cache -> packed rows).
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import jax
import numpy as np

from ..rules import Rules
from . import data as _data
from . import model as _model
from . import tuning as _tuning
from .. import tree as _tree
from ..adapters import add as _add
from .config import Config, ConfigError, adapter_configs, resolve_path
from .trainer import LoopSpec, make_adapter_optimizer, make_optimizer

__all__ = ["compute_dtype", "ckpt_dir", "rules_of", "lora_tree", "loop_specs", "base_remat", "data_rows", "checkpoint_target", "loss_settings",
           "tokenized", "packed_rows"]


def compute_dtype(name: str) -> str:
    """``auto``: bfloat16 on GPU/TPU, float32 on CPU."""
    if name != "auto":
        return name
    return "bfloat16" if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else "float32"


def ckpt_dir(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def rules_of(cfg: Config, model) -> Rules:
    lc = cfg.lora
    return _model.lora_rules(model, lc.targets, rank=lc.rank, alpha=lc.alpha, dropout=lc.dropout, init=lc.init,
                             use_rslora=lc.rslora, variant=lc.variant, exclude=lc.exclude, modules_to_save=lc.modules_to_save)


def lora_tree(cfg: Config, model, params, key=None):
    """The run's LoRA tree from seed ``cfg.seed`` (or ``key``): ``lora.init`` with `rules_of`, or,
    for a run with ``adapters``, one `lora.add` adapter per entry, each initialized exactly as its
    run alone would be (``same_init``)."""
    key = jax.random.key(cfg.seed) if key is None else key
    ads = adapter_configs(cfg)
    if not ads:
        return _tree.init(params, rules_of(cfg, model), key)
    tree = params
    for name, one in ads:
        tree = _add(tree, name, rules_of(one, model), key, same_init=True)
    return tree


def loop_specs(cfg: Config) -> tuple[LoopSpec, dict]:
    """``(the loop's LoopSpec, {adapter name: its LoopSpec})``: for a run with ``adapters`` each
    adapter's optimizer settings, and the loop's batch the rows of all of them; ``{}`` otherwise."""
    ads = adapter_configs(cfg)
    if not ads:
        return LoopSpec.from_config(cfg.train), {}
    specs = {name: LoopSpec.from_config(one.train) for name, one in ads}
    return LoopSpec.from_config(cfg.train, batch_size=sum(s.batch_size for s in specs.values())), specs


def base_remat(cfg: Config) -> Optional[str]:
    """The base model's remat policy (``auto``: none; the train steps' candidates set their own)."""
    return None if cfg.train.remat in ("none", _tuning.AUTO) else cfg.train.remat


def _files(paths) -> str:
    paths = paths if isinstance(paths, list) else [paths]
    return ", ".join(repr(resolve_path(p)) for p in paths)


def _pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def _cache_root(cfg):
    """`tokcache.load`'s ``root`` for ``data.cache``: auto -> the default, null -> none kept."""
    c = cfg.data.cache
    return False if c is None else None if c == "auto" else os.path.expanduser(c)


def tokenized(cfg, tok, paths, what: str, say: Callable, fmt: Optional[str] = None):
    """``(docs, info)`` of ``paths`` from the tokenized cache (`tokcache.load`, built on a miss)."""
    from . import tokcache as _tokcache

    paths = [resolve_path(p) for p in (paths if isinstance(paths, list) else [paths])]
    try:
        return _tokcache.load(paths, tok, root=_cache_root(cfg), fmt=fmt or cfg.data.format,
                              columns=cfg.data.columns, workers=cfg.data.workers, say=say)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"{what}: {e}") from None


def packed_rows(cfg, tok, docs, info, what: str, paths, span=None) -> _data.PackedRows:
    """The rows of documents ``span`` (all by default) in the layout of ``data.packing``;
    ``paths`` (the config's files) are named in the errors.

    Raises:
      ConfigError: no documents, or documents without a single trained token (names the cause).
    """
    from . import tokcache as _tokcache

    a, b = span if span is not None else (0, len(docs))
    where = f" in {_files(paths)}"
    if b <= a:
        raise ConfigError(f"{what}: no documents{where} (empty or blank files?)")
    seq_len, packing = cfg.data.seq_len, cfg.data.packing
    try:
        rows = _data.PackedRows(docs, seq_len, _pad_id(tok), packing, span=(a, b),
                                plan=_tokcache.plan(docs, info["entry"], seq_len, packing, (a, b)))
    except ValueError as e:
        raise ConfigError(f"{what}: {e}{where}") from None
    if rows.n_targets == 0:
        raise ConfigError(f"{what}: the {b - a} documents{where} give 0 trained tokens: "
                          f"{_data.why_no_targets(info['stats'], seq_len, packing)}")
    return rows


def data_rows(cfg, tok, say: Callable) -> tuple:
    """``(train rows, eval rows or None, summary)`` of ``data.train`` / ``data.eval`` (or the
    held-out share of ``data.train``)."""
    docs, info = tokenized(cfg, tok, cfg.data.train, "data.train", say)
    if cfg.data.eval is not None:
        n_train = len(docs)
        edocs, einfo = tokenized(cfg, tok, cfg.data.eval, "data.eval", say)
        espan, epaths = (0, len(edocs)), cfg.data.eval
    else:
        try:
            n_train = _data.split_count(len(docs), cfg.data.eval_fraction)
        except ValueError as e:
            raise ConfigError(f"data.eval_fraction: {e}") from None
        edocs, einfo, espan, epaths = docs, info, (n_train, len(docs)), cfg.data.train
    rows = packed_rows(cfg, tok, docs, info, "data.train", cfg.data.train, (0, n_train))
    eval_rows = packed_rows(cfg, tok, edocs, einfo, "data.eval", epaths, espan) if espan[1] > espan[0] else None
    padding = 1.0 - rows.n_tokens / max(len(rows) * rows.seq_len, 1)
    summary = {"train_documents": n_train, "eval_documents": espan[1] - espan[0], "rows": len(rows),
               "eval_rows": len(eval_rows) if eval_rows is not None else 0, "packing": rows.packing,
               "padding": round(padding, 4), "trained_tokens": rows.n_targets, "cache": info["entry"],
               "tokenized_now": info["built"]}
    return rows, eval_rows, summary


def checkpoint_target(cfg: Config, trainable) -> dict:
    """What a checkpoint of this config holds, as ``ShapeDtypeStruct`` on this process's first
    device: ``adapter`` (the trainable half, concrete or abstract), ``opt_state`` and ``rng``."""
    spec, specs = loop_specs(cfg)
    tx = make_adapter_optimizer(specs, trainable)[0] if specs else make_optimizer(spec)[0]
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    sds = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev)  # noqa: E731
    return {"adapter": jax.tree_util.tree_map(sds, trainable),
            "opt_state": jax.tree_util.tree_map(sds, jax.eval_shape(tx.init, trainable)),
            "rng": jax.ShapeDtypeStruct((2,), np.uint32, sharding=dev)}


def loss_settings(cfg: Config) -> dict:
    """The loss settings outside the train step (``train.loss``: ``auto`` is chunked there, which fits anywhere;
    ``train.loss_chunk``)."""
    return {"chunked": cfg.train.loss != "plain", "chunk": cfg.train.loss_chunk or None}

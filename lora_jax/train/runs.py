"""A finished (or checkpointed) run read back: `load_run` and what is done with it — `evaluate`,
`generate`, `load_checkpoint`. Readers never move or delete anything in the run directory.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
from typing import Callable, Mapping, Optional, Sequence

import jax
import numpy as np

from .. import tree as _tree
from . import data as _data
from . import model as _model
from .checkpoint import Checkpointer, DamagedCheckpoint, latest_step
from .config import Config, ConfigError, deep_update, from_dict, load_yaml
from .metrics import perplexity
from ..adapters import adapter_names, delete
from .config import adapter_configs
from .parts import base_remat, checkpoint_target, ckpt_dir, compute_dtype, data_rows, lora_tree, loss_settings

__all__ = ["RunHandle", "load_run", "load_checkpoint", "latest_run", "eval_rows_of", "evaluate", "generate",
           "generate_ids"]


@dataclasses.dataclass
class RunHandle:
    """A finished (or checkpointed) run loaded back: config, model, tokenizer, LoRA tree."""

    cfg: Config
    out_dir: str
    model: object
    tokenizer: object
    lora_params: object
    adapter_source: str

    @property
    def apply(self):
        """``apply(params, inputs, mask=None) -> logits`` (`model.make_apply`)."""
        return _model.make_apply(self.model)

    @functools.cached_property
    def decode_fn(self) -> Callable:
        """``lora.wrap`` of the model's apply, as `lora_jax.models.generate` calls it (with a KV
        cache); one function object per handle, so decoding compiles once per shape."""
        from ..interpreter import wrap

        model = self.model
        return wrap(lambda p, ids, **kw: model.apply({"params": p}, ids, **kw))


def load_checkpoint(out_dir: str, cfg: Config, lora_params, step: Optional[int] = None):
    """``(state, meta)`` of a run's checkpoint (the newest finalized one unless ``step``), on the
    default device: ``state`` holds ``adapter`` (the trainable half), ``opt_state`` and ``rng``
    (key data). ``lora_params`` (the run's LoRA tree) gives the structure; returns ``(None, None)``
    when the run has no checkpoint."""
    step = latest_step(ckpt_dir(out_dir)) if step is None else step
    if step is None:
        return None, None
    target = checkpoint_target(cfg, _tree.split(lora_params)[0])
    ck = Checkpointer(ckpt_dir(out_dir), keep=cfg.train.keep_checkpoints, async_save=False)
    try:
        return ck.restore(step, target)
    finally:
        ck.close()


def _restore_adapter(out_dir: str, cfg: Config, lp):
    """``(lp with the adapter of the newest intact checkpoint, where it came from)``; ``(None,
    None)`` if there is no checkpoint. Damaged newer checkpoints are skipped and named in the
    second item (a reader never moves or deletes anything).

    Raises:
      ConfigError: every checkpoint is damaged.
    """
    d = ckpt_dir(out_dir)
    if latest_step(d) is None:
        return None, None
    ck = Checkpointer(d, keep=cfg.train.keep_checkpoints, async_save=False)
    try:
        steps = sorted(ck.all_steps(), reverse=True)
    finally:
        ck.close()
    damaged = []
    for step in steps:
        try:
            saved, _ = load_checkpoint(out_dir, cfg, lp, step)
        except DamagedCheckpoint as e:
            damaged.append(e)
            continue
        note = "".join(f"; skipped damaged step {e.step}: {e.file}: {e.reason}" for e in damaged)
        return _tree.combine(saved["adapter"], _tree.split(lp)[1]), f"checkpoint step {step}{note}"
    raise ConfigError(f"{out_dir!r}: no intact checkpoint (" + "; ".join(str(e) for e in damaged) + ")")


def run_config(out_dir: str, overrides: Optional[dict] = None) -> Config:
    """The config a run directory was trained with (``config.yaml``), with nested ``overrides``.

    Raises:
      ConfigError: the directory holds no ``config.yaml``, or it does not parse.
    """
    path = os.path.join(out_dir, "config.yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"{out_dir!r} is not a lora-jax run directory (no config.yaml)")
    with open(path, encoding="utf-8") as fh:
        data = load_yaml(fh, path) or {}
    if overrides:
        data = deep_update(data, overrides)
    return from_dict(data)


def _only(tree, name: str):
    """``tree`` with the adapter ``name`` alone: every other `lora.add` adapter deleted."""
    for other in adapter_names(tree):
        if other != name:
            tree = delete(tree, other)
    return tree


def latest_run(name: Optional[str] = None) -> str:
    """The newest directory under ``runs/`` holding a ``config.yaml`` (of config ``name`` if given)."""
    pat = os.path.join("runs", f"{name}-*" if name else "*")
    runs = [d for d in glob.glob(pat) if os.path.isfile(os.path.join(d, "config.yaml"))]
    if not runs:
        raise ConfigError(f"no run found under {os.path.abspath('runs')}; give the run directory")
    return max(runs, key=os.path.getmtime)


def load_run(out_dir: str, *, adapter: Optional[str] = None, overrides: Optional[dict] = None,
             every: bool = False) -> RunHandle:
    """Load a run directory back: its config, base model, tokenizer and adapter.

    Args:
      out_dir: the run directory.
      adapter: a PEFT adapter directory to use instead of the run's own; by default the newest
        checkpoint, else ``out_dir/adapter``. For a run of several adapters (``adapters``): one of
        their names (that adapter alone, from the newest checkpoint, else ``out_dir/adapters/<name>``)
        or a directory; it must be given.
      overrides: nested config changes (e.g. ``{"data": {"eval": "other.jsonl"}}``).
      every: for a run of several adapters without ``adapter``: all of them, chained on the base
        (as trained; what `generate_many` serves by name and ``generate --base`` needs none of).

    Raises:
      ConfigError: when the directory is not a run or holds no adapter, or for a run of several
        adapters, when ``adapter`` names none of them.
    """
    cfg = run_config(out_dir, overrides)
    cdt = compute_dtype(cfg.model.compute_dtype)
    base = cfg.model.path or os.path.join(out_dir, "base")
    if not os.path.isdir(base):
        raise ConfigError(f"{out_dir!r}: base model {base!r} not found")
    tok = _model.load_tokenizer(cfg.tokenizer.path or base)
    model, params = _model.load_model(base, compute_dtype=cdt, param_dtype=cfg.model.param_dtype, remat=base_remat(cfg))
    lp = lora_tree(cfg, model, params)
    names = [name for name, _ in adapter_configs(cfg)]
    if every and names and adapter is None:
        names = []  # keep them all: nothing deleted below, the run's own config
    elif names and adapter not in names and (adapter is None or not os.path.isdir(adapter)):
        raise ConfigError(f"{out_dir!r} trained the adapters {names}; choose one with --adapter NAME (or give an "
                          f"adapter directory)" + ("" if adapter is None else f", not {adapter!r}"))
    if adapter is not None and adapter not in names:
        return RunHandle(cfg, out_dir, model, tok, _model.load_peft(model, lp, adapter), f"adapter {adapter}")
    own = dict(adapter_configs(cfg)).get(adapter, cfg)  # a named adapter's handle reads its own data
    restored, source = _restore_adapter(out_dir, cfg, lp)
    if restored is not None:
        if names:
            restored = _only(restored, adapter)
        return RunHandle(own, out_dir, model, tok, restored, source + (f", adapter {adapter}" if names else ""))
    if every and adapter_configs(cfg):
        raise ConfigError(f"{out_dir!r} holds no checkpoint of its adapters; give their exports by name "
                          f"(--adapters NAME={os.path.join(out_dir, 'adapters', 'NAME')} ...)")
    exported = os.path.join(out_dir, "adapters", adapter) if names else os.path.join(out_dir, "adapter")
    if os.path.isdir(exported):
        return RunHandle(own, out_dir, model, tok, _model.load_peft(model, lp, exported), f"adapter {exported}")
    raise ConfigError(f"{out_dir!r} holds neither a checkpoint nor an exported adapter")


def eval_rows_of(handle: RunHandle) -> _data.PackedRows:
    """The run's eval rows (``data.eval`` or the held-out share of ``data.train``)."""
    _, rows, _ = data_rows(handle.cfg, handle.tokenizer, lambda s: None)
    if rows is None:
        raise ConfigError("data.eval: the run has no eval documents; pass data.eval=PATH")
    return rows


def evaluate(handle: RunHandle, rows: _data.Rows, batch_size: Optional[int] = None) -> dict:
    """Eval loss, perplexity and token accuracy of the base alone and of base + adapter on ``rows``
    (the loss of training: `model.lora_loss_fn`, without dropout)."""
    from ..interpreter import wrap

    token_sums = wrap(_model.make_stats(handle.model, **loss_settings(handle.cfg)))
    mb = batch_size or max(handle.cfg.train.batch_size // handle.cfg.train.grad_accum, 1)

    @jax.jit
    def stats(lp, b):
        nll, correct = token_sums(lp, b["inputs"], b["targets"], b["weights"], b.get("mask"), b.get("positions"))
        return nll, correct, b["weights"].sum()

    out = {"source": handle.adapter_source, "eval_rows": len(rows)}
    for name, tree in (("base", _model.base_only(handle.lora_params)), ("adapter", handle.lora_params)):
        nll = correct = n = 0.0
        for b in _data.eval_batches(rows, mb):
            r = jax.device_get(stats(tree, b))
            nll, correct, n = nll + float(r[0]), correct + float(r[1]), n + float(r[2])
        loss = nll / max(n, 1.0)
        out[name] = {"eval_loss": loss, "eval_ppl": perplexity(loss), "eval_acc": correct / max(n, 1.0),
                     "eval_tokens": int(n)}
    return out


def _prompt_ids(tok, prompt: str) -> list[int]:
    """The token ids a generation starts from: the bos token (if any), then the prompt's."""
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    ids = bos + list(tok.encode(prompt, add_special_tokens=False))
    if not ids:
        raise ValueError("generate: empty prompt and the tokenizer has no bos_token to start from")
    return ids


def _room(handle: RunHandle, n_ids: int, max_new_tokens: int) -> int:
    """How many tokens may follow a prompt of ``n_ids`` tokens (``max_new_tokens``, or fewer where
    the model's positions end)."""
    max_pos = _model.max_positions(handle.model)
    new = int(max_new_tokens) if max_pos is None else min(int(max_new_tokens), int(max_pos) - n_ids)
    if new < 1:
        raise ValueError(f"generate: the prompt has {n_ids} tokens, the model only {max_pos} positions")
    return new


def _eos_pad(tok) -> tuple[Optional[int], int]:
    """The tokenizer's end-of-sequence id and the id written after it."""
    eos = tok.eos_token_id
    return eos, tok.pad_token_id if tok.pad_token_id is not None else (eos or 0)


def _until_eos(row: list, eos: Optional[int]) -> list:
    """``row`` up to and including its first ``eos``."""
    return row[: row.index(eos) + 1] if eos is not None and eos in row else row


def generate_ids(handle: RunHandle, ids, *, max_new_tokens: int = 64, temperature: float = 0.8, top_k: int = 0,
                 seed: int = 0, use_adapter: bool = True) -> list[int]:
    """Up to ``max_new_tokens`` token ids after ``ids`` from base + adapter (or the base alone),
    decoded with a KV cache by `lora_jax.models.generate` through ``lora.wrap``; stops after the
    tokenizer's EOS (included) and at the model's last position.

    Raises:
      ValueError: an empty prompt, or one that fills the model's positions.
    """
    from ..models import generate as _generate

    ids = [int(i) for i in ids]
    if not ids:
        raise ValueError("generate: empty prompt")
    new = _room(handle, len(ids), max_new_tokens)
    tree = handle.lora_params if use_adapter else _model.base_only(handle.lora_params)
    eos, pad = _eos_pad(handle.tokenizer)
    out = _generate(handle.model, tree, np.asarray([ids], np.int32), new, temperature=float(temperature),
                    top_k=int(top_k) or None, rng=jax.random.key(int(seed)),
                    eos_token_id=() if eos is None else int(eos), pad_token_id=int(pad), apply_fn=handle.decode_fn)
    return _until_eos(np.asarray(jax.device_get(out))[0, len(ids):].tolist(), eos)


def generate(handle: RunHandle, prompt: str = "", *, max_new_tokens: int = 64, temperature: float = 0.8,
             top_k: int = 0, seed: int = 0, use_adapter: bool = True) -> str:
    """``prompt`` and a sampled continuation from base + adapter (or the base alone), as text
    (`generate_ids`; greedy at ``temperature == 0``)."""
    tok = handle.tokenizer
    ids = _prompt_ids(tok, prompt)
    new = generate_ids(handle, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                       use_adapter=use_adapter)
    return tok.decode(ids + new, skip_special_tokens=True)


def generate_many(handle: RunHandle, prompts: Sequence[str], names: Sequence[Optional[str]],
                  adapters: Mapping[str, str], *, max_new_tokens: int = 64, temperature: float = 0.8, top_k: int = 0,
                  seed: int = 0) -> list[str]:
    """Each prompt continued with its own adapter, every row in one batch: the adapters it names
    (PEFT directories by name; ``"run"`` is the run's own unless given, and a run of several
    adapters serves each by its name) go into a `lora.AdapterBank`
    over the kernels they adapt, and `lora_jax.models.generate` routes each row to its slot
    (``None``: the base, as ``generate --base``). Each text equals `generate` with that adapter
    alone (greedy), whatever the other rows' lengths.

    Raises:
      ValueError: a name no adapter has, an empty prompt, a prompt that fills the model's positions,
        or an adapter that does not fit the bank (its message names the slot and module).
    """
    from ..bank import AdapterBank
    from ..models import generate as _generate
    from ..weight import is_trainable, is_unit

    if len(prompts) != len(names) or not prompts:
        raise ValueError(f"generate: {len(prompts)} prompts and {len(names)} adapter names; give one name per prompt")
    run_names = [n for n, _ in adapter_configs(handle.cfg)]  # a run of several adapters: each by name
    known = set(adapters) | (set(run_names) if run_names else {"run"})
    unknown = sorted({n for n in names if n is not None and n not in known})
    if unknown:
        raise ValueError(f"generate: no adapter named {unknown}; adapters: {sorted(known)} (null: the base model)")

    def plain(tree):  # fully trained leaves (modules_to_save) as the arrays they hold, as `generate --base` runs
        return jax.tree_util.tree_map(lambda x: x.value if is_trainable(x) else x, tree, is_leaf=is_unit)

    used = list(dict.fromkeys(n for n in names if n is not None))
    def own(n):  # the run's adapter of that name (its only one: "run")
        return _only(handle.lora_params, n) if n in run_names else handle.lora_params

    trees = {n: plain(_model.load_peft(handle.model, handle.lora_params, adapters[n]) if n in adapters else own(n))
             for n in used}
    tok = handle.tokenizer
    ids = [_prompt_ids(tok, p) for p in prompts]
    room = [_room(handle, len(i), max_new_tokens) for i in ids]
    width, new = max(len(i) for i in ids), max(room)  # a row's tokens past its room are cut below
    eos, pad = _eos_pad(tok)
    x = np.full((len(ids), width), pad, np.int32)
    mask = np.zeros((len(ids), width), np.int32)
    for j, row in enumerate(ids):  # left padding: every row ends with a real token
        x[j, width - len(row):], mask[j, width - len(row):] = row, 1
    layouts = {p: lw.layout for n in used for p, lw in _tree.lora_items(trees[n])}
    rank = max([node.rank for n in used for _, lw in _tree.lora_items(trees[n]) for node in lw.chain()] or [1])
    base = plain(_model.base_only(handle.lora_params))
    if layouts:
        bank = AdapterBank(base, layouts, slots=len(used), rank=rank)
        for k, n in enumerate(used):
            bank.load(k, trees[n], name=n)
        tree, row_ids = bank.tree, bank.ids(names)
    else:  # every row runs the base
        tree, row_ids = base, None
    out = _generate(handle.model, tree, x, new, attention_mask=mask, temperature=float(temperature),
                    top_k=int(top_k) or None, rng=jax.random.key(int(seed)),
                    eos_token_id=() if eos is None else int(eos), pad_token_id=int(pad), apply_fn=handle.decode_fn,
                    adapter_ids=row_ids)
    texts = []
    for j, row in enumerate(np.asarray(jax.device_get(out))[:, width:].tolist()):
        row = _until_eos(row[:room[j]], eos)
        texts.append(tok.decode(ids[j] + row, skip_special_tokens=True))
    return texts

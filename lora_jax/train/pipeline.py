"""A whole run, from a validated `Config` to an exported adapter: what ``lora-jax train`` calls.

Order of work (nothing is written until everything that can be checked has been):

1. ``jax.distributed.initialize()`` when ``distributed: true`` (a peer silent for ``peer_timeout``
   seconds stops the others); the processes must hold the same config and code (`hosts.check_same`),
   and every setup check below fails on all of them alike (`hosts.agree`); the mesh.
2. The run directory is chosen (``out_dir``, or ``runs/<name>-<timestamp>``; with ``resume`` the
   newest run of that config holding a finalized checkpoint), locked for this run (`lock.RunLock`:
   a second run of it is refused, naming this one's pid) and checked.
3. Tokenizer and base model: a local checkpoint (``model.path``), the run's own pretrained base
   (when resuming), or a fresh model built from ``model.init`` with a byte-level BPE tokenizer
   trained on the pretraining text.
4. Data read, tokenized and packed (0 trained tokens is an error naming the files and the cause);
   the LoRA rules resolved against the model; when resuming, the newest checkpoint that restores
   intact is found (`checkpoint.Checkpointer.restore` verifies every checksum; damaged newer
   steps are named, one line each) and ``train.steps`` checked against it.
5. Writes begin (a run that failed before here leaves its directory as it found it): damaged
   checkpoints moved to ``damaged-checkpoints/``; ``config.yaml``; for a fresh model, pretraining
   and ``base/``; then LoRA training with metrics, evals and checkpoints; at the end ``adapter/``
   (PEFT), ``loss.png`` and ``summary.json``.

Each step is one function over a small `_Run` state (`_prepare`, `_load_base`, `_load_data`,
`_choose_checkpoint`, `_start_writes`, `_pretrain`, `_finetune`, `_export`). The train records and the summary report
tokens/s and the model FLOPs utilization (`flops`). Pretraining and LoRA training run the step
settings `tuning` picks (``train.remat``, ``train.loss``, ``train.unroll``: fastest within the
device's memory, or as fixed in the config); `runs.evaluate` uses the chunked cross-entropy of `loss`
unless ``train.loss`` is ``plain`` (it never holds the full ``(batch, seq, vocab)`` float32 logits).

Run directory::

    config.yaml  metrics.jsonl  loss.png  summary.json  .lock (the live run's pid and host)
    base/         the pretrained base (only when model.path is null): config.json, model.safetensors
                  and the tokenizer (PyTorch transformers loads it as is)
    checkpoints/  orbax steps: adapter + optimizer state + rng + data position, with checksums
    damaged-checkpoints/  steps a resume found damaged and skipped (never deleted; only if any)
    adapter/      the adapter, PEFT format
    adapters/<name>/  instead, for a run with ``adapters``: each adapter, PEFT format

Crashes: every file is written under a temporary name and renamed, and orbax finalizes a step by
renaming it, so a killed run leaves complete files, finalized checkpoints and hidden temporaries.
``train.resume`` removes the temporaries, restores the newest finalized checkpoint (or, when the
run stopped before its first one, starts it over in the same directory) and drops the metric
records written after that step; the resumed run then computes exactly what an uninterrupted one
would. SIGINT / SIGTERM checkpoint the current step first (see `trainer.Trainer.fit`).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
import time
from typing import Callable, Optional

import jax
import numpy as np

from .. import tree as _tree
from ..models.family import roles_of
from ..rules import Rules
from . import data as _data
from . import flops as _flops
from . import hosts as _hosts
from . import model as _model
from . import sharding as shd
from . import tuning as _tuning
from .checkpoint import Checkpointer, DamagedCheckpoint, latest_step
from .config import Config, ConfigError, load_yaml, resolve_path, to_dict, to_yaml
from .files import atomic_write_text, remove_leftovers
from .lock import LOCK_NAME, RunDirLocked, RunLock
from .metrics import MetricsWriter, perplexity, plot_losses, read_metrics, strict_json
from .config import adapter_configs
from .parts import (base_remat, checkpoint_target, ckpt_dir, compute_dtype, data_rows, lora_tree, loop_specs,
                    packed_rows, rules_of, tokenized)
from .trainer import LoopSpec, NonFiniteError, Trainer, TrainingInterrupted

__all__ = ["run", "resolve_out_dir", "RESUME_MAY_DIFFER"]

# keys that may change between a run and its resumption
RESUME_MAY_DIFFER = ("out_dir", "name", "distributed", "peer_timeout", "mesh.", "train.resume", "train.steps", "train.progress",
                     "train.eval_every", "train.eval_batches", "train.log_every", "train.checkpoint_every",
                     "train.keep_checkpoints", "train.async_checkpoint", "train.export", "train.plot",
                     "train.on_nonfinite", "train.max_skipped")


def _flat(d: dict, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "init":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resolve_out_dir(cfg: Config) -> tuple[str, Optional[int]]:
    """``(run directory, step to resume from or None)``; writes nothing.

    With ``train.resume`` and an ``out_dir`` that holds a run's ``config.yaml`` but no finalized
    checkpoint (it was stopped before its first one), the step is None: the run starts over there.

    Raises:
      ConfigError: resuming with nothing to resume; a fresh run into a directory that already
        holds one; a distributed run without an explicit ``out_dir``.
    """
    if cfg.out_dir is None:
        if cfg.distributed:
            raise ConfigError("out_dir: must be set when distributed is true (all hosts must agree on it)")
        if cfg.train.resume:
            runs = [d for d in sorted(glob.glob(os.path.join("runs", f"{cfg.name}-*")))
                    if latest_step(ckpt_dir(d)) is not None]
            if not runs:
                raise ConfigError(f"train.resume: no run of config {cfg.name!r} with a finalized checkpoint under "
                                  f"{os.path.abspath('runs')}; set out_dir to the run to resume")
            d = max(runs, key=os.path.getmtime)
            return d, latest_step(ckpt_dir(d))
        base = os.path.join("runs", f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        d, k = base, 1
        while os.path.exists(d):
            k += 1
            d = f"{base}-{k}"
        return d, None
    d = cfg.out_dir
    step = latest_step(ckpt_dir(d))
    if cfg.train.resume:
        if step is None and not os.path.isfile(os.path.join(d, "config.yaml")):
            raise ConfigError(f"train.resume: no finalized checkpoint in {os.path.join(d, 'checkpoints')!r}; "
                              "nothing to resume")
        return d, step  # step None: a run stopped before its first checkpoint, started over
    if step is not None:
        raise ConfigError(f"out_dir: {d!r} already holds a run (checkpoints up to step {step}); pass --resume "
                          "(train.resume=true) to continue it, or choose another out_dir")
    if os.path.isdir(d) and [n for n in os.listdir(d) if n != LOCK_NAME]:
        raise ConfigError(f"out_dir: {d!r} exists and is not empty; choose another out_dir or remove it")
    if os.path.exists(d) and not os.path.isdir(d):
        raise ConfigError(f"out_dir: {d!r} exists and is not a directory")
    return d, None


def _check_resume_config(out_dir: str, cfg: Config) -> None:
    path = os.path.join(out_dir, "config.yaml")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as fh:
        saved = _flat(load_yaml(fh, path) or {})
    now = _flat(to_dict(cfg))
    diffs = [f"{k} (saved {saved.get(k)!r}, now {now.get(k)!r})" for k in sorted(set(saved) | set(now))
             if saved.get(k) != now.get(k) and not any(k == p or (p.endswith(".") and k.startswith(p))
                                                        for p in RESUME_MAY_DIFFER)]
    if diffs:
        raise ConfigError(["train.resume: the config differs from the run's saved config.yaml in: " + d
                           for d in diffs])


def _step_candidates(r: "_Run", make_loss: Callable) -> list:
    """``[(tuning.StepSettings, loss_fn)]`` for the Trainer, fastest first (`tuning.candidates` with the
    config's fixed choices); ``make_loss(model, chunked=, chunk=)`` is `lora_loss_fn` or `full_loss_fn`."""
    t = r.cfg.train
    unroll = {"auto": _tuning.AUTO, "all": 0}.get(t.unroll, t.unroll)
    cands = _tuning.candidates(jax.default_backend(), remat=t.remat, loss=t.loss, unroll=unroll)
    return [(c, make_loss(_model.with_step_settings(r.model, c), chunked=c.loss == "chunked",
                          chunk=t.loss_chunk or None)) for c in cands]


def _init_distributed(peer_timeout: int):
    """``jax.distributed.initialize()`` with its auto-detection (SLURM, Open MPI, TPU pods, or the
    ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` variables); a peer
    silent for ``peer_timeout`` seconds stops the others."""
    import inspect

    kw = {}
    if "heartbeat_timeout_seconds" in inspect.signature(jax.distributed.initialize).parameters:
        kw["heartbeat_timeout_seconds"] = int(peer_timeout)
    for var, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        if os.environ.get(var):  # jax reads JAX_COORDINATOR_ADDRESS itself, not these two
            try:
                kw[arg] = int(os.environ[var])
            except ValueError:
                raise ConfigError(f"distributed: {var}={os.environ[var]!r} is not an integer") from None
    try:
        jax.distributed.initialize(**kw)
    except (RuntimeError, ValueError) as e:
        if "already" in str(e):
            return
        raise ConfigError(f"distributed: jax.distributed.initialize() failed ({e}). Run one process per host under "
                          "SLURM, Open MPI or a TPU pod, or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
                          "JAX_PROCESS_ID; or set distributed=false on a single host") from None


@dataclasses.dataclass
class _Run:
    """The state one `run` passes from phase to phase."""

    cfg: Config
    out_dir: str
    resume_step: Optional[int]  # the checkpoint to resume from (None: from step 0)
    restart: bool  # train.resume on a run stopped before its first checkpoint: start it over in place
    mesh: object
    say: Callable
    main: bool  # process 0 (writes the files)
    tokenizer: object = None
    model: object = None
    params: object = None  # the base (pretrained, loaded or being pretrained)
    fresh: bool = False  # the base was built from model.init here (and is saved to base/)
    pre_rows: Optional[_data.PackedRows] = None  # pretraining rows (a fresh base with pretraining steps)
    rows: Optional[_data.PackedRows] = None
    eval_rows: Optional[_data.PackedRows] = None
    data_summary: dict = dataclasses.field(default_factory=dict)
    rules: Optional[Rules] = None
    adapters: list = dataclasses.field(default_factory=list)  # [(name, Config)] of a run with several adapters
    order: object = None  # the row order of several adapters' rows (data.MixedOrder); None: data.Order
    metrics: Optional[MetricsWriter] = None
    summary: dict = dataclasses.field(default_factory=dict)
    result: Optional[dict] = None  # the fine-tuning loop's result
    lora_params: object = None  # base + trained adapter after fine-tuning
    lock: Optional[RunLock] = None  # this run's lock on out_dir (process 0)
    damaged: list = dataclasses.field(default_factory=list)  # DamagedCheckpoint of newer steps, when resuming
    writing: bool = False  # `_start_writes` has begun

    @property
    def base_dir(self) -> str:
        return os.path.join(self.out_dir, "base")

    @property
    def resume_hint(self) -> str:
        return f"resume with the same command plus out_dir={os.path.abspath(self.out_dir)} --resume"

    def flops(self, n_rows: int, seq_len: int, **kw) -> tuple[Optional[float], Optional[float]]:
        """``(model FLOPs of one step, peak FLOP/s of one device)`` (`flops`; None where unknown)."""
        try:
            f = _flops.step_flops(self.model, n_rows, seq_len, **kw)
        except (AttributeError, TypeError, ValueError):  # a family without the fields the count needs
            f = None
        return f, _flops.peak_flops(dtype=self.model.config.dtype)


def _prepare(cfg: Config, echo: Callable) -> _Run:
    """Distributed init, the mesh, the run directory and every check that needs no model."""
    if cfg.distributed:
        _init_distributed(cfg.peer_timeout)
    main = jax.process_index() == 0
    say = echo if main else (lambda *a, **k: None)
    # every process runs the same config and code, or none runs (the differences named)
    _hosts.check_same({**{f"config {k}": v for k, v in _flat(to_dict(cfg)).items()},
                       "lora_jax code": _hosts.code_version(), "jax": jax.__version__,
                       "processes": jax.process_count()})
    try:
        mesh = shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    except ValueError as e:
        raise ConfigError(f"mesh: {e}") from None
    if cfg.out_dir is None:  # a new runs/<name>-<time> or the newest run of this config
        cfg = dataclasses.replace(cfg, out_dir=resolve_out_dir(cfg)[0])
    # one lock per run, taken by process 0; the others learn its outcome
    lock = _hosts.together("the run directory's lock", lambda: _lock(cfg.out_dir) if main else None)
    try:
        def checked():
            where = resolve_out_dir(cfg)  # again under the lock: no other run can change it now
            if cfg.train.resume:
                _check_resume_config(where[0], cfg)
            return where

        out_dir, resume_step = _hosts.together("the run directory", checked)
        _hosts.check_same({"out_dir": os.path.abspath(out_dir), "resume step": resume_step})
    except BaseException:
        if lock is not None:
            lock.release(clean=True)
        raise
    restart = bool(cfg.train.resume) and resume_step is None
    sizes = shd.mesh_shape(mesh)
    n_batch = sizes["data"] * sizes["fsdp"]
    t = cfg.train
    problems = []
    sizes_of = {name: one.train.batch_size for name, one in adapter_configs(cfg)}
    if sizes_of:
        micro = sum(b // t.grad_accum for b in sizes_of.values())
        if micro % n_batch:
            problems.append(f"adapters: the micro-batch of all adapters together ({' + '.join(map(str, sizes_of.values()))}"
                            f" rows / grad_accum {t.grad_accum} = {micro}) must divide by mesh data x fsdp = {n_batch} "
                            f"(mesh {sizes}); change the adapters' train.batch_size")
    elif (t.batch_size // t.grad_accum) % n_batch:
        problems.append(f"train.batch_size: {t.batch_size} / grad_accum {t.grad_accum} = {t.batch_size // t.grad_accum}"
                        f" rows per micro-batch must divide by mesh data x fsdp = {n_batch} (mesh {sizes})")
    if cfg.model.path is None and cfg.model.pretrain.steps and cfg.model.pretrain.batch_size % n_batch:
        problems.append(f"model.pretrain.batch_size: {cfg.model.pretrain.batch_size} must divide by mesh data x "
                        f"fsdp = {n_batch}")
    if problems:
        if lock is not None:
            lock.release(clean=True)
        raise ConfigError(problems)
    if lock is not None and lock.describe_previous():
        say(f"# {lock.describe_previous()}")
    say(f"# lora-jax train: resolved config ({'resuming ' + out_dir if cfg.train.resume else out_dir})")
    say(to_yaml(cfg).rstrip())
    say(f"# devices: {jax.device_count()} x {jax.devices()[0].platform}, processes: {jax.process_count()}, "
        f"mesh {sizes}")
    return _Run(cfg=cfg, out_dir=out_dir, resume_step=resume_step, restart=restart, mesh=mesh, say=say, main=main,
                lock=lock)


def _lock(out_dir: str) -> RunLock:
    """The run directory's lock (`lock.RunLock`; ConfigError naming the live holder if taken)."""
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"out_dir: {out_dir!r} exists and is not a directory")
    try:
        return RunLock.acquire(out_dir)
    except RunDirLocked as e:
        raise ConfigError(f"out_dir: {e}") from None
    except OSError as e:
        raise ConfigError(f"out_dir: cannot create or lock {out_dir!r} ({e.strerror or e})") from None


def _choose_checkpoint(r: _Run) -> None:
    """When resuming: the newest checkpoint that reads back intact (checksums verified), before
    anything is written. Newer damaged ones are reported, one line each, and moved aside later
    (`_start_writes`); ``train.steps`` must reach the chosen step.

    Raises:
      ConfigError: no intact checkpoint (nothing is changed), a checkpoint of another model or
        adapter config, or ``train.steps`` below the checkpoint's step.
    """
    if r.resume_step is None:
        return
    cfg = r.cfg
    trainable = jax.eval_shape(lambda p: _tree.split(lora_tree(cfg, r.model, p))[0], r.params)
    target = checkpoint_target(cfg, trainable)
    ck = Checkpointer(ckpt_dir(r.out_dir), keep=cfg.train.keep_checkpoints, async_save=False)
    chosen = None
    try:
        for step in sorted(ck.all_steps(), reverse=True):
            try:
                ck.restore(step, target)
            except DamagedCheckpoint as e:
                r.damaged.append(e)
                continue
            except ValueError as e:
                raise ConfigError(f"train.resume: {e}") from None
            chosen = step
            break
    finally:
        ck.close()
    if chosen is None:
        raise ConfigError(f"train.resume: no intact checkpoint in {ckpt_dir(r.out_dir)!r} to resume from ("
                          + "; ".join(f"step {e.step}: {e.file}: {e.reason}" for e in r.damaged)
                          + "); nothing was changed")
    for e in r.damaged:
        r.say(f"# {e}; falling back to step {chosen}")
    if chosen > cfg.train.steps:
        raise ConfigError(f"train.steps: {cfg.train.steps} is below step {chosen} of the checkpoint to resume "
                          f"({os.path.join(ckpt_dir(r.out_dir), str(chosen))}); set train.steps={chosen} or more")
    r.resume_step = chosen


def _load_base(r: _Run) -> None:
    """Tokenizer and base model, in memory: ``model.path``, the run's own pretrained base (when
    resuming), or a fresh model from ``model.init`` with a BPE tokenizer trained on the
    pretraining text."""
    cfg = r.cfg
    kw = dict(compute_dtype=compute_dtype(cfg.model.compute_dtype), param_dtype=cfg.model.param_dtype,
              remat=base_remat(cfg))
    if cfg.model.path is not None:
        try:
            r.tokenizer = _model.load_tokenizer(cfg.tokenizer.path or cfg.model.path)
            r.model, r.params = _model.load_model(cfg.model.path, **kw)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.path: cannot load {cfg.model.path!r}: {e}") from None
    elif r.resume_step is not None and os.path.isdir(r.base_dir):
        r.tokenizer = _model.load_tokenizer(r.base_dir)
        r.model, r.params = _model.load_model(r.base_dir, **kw)
    else:
        pre_paths = cfg.model.pretrain.data
        if cfg.tokenizer.path is not None:
            r.tokenizer = _model.load_tokenizer(cfg.tokenizer.path)
        else:
            try:
                pre_docs = _data.read_documents([resolve_path(p) for p in (pre_paths if isinstance(pre_paths, list)
                                                                           else [pre_paths])])
            except (ValueError, FileNotFoundError) as e:
                raise ConfigError(f"model.pretrain.data: {e}") from None
            r.tokenizer = _model.build_tokenizer([getattr(d, "text", "") for d in pre_docs], cfg.tokenizer.vocab_size)
        tok = r.tokenizer
        ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
        try:
            r.model, r.params = _model.new_model(cfg.model.init, vocab_size=len(tok), seed=cfg.seed, token_ids=ids,
                                                 **kw)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ConfigError(f"model.init: cannot build the model ({type(e).__name__}: {e})") from None
        r.fresh = True
        if cfg.model.pretrain.steps:
            docs, info = tokenized(cfg, tok, pre_paths, "model.pretrain.data", r.say, fmt="auto")
            r.pre_rows = packed_rows(cfg, tok, docs, info, "model.pretrain.data", pre_paths)
    vocab = getattr(r.model.config, "vocab_size", None)
    if vocab is not None and len(r.tokenizer) > vocab:
        key = "tokenizer.path" if cfg.tokenizer.path is not None else "model.path"
        raise ConfigError(f"{key}: the tokenizer has {len(r.tokenizer):,} tokens but the model's embedding only "
                          f"{vocab:,} rows: ids from {vocab:,} on would index past it (NaN losses from the first "
                          "step); use the model's own tokenizer or resize the model")
    max_pos = _model.max_positions(r.model)
    if max_pos is not None and cfg.data.seq_len > max_pos:
        raise ConfigError(f"data.seq_len: {cfg.data.seq_len} is more than the model's {max_pos} positions")


def _load_data(r: _Run) -> None:
    """The fine-tuning data, tokenized and packed, and the LoRA rules resolved against the model."""
    cfg = r.cfg
    r.adapters = adapter_configs(cfg)
    if r.adapters:
        _load_adapters_data(r)
        return
    r.rows, r.eval_rows, r.data_summary = data_rows(cfg, r.tokenizer, r.say)
    r.rules = rules_of(cfg, r.model)
    _check_targets(r, cfg, "")
    d = r.data_summary
    r.say(f"# data: {d['train_documents']:,} train documents -> {len(r.rows):,} rows of {cfg.data.seq_len + 1} tokens "
          f"(packing {d['packing']}, {100 * d['padding']:.1f}% padding, {r.rows.n_targets:,} trained tokens); "
          f"{d['eval_documents']:,} eval documents" + (f" -> {len(r.eval_rows):,} rows" if r.eval_rows is not None
                                                        else ""))


def _check_targets(r: _Run, cfg: Config, where: str) -> None:
    """Resolve ``cfg``'s LoRA rules against the model now, before any write (ConfigError naming
    ``where`` + the key otherwise)."""
    try:
        _tree.init(r.params, rules_of(cfg, r.model), 0)
    except (ValueError, TypeError) as e:
        key = "lora.rank" if f"rank {cfg.lora.rank} is larger" in str(e) else "lora.targets"
        raise ConfigError(f"{where}{key}: {e}") from None


def _load_adapters_data(r: _Run) -> None:
    """`_load_data` of a run with ``adapters``: each adapter's own train and eval rows (one
    `data.Mixture`, read in a `data.MixedOrder`: each adapter's rows as its run alone reads them)."""
    cfg = r.cfg
    rows, evals, r.data_summary = [], [], {"adapters": {}}
    for j, (name, one) in enumerate(r.adapters):
        where = f"adapters[{j}] ({name})."
        try:
            t, e, d = data_rows(one, r.tokenizer, r.say)
        except ConfigError as err:
            raise ConfigError([where + p for p in err.problems]) from None
        _check_targets(r, one, where)
        rows.append(t)
        evals.append(e)
        r.data_summary["adapters"][name] = d
        r.say(f"# data of adapter {name}: {d['train_documents']:,} train documents -> {len(t):,} rows of "
              f"{cfg.data.seq_len + 1} tokens ({t.n_targets:,} trained tokens, {one.train.batch_size} rows per step); "
              f"{d['eval_documents']:,} eval documents" + (f" -> {len(e):,} rows" if e is not None else ""))
    r.rows = _data.Mixture(rows)
    have = [k for k, e in enumerate(evals) if e is not None]
    r.eval_rows = _data.Mixture([evals[k] for k in have], ids=have) if have else None
    r.order = _data.MixedOrder(r.rows, [one.train.batch_size for _, one in r.adapters], cfg.seed, cfg.train.grad_accum)


def _start_writes(r: _Run) -> None:
    """The first writes: damaged checkpoints moved aside, leftovers of an interrupted run removed,
    ``config.yaml``, the metrics file."""
    r.writing = True
    if r.main:
        for e in r.damaged:  # never deleted: kept beside the run for a look, out of orbax's way
            src = os.path.join(ckpt_dir(r.out_dir), str(e.step))
            dst = os.path.join(r.out_dir, "damaged-checkpoints", str(e.step))
            k = 1
            while os.path.exists(dst):
                k += 1
                dst = os.path.join(r.out_dir, "damaged-checkpoints", f"{e.step}-{k}")
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.rename(src, dst)
            r.say(f"# moved the damaged checkpoint step {e.step} to {dst} (not used; delete it when done)")
        if r.cfg.train.resume:
            gone = remove_leftovers(r.out_dir)
            if gone:
                r.say(f"# removed {len(gone)} unfinished write(s) of an interrupted run: {', '.join(gone)}")
        if r.restart:
            r.say(f"# train.resume: no finalized checkpoint in {ckpt_dir(r.out_dir)} (the run stopped before its "
                  "first one): starting it over from step 0")
        os.makedirs(r.out_dir, exist_ok=True)
        atomic_write_text(os.path.join(r.out_dir, "config.yaml"), to_yaml(r.cfg))
    _hosts.barrier("run directory ready")  # no process opens the checkpoints before they are in order
    r.metrics = MetricsWriter(os.path.join(r.out_dir, "metrics.jsonl"), resume_step=r.resume_step, restart=r.restart)
    r.summary = {"out_dir": os.path.abspath(r.out_dir), "data": r.data_summary}


def _pretrain(r: _Run) -> None:
    """Full-parameter pretraining of a fresh base (``model.pretrain``), then ``base/`` is written."""
    cfg = r.cfg
    if r.pre_rows is not None:
        pc = cfg.model.pretrain
        spec = LoopSpec.from_config(cfg.train, steps=pc.steps, batch_size=pc.batch_size, grad_accum=1, lr=pc.lr,
                                    warmup_steps=pc.warmup_steps, weight_decay=0.0, eval_every=0, checkpoint_every=0)
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(r.params))
        r.say(f"# pretraining the fresh base model ({n_params:,} params) for {pc.steps} steps on {pc.data}")
        flops, peak = r.flops(pc.batch_size, r.pre_rows.seq_len, full=True)
        pre = Trainer(spec, mesh=r.mesh, loss_fn=_step_candidates(r, _model.full_loss_fn), trainable=r.params,
                      rows=r.pre_rows, seed=cfg.seed, phase="pretrain", metrics=r.metrics, echo=r.say,
                      stacked=_model.stacked_paths(r.model), roles=roles_of(r.model), flops_per_step=flops,
                      peak_flops=peak)
        try:
            res = pre.fit()
        except TrainingInterrupted as e:
            raise TrainingInterrupted(f"{e} (pretraining); {r.resume_hint} to start the run over",
                                      signum=e.signum, step=e.step) from None
        except NonFiniteError as e:
            raise NonFiniteError(f"{e}; lower model.pretrain.lr or check model.pretrain.data", step=e.step) from None
        r.params = pre.trainable
        last = pre.history[-10:]
        r.summary["pretrain"] = {"steps": pc.steps, "train_s": res["train_s"],
                                 "final_train_loss": float(np.mean([l for _, l in last])) if last else None,
                                 **_speed(res)}
        r.summary["pretrain"]["step_settings"] = pre.settings.label
        r.say(f"# pretrained in {res['train_s']:.1f}s (train loss {r.summary['pretrain']['final_train_loss']}; "
              f"{_speed_line(res)})")
        del pre
    if r.fresh:
        _model.save_model(r.model, r.params, r.tokenizer, r.base_dir)
        r.say(f"# base model saved to {r.base_dir}")


def _finetune(r: _Run, stop_after: Optional[int]) -> None:
    """LoRA training with evals and checkpoints (resumed from ``r.resume_step`` if set)."""
    cfg = r.cfg
    lp = lora_tree(cfg, r.model, r.params)
    count = _tree.count(lp)
    r.say(f"# LoRA: {count}")
    trainable, frozen = _tree.split(lp)
    del lp  # the trainer owns (and donates) the trainable half
    flops, peak = r.flops(loop_specs(cfg)[0].batch_size, r.rows.seq_len, n_lora=count.trainable)
    ck = Checkpointer(ckpt_dir(r.out_dir), keep=cfg.train.keep_checkpoints, async_save=cfg.train.async_checkpoint,
                      remove_unfinished=True)
    if ck.removed:
        r.say(f"# removed unfinished checkpoint save(s) of an interrupted run (never finalized, not used): "
              f"{', '.join(ck.removed)}")
    try:
        spec, specs = loop_specs(cfg)
        trainer = Trainer(spec, mesh=r.mesh,
                          loss_fn=_step_candidates(r, functools.partial(_model.lora_loss_fn, adapters=tuple(specs))),
                          trainable=trainable, frozen=frozen, rows=r.rows, eval_rows=r.eval_rows, seed=cfg.seed,
                          phase="lora", metrics=r.metrics, checkpointer=ck, echo=r.say,
                          stacked=_model.stacked_paths(r.model), roles=roles_of(r.model), flops_per_step=flops,
                          peak_flops=peak, adapters=specs or None, order=r.order)
        r.say(f"# compiled the train/eval steps in {trainer.compile_s:.1f}s ({trainer.settings.label}"
              + (f"; tried {', '.join(t['settings'] for t in trainer.settings_tried)}"
                 if len(trainer.settings_tried) > 1 else "") + ")")
        r.summary["step_settings"] = trainer.settings.label
        if r.resume_step is not None:
            try:
                step = trainer.restore(r.resume_step)
            except DamagedCheckpoint as e:  # verified moments ago in `_choose_checkpoint`: changed since
                raise ConfigError(f"train.resume: {e}") from None
            r.say(f"# resuming from step {step} of {cfg.train.steps} (checkpoint "
                  f"{os.path.join(ckpt_dir(r.out_dir), str(step))}, data position {trainer.position})")
        try:
            res = trainer.fit(until=stop_after)
        except TrainingInterrupted as e:
            raise TrainingInterrupted(f"{e}; {r.resume_hint}", signum=e.signum, step=e.step,
                                      checkpoint_step=e.checkpoint_step) from None
        except NonFiniteError as e:
            fix = ("lower train.lr, check the data around that step, or set train.on_nonfinite=skip; then "
                   + (r.resume_hint + f" (from step {e.checkpoint_step})" if e.checkpoint_step is not None
                      else "start again"))
            raise NonFiniteError(f"{e}; {fix}", step=e.step, checkpoint_step=e.checkpoint_step) from None
    finally:
        ck.close()
    r.result = res
    r.lora_params = _tree.combine(trainer.trainable, trainer.frozen)
    lora_evals = [rec for rec in read_metrics(os.path.join(r.out_dir, "metrics.jsonl"))
                  if rec.get("kind") == "eval" and rec.get("phase") == "lora"] if r.main else trainer.evals
    r.summary.update({"step": res["step"], "steps": cfg.train.steps, "stopped": res["stopped"],
                      "train_s": res["train_s"], "tokens_per_s": res["tokens_per_s"], "compile_s": res["compile_s"],
                      **_speed(res), "trainable_params": count.trainable, "total_params": count.total})
    if res["step"] > (r.resume_step or 0):
        r.say(f"# LoRA steps: {_speed_line(res)}")
    if lora_evals:
        r.summary["eval_loss_before"] = lora_evals[0]["eval_loss"]
        r.summary["eval_loss_after"] = lora_evals[-1]["eval_loss"]
        r.summary["eval_ppl_before"] = perplexity(r.summary["eval_loss_before"])
        r.summary["eval_ppl_after"] = perplexity(r.summary["eval_loss_after"])
    if r.adapters:
        r.summary["adapters"] = {}
        for name, one in r.adapters:
            mine = [rec["adapters"][name] for rec in lora_evals if name in rec.get("adapters", {})]
            r.summary["adapters"][name] = {
                "rank": one.lora.rank, "lr": one.train.lr, "batch_size": one.train.batch_size,
                **({"eval_loss_before": mine[0]["eval_loss"], "eval_loss_after": mine[-1]["eval_loss"]} if mine else {})}


def _speed(res: dict) -> dict:
    """The speed fields of a loop result (see `flops` for the FLOPs and MFU)."""
    return {"step_tokens_per_s": res["step_tokens_per_s"], "model_tflops_per_s": res["tflops"], "mfu": res["mfu"]}


def _speed_line(res: dict) -> str:
    mfu = "MFU n/a (no known peak FLOP/s for this device and dtype)" if res["mfu"] is None else f"MFU {res['mfu']:.1%}"
    tf = "" if res["tflops"] is None else f", {res['tflops'] * 1e3:,.1f} model GFLOP/s"
    return f"{res['step_tokens_per_s']:,.0f} tokens/s in steps{tf}, {mfu}"


def _export(r: _Run) -> None:
    """A finished run's adapter (PEFT) and loss plot; nothing for a run stopped early."""
    cfg = r.cfg
    if r.result["stopped"]:
        r.say(f"# stopped after step {r.result['step']}; resume with train.resume=true out_dir={r.out_dir}")
        return
    base = cfg.model.path or os.path.abspath(r.base_dir)
    if cfg.train.export and r.adapters:
        for name, _ in r.adapters:
            adapter_dir = os.path.join(r.out_dir, "adapters", name)
            _model.export_peft(r.model, r.lora_params, adapter_dir, base_model=base, adapter=name)
            r.summary["adapters"][name]["adapter"] = os.path.abspath(adapter_dir)
    elif cfg.train.export:
        adapter_dir = os.path.join(r.out_dir, "adapter")
        _model.export_peft(r.model, r.lora_params, adapter_dir, base_model=base)
        r.summary["adapter"] = os.path.abspath(adapter_dir)
    if cfg.train.plot and r.main:
        png = os.path.join(r.out_dir, "loss.png")
        plot_losses(read_metrics(os.path.join(r.out_dir, "metrics.jsonl")), png, title=f"lora-jax train: {cfg.name}")
        r.summary["plot"] = os.path.abspath(png)


def run(cfg: Config, *, stop_after: Optional[int] = None, echo: Callable = print) -> dict:
    """Train as ``cfg`` says and return the run's summary (also written to ``summary.json``).

    The phases, in order (each a function of this module taking the one `_Run` state): `_prepare`
    (mesh, run directory, checks), `_load_base`, `_load_data` — nothing is written until here —
    then `_start_writes` (``config.yaml``, metrics), `_pretrain` (a fresh base; ``base/``),
    `_finetune` (LoRA, checkpoints) and `_export` (``adapter/``, ``loss.png``); ``summary.json``
    last.

    Args:
      cfg: a validated config (`load_config`).
      stop_after: stop after this LoRA step (checkpointed, nothing exported), as a preemption
        would; resume later with ``train.resume=true``.
      echo: where progress lines go (process 0 only).

    The run holds a lock on its directory from start to end (`lock.RunLock`): a second run of
    the same directory is refused, naming this one's pid.

    Raises:
      ConfigError: for everything found wrong before work starts (nothing is written then).
    """
    r = _prepare(cfg, echo)
    try:
        t0 = time.perf_counter()
        for phase in (_load_base, _load_data, _choose_checkpoint):  # a failure on one process stops all alike
            _hosts.together(phase.__name__.strip("_").replace("_", " "), lambda: phase(r))
        # every process resumes the same step, having skipped the same damaged ones
        _hosts.check_same({"resume step": r.resume_step, "damaged checkpoints": sorted(e.step for e in r.damaged)})
        r.say(f"# setup {time.perf_counter() - t0:.1f}s")
        _start_writes(r)
        try:
            _pretrain(r)
            _finetune(r, stop_after)
            _export(r)
        finally:
            r.metrics.close()
        s = r.summary
        if r.main:
            atomic_write_text(os.path.join(r.out_dir, "summary.json"), strict_json(s, indent=2) + "\n")
    finally:
        if r.lock is not None:
            r.lock.release(clean=not r.writing)
    if "eval_loss_after" in s and not s.get("stopped"):
        for name, a in (s.get("adapters") or {None: s}).items():
            if a.get("eval_loss_before") is not None and a.get("eval_loss_after") is not None:
                r.say(f"# eval loss on the held-out data{'' if name is None else ' of adapter ' + name}: "
                      f"{a['eval_loss_before']:.4f} before LoRA -> {a['eval_loss_after']:.4f} after (perplexity "
                      f"{perplexity(a['eval_loss_before']):.2f} -> {perplexity(a['eval_loss_after']):.2f})")
    r.say(f"# run directory: {r.out_dir}")
    return s

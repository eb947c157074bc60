"""A whole run, from a validated `Config` to an exported adapter: what ``lora-jax train`` calls.

Order of work (nothing is written until everything that can be checked has been):

1. ``jax.distributed.initialize()`` when ``distributed: true``; the mesh.
2. The run directory is chosen (``out_dir``, or ``runs/<name>-<timestamp>``; with ``resume`` the
   newest run of that config holding a finalized checkpoint) and checked.
3. Tokenizer and base model: a local checkpoint (``model.path``), the run's own pretrained base
   (when resuming), or a fresh model built from ``model.init`` with a byte-level BPE tokenizer
   trained on the pretraining text.
4. Data read, tokenized and packed; the LoRA rules resolved against the model.
5. Writes begin: ``config.yaml``; for a fresh model, pretraining and ``base/``; then LoRA training
   with metrics, evals and checkpoints; at the end ``adapter/`` (PEFT), ``loss.png`` and
   ``summary.json``.

Run directory::

    config.yaml  metrics.jsonl  loss.png  summary.json
    base/         the pretrained base (only when model.path is null), HF Flax checkpoint + tokenizer
    checkpoints/  orbax steps: adapter + optimizer state + rng + data position
    adapter/      the adapter, PEFT format

Crashes: every file is written under a temporary name and renamed, and orbax finalizes a step by
renaming it, so a killed run leaves complete files, finalized checkpoints and hidden temporaries.
``train.resume`` removes the temporaries, restores the newest finalized checkpoint (or, when the
run stopped before its first one, starts it over in the same directory) and drops the metric
records written after that step; the resumed run then computes exactly what an uninterrupted one
would. SIGINT / SIGTERM checkpoint the current step first (see `trainer.Trainer.fit`).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import time
from typing import Callable, Optional

import jax
import numpy as np

from .. import tree as _tree
from ..rules import Rules
from . import data as _data
from . import model as _model
from . import sharding as shd
from .checkpoint import Checkpointer, latest_step
from .config import Config, ConfigError, from_dict, resolve_path, to_dict, to_yaml
from .files import atomic_write_text, remove_leftovers
from .metrics import MetricsWriter, perplexity, plot_losses, read_metrics
from .trainer import LoopSpec, NonFiniteError, Trainer, TrainingInterrupted, make_optimizer

__all__ = ["run", "resolve_out_dir", "load_run", "load_checkpoint", "latest_run", "evaluate", "generate", "sample",
           "RunHandle", "compute_dtype", "RESUME_MAY_DIFFER"]

# keys that may change between a run and its resumption
RESUME_MAY_DIFFER = ("out_dir", "name", "distributed", "mesh.", "train.resume", "train.steps", "train.progress",
                     "train.eval_every", "train.eval_batches", "train.log_every", "train.checkpoint_every",
                     "train.keep_checkpoints", "train.async_checkpoint", "train.export", "train.plot",
                     "train.on_nonfinite", "train.max_skipped")


def compute_dtype(name: str) -> str:
    """``auto``: bfloat16 on GPU/TPU, float32 on CPU."""
    if name != "auto":
        return name
    return "bfloat16" if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else "float32"


def _flat(d: dict, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "init":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _ckpt_dir(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


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
                    if latest_step(_ckpt_dir(d)) is not None]
            if not runs:
                raise ConfigError(f"train.resume: no run of config {cfg.name!r} with a finalized checkpoint under "
                                  f"{os.path.abspath('runs')}; set out_dir to the run to resume")
            d = max(runs, key=os.path.getmtime)
            return d, latest_step(_ckpt_dir(d))
        base = os.path.join("runs", f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        d, k = base, 1
        while os.path.exists(d):
            k += 1
            d = f"{base}-{k}"
        return d, None
    d = cfg.out_dir
    step = latest_step(_ckpt_dir(d))
    if cfg.train.resume:
        if step is None and not os.path.isfile(os.path.join(d, "config.yaml")):
            raise ConfigError(f"train.resume: no finalized checkpoint in {os.path.join(d, 'checkpoints')!r}; "
                              "nothing to resume")
        return d, step  # step None: a run stopped before its first checkpoint, started over
    if step is not None:
        raise ConfigError(f"out_dir: {d!r} already holds a run (checkpoints up to step {step}); pass --resume "
                          "(train.resume=true) to continue it, or choose another out_dir")
    if os.path.isdir(d) and os.listdir(d):
        raise ConfigError(f"out_dir: {d!r} exists and is not empty; choose another out_dir or remove it")
    if os.path.exists(d) and not os.path.isdir(d):
        raise ConfigError(f"out_dir: {d!r} exists and is not a directory")
    return d, None


def _check_resume_config(out_dir: str, cfg: Config) -> None:
    path = os.path.join(out_dir, "config.yaml")
    if not os.path.isfile(path):
        return
    import yaml

    with open(path, encoding="utf-8") as fh:
        saved = _flat(yaml.safe_load(fh) or {})
    now = _flat(to_dict(cfg))
    diffs = [f"{k} (saved {saved.get(k)!r}, now {now.get(k)!r})" for k in sorted(set(saved) | set(now))
             if saved.get(k) != now.get(k) and not any(k == p or (p.endswith(".") and k.startswith(p))
                                                        for p in RESUME_MAY_DIFFER)]
    if diffs:
        raise ConfigError(["train.resume: the config differs from the run's saved config.yaml in: " + d
                           for d in diffs])


def _lora_rules(cfg: Config, model) -> Rules:
    lc = cfg.lora
    layout = _model.default_layout(model) if lc.layout == "auto" else lc.layout
    return Rules(lc.targets, rank=lc.rank, alpha=lc.alpha, dropout=lc.dropout, init=lc.init,
                 use_rslora=lc.rslora, exclude=lc.exclude, layout=layout)


def _rows(docs, tok, seq_len, packing, what):
    if not docs:
        raise ConfigError(f"{what}: no documents")
    enc = [_data.encode(d, tok) for d in docs]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return _data.pack(enc, seq_len, pad, packing)


def _documents(paths, fmt, what):
    paths = [resolve_path(p) for p in (paths if isinstance(paths, list) else [paths])]
    try:
        return _data.read_documents(paths, fmt)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"{what}: {e}") from None


def _init_distributed():
    """``jax.distributed.initialize()`` with its auto-detection (SLURM, Open MPI, TPU pods, or the
    ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` variables)."""
    kw = {}
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


def run(cfg: Config, *, stop_after: Optional[int] = None, echo: Callable = print) -> dict:
    """Train as ``cfg`` says and return the run's summary (also written to ``summary.json``).

    Args:
      cfg: a validated config (`load_config`).
      stop_after: stop after this LoRA step (checkpointed, nothing exported), as a preemption
        would; resume later with ``train.resume=true``.
      echo: where progress lines go (process 0 only).

    Raises:
      ConfigError: for everything found wrong before work starts (nothing is written then).
    """
    if cfg.distributed:
        _init_distributed()
    main = jax.process_index() == 0
    say = echo if main else (lambda *a, **k: None)
    try:
        mesh = shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    except ValueError as e:
        raise ConfigError(f"mesh: {e}") from None
    out_dir, resume_step = resolve_out_dir(cfg)
    restart = bool(cfg.train.resume) and resume_step is None
    if cfg.train.resume:
        _check_resume_config(out_dir, cfg)
    cfg = dataclasses.replace(cfg, out_dir=out_dir)
    sizes = shd.mesh_shape(mesh)
    n_batch = sizes["data"] * sizes["fsdp"]
    t = cfg.train
    problems = []
    if (t.batch_size // t.grad_accum) % n_batch:
        problems.append(f"train.batch_size: {t.batch_size} / grad_accum {t.grad_accum} = {t.batch_size // t.grad_accum}"
                        f" rows per micro-batch must divide by mesh data x fsdp = {n_batch} (mesh {sizes})")
    if cfg.model.path is None and cfg.model.pretrain.steps and cfg.model.pretrain.batch_size % n_batch:
        problems.append(f"model.pretrain.batch_size: {cfg.model.pretrain.batch_size} must divide by mesh data x "
                        f"fsdp = {n_batch}")
    if problems:
        raise ConfigError(problems)
    say(f"# lora-jax train: resolved config ({'resuming ' + out_dir if cfg.train.resume else out_dir})")
    say(to_yaml(cfg).rstrip())
    say(f"# devices: {jax.device_count()} x {jax.devices()[0].platform}, processes: {jax.process_count()}, "
        f"mesh {sizes}")

    # ---- tokenizer and base model (in memory) ------------------------------------------------
    t0 = time.perf_counter()
    cdt = compute_dtype(cfg.model.compute_dtype)
    base_dir = os.path.join(out_dir, "base")
    pre_rows = None
    fresh = False
    if cfg.model.path is not None:
        try:
            tok = _model.load_tokenizer(cfg.tokenizer.path or cfg.model.path)
            model, params = _model.load_model(cfg.model.path, compute_dtype=cdt, param_dtype=cfg.model.param_dtype)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.path: cannot load {cfg.model.path!r}: {e}") from None
    elif resume_step is not None and os.path.isdir(base_dir):
        tok = _model.load_tokenizer(base_dir)
        model, params = _model.load_model(base_dir, compute_dtype=cdt, param_dtype=cfg.model.param_dtype)
    else:
        pre_docs = _documents(cfg.model.pretrain.data, "auto", "model.pretrain.data")
        if cfg.tokenizer.path is not None:
            tok = _model.load_tokenizer(cfg.tokenizer.path)
        else:
            tok = _model.build_tokenizer([d.get("text", "") for d in pre_docs], cfg.tokenizer.vocab_size)
        try:
            model, params = _model.new_model(cfg.model.init, vocab_size=len(tok), seed=cfg.seed, compute_dtype=cdt,
                                             param_dtype=cfg.model.param_dtype)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ConfigError(f"model.init: cannot build the model ({type(e).__name__}: {e})") from None
        fresh = True
        if cfg.model.pretrain.steps:
            pre_rows = _rows(pre_docs, tok, cfg.data.seq_len, cfg.data.packing, "model.pretrain.data")
    max_pos = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if max_pos is not None and cfg.data.seq_len > max_pos:
        raise ConfigError(f"data.seq_len: {cfg.data.seq_len} is more than the model's {max_pos} positions")

    # ---- data and rules ----------------------------------------------------------------------
    docs = _documents(cfg.data.train, cfg.data.format, "data.train")
    if cfg.data.eval is not None:
        train_docs, eval_docs = docs, _documents(cfg.data.eval, cfg.data.format, "data.eval")
    else:
        try:
            train_docs, eval_docs = _data.split_eval(docs, cfg.data.eval_fraction)
        except ValueError as e:
            raise ConfigError(f"data.eval_fraction: {e}") from None
    try:
        rows = _rows(train_docs, tok, cfg.data.seq_len, cfg.data.packing, "data.train")
        eval_rows = _rows(eval_docs, tok, cfg.data.seq_len, cfg.data.packing, "data.eval") if eval_docs else None
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None
    rules = _lora_rules(cfg, model)
    try:
        _tree.init(params, rules, 0)  # resolves the targets against the model now, before any write
    except (ValueError, TypeError) as e:
        raise ConfigError(f"lora.targets: {e}") from None
    say(f"# data: {len(train_docs)} train documents -> {len(rows)} rows of {cfg.data.seq_len + 1} tokens "
        f"({rows.n_targets:,} trained tokens); {len(eval_docs)} eval documents"
        + (f" -> {len(eval_rows)} rows" if eval_rows is not None else ""))
    say(f"# setup {time.perf_counter() - t0:.1f}s")

    # ---- writes begin ------------------------------------------------------------------------
    if main:
        if cfg.train.resume:
            gone = remove_leftovers(out_dir)
            if gone:
                say(f"# removed {len(gone)} unfinished write(s) of an interrupted run: {', '.join(gone)}")
        if restart:
            say(f"# train.resume: no finalized checkpoint in {_ckpt_dir(out_dir)} (the run stopped before its "
                "first one): starting it over from step 0")
        os.makedirs(out_dir, exist_ok=True)
        atomic_write_text(os.path.join(out_dir, "config.yaml"), to_yaml(cfg))
    metrics = MetricsWriter(os.path.join(out_dir, "metrics.jsonl"), resume_step=resume_step, restart=restart)
    summary: dict = {"out_dir": os.path.abspath(out_dir)}
    resume_hint = f"resume with the same command plus out_dir={os.path.abspath(out_dir)} --resume"
    try:
        if pre_rows is not None:
            pc = cfg.model.pretrain
            spec = LoopSpec.from_config(cfg.train, steps=pc.steps, batch_size=pc.batch_size, grad_accum=1,
                                        lr=pc.lr, warmup_steps=pc.warmup_steps, weight_decay=0.0, eval_every=0,
                                        checkpoint_every=0)
            apply = _model.make_apply(model)
            say(f"# pretraining the fresh base model ({sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params)):,}"
                f" params) for {pc.steps} steps on {pc.data}")
            pre = Trainer(spec, mesh=mesh, logits_fn=lambda tr, fr, x, m, rng: apply(tr, x, m), trainable=params,
                          rows=pre_rows, seed=cfg.seed, phase="pretrain", metrics=metrics, echo=say)
            try:
                res = pre.fit()
            except TrainingInterrupted as e:
                raise TrainingInterrupted(f"{e} (pretraining); {resume_hint} to start the run over",
                                          signum=e.signum, step=e.step) from None
            except NonFiniteError as e:
                raise NonFiniteError(f"{e}; lower model.pretrain.lr or check model.pretrain.data",
                                     step=e.step) from None
            params = pre.trainable
            last = [r for r in pre.history[-10:]]
            summary["pretrain"] = {"steps": pc.steps, "train_s": res["train_s"],
                                   "final_train_loss": float(np.mean([l for _, l in last])) if last else None}
            say(f"# pretrained in {res['train_s']:.1f}s (train loss {summary['pretrain']['final_train_loss']})")
            del pre
        if fresh:
            _model.save_model(model, params, tok, base_dir)
            say(f"# base model saved to {base_dir}")

        lp = _tree.init(params, rules, jax.random.key(cfg.seed))
        count = _tree.count(lp)
        say(f"# LoRA: {count}")
        trainable, frozen = _tree.split(lp)
        apply = _model.make_apply(model)

        def logits_fn(tr, fr, x, m, rng):
            return _model.forward(apply, _tree.combine(tr, fr), x, m, rng=rng)

        ck = Checkpointer(_ckpt_dir(out_dir), keep=cfg.train.keep_checkpoints,
                          async_save=cfg.train.async_checkpoint, remove_unfinished=True)
        if ck.removed:
            say(f"# removed unfinished checkpoint save(s) of an interrupted run (never finalized, not used): "
                f"{', '.join(ck.removed)}")
        try:
            trainer = Trainer(LoopSpec.from_config(cfg.train), mesh=mesh, logits_fn=logits_fn, trainable=trainable,
                              frozen=frozen, rows=rows, eval_rows=eval_rows, seed=cfg.seed, phase="lora",
                              metrics=metrics, checkpointer=ck, echo=say)
            say(f"# compiled the train/eval steps in {trainer.compile_s:.1f}s")
            if resume_step is not None:
                step = trainer.restore(resume_step)
                say(f"# resuming from step {step} of {cfg.train.steps} (checkpoint {os.path.join(_ckpt_dir(out_dir), str(step))},"
                    f" data position {trainer.position})")
            try:
                res = trainer.fit(until=stop_after)
            except TrainingInterrupted as e:
                raise TrainingInterrupted(f"{e}; {resume_hint}", signum=e.signum, step=e.step,
                                          checkpoint_step=e.checkpoint_step) from None
            except NonFiniteError as e:
                fix = ("lower train.lr, check the data around that step, or set train.on_nonfinite=skip; then "
                       + (resume_hint + f" (from step {e.checkpoint_step})" if e.checkpoint_step is not None
                          else "start again"))
                raise NonFiniteError(f"{e}; {fix}", step=e.step, checkpoint_step=e.checkpoint_step) from None
        finally:
            ck.close()
        lora_evals = [r for r in read_metrics(os.path.join(out_dir, "metrics.jsonl"))
                      if r.get("kind") == "eval" and r.get("phase") == "lora"] if main else trainer.evals
        summary.update({"step": res["step"], "steps": cfg.train.steps, "stopped": res["stopped"],
                        "train_s": res["train_s"], "tokens_per_s": res["tokens_per_s"], "compile_s": res["compile_s"],
                        "trainable_params": count.trainable, "total_params": count.total})
        if lora_evals:
            summary["eval_loss_before"] = lora_evals[0]["eval_loss"]
            summary["eval_loss_after"] = lora_evals[-1]["eval_loss"]
            summary["eval_ppl_before"] = perplexity(summary["eval_loss_before"])
            summary["eval_ppl_after"] = perplexity(summary["eval_loss_after"])
        if res["stopped"]:
            say(f"# stopped after step {res['step']}; resume with train.resume=true out_dir={out_dir}")
        else:
            lp = _tree.combine(trainer.trainable, trainer.frozen)
            if cfg.train.export:
                adapter_dir = os.path.join(out_dir, "adapter")
                _model.export_peft(model, lp, adapter_dir, base_model=cfg.model.path or os.path.abspath(base_dir))
                summary["adapter"] = os.path.abspath(adapter_dir)
            if cfg.train.plot and main:
                png = os.path.join(out_dir, "loss.png")
                plot_losses(read_metrics(os.path.join(out_dir, "metrics.jsonl")), png,
                            title=f"lora-jax train: {cfg.name}")
                summary["plot"] = os.path.abspath(png)
    finally:
        metrics.close()
    if main:
        atomic_write_text(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=2) + "\n")
    if "eval_loss_after" in summary and not summary.get("stopped"):
        say(f"# eval loss on the held-out data: {summary['eval_loss_before']:.4f} before LoRA -> "
            f"{summary['eval_loss_after']:.4f} after (perplexity {summary['eval_ppl_before']:.2f} -> "
            f"{summary['eval_ppl_after']:.2f})")
    say(f"# run directory: {out_dir}")
    return summary


# ------------------------------------------------------------------------------------------
# an existing run: eval / merge / export / generate
# ------------------------------------------------------------------------------------------


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
        return _model.make_apply(self.model)


def load_checkpoint(out_dir: str, cfg: Config, lora_params, step: Optional[int] = None):
    """``(state, meta)`` of a run's checkpoint (the newest finalized one unless ``step``), on the
    default device: ``state`` holds ``adapter`` (the trainable half), ``opt_state`` and ``rng``
    (key data). ``lora_params`` (the run's LoRA tree) gives the structure; returns ``(None, None)``
    when the run has no checkpoint."""
    step = latest_step(_ckpt_dir(out_dir)) if step is None else step
    if step is None:
        return None, None
    trainable, _ = _tree.split(lora_params)
    tx, _ = make_optimizer(LoopSpec.from_config(cfg.train))
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    sds = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev)  # noqa: E731
    target = {"adapter": jax.tree_util.tree_map(sds, trainable),
              "opt_state": jax.tree_util.tree_map(sds, jax.eval_shape(tx.init, trainable)),
              "rng": jax.ShapeDtypeStruct((2,), np.uint32, sharding=dev)}
    ck = Checkpointer(_ckpt_dir(out_dir), keep=cfg.train.keep_checkpoints, async_save=False)
    try:
        return ck.restore(step, target)
    finally:
        ck.close()


def _restore_adapter(out_dir: str, cfg: Config, lp):
    """The newest checkpoint's adapter put into ``lp`` (None if there is no checkpoint)."""
    saved, meta = load_checkpoint(out_dir, cfg, lp)
    if saved is None:
        return None, None
    return _tree.combine(saved["adapter"], _tree.split(lp)[1]), int(meta["step"])


def latest_run(name: Optional[str] = None) -> str:
    """The newest directory under ``runs/`` holding a ``config.yaml`` (of config ``name`` if given)."""
    pat = os.path.join("runs", f"{name}-*" if name else "*")
    runs = [d for d in glob.glob(pat) if os.path.isfile(os.path.join(d, "config.yaml"))]
    if not runs:
        raise ConfigError(f"no run found under {os.path.abspath('runs')}; give the run directory")
    return max(runs, key=os.path.getmtime)


def load_run(out_dir: str, *, adapter: Optional[str] = None, overrides: Optional[dict] = None) -> RunHandle:
    """Load a run directory back: its config, base model, tokenizer and adapter.

    Args:
      out_dir: the run directory.
      adapter: a PEFT adapter directory to use instead of the run's own; by default the newest
        checkpoint, else ``out_dir/adapter``.
      overrides: nested config changes (e.g. ``{"data": {"eval": "other.jsonl"}}``).

    Raises:
      ConfigError: when the directory is not a run or holds no adapter.
    """
    import yaml

    path = os.path.join(out_dir, "config.yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"{out_dir!r} is not a lora-jax run directory (no config.yaml)")
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if overrides:
        from .config import _deep_update

        data = _deep_update(data, overrides)
    cfg = from_dict(data)
    cdt = compute_dtype(cfg.model.compute_dtype)
    base = cfg.model.path or os.path.join(out_dir, "base")
    if not os.path.isdir(base):
        raise ConfigError(f"{out_dir!r}: base model {base!r} not found")
    tok = _model.load_tokenizer(cfg.tokenizer.path or base)
    model, params = _model.load_model(base, compute_dtype=cdt, param_dtype=cfg.model.param_dtype)
    lp = _tree.init(params, _lora_rules(cfg, model), jax.random.key(cfg.seed))
    if adapter is not None:
        return RunHandle(cfg, out_dir, model, tok, _model.load_peft(model, lp, adapter), f"adapter {adapter}")
    restored, step = _restore_adapter(out_dir, cfg, lp)
    if restored is not None:
        return RunHandle(cfg, out_dir, model, tok, restored, f"checkpoint step {step}")
    exported = os.path.join(out_dir, "adapter")
    if os.path.isdir(exported):
        return RunHandle(cfg, out_dir, model, tok, _model.load_peft(model, lp, exported), f"adapter {exported}")
    raise ConfigError(f"{out_dir!r} holds neither a checkpoint nor an exported adapter")


def eval_rows_of(handle: RunHandle) -> _data.Rows:
    """The run's eval rows (``data.eval`` or the held-out share of ``data.train``)."""
    cfg = handle.cfg
    if cfg.data.eval is not None:
        docs = _documents(cfg.data.eval, cfg.data.format, "data.eval")
    else:
        _, docs = _data.split_eval(_documents(cfg.data.train, cfg.data.format, "data.train"), cfg.data.eval_fraction)
    if not docs:
        raise ConfigError("data.eval: the run has no eval documents; pass data.eval=PATH")
    return _rows(docs, handle.tokenizer, cfg.data.seq_len, cfg.data.packing, "data.eval")


def evaluate(handle: RunHandle, rows: _data.Rows, batch_size: Optional[int] = None) -> dict:
    """Eval loss, perplexity and token accuracy of the base alone and of base + adapter on ``rows``."""
    from .trainer import token_stats

    apply = handle.apply
    mb = batch_size or max(handle.cfg.train.batch_size // handle.cfg.train.grad_accum, 1)

    @jax.jit
    def stats(lp, b):
        logits = _model.forward(apply, lp, b["inputs"], b["mask"])
        nll, correct = token_stats(logits, b["targets"], b["weights"])
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


def sample(apply: Callable, lora_params, ids, *, max_new_tokens: int, max_len: int, eos_id: Optional[int],
           pad_id: int, temperature: float = 0.8, top_k: int = 0, seed: int = 0) -> list[int]:
    """Sample up to ``max_new_tokens`` after ``ids`` with the LoRA model (`model.forward`).

    One jitted ``lax.fori_loop`` over a fixed buffer of ``max_len`` tokens: every step runs the
    model on the whole buffer (no KV cache: meant for checking a run, not for serving) and
    appends a token drawn from ``softmax(logits / temperature)`` (top-k if ``top_k``; greedy at
    ``temperature == 0``), stopping at ``eos_id``. Returns the new tokens.
    """
    ids = [int(i) for i in ids]
    n0 = len(ids)
    new = min(int(max_new_tokens), int(max_len) - n0)
    if new < 1:
        raise ValueError(f"generate: the prompt has {n0} tokens, the model only {max_len} positions")
    import jax.numpy as jnp

    length = n0 + new
    buf = jnp.asarray(ids + [pad_id] * new, jnp.int32)
    eos = -1 if eos_id is None else int(eos_id)

    @jax.jit
    def run_loop(lp, buf, key):
        def body(i, carry):
            buf, key, done = carry
            pos = n0 + i
            mask = (jnp.arange(length) < pos).astype(jnp.int32)
            logits = _model.forward(apply, lp, buf[None], mask[None])[0, pos - 1].astype(jnp.float32)
            key, sub = jax.random.split(key)
            if temperature == 0:
                nxt = jnp.argmax(logits)
            else:
                logits = logits / temperature
                if top_k:
                    kth = jax.lax.top_k(logits, top_k)[0][-1]
                    logits = jnp.where(logits < kth, -jnp.inf, logits)
                nxt = jax.random.categorical(sub, logits)
            nxt = jnp.where(done, pad_id, nxt).astype(jnp.int32)
            return buf.at[pos].set(nxt), key, done | (nxt == eos)

        return jax.lax.fori_loop(0, new, body, (buf, key, jnp.zeros((), bool)))[0]

    out = np.asarray(jax.device_get(run_loop(lora_params, buf, jax.random.key(seed)))).tolist()[n0:]
    return out[: out.index(eos) + 1] if eos in out else out


def generate(handle: RunHandle, prompt: str = "", *, max_new_tokens: int = 64, temperature: float = 0.8,
             top_k: int = 0, seed: int = 0, use_adapter: bool = True) -> str:
    """``prompt`` and a sampled continuation from base + adapter (or the base alone), as text."""
    tok, model = handle.tokenizer, handle.model
    tree = handle.lora_params if use_adapter else _model.base_only(handle.lora_params)
    ids = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + list(
        tok.encode(prompt, add_special_tokens=False))
    if not ids:
        raise ValueError("generate: empty prompt and the tokenizer has no bos_token to start from")
    max_pos = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 1024)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    new = sample(handle.apply, tree, ids, max_new_tokens=max_new_tokens, max_len=int(max_pos),
                 eos_id=tok.eos_token_id, pad_id=pad, temperature=temperature, top_k=top_k, seed=seed)
    return tok.decode(ids + new, skip_special_tokens=True)

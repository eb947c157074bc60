"""The training loop: one jitted, sharded step; eval; metrics; checkpoints; exact resume.

The step differentiates the loss with respect to the trainable half of a `lora.split` only (for
LoRA) or the whole parameter tree (for the from-scratch pretraining of the default run), sums the
token losses over ``grad_accum`` micro-batches (``lax.scan``), divides by the number of trained
tokens of the whole batch (so accumulation changes nothing but memory), clips, and applies the
optax update — all inside one ``jax.jit`` that donates the old state (`jit_train_step`, the
step `benchmarks/train_step.py` times too). Rematerialization belongs to the model (the
``remat_policy`` of a `lora_jax.models` config: each scanned layer under ``nn.remat``), not to
the loop.

Non-finite steps: the step checks the loss, the gradient norm and the updated parameters; if any
is NaN or infinite it keeps the parameters and optimizer state as they were (``jnp.where``, no
host round trip) and reports ``finite=False``. The loop then stops with `NonFiniteError`
(``on_nonfinite="stop"``) before anything after the last good step is saved, or counts the step
as skipped (``"skip"``) and stops once ``max_skipped`` steps in a row were skipped.

Interruptions: while `Trainer.fit` runs in the main thread, SIGINT / SIGTERM finish the current
step, write a checkpoint (waiting until it is finalized) and raise `TrainingInterrupted`.

Example (the pieces, on any ``logits_fn(trainable, frozen, inputs, mask, rng)``):
  >>> spec = LoopSpec(steps=10, batch_size=8, lr=1e-3, warmup_steps=2)
  >>> tx, schedule = make_optimizer(spec)
  >>> [round(float(schedule(s)), 6) for s in (0, 1, 2, 10)]  # warmup, peak, cosine down to 10%
  [0.0, 0.0005, 0.001, 0.0001]
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import data as _data
from . import tuning as _tuning
from . import flops as _flops
from . import sharding as shd
from .interrupts import StopSignals, TrainingInterrupted, signal_name
from ..optim import adapter_labels, freeze
from .loss import group_sum, token_stats
from .metrics import MetricsWriter, Progress, perplexity

__all__ = ["LoopSpec", "make_schedule", "make_optimizer", "make_adapter_optimizer", "token_stats", "make_loss_fn", "make_train_step",
           "jit_train_step", "make_eval_step", "Trainer", "NonFiniteError", "TrainingInterrupted", "ON_NONFINITE"]

ON_NONFINITE = ("stop", "skip")


class NonFiniteError(RuntimeError):
    """Training stopped on a non-finite loss / gradient norm / update.

    Attributes:
      step: the step whose loss or gradients were not finite (the last of the run of skipped
        steps with ``on_nonfinite="skip"``).
      checkpoint_step: the newest finalized checkpoint (all of them hold finite state; None: none).
    """

    def __init__(self, message: str, *, step: int, checkpoint_step: Optional[int] = None):
        super().__init__(message)
        self.step, self.checkpoint_step = int(step), checkpoint_step


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    """What one training loop needs (built from `TrainConfig` or `PretrainConfig`)."""

    steps: int
    batch_size: int
    lr: float
    grad_accum: int = 1
    schedule: str = "cosine"
    warmup_steps: int = 0
    end_lr_ratio: float = 0.1
    optimizer: str = "adamw"
    b1: float = 0.9
    b2: float = 0.999
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    eval_every: int = 0
    eval_batches: int = 0
    log_every: int = 10
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    async_checkpoint: bool = True
    progress: bool = True
    on_nonfinite: str = "stop"
    max_skipped: int = 10
    handle_signals: bool = True

    def __post_init__(self):
        if self.on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {', '.join(ON_NONFINITE)}; got {self.on_nonfinite!r}")
        if int(self.max_skipped) < 1:
            raise ValueError(f"max_skipped must be >= 1, got {self.max_skipped!r}")

    @classmethod
    def from_config(cls, train, **changes) -> "LoopSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in dataclasses.asdict(train).items() if k in names}
        kw.update(changes)
        return cls(**kw)

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum


# ------------------------------------------------------------------------------------------
# optimizer
# ------------------------------------------------------------------------------------------


def make_schedule(spec: LoopSpec) -> optax.Schedule:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then cosine / linear decay to
    ``lr * end_lr_ratio`` at ``steps``, or constant."""
    lr, warm = float(spec.lr), int(spec.warmup_steps)
    rest = max(int(spec.steps) - warm, 1)
    if spec.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, rest, alpha=spec.end_lr_ratio)
    elif spec.schedule == "linear":
        main = optax.linear_schedule(lr, lr * spec.end_lr_ratio, rest)
    elif spec.schedule == "constant":
        main = optax.constant_schedule(lr)
    else:
        raise ValueError(f"schedule must be 'cosine', 'linear' or 'constant', got {spec.schedule!r}")
    if warm == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), main], [warm])


def make_adapter_optimizer(specs: Mapping[str, LoopSpec], trainable) -> tuple[optax.GradientTransformation, dict]:
    """``(tx, {name: schedule})`` for several adapters trained side by side: each adapter of
    ``trainable`` (a `lora.split` half holding the `lora.add` adapters ``specs`` names) gets
    `make_optimizer` of its own spec (`lora.freeze` with a mapping): its own learning rate,
    schedule, clipping norm and optimizer state, as in a run of it alone."""
    made = {name: make_optimizer(spec) for name, spec in specs.items()}
    return freeze({name: tx for name, (tx, _) in made.items()}, trainable), {n: s for n, (_, s) in made.items()}


def make_optimizer(spec: LoopSpec) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(tx, schedule)``: clipping (if ``clip_norm > 0``), then AdamW / Adam / SGD / Lion."""
    sched = make_schedule(spec)
    if spec.optimizer == "adamw":
        core = optax.adamw(sched, b1=spec.b1, b2=spec.b2, weight_decay=spec.weight_decay)
    elif spec.optimizer == "adam":
        core = optax.adam(sched, b1=spec.b1, b2=spec.b2)
        if spec.weight_decay:
            core = optax.chain(optax.add_decayed_weights(spec.weight_decay), core)
    elif spec.optimizer == "sgd":
        core = optax.sgd(sched, momentum=spec.b1 or None)
        if spec.weight_decay:
            core = optax.chain(optax.add_decayed_weights(spec.weight_decay), core)
    elif spec.optimizer == "lion":
        core = optax.lion(sched, b1=spec.b1, b2=spec.b2, weight_decay=spec.weight_decay)
    else:
        raise ValueError(f"optimizer must be one of adamw, adam, sgd, lion; got {spec.optimizer!r}")
    tx = optax.chain(optax.clip_by_global_norm(spec.clip_norm), core) if spec.clip_norm > 0 else core
    return tx, sched


# ------------------------------------------------------------------------------------------
# loss and steps
# ------------------------------------------------------------------------------------------


def make_loss_fn(logits_fn: Callable) -> Callable:
    """``loss(trainable, frozen, batch, rng) -> (nll_sum, correct_sum)`` of
    ``logits_fn(trainable, frozen, inputs, mask, rng, positions=None)`` on a batch (``positions``
    given only for rows packed by documents, `data`): the plain `token_stats` of the full logits. (The runs of ``lora-jax train`` use the chunked loss of
    `lora_jax.train.model.lora_loss_fn` instead, which never holds the full float32 logits.)"""

    def loss(trainable, frozen, batch, rng):
        kw = {"positions": batch["positions"]} if "positions" in batch else {}
        logits = logits_fn(trainable, frozen, batch["inputs"], batch["mask"], rng, **kw)
        return token_stats(logits, batch["targets"], batch["weights"])

    return loss


def _all_finite(tree):
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, grad_accum: int = 1,
                    adapters: Sequence[str] = ()) -> Callable:
    """``step(state, frozen, batch) -> (state, metrics)``.

    ``state`` is ``{"params", "opt_state", "rng", "step"}``; with ``grad_accum > 1`` every batch
    array has a leading micro-batch axis. Gradients are taken of the summed token loss and divided
    by the batch's trained-token count, so the result does not depend on ``grad_accum``.

    With ``adapters`` (several adapters trained side by side, `make_adapter_optimizer`) the batch
    holds ``"adapter"`` (each row's index into ``adapters``), ``loss_fn`` returns one sum per
    adapter (`lora_jax.train.model.lora_loss_fn` with ``adapters``), and each adapter's gradient is
    divided by its own rows' trained-token count: it is the gradient of its own mean loss, as in a
    run of it alone. ``loss``, ``acc``, ``grad_norm`` and ``tokens`` are then per adapter.

    When the loss, the gradient norm or any updated parameter is not finite, the parameters and
    optimizer state are returned unchanged and ``metrics["finite"]`` is False (the rng and the
    step counter advance either way).
    """
    names = tuple(adapters)
    shape = (len(names),) if names else ()

    def step(state, frozen, batch):
        params = state["params"]
        rng, sub = jax.random.split(state["rng"])

        def f(p, b, key):
            nll, correct = loss_fn(p, frozen, b, key)
            return jnp.sum(nll), (nll, correct)

        vg = jax.value_and_grad(f, has_aux=True)
        if grad_accum == 1:
            (_, (nll, correct)), grads = vg(params, batch, sub)
        else:
            def body(carry, xs):
                b, j = xs
                (_, (l_, c_)), g_ = vg(params, b, jax.random.fold_in(sub, j))
                acc_l, acc_c, acc_g = carry
                return (acc_l + l_, acc_c + c_, jax.tree_util.tree_map(jnp.add, acc_g, g_)), None

            zero = (jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32),
                    jax.tree_util.tree_map(jnp.zeros_like, params))
            (nll, correct, grads), _ = jax.lax.scan(body, zero, (batch, jnp.arange(grad_accum)))
        weights = batch["weights"].astype(jnp.float32)
        sq = lambda g: jnp.sum(jnp.square(g.astype(jnp.float32)))  # noqa: E731
        if names:
            n = jnp.maximum(group_sum(weights, batch["adapter"], len(names)), 1.0)
            labels = adapter_labels(params)
            grads = jax.tree_util.tree_map(lambda g, lab: (g / n[names.index(lab)]).astype(g.dtype), grads, labels)
            pairs = list(zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(labels)))
            gnorm = jnp.sqrt(jnp.stack([sum((sq(g) for g, lab in pairs if lab == name), jnp.zeros((), jnp.float32))
                                        for name in names]))
        else:
            n = jnp.maximum(jnp.sum(weights), 1.0)
            grads = jax.tree_util.tree_map(lambda g: (g / n).astype(g.dtype), grads)  # bf16 params: bf16 grads
            gnorm = jnp.sqrt(sum(sq(g) for g in jax.tree_util.tree_leaves(grads)))
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        finite = jnp.all(jnp.isfinite(nll)) & jnp.all(jnp.isfinite(gnorm)) & _all_finite(new_params)
        # the state keeps its dtypes, so the compiled step takes its own output (bf16 params included)
        keep = lambda new, old: jnp.where(finite, new, old).astype(old.dtype)  # noqa: E731
        params = jax.tree_util.tree_map(keep, new_params, params)
        opt_state = jax.tree_util.tree_map(keep, opt_state, state["opt_state"])
        new = {"params": params, "opt_state": opt_state, "rng": rng, "step": state["step"] + 1}
        return new, {"loss": nll / n, "acc": correct / n, "grad_norm": gnorm, "tokens": n, "finite": finite}

    return step


def jit_train_step(loss_fn: Callable, tx: optax.GradientTransformation, grad_accum: int = 1, *,
                   out_shardings=None, adapters: Sequence[str] = ()) -> Callable:
    """`make_train_step` under ``jax.jit``, donating the state it replaces (the trainer's step and
    the one `benchmarks/train_step.py` times)."""
    kw = {} if out_shardings is None else {"out_shardings": out_shardings}
    return jax.jit(make_train_step(loss_fn, tx, grad_accum, adapters), donate_argnums=(0,), **kw)


def make_eval_step(loss_fn: Callable, adapters: Sequence[str] = ()) -> Callable:
    """``eval(trainable, frozen, batch) -> (nll_sum, correct_sum, n_tokens)`` (each one per adapter
    with ``adapters``, as `make_train_step`)."""
    k = len(tuple(adapters))

    def ev(trainable, frozen, batch):
        nll, correct = loss_fn(trainable, frozen, batch, None)
        groups = batch["adapter"] if k else None
        return nll, correct, group_sum(batch["weights"].astype(jnp.float32), groups, k)

    return ev


# ------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------


def _show(x):
    """A metric for a message: a float, or a list of floats (one per adapter)."""
    x = np.asarray(x, np.float64)
    return float(x) if x.ndim == 0 else [float(v) for v in x]


def _abstract(tree):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _eval_text(ev: dict) -> str:
    """An eval record as a log line: its loss and perplexity, each adapter's with ``adapters``."""
    def one(e):
        if not e["eval_tokens"]:
            return "n/a (no scored token in the eval batches; raise train.eval_batches)"
        return f"{e['eval_loss']:.4f} (ppl {e['eval_ppl']:.2f})"

    if "adapters" in ev:
        return "eval loss " + ", ".join(f"{name} {one(e)}" for name, e in ev["adapters"].items())
    return f"eval loss {one(ev)}"


class Trainer:
    """Runs a `LoopSpec` over packed rows on a mesh.

    Args:
      spec: the loop's settings.
      mesh: the device mesh (`sharding.make_mesh`).
      logits_fn: ``(trainable, frozen, inputs, mask, rng) -> logits`` (its loss is `make_loss_fn`'s
        plain cross-entropy); or instead
      loss_fn: ``(trainable, frozen, batch, rng) -> (nll_sum, correct_sum)`` (e.g. the chunked
        `lora_jax.train.model.lora_loss_fn`), or a sequence of ``(tuning.StepSettings, loss_fn)``
        candidates, fastest first: each is compiled in turn and the first whose compiled footprint
        fits ``memory_limit`` runs (`tuning.pick`; ``self.settings`` says which). Exactly one of
        ``logits_fn`` and ``loss_fn``.
      trainable: what the optimizer updates (a `lora.split` trainable half, or whole params); the
        trainer owns it from here (each step donates the state it replaces).
      frozen: everything else (None for full training).
      rows: a row source (`data.PackedRows` over the tokenized cache, `data.Rows` in memory): the loop
        reads the rows of each batch by index, each process only those its devices hold.
      eval_rows: eval rows or None.
      seed: seeds the data order and the step rng.
      phase: a name written into metric records (``"lora"``, ``"pretrain"``).
      metrics: where records go (None: nowhere).
      checkpointer: a `checkpoint.Checkpointer` (None: no checkpoints).
      echo: prints a line (the progress bar's ``write`` is used while it is open).
      stacked: paths of plain leaves with a leading layer axis (`sharding.param_shardings`).
      roles: ``{path: role}`` of the kernels (`sharding.param_shardings`; needed on a mesh with a
        tensor axis; `lora_jax.models.family.roles_of` for a model of `lora_jax.models`).
      flops_per_step: the model FLOPs of one step (`flops.step_flops`); with it the train records
        report the achieved ``tflops`` and, when ``peak_flops`` (per device) is known, ``mfu``.
      peak_flops: the peak FLOP/s of one device (`flops.peak_flops`), None when unknown.
      memory_limit: bytes per device the step may plan to use when choosing among ``loss_fn``
        candidates; default `tuning.device_memory_limit` (None on a CPU: the first candidate).
      adapters: several `lora.add` adapters trained side by side: ``{name: LoopSpec}`` of each one's
        optimizer settings (`make_adapter_optimizer`; ``spec`` keeps the shared loop settings, its
        ``batch_size`` the rows of all adapters together). ``rows`` is then a `data.Mixture` (one
        source per adapter, in this order; ``eval_rows`` too) and ``loss_fn`` returns one sum per
        adapter (`lora_jax.train.model.lora_loss_fn` with ``adapters``); the records carry each
        adapter's loss, accuracy, gradient norm and learning rate under ``"adapters"``.
      order: the row order (default `data.Order` over ``rows``; `data.MixedOrder` with ``adapters``).

    The trainable state, frozen params and every batch are placed with `sharding` rules; the
    step and eval functions are compiled once, ahead of time.
    """

    def __init__(self, spec: LoopSpec, *, mesh, logits_fn: Optional[Callable] = None, trainable, frozen=None,
                 rows: _data.Rows, loss_fn: Optional[Callable] = None,
                 eval_rows: Optional[_data.Rows] = None, seed: int = 0, phase: str = "lora",
                 metrics: Optional[MetricsWriter] = None, checkpointer=None, echo: Callable = print,
                 stacked=(), roles=None, flops_per_step: Optional[float] = None, peak_flops: Optional[float] = None,
                 memory_limit: Optional[int] = None, adapters: Optional[Mapping[str, LoopSpec]] = None,
                 order=None):
        self.spec, self.mesh, self.phase, self.seed = spec, mesh, phase, int(seed)
        self.adapters = tuple(adapters or ())
        self.adapter_specs = dict(adapters or {})
        self.rows, self.eval_rows = rows, eval_rows
        self.metrics, self.checkpointer, self.echo = metrics, checkpointer, echo
        self.flops_per_step, self.peak_flops = flops_per_step, peak_flops
        self.n_devices = int(mesh.devices.size)
        n_batch = math.prod(shd.mesh_shape(mesh)[a] for a in shd.BATCH_AXES)
        if spec.micro_batch % n_batch:
            raise ValueError(f"the micro-batch ({spec.batch_size} / grad_accum {spec.grad_accum} = "
                             f"{spec.micro_batch} rows) must divide by mesh data x fsdp = {n_batch}")
        self.order = _data.Order(len(rows), self.seed) if order is None else order
        if self.adapters:
            self.tx, self.schedules = make_adapter_optimizer(adapters, trainable)
            self.schedule = self.schedules[self.adapters[0]]
        else:
            self.tx, self.schedule = make_optimizer(spec)
            self.schedules = {}
        if (logits_fn is None) == (loss_fn is None):
            raise TypeError("Trainer: give exactly one of logits_fn and loss_fn")
        if loss_fn is None:
            loss_fn = make_loss_fn(logits_fn)
        cands = list(loss_fn) if isinstance(loss_fn, (list, tuple)) else [(None, loss_fn)]
        if not cands or not all(isinstance(c, tuple) and len(c) == 2 and callable(c[1]) for c in cands):
            raise TypeError(f"Trainer: loss_fn must be a callable or a sequence of (StepSettings, loss_fn) pairs, "
                            f"got {type(loss_fn).__name__}")

        self.trainable_shardings = shd.param_shardings(trainable, mesh, stacked, roles)
        self.frozen_shardings = shd.param_shardings(frozen, mesh, stacked, roles) if frozen is not None else None
        trainable = shd.place(trainable, self.trainable_shardings)
        self.frozen = shd.place(frozen, self.frozen_shardings) if frozen is not None else None
        opt_abstract = jax.eval_shape(self.tx.init, trainable)
        opt_shardings = shd.state_shardings(opt_abstract, trainable, self.trainable_shardings, mesh)
        rep = shd.replicated(mesh)
        opt_state = jax.jit(self.tx.init, out_shardings=opt_shardings)(trainable)
        self.state = {
            "params": trainable, "opt_state": opt_state,
            "rng": jax.jit(lambda: jax.random.fold_in(jax.random.key(self.seed), 1), out_shardings=rep)(),
            "step": jax.jit(lambda: jnp.zeros((), jnp.int32), out_shardings=rep)(),
        }
        self.state_shardings = {"params": self.trainable_shardings, "opt_state": opt_shardings, "rng": rep,
                                "step": rep}
        self.position = 0
        self.skip_run = 0  # consecutive skipped (non-finite) steps up to the current one
        self.skipped = 0  # skipped steps in all
        self._saved_step: Optional[int] = None  # the step last handed to the checkpointer
        self._state_finite = None
        self.history: list[tuple[int, float]] = []
        self.evals: list[dict] = []
        self._timed_steps, self._timed_s = 0, 0.0  # steps and seconds spent in steps (evals excluded)

        t0 = time.perf_counter()
        accum = spec.grad_accum > 1
        self._batch_sharding = shd.batch_sharding(mesh, accum=accum)
        self._eval_sharding = shd.batch_sharding(mesh)
        L = rows.seq_len
        lead = (spec.grad_accum, spec.micro_batch) if accum else (spec.batch_size,)
        ab = {k: jax.ShapeDtypeStruct(lead + (L,), v.dtype, sharding=self._batch_sharding)
              for k, v in rows.batch(np.zeros(1, np.int64)).items()}
        by_label = {}

        def compile_step(settings):
            fn = by_label[getattr(settings, "label", None)]
            step_fn = jit_train_step(fn, self.tx, spec.grad_accum, out_shardings=(self.state_shardings, rep),
                                     adapters=self.adapters)
            return step_fn.lower(_abstract(self.state), self.frozen, ab).compile()

        if len(cands) == 1:
            self.settings, loss_fn = cands[0]
            by_label[getattr(self.settings, "label", None)] = loss_fn
            self._step = compile_step(self.settings)
            self.settings_tried = []
        else:
            by_label.update((c.label, fn) for c, fn in cands)
            limit = _tuning.device_memory_limit(mesh.devices.flat[0]) if memory_limit is None else memory_limit
            self.settings, self._step, self.settings_tried = _tuning.pick([c for c, _ in cands], compile_step, limit)
            loss_fn = by_label[self.settings.label]
        self._eval = None
        if eval_rows is not None and len(eval_rows):
            eb = {k: jax.ShapeDtypeStruct((spec.micro_batch, eval_rows.seq_len), v.dtype,
                                          sharding=self._eval_sharding) for k, v in ab.items()}
            self._eval = jax.jit(make_eval_step(loss_fn, self.adapters), out_shardings=rep).lower(
                _abstract(trainable), self.frozen, eb).compile()
        self.compile_s = time.perf_counter() - t0

    # -- state --------------------------------------------------------------------------------
    @property
    def trainable(self):
        """The current trainable tree (sharded)."""
        return self.state["params"]

    @property
    def step(self) -> int:
        return int(jax.device_get(self.state["step"]))

    def checkpoint_state(self) -> dict:
        """What a checkpoint holds: adapter (trainable), optimizer state and the rng's key data."""
        return {"adapter": self.state["params"], "opt_state": self.state["opt_state"],
                "rng": jax.random.key_data(self.state["rng"])}

    def save(self) -> None:
        """Checkpoint the current step (no-op without a checkpointer, or if this step is saved).

        Raises:
          NonFiniteError: if the state holds a NaN or infinity (nothing is written then).
        """
        if self.checkpointer is None or self._saved_step == self.step:
            return
        if self._state_finite is None:
            self._state_finite = jax.jit(_all_finite)
        state = self.checkpoint_state()
        if not bool(jax.device_get(self._state_finite({"adapter": state["adapter"], "opt_state": state["opt_state"]}))):
            self.checkpointer.wait()
            last = self.checkpointer.latest_step()
            raise NonFiniteError(f"step {self.step}: the trainable state holds NaN or infinite values; not saved "
                                 f"(the last good checkpoint is {'step ' + str(last) if last is not None else 'none'})",
                                 step=self.step, checkpoint_step=last)
        self.checkpointer.save(self.step, state,
                               {"position": int(self.position), "seed": self.seed, "phase": self.phase,
                                "skipped_in_a_row": int(self.skip_run), "skipped": int(self.skipped)})
        self._saved_step = self.step

    def restore(self, step: Optional[int] = None) -> Optional[int]:
        """Load the newest finalized checkpoint (or ``step``) into this trainer, resharded onto its
        mesh; returns the step restored (None when there is none)."""
        if self.checkpointer is None:
            return None
        step = self.checkpointer.latest_step() if step is None else step
        if step is None:
            return None
        target = _abstract(self.checkpoint_state())
        saved, meta = self.checkpointer.restore(step, target)
        rep = shd.replicated(self.mesh)
        n = int(meta["step"])
        self.state = {"params": saved["adapter"], "opt_state": saved["opt_state"],
                      "rng": jax.jit(jax.random.wrap_key_data, out_shardings=rep)(saved["rng"]),
                      "step": jax.jit(lambda: jnp.asarray(n, jnp.int32), out_shardings=rep)()}
        self.position = int(meta["position"])
        self.skip_run = int(meta.get("skipped_in_a_row", 0))
        self.skipped = int(meta.get("skipped", 0))
        self._saved_step = n
        return n

    # -- data ---------------------------------------------------------------------------------
    def _put(self, arrays: dict, sharding) -> dict:
        return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx]) for k, v in arrays.items()}

    def _lead(self) -> tuple:
        return (self.spec.grad_accum, self.spec.micro_batch) if self.spec.grad_accum > 1 else (self.spec.batch_size,)

    def _put_rows(self, idx: np.ndarray, sharding) -> dict:
        """The batch of rows ``idx`` as global arrays, each process reading from the row source
        only the rows its devices hold (`jax.make_array_from_callback`)."""
        lead = self._lead()
        shape = lead + (self.rows.seq_len,)
        slots = np.arange(len(idx)).reshape(lead)
        need = sorted({int(k) for index in sharding.addressable_devices_indices_map(shape).values()
                       for k in np.ravel(slots[index[:len(lead)]])})
        local = self.rows.batch(idx[need])
        at = np.full(len(idx), -1, np.int64)
        at[need] = np.arange(len(need))

        def piece(v, index):
            return v[at[slots[index[:len(lead)]]]][(Ellipsis,) + tuple(index[len(lead):])]

        return {k: jax.make_array_from_callback(shape, sharding, lambda index, v=v: piece(v, index))
                for k, v in local.items()}

    def next_batch(self) -> dict:
        """The next global batch (host arrays), advancing the data position."""
        idx = self.order.take(self.position, self.spec.batch_size)
        self.position += self.spec.batch_size
        b = _data.batch(self.rows, idx)
        return {k: v.reshape(self._lead() + v.shape[1:]) for k, v in b.items()}

    def next_global_batch(self) -> dict:
        """The next batch as arrays on the mesh (each process reads only its rows), advancing
        the data position."""
        idx = self.order.take(self.position, self.spec.batch_size)
        self.position += self.spec.batch_size
        return self._put_rows(idx, self._batch_sharding)

    # -- eval ---------------------------------------------------------------------------------
    def evaluate(self) -> Optional[dict]:
        """Loss, perplexity and next-token accuracy over the eval rows (None without eval rows)."""
        if self._eval is None:
            return None
        sums = np.zeros((3, max(len(self.adapters), 1)))
        shares = None
        if self.adapters:  # each adapter's eval rows in its own micro-batches, as in its run alone
            shares = [self.adapter_specs[self.adapters[i]].micro_batch for i in self.eval_rows.ids]
        for b in _data.eval_batches(self.eval_rows, self.spec.micro_batch, self.spec.eval_batches, shares):
            out = jax.device_get(self._eval(self.state["params"], self.frozen, self._put(b, self._eval_sharding)))
            sums += np.asarray([np.atleast_1d(np.asarray(o, np.float64)) for o in out])

        def record(nll, correct, n):  # no scored token: NaN (null in the files), never a perfect 0.0
            loss = float(nll / n) if n else float("nan")
            return {"eval_loss": loss, "eval_ppl": perplexity(loss), "eval_acc": float(correct / n) if n else float("nan"),
                    "eval_tokens": int(n)}

        rec = {"kind": "eval", "phase": self.phase, "step": self.step, **record(*sums.sum(axis=1))}
        if self.adapters:
            rec["adapters"] = {self.adapters[k]: record(*sums[:, k]) for k in sorted(int(i) for i in self.eval_rows.ids)}
        self.evals.append(rec)
        if self.metrics is not None:
            self.metrics.write(rec)
        return rec

    # -- train --------------------------------------------------------------------------------
    def _last_checkpoint(self) -> Optional[int]:
        if self.checkpointer is None:
            return None
        self.checkpointer.wait()
        return self.checkpointer.latest_step()

    def _flush(self, pending: list, say: Callable, t_win: float, t_start: float) -> Optional[dict]:
        """Fetch the metrics of ``pending`` steps, check them for non-finite steps and write one
        train record; returns it (None if ``pending`` is empty).

        Raises:
          NonFiniteError: ``on_nonfinite="stop"`` and a step was not finite, or ``"skip"`` and
            ``max_skipped`` steps in a row were.
        """
        if not pending:
            return None
        spec = self.spec
        got = jax.device_get([m for _, m in pending])
        steps = [s for s, _ in pending]
        dt = time.perf_counter() - t_win
        tps = len(pending) * spec.batch_size * self.rows.seq_len / max(dt, 1e-9)
        ok = [bool(g["finite"]) for g in got]
        good = [(s, g) for s, g, f in zip(steps, got, ok) if f]
        k = max(len(self.adapters), 1)
        # (steps, adapters): per-step mean loss / accuracy and trained tokens of each adapter
        loss_, acc_, tok_ = (np.asarray([np.atleast_1d(np.asarray(g[key], np.float64)) for _, g in good]).reshape(-1, k)
                             for key in ("loss", "acc", "tokens"))

        def mean(v, t):
            return float(np.sum(v * t) / max(np.sum(t), 1.0)) if len(v) else None

        self.history += [(s, mean(loss_[j], tok_[j])) for j, (s, _) in enumerate(good)]
        self._timed_steps += len(pending)
        self._timed_s += dt
        gnorm = np.atleast_1d(np.asarray(got[-1]["grad_norm"], np.float64))
        rec = {"kind": "train", "phase": self.phase, "step": steps[-1], "loss": mean(loss_, tok_),
               "acc": mean(acc_, tok_), "grad_norm": float(np.sqrt(np.sum(gnorm ** 2))),
               "lr": float(self.schedule(steps[-1] - 1)),
               "tokens_per_s": tps, **self._rates(len(pending), dt), "elapsed_s": time.perf_counter() - t_start}
        if self.adapters:
            rec["adapters"] = {name: {"loss": mean(loss_[:, j], tok_[:, j]), "acc": mean(acc_[:, j], tok_[:, j]),
                                      "grad_norm": float(gnorm[j]), "lr": float(self.schedules[name](steps[-1] - 1))}
                               for j, name in enumerate(self.adapters)}
        bad = [(s, g) for s, g, f in zip(steps, got, ok) if not f]
        if bad:
            rec["skipped"] = len(bad)
        stop = None
        for s, g, f in zip(steps, got, ok):
            if f:
                self.skip_run = 0
                continue
            self.skip_run += 1
            self.skipped += 1
            what = f"non-finite loss or gradients at step {s} (loss {_show(g['loss'])}, grad norm {_show(g['grad_norm'])}" + (
                f" of the adapters {list(self.adapters)}" if self.adapters else "") + ")"
            if spec.on_nonfinite == "stop":
                stop = (s, what + "; the update was not applied")
                break
            say(f"[{self.phase}] {what}: update skipped ({self.skip_run} in a row, {self.skipped} in all)")
            if self.skip_run >= spec.max_skipped:
                stop = (s, f"{self.skip_run} steps in a row (up to step {s}) had non-finite loss or gradients "
                           f"(max_skipped={spec.max_skipped}); their updates were skipped")
                break
        if self.metrics is not None:
            self.metrics.write(rec)
        if stop is not None:
            s, what = stop
            last = self._last_checkpoint()
            if self.metrics is not None:
                self.metrics.write({"kind": "nonfinite", "phase": self.phase, "step": s,
                                    "on_nonfinite": spec.on_nonfinite, "checkpoint_step": last})
            where = f"the last good checkpoint is step {last}" if last is not None else "there is no checkpoint"
            raise NonFiniteError(f"[{self.phase}] {what}; training stopped, nothing after it was saved, {where}",
                                 step=s, checkpoint_step=last)
        return rec

    def fit(self, until: Optional[int] = None) -> dict:
        """Train up to ``spec.steps`` (or stop after step ``until``), evaluating, logging and
        checkpointing on the way. Returns ``{"step", "stopped", "train_s", "tokens_per_s", ...}``.

        A train record is written every ``log_every`` steps, at every checkpoint (so a run resumed
        from a checkpoint writes the same records as an uninterrupted one) and at the end.

        Raises:
          NonFiniteError: see `make_train_step` and ``LoopSpec.on_nonfinite``.
          TrainingInterrupted: SIGINT / SIGTERM arrived (main thread, ``handle_signals``); the
            current step was finished and checkpointed (finalized) first.
        """
        spec = self.spec
        end = spec.steps if until is None else min(int(until), spec.steps)
        start = self.step
        if end <= start:
            return {"step": start, "stopped": start < spec.steps, "train_s": 0.0, "tokens_per_s": 0.0,
                    "compile_s": self.compile_s, "steps_s": 0.0, "step_tokens_per_s": 0.0, "tflops": None,
                    "mfu": None, "eval": None}
        bar = Progress(spec.steps, start, enabled=spec.progress, desc=self.phase, echo=self.echo)
        self._timed_steps, self._timed_s = 0, 0.0
        say = bar.write
        tokens_per_step = spec.batch_size * self.rows.seq_len
        if start == 0 and self._eval is not None:
            ev = self.evaluate()
            say(f"[{self.phase}] step 0: {_eval_text(ev)}")
        pending: list[tuple[int, dict]] = []
        t_start = t_win = time.perf_counter()
        last_ev = None
        ck = self.checkpointer
        try:
            with StopSignals(spec.handle_signals) as stop:
                for s in range(start + 1, end + 1):
                    batch = self.next_global_batch()
                    self.state, m = self._step(self.state, self.frozen, batch)
                    pending.append((s, m))
                    save_now = ck is not None and ((spec.checkpoint_every and s % spec.checkpoint_every == 0)
                                                   or s == end)
                    if s % spec.log_every == 0 or s == end or save_now or stop.signum is not None:
                        rec = self._flush(pending, say, t_win, t_start)
                        bar.update(len(pending), loss=rec["loss"] if rec["loss"] is not None else float("nan"),
                                   tok_s=f"{rec['tokens_per_s']:,.0f}")
                        pending, t_win = [], time.perf_counter()
                    if self._eval is not None and ((spec.eval_every and s % spec.eval_every == 0) or s == spec.steps):
                        last_ev = self.evaluate()
                        say(f"[{self.phase}] step {s}: {_eval_text(last_ev)}")
                        t_win = time.perf_counter()  # eval time is not training time
                    if stop.signum is not None and pending:  # arrived during the eval: check before saving
                        self._flush(pending, say, t_win, t_start)
                        bar.update(len(pending))
                        pending = []
                    if save_now:
                        self.save()
                    if stop.signum is not None:
                        self._interrupted(stop.signum, say)
                if ck is not None:
                    ck.wait()
                if stop.signum is not None:
                    self._interrupted(stop.signum, say)
        finally:
            bar.close()
        train_s = time.perf_counter() - t_start
        done = end - start
        return {"step": self.step, "stopped": end < spec.steps, "train_s": train_s,
                "tokens_per_s": done * tokens_per_step / max(train_s, 1e-9), "compile_s": self.compile_s,
                "steps_s": self._timed_s,
                "step_tokens_per_s": self._timed_steps * tokens_per_step / max(self._timed_s, 1e-9),
                **self._rates(self._timed_steps, self._timed_s), "eval": last_ev}

    def _rates(self, steps: int, seconds: float) -> dict:
        """``tflops`` (achieved model TFLOP/s) and ``mfu`` of ``steps`` steps in ``seconds`` (None
        where the FLOPs or the peak are unknown; see `lora_jax.train.flops`)."""
        if self.flops_per_step is None or steps == 0:
            return {"tflops": None, "mfu": None}
        flops = self.flops_per_step * steps
        return {"tflops": flops / max(seconds, 1e-9) / 1e12,
                "mfu": _flops.mfu(flops, seconds, self.peak_flops, self.n_devices)}

    def _interrupted(self, signum: int, say: Callable):
        """Checkpoint the current step (waiting until it is finalized) and raise `TrainingInterrupted`."""
        step = self.step
        name = signal_name(signum)
        if self.checkpointer is None:
            raise TrainingInterrupted(f"[{self.phase}] {name} received: stopped after step {step}; this phase "
                                      "writes no checkpoints", signum=signum, step=step)
        say(f"[{self.phase}] {name} received: stopping after step {step}, writing its checkpoint ...")
        self.save()
        last = self._last_checkpoint()
        raise TrainingInterrupted(f"[{self.phase}] {name} received: stopped after step {step}; checkpoint step "
                                  f"{last} written to {self.checkpointer.directory}", signum=signum, step=step,
                                  checkpoint_step=last)

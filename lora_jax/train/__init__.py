"""Fine-tuning with LoRA: config, data, sharded jitted loop, checkpoints, metrics; ``lora-jax train``.

>>> from lora_jax.train import load_config
>>> cfg = load_config(None, ["train.steps=2", "train.warmup_steps=0"])
>>> cfg.train.steps
2

Run it with ``lora_jax.train.run(cfg)`` or from the shell with ``lora-jax train train.steps=20``.
"""

from .config import Config, ConfigError, load_config, config_names, to_yaml
from .data import Rows, PackedRows, Order, read_documents, encode, pack
from .trainer import (LoopSpec, Trainer, NonFiniteError, make_optimizer, make_train_step, jit_train_step, make_eval_step,
                      make_loss_fn)
from .interrupts import TrainingInterrupted
from .checkpoint import Checkpointer, latest_step
from .sharding import make_mesh, param_shardings
from .pipeline import run, load_run, resolve_out_dir

__all__ = [
    "Config", "ConfigError", "load_config", "config_names", "to_yaml",
    "Rows", "PackedRows", "Order", "read_documents", "encode", "pack",
    "LoopSpec", "Trainer", "NonFiniteError", "TrainingInterrupted", "make_optimizer", "make_train_step", "jit_train_step",
    "make_eval_step", "make_loss_fn",
    "Checkpointer", "latest_step", "make_mesh", "param_shardings",
    "run", "load_run", "resolve_out_dir",
]

"""Fine-tuning with LoRA: config, data, sharded jitted loop, checkpoints, metrics; ``lora-jax train``.

>>> from lora_jax.train import load_config
>>> cfg = load_config(None, ["train.steps=2", "train.warmup_steps=0"])
>>> cfg.train.steps
2

Run it with ``lora_jax.train.run(cfg)`` or from the shell with ``lora-jax train train.steps=20``.
"""

from .._lazy import require as _require

_require("lora_jax.train", "train")

from .._lazy import exports as _exports

_WHERE = {
    **dict.fromkeys(["Config", "ConfigError", "load_config", "config_names", "to_yaml"], "config"),
    **dict.fromkeys(["Rows", "PackedRows", "Order", "read_documents", "encode", "pack"], "data"),
    **dict.fromkeys(["LoopSpec", "Trainer", "NonFiniteError", "make_optimizer", "make_train_step", "jit_train_step",
                     "make_eval_step", "make_loss_fn"], "trainer"),
    "TrainingInterrupted": "interrupts",
    **dict.fromkeys(["Checkpointer", "latest_step"], "checkpoint"),
    **dict.fromkeys(["make_mesh", "param_shardings"], "sharding"),
    **dict.fromkeys(["run", "resolve_out_dir"], "pipeline"),
    **dict.fromkeys(["load_run", "evaluate", "generate"], "runs"),
}
__getattr__, __dir__ = _exports(__name__, _WHERE)

__all__ = list(_WHERE)

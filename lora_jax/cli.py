"""The ``lora-jax`` command.

::

    lora-jax train [CONFIG] [key=value ...] [--resume] [--dry-run]
    lora-jax eval [RUN] [key=value ...] [--adapter DIR]
    lora-jax merge [RUN] [--out DIR] [--adapter DIR] [--overwrite]
    lora-jax export [RUN] [--out DIR] [--overwrite]
    lora-jax generate [RUN] [--prompt TEXT] [--max-new-tokens N] [--temperature T] [--seed S] [--base]
    lora-jax demo [...]

``CONFIG`` is a shipped config name (``default``), ``./conf/NAME.yaml`` or a path to a YAML file;
``key=value`` overrides use dotted keys (``train.steps=20 lora.rank=4``, values read as YAML).
``RUN`` is a run directory (default: the newest under ``./runs``).

Every command returns an exit status: 0 on success, 2 for a configuration or usage error (one
message naming the key and what is allowed; nothing is written), 1 for any other failure.
``train`` also returns 3 when the loss or gradients became NaN/infinite (``train.on_nonfinite``;
the last good checkpoint is kept, nothing after it is written), and 130 / 143 when SIGINT /
SIGTERM stopped it (the current step was finished and checkpointed; the message says how to
resume).

Example:
  >>> from lora_jax.cli import main
  >>> main(["train", "--dry-run", "train.steps=3"]) == 0  # doctest: +SKIP
  True
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

__all__ = ["main", "EXIT_NONFINITE"]

EXIT_NONFINITE = 3

_USAGE = """lora-jax COMMAND ...

commands:
  train     fine-tune: lora-jax train [CONFIG] [key=value ...] [--resume] [--dry-run]
  eval      eval loss of the base and the adapter on a run's eval data
  merge     fold a run's adapter into its base and write an HF checkpoint
  export    write a run's adapter (newest checkpoint) in PEFT format
  generate  sample text from a run's base + adapter
  demo      the seed experiment (LoRA on an MLP, digits)

lora-jax COMMAND --help for a command's options."""


def _err(msg: str) -> int:
    print(f"lora-jax: error: {msg}", file=sys.stderr)
    return 2


def _split_overrides(items: Sequence[str], allow_positional: int, what: str):
    pos, over = [], []
    for it in items:
        if "=" in it and not it.startswith(("/", "./")):
            over.append(it)
        elif over:
            raise ValueError(f"{what}: {it!r} comes after key=value overrides; give {what} first")
        else:
            pos.append(it)
    if len(pos) > allow_positional:
        raise ValueError(f"expected at most {allow_positional} {what}, got {pos}; overrides look like key=value")
    return pos, over


def _train(argv) -> int:
    from .train.config import ConfigError, load_config

    ap = argparse.ArgumentParser(prog="lora-jax train", description="LoRA fine-tuning from a YAML config.")
    ap.add_argument("args", nargs="*", metavar="[CONFIG] [key=value ...]",
                    help="a config name (default) or YAML path, then dotted overrides")
    ap.add_argument("--resume", action="store_true", help="continue from the newest finalized checkpoint")
    ap.add_argument("--dry-run", action="store_true", help="validate and print the config; train nothing")
    ap.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    try:
        pos, over = _split_overrides(a.args, 1, "CONFIG")
    except ValueError as e:
        return _err(str(e))
    if a.resume:
        over.append("train.resume=true")
    try:
        cfg = load_config(pos[0] if pos else None, over)
    except ConfigError as e:
        return _err(str(e))
    if a.dry_run:
        from .train.config import to_yaml

        print(to_yaml(cfg), end="")
        return 0
    from .train.interrupts import TrainingInterrupted
    from .train.pipeline import run
    from .train.trainer import NonFiniteError

    def echo(*args, **kw):  # flushed: under a scheduler stdout is a file, and a killed run keeps its log
        print(*args, **kw, flush=True)

    try:
        run(cfg, stop_after=a.stop_after, echo=echo)
    except ConfigError as e:
        return _err(str(e))
    except NonFiniteError as e:
        print(f"lora-jax: error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except TrainingInterrupted as e:
        print(f"lora-jax: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # outside the training loop (setup, compile, export): no new checkpoint
        print("lora-jax: interrupted (SIGINT) outside the training loop; no new checkpoint was written (finalized "
              "ones are kept: continue with --resume)", file=sys.stderr)
        return 130
    return 0


def _run_dir(pos) -> str:
    from .train.pipeline import latest_run

    return pos[0] if pos else latest_run()


def _eval(argv) -> int:
    from .train.config import ConfigError, parse_overrides

    ap = argparse.ArgumentParser(prog="lora-jax eval", description="Eval loss of base and adapter on a run's data.")
    ap.add_argument("args", nargs="*", metavar="[RUN] [key=value ...]")
    ap.add_argument("--adapter", default=None, help="a PEFT adapter dir instead of the run's own")
    a = ap.parse_args(argv)
    try:
        pos, over = _split_overrides(a.args, 1, "RUN")
        nested, problems = parse_overrides(over)
        if problems:
            raise ConfigError(problems)
        from .train import pipeline

        h = pipeline.load_run(_run_dir(pos), adapter=a.adapter, overrides=nested)
        rows = pipeline.eval_rows_of(h)
        out = pipeline.evaluate(h, rows)
    except (ConfigError, ValueError) as e:
        return _err(str(e))
    print(json.dumps(out, indent=2))
    return 0


def _merge_or_export(argv, which: str) -> int:
    from .train.config import ConfigError

    ap = argparse.ArgumentParser(prog=f"lora-jax {which}",
                                 description="merged HF checkpoint" if which == "merge" else "PEFT adapter")
    ap.add_argument("run", nargs="?", default=None)
    ap.add_argument("--out", default=None, help=f"output dir (default: RUN/{'merged' if which == 'merge' else 'adapter'})")
    if which == "merge":
        ap.add_argument("--adapter", default=None, help="a PEFT adapter dir instead of the run's own")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    a = ap.parse_args(argv)
    try:
        from .train import model as _model, pipeline

        run_dir = _run_dir([a.run] if a.run else [])
        out = a.out or os.path.join(run_dir, "merged" if which == "merge" else "adapter")
        if os.path.isdir(out) and os.listdir(out) and not a.overwrite:
            raise ValueError(f"{out!r} exists and is not empty; pass --overwrite to replace it or --out DIR")
        if os.path.exists(out) and not os.path.isdir(out):
            raise ValueError(f"{out!r} exists and is not a directory")
        h = pipeline.load_run(run_dir, adapter=getattr(a, "adapter", None))
        if which == "merge":
            _model.save_merged(h.model, h.lora_params, h.tokenizer, out)
        else:
            _model.export_peft(h.model, h.lora_params, out,
                               base_model=h.cfg.model.path or os.path.join(run_dir, "base"))
    except (ConfigError, ValueError) as e:
        return _err(str(e))
    print(f"{which}: {h.adapter_source} -> {out}")
    return 0


def _generate(argv) -> int:
    from .train.config import ConfigError

    ap = argparse.ArgumentParser(prog="lora-jax generate", description="Sample text from base + adapter.")
    ap.add_argument("run", nargs="?", default=None)
    ap.add_argument("--prompt", default="", help="text to continue (default: the start of a document)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base", action="store_true", help="the base model alone (adapter off)")
    ap.add_argument("--adapter", default=None, help="a PEFT adapter dir instead of the run's own")
    a = ap.parse_args(argv)
    if a.max_new_tokens < 1:
        return _err(f"--max-new-tokens: expected a positive integer, got {a.max_new_tokens}")
    if a.temperature < 0:
        return _err(f"--temperature: expected a number >= 0, got {a.temperature}")
    try:
        from .train import pipeline

        h = pipeline.load_run(_run_dir([a.run] if a.run else []), adapter=a.adapter)
        text = pipeline.generate(h, a.prompt, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                                 top_k=a.top_k, seed=a.seed, use_adapter=not a.base)
    except (ConfigError, ValueError) as e:
        return _err(str(e))
    print(text)
    return 0


def _demo(argv) -> int:
    from . import demo  # written by the lead; imported only when asked for

    demo.main(list(argv))
    return 0


_COMMANDS = {"train": _train, "eval": _eval, "merge": lambda a: _merge_or_export(a, "merge"),
             "export": lambda a: _merge_or_export(a, "export"), "generate": _generate, "demo": _demo}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``lora-jax`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in _COMMANDS:
        import difflib

        hint = difflib.get_close_matches(cmd, list(_COMMANDS), n=1)
        return _err(f"unknown command {cmd!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                    + f" (commands: {', '.join(_COMMANDS)})")
    return _COMMANDS[cmd](rest)


if __name__ == "__main__":
    sys.exit(main())

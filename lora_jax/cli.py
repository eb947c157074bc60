"""The ``lora-jax`` command.

::

    lora-jax train [CONFIG] [key=value ...] [--resume] [--dry-run]
    lora-jax eval [RUN] [key=value ...] [--adapter DIR|NAME]
    lora-jax merge [RUN] [--out DIR] [--adapter DIR|NAME] [--overwrite]
    lora-jax merge --base HF_DIR --adapter PEFT_DIR --out DIR [--overwrite]
    lora-jax export [RUN] [--out DIR] [--adapter NAME] [--overwrite]
    lora-jax generate [RUN] [--prompt TEXT] [--max-new-tokens N] [--temperature T] [--seed S] [--base] [--adapter DIR|NAME]
    lora-jax generate [RUN] --prompts FILE [--adapters NAME=DIR ...]   (each prompt its adapter, one batch)
    lora-jax demo [...]
    lora-jax launch --processes N [--cpu-devices K] [--port P] [--grace S] train ...

``CONFIG`` is a shipped config name (``default``), ``./conf/NAME.yaml`` or a path to a YAML file;
``key=value`` overrides use dotted keys (``train.steps=20 lora.rank=4``, values read as YAML).
``RUN`` is a run directory (default: the newest under ``./runs``). A run of several adapters
(``adapters:`` in its config) needs ``--adapter NAME`` to eval, merge, export or generate one of
them; its own slots are ``RUN/adapters/NAME`` and ``RUN/merged/NAME``.

Every command returns an exit status: 0 on success, 2 for a configuration or usage error (one
message naming the key and what is allowed; nothing is written), 1 for any other failure.
``train`` also returns 3 when the loss or gradients became NaN/infinite (``train.on_nonfinite``;
the last good checkpoint is kept, nothing after it is written), 4 when a process of a distributed
run lost contact with another (the message names it; ``launch`` returns the status of the process
that failed first), and 130 / 143 when SIGINT /
SIGTERM stopped it (the current step was finished and checkpointed; the message says how to
resume). A run directory in use by another live ``train`` (`lora_jax.train.lock`), a resume with
no intact checkpoint, or data that gives no trained token return 2 and change nothing. ``merge``/``export`` write under a temporary name, read what they wrote back and check it
(`lora_jax.hf.verify`), then rename it into place; they return 2 for an output that is, contains or
lies inside what they read (the run, its base, the adapter), an adapter that does not fit, or an
export that fails its check, and 1 when a file cannot be read or written (unwritable directory, disk
full), 130 / 143 when SIGINT / SIGTERM stopped them: one line in every case, and no temporary
directory is left behind.

Example:
  >>> from lora_jax.cli import main
  >>> main(["train", "--dry-run", "train.steps=3"]) == 0  # doctest: +SKIP
  True
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from typing import Optional, Sequence

from .io._files import InterruptedAfterWrite

__all__ = ["main", "EXIT_NONFINITE", "EXIT_PEER_LOST"]

EXIT_NONFINITE = 3
EXIT_PEER_LOST = 4  # a process of a distributed run lost contact with another

_USAGE = """lora-jax COMMAND ...

commands:
  train     fine-tune: lora-jax train [CONFIG] [key=value ...] [--resume] [--dry-run]
  eval      eval loss of the base and the adapter on a run's eval data
  merge     fold a run's adapter into its base and write an HF checkpoint; or, with --base HF_DIR
            --adapter PEFT_DIR --out DIR, any PEFT adapter into a safetensors checkpoint, shard by shard
  export    write a run's adapter (newest checkpoint) in PEFT format
  generate  sample text from a run's base + adapter; --prompts FILE --adapters NAME=DIR ...: many adapters, one batch
  demo      the seed experiment (LoRA on an MLP, digits)
  launch    several processes of one run on this machine: lora-jax launch --processes N [--cpu-devices K] train ...

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
    a = ap.parse_intermixed_args(argv)  # flags may stand between the overrides
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
    except InterruptedAfterWrite as e:  # the last export was put in place whole, then the signal was raised
        print(f"lora-jax: interrupted ({signal.Signals(e.signum).name}) just after {e.path!r} was completely "
              "written; it is kept, and the run's finalized checkpoints too", file=sys.stderr)
        return 143 if e.signum == signal.SIGTERM else 130
    except KeyboardInterrupt as e:  # outside the training loop (setup, compile, export): no new checkpoint
        sig = _signum(e)
        print(f"lora-jax: interrupted ({signal.Signals(sig).name}) outside the training loop (setup, compiling, "
              "pretraining's start or export); no new checkpoint was written (finalized ones are kept: continue "
              "with --resume)", file=sys.stderr)
        return 128 + sig
    except Exception as e:  # noqa: BLE001 - a distributed run whose peer is gone ends here, named
        if cfg.distributed and _peer_lost(e):
            _exit_peer_lost(e)
        raise
    return 0


def _peer_lost(e: BaseException) -> bool:
    """A JAX runtime error of a multi-process run: a collective or the coordination service failed,
    which in a run that was set up together means a peer is gone."""
    import jax

    return isinstance(e, jax.errors.JaxRuntimeError) and jax.process_count() > 1


def _exit_peer_lost(e: BaseException) -> None:
    """Say which process lost which peer and leave at once with `EXIT_PEER_LOST` (a normal exit
    would wait in ``jax.distributed.shutdown`` for the lost peer)."""
    import re

    import jax

    me, n = jax.process_index(), jax.process_count()
    peers = sorted({int(t) for t in re.findall(r"task[:_ ](\d+)", str(e))} - {me})
    if not peers and n == 2:  # a transport error names an address, not a task: of two, it is the other
        peers = [1 - me]
    who = ("process " + ", ".join(map(str, peers))) if peers else "another process"
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    print(f"lora-jax: error: process {me} of a distributed run of {n} lost contact with {who} ({first}); stopped "
          "without a new checkpoint (finalized ones are kept: start every process again with --resume)",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_PEER_LOST)


def _launch(argv) -> int:
    from .train.launch import launch

    ap = argparse.ArgumentParser(
        prog="lora-jax launch", description="Run a command as several processes of one distributed run on this "
        "machine (each with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID and distributed=true).")
    ap.add_argument("--processes", type=int, required=True, help="how many processes")
    ap.add_argument("--cpu-devices", type=int, default=0,
                    help="run on the CPU with this many devices per process (gloo collectives)")
    ap.add_argument("--port", type=int, default=None, help="the coordinator's port on localhost (default: a free one)")
    ap.add_argument("--grace", type=float, default=30.0,
                    help="seconds the others get to stop by themselves after one failed (default 30)")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the lora-jax command, e.g. train CONFIG key=value")
    a = ap.parse_args(argv)
    if not a.command or a.command[0] != "train":
        return _err(f"launch: the command must be train (e.g. lora-jax launch --processes 2 train), got "
                    f"{' '.join(a.command) or 'nothing'!r}")
    try:
        return launch(a.command, a.processes, cpu_devices=a.cpu_devices, port=a.port, grace=a.grace,
                      echo=lambda s: print(s, file=sys.stderr, flush=True))
    except ValueError as e:
        return _err(str(e))


def _run_dir(pos) -> str:
    from .train.runs import latest_run

    return pos[0] if pos else latest_run()


def _eval(argv) -> int:
    from .train.config import ConfigError, parse_overrides

    ap = argparse.ArgumentParser(prog="lora-jax eval", description="Eval loss of base and adapter on a run's data.")
    ap.add_argument("args", nargs="*", metavar="[RUN] [key=value ...]")
    ap.add_argument("--adapter", default=None, help="a PEFT adapter dir instead of the run's own, or the name of "
                    "one adapter of a run of several (adapters: in its config)")
    a = ap.parse_intermixed_args(argv)
    try:
        pos, over = _split_overrides(a.args, 1, "RUN")
        nested, problems = parse_overrides(over)
        if problems:
            raise ConfigError(problems)
        from .train import runs

        h = runs.load_run(_run_dir(pos), adapter=a.adapter, overrides=nested)
        rows = runs.eval_rows_of(h)
        out = runs.evaluate(h, rows)
    except (ConfigError, ValueError) as e:
        return _err(str(e))
    from .train.metrics import strict_json

    print(strict_json(out, indent=2))  # NaN / infinity as null: always valid JSON
    return 0


def _fail(msg: str) -> int:
    """A runtime failure (a file that cannot be read or written): one line, exit status 1."""
    print(f"lora-jax: error: {msg}", file=sys.stderr)
    return 1


def _check_out(out: str, overwrite: bool) -> None:
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ValueError(f"{out!r} exists and is not empty; pass --overwrite to replace it or --out DIR")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"{out!r} exists and is not a directory")


def _merge_or_export(argv, which: str) -> int:
    try:
        return _merge_or_export_body(argv, which)
    except InterruptedAfterWrite as e:
        print(f"lora-jax: {which} interrupted ({signal.Signals(e.signum).name}) after the output was complete: "
              f"{e.path!r} is written and checked, and kept", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt as e:  # the temporary directory is gone with the exception
        sig = _signum(e)
        print(f"lora-jax: {which} interrupted ({signal.Signals(sig).name}); nothing was written", file=sys.stderr)
        return 128 + sig


def _merge_or_export_body(argv, which: str) -> int:
    """``merge``/``export``: written under a temporary name, read back and checked (every tensor, and
    factorized vs merged logits on a probe batch), then renamed into place. An output that is,
    contains or lies inside what the command reads (the run, its base, the adapter) is refused;
    only the run's own ``RUN/merged`` / ``RUN/adapter`` may lie inside the run."""
    from .train.config import ConfigError

    merge = which == "merge"
    ap = argparse.ArgumentParser(prog=f"lora-jax {which}",
                                 description="merged HF checkpoint" if merge else "PEFT adapter")
    ap.add_argument("run", nargs="?", default=None)
    ap.add_argument("--out", default=None, help=f"output dir (default: RUN/{'merged' if merge else 'adapter'}; "
                                                 f"RUN/{'merged' if merge else 'adapters'}/NAME for --adapter NAME)")
    ap.add_argument("--adapter", default=None,
                    help=("a PEFT adapter dir instead of the run's own, or " if merge else "")
                    + "the name of one adapter of a run of several (adapters: in its config)")
    if merge:
        ap.add_argument("--base", default=None,
                        help="a Hugging Face safetensors checkpoint dir: merge --adapter (a PEFT dir) into it shard "
                             "by shard, without a run (needs --adapter and --out)")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    a = ap.parse_args(argv)
    try:
        if merge and a.base is not None:
            if a.run is not None or a.adapter is None or a.out is None:
                raise ValueError("merge --base HF_DIR needs --adapter PEFT_DIR and --out DIR (and no RUN)")
            from .hf.merge import merge_checkpoint
            from .io._files import refuse_overlap

            refuse_overlap(a.out, {"the base checkpoint": a.base, "the adapter": a.adapter}, what=which)
            _check_out(a.out, a.overwrite)
            info = merge_checkpoint(a.base, a.adapter, a.out, overwrite=a.overwrite,
                                    echo=lambda line: print(line, flush=True))
            print(f"merge: {a.adapter} into {a.base} -> {a.out} ({len(info['merged'])} tensor(s) merged, "
                  f"{info['shards']} shard(s))")
            return 0
        from . import tree as _tree
        from .hf.verify import check_merged_files, check_probe
        from .io._files import atomic_directory, refuse_overlap
        from .train import model as _model, runs
        from .train.config import adapter_configs

        run_dir = _run_dir([a.run] if a.run else [])
        adapter = a.adapter
        names = [n for n, _ in adapter_configs(runs.run_config(run_dir))]
        if adapter is not None and not names and not merge:
            raise ValueError(f"export --adapter {adapter}: {run_dir!r} trained one adapter; --adapter names one of "
                             f"a run of several")
        if adapter in names:  # one adapter of a run of several: its own slot, RUN/<merged|adapters>/NAME
            own = os.path.join(run_dir, "merged" if merge else "adapters", adapter)
        else:
            own = os.path.join(run_dir, "merged" if merge else "adapter")
        out = a.out or own
        inside_ok = os.path.realpath(out) == os.path.realpath(own)  # the run's own export slot
        refuse_overlap(out, {"the run directory": None if inside_ok else run_dir,
                             "the adapter": None if adapter in names else adapter}, what=which)
        _check_out(out, a.overwrite)
        h = runs.load_run(run_dir, adapter=adapter)
        base = os.path.abspath(h.cfg.model.path or os.path.join(run_dir, "base"))
        refuse_overlap(out, {"the base model": base, "the tokenizer": h.cfg.tokenizer.path}, what=which)
        with atomic_directory(out, overwrite=a.overwrite, what=which) as tmp:
            if merge:
                merged = _tree.merge(h.lora_params, safe=True)
                _model.save_model(h.model, merged, h.tokenizer, tmp)
                check_merged_files(tmp, h.model, merged)
                check_probe(h.model, h.lora_params, merged, what=which)
            else:
                _model.export_peft(h.model, h.lora_params, tmp, base_model=base)
                back = _model.load_peft(h.model, h.lora_params, tmp)
                check_probe(h.model, h.lora_params, _tree.merge(back), what=which, also=back)
    except (ConfigError, ValueError) as e:
        return _err(str(e))
    except OSError as e:  # unwritable, disk full, missing input: one line; atomic_directory left nothing
        return _fail(f"{which}: {e}")
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
    ap.add_argument("--adapter", default=None, help="a PEFT adapter dir instead of the run's own, or the name of "
                    "one adapter of a run of several (adapters: in its config)")
    ap.add_argument("--adapters", nargs="+", default=None, metavar="NAME=DIR",
                    help="PEFT adapter dirs by name, served in one batch with --prompts (give RUN before them); "
                         "the name 'run' is the run's own adapter unless given; a run of several adapters serves "
                         "each by its own name")
    ap.add_argument("--prompts", default=None, metavar="FILE",
                    help='JSONL, one {"prompt": TEXT, "adapter": NAME or null (the base)} per line; prints one '
                         '{"adapter", "text"} JSON line per prompt')
    a = ap.parse_args(argv)
    if a.max_new_tokens < 1:
        return _err(f"--max-new-tokens: expected a positive integer, got {a.max_new_tokens}")
    if a.temperature < 0:
        return _err(f"--temperature: expected a number >= 0, got {a.temperature}")
    if (a.adapters is not None or a.prompts is not None) and (a.adapter is not None or a.base or a.prompt):
        return _err("--adapters/--prompts serve many prompts; --adapter, --base and --prompt serve one")
    if a.adapters is not None and a.prompts is None:
        return _err("--adapters needs --prompts FILE (each prompt names its adapter)")
    try:
        adapters = _named_dirs(a.adapters or [])
        jobs = _prompt_jobs(a.prompts) if a.prompts is not None else None
        from .train import runs

        if jobs is not None:
            h = runs.load_run(_run_dir([a.run] if a.run else []), every=True)
            texts = runs.generate_many(h, [p for p, _ in jobs], [n for _, n in jobs], adapters,
                                       max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                                       seed=a.seed)
            for (_, n), text in zip(jobs, texts):
                print(json.dumps({"adapter": n, "text": text}, ensure_ascii=False))
            return 0
        h = runs.load_run(_run_dir([a.run] if a.run else []), adapter=a.adapter, every=a.base)
        text = runs.generate(h, a.prompt, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                                 top_k=a.top_k, seed=a.seed, use_adapter=not a.base)
    except (ConfigError, ValueError) as e:
        return _err(str(e))
    except OSError as e:  # an adapter directory that is not one, an unreadable file
        return _err(f"{type(e).__name__}: {e}")
    print(text)
    return 0


def _named_dirs(items) -> dict:
    """``NAME=DIR`` arguments as a mapping; ValueError naming a malformed or repeated one."""
    out = {}
    for item in items:
        name, eq, path = item.partition("=")
        if not eq or not name or not path:
            raise ValueError(f"--adapters: expected NAME=DIR, got {item!r}")
        if name in out:
            raise ValueError(f"--adapters: {name!r} is given twice")
        out[name] = path
    return out


def _prompt_jobs(path) -> list:
    """``[(prompt, adapter name or None)]`` from a JSONL file; ValueError naming the line that is off."""
    jobs = []
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().split("\n")  # not splitlines: U+2028 and friends are legal inside JSON strings
    except OSError as e:
        raise ValueError(f"--prompts: cannot read {path!r}: {e.strerror or e}") from None
    for j, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"--prompts {path}:{j}: not JSON ({e.msg})") from None
        if not isinstance(rec, dict) or set(rec) != {"prompt", "adapter"} or not isinstance(rec["prompt"], str) or \
                not (rec["adapter"] is None or isinstance(rec["adapter"], str)):
            raise ValueError(f'--prompts {path}:{j}: expected {{"prompt": TEXT, "adapter": NAME or null}}, '
                             f'got {line[:80]!r}')
        jobs.append((rec["prompt"], rec.get("adapter")))
    if not jobs:
        raise ValueError(f"--prompts: {path!r} holds no prompt")
    return jobs


def _demo(argv) -> int:
    from . import demo  # written by the lead; imported only when asked for

    demo.main(list(argv))
    return 0


_COMMANDS = {"train": _train, "eval": _eval, "merge": lambda a: _merge_or_export(a, "merge"),
             "export": lambda a: _merge_or_export(a, "export"), "generate": _generate, "demo": _demo,
             "launch": _launch}


class _Signalled(KeyboardInterrupt):
    """SIGINT or SIGTERM while a command runs, raised where it lands (the training loop replaces this
    with its own handling, which finishes the step and checkpoints first)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def _signum(e: BaseException) -> int:
    return getattr(e, "signum", signal.SIGINT)


@contextlib.contextmanager
def _signals_raised():
    """SIGINT and SIGTERM raise `_Signalled` where they land (main thread only; a signal the process
    ignores stays ignored) and are recorded in the yielded list, so one that lands where it is
    caught and not raised again (a JAX callback turns it into a runtime error) is still seen."""
    got: list = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return

    def raised(signum, frame):  # noqa: ARG001 - the signal module's signature
        got.append(signum)
        raise _Signalled(signum)

    previous = {s: signal.signal(s, raised) for s in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield got
    finally:
        for s, p in previous.items():
            signal.signal(s, p)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``lora-jax`` console script; returns the exit status.

    SIGINT / SIGTERM end every command with one line and 130 / 143: where they land before a
    command has anything to lose (importing, reading the config), nothing was written; a signal
    that lands where it cannot stop the command (inside a JAX callback) is reported when the
    command ends, and its status is the signal's.
    """
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
    with _signals_raised() as got:
        try:
            rc = _COMMANDS[cmd](rest)
        except KeyboardInterrupt as e:  # landed before the command's own handling began
            sig = _signum(e)
            print(f"lora-jax: {cmd} interrupted ({signal.Signals(sig).name}) while starting; nothing was written",
                  file=sys.stderr)
            return 128 + sig
        except ModuleNotFoundError as e:
            if (e.name or "").partition(".")[0] == "lora_jax":
                raise
            return _err(f"{cmd}: {(str(e).splitlines() or [''])[0]}")  # a light install: it names the extra
        except Exception as e:  # noqa: BLE001 - after a signal the failure is its consequence: one line
            if not got:
                raise
            rc = 1
            print(f"lora-jax: error: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}", file=sys.stderr)
    if got and rc in (0, 1):
        name = signal.Signals(got[0]).name
        print(f"lora-jax: {cmd}: {name} arrived where it could not stop the command (inside a callback); "
              + ("the command then finished, and what it wrote is complete" if rc == 0 else
                 "the failure above followed it"), file=sys.stderr)
        return 128 + got[0]
    return rc


def console() -> None:
    """The ``lora-jax`` script: `main`, then exit. A signal after the command has finished ends the
    process at once (default action) instead of raising inside the interpreter's shutdown, where
    JAX's runtime is being torn down."""
    rc = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(s) is not signal.SIG_IGN:
                signal.signal(s, signal.SIG_DFL)
    sys.exit(rc)


if __name__ == "__main__":
    console()

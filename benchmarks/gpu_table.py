"""The README's GPU table, made from a committed GPU run (``benchmarks/results/<date>-<gpu>.jsonl``).

One line per measured row of `gpu_run.py`: what ran (model shape, system, the step settings
``lora-jax train`` picked or the ones the row fixed), tokens/s, peak device memory, step time,
and for lora_jax rows the ratio to PyTorch + PEFT + ``torch.compile`` of the same shape measured
on the same machine. The README holds this output between ``<!-- gpu-table -->`` markers;
``tests/test_readme.py`` checks they agree.

Usage::

    python benchmarks/gpu_table.py benchmarks/results/2026-12-04-h200.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys

SHAPES = {"1b": "1.1B (TinyLlama shape)", "llama3-1b": "Llama-3.2-1B shape", "llama3-8b": "Llama-3.1-8B shape"}


def rows_of(path: str) -> tuple[dict, list[dict]]:
    """``(env record, successful row records in file order)`` of a results file."""
    env, rows = {}, []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if r.get("kind") == "env" and not env:
                env = r
            elif r.get("kind") == "row" and "tokens_per_s" in r and "error" not in r:
                rows.append(r)
    return env, rows


def _what(r: dict) -> str:
    system = r.get("system")
    if system == "peft_compile":
        return "PyTorch + PEFT + torch.compile"
    name = {"lora_jax": "lora_jax LoRA", "frozen": "frozen floor (no LoRA)", "merged": "merged in the loss"}[system]
    if r.get("quant"):
        name = f"lora_jax QLoRA {r['quant'].upper()}"
    auto = "/" not in r["name"][len(r["name"].split("/")[0]) + 1:]  # 1b/lora_jax: the trainer's own pick
    limit = r.get("memory_limit_gib")
    picked = "picked" + (f" within {limit:g} GiB" if limit and r.get("quant") else "") if auto else "fixed"
    return f"{name} ({picked}: {r.get('settings')})"


def table(path: str) -> str:
    """The markdown table of one results file."""
    env, rows = rows_of(path)
    peft = {r["size"]: r for r in rows if r.get("system") == "peft_compile"}
    out = ["| shape | what ran | tokens/s | peak GiB | step ms | vs PEFT + compile (speed, memory) |",
           "|---|---|---:|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: list(SHAPES).index(r["size"]) if r["size"] in SHAPES else 99):
        p = peft.get(r["size"])
        vs = "" if r.get("system") == "peft_compile" or p is None else \
            f"{r['tokens_per_s'] / p['tokens_per_s']:.2f}x, {r['peak_gib'] / p['peak_gib']:.2f}x"
        out.append(f"| {SHAPES.get(r['size'], r['size'])} | {_what(r)} | {r['tokens_per_s']:,} | "
                   f"{r['peak_gib']:.2f} | {r['step_ms']:.1f} | {vs} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="a gpu_run.py results file (.jsonl)")
    args = ap.parse_args(argv)
    sys.stdout.write(table(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where a GPU step's time goes, from a `jax.profiler` trace: device time per kernel and per category.

The unit is the kernel (one event on a device stream line, named by the kernel it ran), not the
XLA op: with command buffers (CUDA graphs) XLA files every kernel of a graph under one
``command_buffer_N`` op, so grouping by op says nothing about what ran. Each kernel falls in one
category, by its name:

* ``matmul``: cuBLAS/cuBLASLt (``nvjet_*``, ``*gemm*``, ``cutlass``/``xmma`` kernels) and XLA's
  Triton GEMM fusions (``gemm_fusion_*``);
* ``attention``: cuDNN's fused attention (``*sdpa*``, ``*fmha*``, ``cudnn::fusion::*``, ``flash``);
* ``dynamic-slice``: XLA's (dynamic) slice and dynamic-update-slice fusions (a scan's per-layer
  slicing and stacking);
* ``copy``: memcpy/memset and copy/transpose fusions;
* ``reduction``: reduction fusions (``input_*reduce*``, ``*reduction*``);
* ``elementwise``: every other XLA fusion (``loop_*``, ``input_*``, ``wrapped_*``);
* ``other``: anything else.

The shares add up to 1 over the device time of the trace. Where the step's compiled HLO text is
given, each XLA fusion kernel (``loop_add_fusion_6`` is the instruction ``%loop_add_fusion.6``)
is mapped to its JAX ``op_name``, which says whether it belongs to the backward pass
(``transpose(jvp(...))``), the loss (``lm_loss`` scope) or LoRA (``lora`` scope); cuBLAS and cuDNN
kernels carry no instruction name, so those shares are of the mapped kernels' time, and the
mapped share is reported beside them.

Reads a Perfetto/Chrome trace (``*.trace.json.gz``, what `jax.profiler` writes beside the
xplane) or the ``*.xplane.pb`` itself.

Usage::

    python benchmarks/profile_summary.py TRACE.trace.json.gz [--hlo STEP.hlo.txt.gz] [--steps 3]
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from typing import Iterable, Optional

__all__ = ["CATEGORIES", "categorize", "kernel_events", "hlo_op_names", "summarize"]

CATEGORIES = ("matmul", "attention", "elementwise", "copy", "dynamic-slice", "reduction", "other")

_HLO_LINE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*?op_name=\"([^\"]*)\"")


def categorize(kernel: str) -> str:
    """The category (one of `CATEGORIES`) of a GPU kernel, by its name."""
    k = kernel.lower()
    if k.startswith("nvjet") or "gemm" in k or "cutlass" in k or "xmma" in k or "cublas" in k or "gemv" in k:
        return "matmul"
    if "sdpa" in k or "fmha" in k or "flash" in k or "cudnn" in k or "attention" in k:
        return "attention"
    if "dynamic_update_slice" in k or "dynamic_slice" in k or "dynamic-update-slice" in k or \
            "dynamic-slice" in k or re.search(r"(^|_)slice(_|$)", k):
        return "dynamic-slice"
    if k.startswith(("memcpy", "memset")) or "copy" in k or "transpose" in k:
        return "copy"
    if "reduce" in k or "reduction" in k:
        return "reduction"
    if "fusion" in k or k.startswith(("wrapped_", "loop_", "input_")):
        return "elementwise"
    return "other"


def hlo_op_names(hlo_text: str) -> dict:
    """``{HLO instruction name: JAX op_name}`` from a compiled module's text (``Compiled.as_text()``)."""
    out = {}
    for line in hlo_text.splitlines():
        m = _HLO_LINE.match(line)
        if m:
            out.setdefault(m.group(1), m.group(2))
    return out


def _device_events_json(trace: dict) -> Iterable[tuple]:
    procs, threads = {}, {}
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e.get("pid")] = str(e.get("args", {}).get("name", ""))
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e.get("pid"), e.get("tid"))] = str(e.get("args", {}).get("name", ""))
    for e in events:
        if e.get("ph") != "X" or not procs.get(e.get("pid"), "").startswith("/device:"):
            continue
        if not threads.get((e.get("pid"), e.get("tid")), "").startswith("Stream"):
            continue
        args = e.get("args") or {}
        yield str(e.get("name", "")), float(e.get("dur", 0.0)), str(args.get("hlo_op", ""))


def _device_events_xplane(path: str) -> Iterable[tuple]:
    from jax.profiler import ProfileData

    pd = ProfileData.from_file(path)
    for plane in pd.planes:
        if not plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            if not line.name.startswith("Stream"):
                continue
            for ev in line.events:
                stats = dict(ev.stats)
                yield str(ev.name), ev.duration_ns / 1e3, str(stats.get("hlo_op", ""))


def kernel_events(path: str) -> list[tuple]:
    """``[(kernel name, duration in us, hlo_op)]`` of every kernel on a device stream of a trace
    file (``.trace.json``, ``.trace.json.gz`` or ``.xplane.pb``)."""
    if path.endswith(".xplane.pb"):
        return list(_device_events_xplane(path))
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return list(_device_events_json(json.load(f)))


def _instruction(kernel: str, hlo_op: str, names: dict) -> Optional[str]:
    """The HLO instruction a kernel ran: its ``hlo_op`` unless that is a command buffer, else the
    kernel name with its last ``_N`` read as ``.N`` (how XLA names a fusion's kernel)."""
    if hlo_op and not hlo_op.startswith("command_buffer") and hlo_op in names:
        return hlo_op
    for cand in (kernel, re.sub(r"_(\d+)$", r".\1", kernel)):
        if cand in names:
            return cand
    return None


def summarize(events: list[tuple], hlo_text: Optional[str] = None, steps: int = 1, top: int = 40) -> dict:
    """Device time per kernel and per category of ``events`` (`kernel_events`) over ``steps`` steps."""
    steps = max(int(steps), 1)
    names = hlo_op_names(hlo_text) if hlo_text else {}
    kernels: dict = {}
    for name, dur, hlo_op in events:
        r = kernels.setdefault(name, {"kernel": name, "category": categorize(name), "count": 0, "us": 0.0,
                                      "jax": None})
        r["count"] += 1
        r["us"] += dur
        if r["jax"] is None and names:
            inst = _instruction(name, hlo_op, names)
            r["jax"] = names.get(inst) if inst else None
    total = sum(r["us"] for r in kernels.values())
    if not kernels or total <= 0:
        return {"note": "no kernel events on a device stream (a CPU run records none)", "steps": steps}
    cats = {c: {"ms_per_step": 0.0, "share": 0.0, "launches_per_step": 0.0, "kernels": 0} for c in CATEGORIES}
    mapped = backward = loss = lora = 0.0
    for r in kernels.values():
        c = cats[r["category"]]
        c["ms_per_step"] += r["us"] / steps / 1e3
        c["share"] += r["us"] / total
        c["launches_per_step"] += r["count"] / steps
        c["kernels"] += 1
        j = r["jax"]
        if j is not None:
            mapped += r["us"]
            backward += r["us"] if "transpose(" in j else 0.0
            loss += r["us"] if "lm_loss" in j else 0.0
            lora += r["us"] if "/lora" in j or j.startswith("lora") else 0.0
    for c in cats.values():
        c["ms_per_step"], c["share"] = round(c["ms_per_step"], 3), round(c["share"], 4)
        c["launches_per_step"] = round(c["launches_per_step"], 1)
    ranked = sorted(kernels.values(), key=lambda r: -r["us"])
    out = {"steps": steps, "device_ms_per_step": round(total / steps / 1e3, 3),
           "launches_per_step": round(len(events) / steps, 1),
           "by_category": {k: v for k, v in sorted(cats.items(), key=lambda kv: -kv[1]["ms_per_step"])},
           "top_kernels": [{"kernel": r["kernel"], "category": r["category"],
                            "ms_per_step": round(r["us"] / steps / 1e3, 4), "share": round(r["us"] / total, 4),
                            "launches_per_step": round(r["count"] / steps, 1), "jax": r["jax"]}
                           for r in ranked[:top]]}
    if names:
        out["hlo_mapped_share"] = round(mapped / total, 4)
        out["of_mapped"] = {k: None if not mapped else round(v / mapped, 4)
                            for k, v in (("backward", backward), ("lm_loss", loss), ("lora", lora))}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace", help="*.trace.json.gz, *.trace.json or *.xplane.pb")
    ap.add_argument("--hlo", default=None, help="the step's compiled HLO text (.txt or .txt.gz)")
    ap.add_argument("--steps", type=int, default=1, help="steps the trace holds (times are per step)")
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args(argv)
    hlo = None
    if args.hlo:
        with (gzip.open if args.hlo.endswith(".gz") else open)(args.hlo, "rt") as f:
            hlo = f.read()
    print(json.dumps(summarize(kernel_events(args.trace), hlo, args.steps, args.top), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

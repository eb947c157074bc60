"""The GPU measurement of issues 15 and 21 in one go: lora_jax beside PyTorch + PEFT, with a profile.

One run, in priority order (`plan`), each row in its own process (its own peak memory), within a
time budget (default 500 s, compiles included; a row starts only when the budget left covers its
estimate, and is recorded as skipped otherwise):

1. ``train_step.py --size 1b`` ``lora_jax`` with the settings ``lora-jax train`` picks
   (`lora_jax.train.tuning`), then a `jax.profiler` trace of a few more steps of it, summarized
   per kernel and category (``profile_summary.py``) with the compiled step's HLO;
2. the same step with the layer scan rolled (``--unroll 1``); 3. ``1b`` ``frozen`` (the floor);
4. ``llama3-1b`` ``lora_jax``; 5. ``llama3-8b`` ``lora_jax`` (Llama 3.1 8B's shape);
6. ``llama3-8b`` QLoRA (NF4 base, the settings picked within 16 GiB);
7.-8. PyTorch + PEFT + ``torch.compile`` at ``llama3-8b`` and ``llama3-1b`` (``train_step.py
   --only peft_compile``: PEFT's anchor's model, adapter, optimizer and batch, built on the GPU);
9. ``llama3-1b`` ``frozen``; 10. ``1b`` with the chunked loss; 11. PEFT + compile at ``1b``.

Everything goes to ``OUT/<date>-<gpu>.jsonl`` (one JSON object per line: ``kind`` ``env`` first,
then one ``row`` per measurement, the ``profile`` record after its row, then the ``summary``
against the issue's targets), the driver's log ``OUT/<date>-<gpu>.log``, and beside them the
profile: ``-profile-ops.json`` (device time per kernel and per category),
``-profile.xplane.pb.gz`` / ``-profile.trace.json.gz`` (TensorBoard / Perfetto),
``-step.hlo.txt.gz``. At most 8 files, one folder level (what a device run returns). The
``.jsonl`` is committed as ``benchmarks/results/<date>-<gpu>.jsonl``; ``gpu_table.py`` makes the
README's table from it.

``--size tiny`` is the CPU dry run of the same plan: every row at the tiny sizes with a GPU's
candidate settings, the loss chunked into 16-position chunks, PEFT eager on the CPU for the
compiled PEFT rows.

Usage::

    python benchmarks/gpu_run.py --out "$OUT"                      # GPU
    python benchmarks/gpu_run.py --size tiny --out /tmp/dry        # CPU dry run
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import profile_summary  # noqa: E402  (beside this file)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TRAIN_STEP = os.path.join(HERE, "train_step.py")
REMAT = "dots_with_no_batch_dims_saveable"
MAX_FILE = 16 * 2**20  # what one file back from a device run may weigh

# the targets (one H100/H200, batch 8 x 1024)
TARGET_1B_TOKENS_PER_S = 100_000
TARGET_1B_PEAK_GIB = 16.0
TARGET_LORA_OVER_FROZEN_STEP = 1.10
TARGET_L3_SPEEDUP_OVER_PEFT_COMPILE = 1.5
TARGET_L3_MEMORY_OVER_PEFT_COMPILE = 0.75
TARGET_8B_SPEEDUP_OVER_PEFT_COMPILE = 1.3
TARGET_8B_MEMORY_OVER_PEFT_COMPILE = 1.0
TARGET_8B_QLORA_PEAK_GIB = 16.0


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------
def plan(size: str, anchor: Optional[str] = None) -> list[dict]:
    """The rows to measure, in priority order: ``{"name", "kind": "jax"|"anchor", "args", "est_s", ...}``.

    ``est_s`` is what a row is expected to take on the GPU (process start, init, compiles, steps);
    a row starts only when the budget left covers it. PEFT + torch.compile rows come from
    ``train_step.py --only peft_compile`` (the anchor's model, adapter, optimizer and batch, built
    on the GPU in bf16), or from PEFT's own anchor script when ``anchor`` is given.
    """
    tiny = size == "tiny"
    sz = {"1b": "tiny", "llama3-1b": "tiny-llama3", "llama3-8b": "tiny-8b"} if tiny else \
        {k: k for k in ("1b", "llama3-1b", "llama3-8b")}
    # the dry run: a GPU's candidate settings on the CPU, 16-position loss chunks
    extra = ["--loss-chunk", "16", "--tune-for", "gpu"] if tiny else []

    def jax_row(name, model, system, est, profile=False, remat="auto", loss="auto", unroll="auto", quant=None,
                memory_gib=None):
        args = ["--size", sz[model], "--only", system, "--gpu", "0" if tiny else "1", "--remat", remat,
                "--loss", loss, "--unroll", str(unroll)] + extra
        if quant:
            args += ["--quant", quant]
        if memory_gib:
            args += ["--memory-gib", str(memory_gib)]
        return {"name": name, "kind": "jax", "args": args, "profile": profile, "est_s": 30 if tiny else est}

    def peft_row(model, est):
        if anchor and not tiny:
            return {"name": f"peft_compile/{model}", "kind": "anchor", "args": [model, "--compile", "--no-full"],
                    "est_s": 2 * est}
        args = ["--size", sz[model], "--only", "peft" if tiny else "peft_compile", "--gpu", "0" if tiny else "1"]
        return {"name": f"peft_compile/{model}", "kind": "jax", "args": args, "profile": False,
                "est_s": 30 if tiny else est, "peft_for": model}

    return [
        # what lora-jax train picks on its own (lora_jax.train.tuning), with the profile of its step
        jax_row("1b/lora_jax", "1b", "lora_jax", 45, profile=True),
        # the same step with the layer scan rolled: the price of the scan's copies
        jax_row("1b/lora_jax/unroll1", "1b", "lora_jax", 25, remat=REMAT, loss="plain", unroll=1),
        jax_row("1b/frozen", "1b", "frozen", 35),
        jax_row("llama3-1b/lora_jax", "llama3-1b", "lora_jax", 40),
        jax_row("llama3-8b/lora_jax", "llama3-8b", "lora_jax", 90),
        jax_row("llama3-8b/qlora_nf4", "llama3-8b", "lora_jax", 130, quant="nf4", memory_gib=16),
        peft_row("llama3-8b", 150),
        peft_row("llama3-1b", 75),
        jax_row("llama3-1b/frozen", "llama3-1b", "frozen", 30),
        jax_row("1b/lora_jax/chunked", "1b", "lora_jax", 30, loss="chunked"),
        peft_row("1b", 75),
    ]


# ---------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------
_ENV_CODE = r"""
import json, platform, sys
out = {"python": platform.python_version()}
for m in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers", "peft"):
    try:
        out[m] = __import__(m).__version__
    except Exception as e:
        out[m] = None
import jax
d = jax.devices()[0]
out.update(backend=jax.default_backend(), device_kind=getattr(d, "device_kind", str(d)), n_devices=jax.device_count())
print(json.dumps(out))
"""


def environment() -> dict:
    """Versions, the device (asked in a child process: this driver never holds the GPU), git state."""
    env = {"kind": "env", "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    try:
        r = subprocess.run([sys.executable, "-c", _ENV_CODE], capture_output=True, text=True, timeout=300)
        env.update(json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1]))
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
        env["env_error"] = repr(e)
    try:
        q = "name,driver_version,memory.total,clocks.max.sm"
        r = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=60)
        if r.returncode == 0:
            env["nvidia_smi"] = r.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    for key, cmd in (("git_commit", ["git", "rev-parse", "HEAD"]), ("git_dirty", ["git", "status", "--porcelain"])):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60)
            env[key] = (r.stdout.strip() if key == "git_commit" else bool(r.stdout.strip())) if r.returncode == 0 \
                else None
        except (OSError, subprocess.SubprocessError):
            env[key] = None
    return env


def gpu_slug(env: dict) -> str:
    """``h200`` for "NVIDIA H200", ``cpu`` on a CPU: the file name's device part."""
    if env.get("backend") in (None, "cpu"):
        return "cpu"
    kind = str(env.get("device_kind", "gpu")).lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", kind).strip("-") or "gpu"


# ---------------------------------------------------------------------------------------------
# running rows
# ---------------------------------------------------------------------------------------------
def _json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def run_row(row: dict, anchor: Optional[str], timeout: float, profile_dir: Optional[str], log) -> list[dict]:
    """Run one planned row; returns the records it produced (errors included)."""
    if row["kind"] == "anchor":
        cmd = [sys.executable, anchor] + row["args"]
    else:
        cmd = [sys.executable, TRAIN_STEP] + row["args"]
        if row.get("profile") and profile_dir:
            cmd += ["--profile", profile_dir, "--profile-steps", "3"]
    t0 = time.perf_counter()
    log(f"$ {' '.join(cmd)}  (timeout {timeout:.0f}s)")
    base = {"kind": "row", "name": row["name"], "cmd": " ".join(os.path.relpath(c, REPO) if os.path.isabs(c) and
                                                                 c.startswith(REPO) else c for c in cmd[1:])}
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired as e:
        log(f"  timeout after {timeout:.0f}s; stderr tail:\n{(e.stderr or b'')[-2000:]!r}")
        return [{**base, "error": f"timeout after {timeout:.0f}s", "wall_s": round(time.perf_counter() - t0, 1)}]
    wall = round(time.perf_counter() - t0, 1)
    log(f"  exit {r.returncode} in {wall}s")
    lines = _json_lines(r.stdout)
    if r.stderr.strip():
        log("  stderr tail: " + r.stderr[-3000:].replace("\n", "\n    "))
    if row["kind"] == "anchor":
        recs = []
        header = next((x for x in lines if "system" not in x), {})
        for x in lines:
            if "system" in x:
                system = "peft_compile" if x.get("compile") else "peft_eager"
                recs.append({**base, "source": "peft_anchor", **x, "system": system, "anchor_env": header,
                             "peak_gib": x.get("peak_mem_gib"), "wall_s": wall})
                if system != "peft_compile":
                    recs[-1]["name"] += "/eager"
        if r.returncode != 0 or not recs:
            recs.append({**base, "source": "peft_anchor", "error": f"exit {r.returncode}",
                         "stderr_tail": r.stderr[-1500:], "wall_s": wall})
        return recs
    if r.returncode != 0 or not lines:
        return [{**base, "error": f"exit {r.returncode}", "stderr_tail": r.stderr[-1500:], "wall_s": wall}]
    rec = {**base, **lines[-1], "wall_s": wall}
    if row.get("peft_for"):  # the dry run's eager CPU row stands for the GPU's compiled one
        rec.update(system="peft_compile", peft_for=row["peft_for"])
    if "skipped" in rec:
        rec["error"] = rec.pop("skipped")
    return [rec]


# ---------------------------------------------------------------------------------------------
# the profile
# ---------------------------------------------------------------------------------------------
def collect_profile(profile_dir: str, out_dir: str, stem: str, steps: int, log) -> dict:
    """Summarize the trace in ``profile_dir`` and copy it (gzipped, one folder level) under ``out_dir``."""
    info: dict = {"kind": "profile"}
    found = []
    for root, _, files in os.walk(profile_dir):
        found += [os.path.join(root, f) for f in files]
    xplanes = [f for f in found if f.endswith(".xplane.pb")]
    traces = [f for f in found if f.endswith(".trace.json.gz")]
    hlo_path = os.path.join(profile_dir, "lora_jax.hlo.txt")
    hlo = open(hlo_path).read() if os.path.exists(hlo_path) else None
    if not xplanes:
        info["error"] = f"no *.xplane.pb under {profile_dir}"
        return info
    try:  # per kernel, not per XLA op (a command buffer holds many kernels): profile_summary.py
        summary = profile_summary.summarize(profile_summary.kernel_events(traces[0] if traces else xplanes[0]),
                                            hlo, steps)
    except Exception as e:  # noqa: BLE001 - the raw trace still comes back
        summary = {"error": repr(e)}
    ops_file = os.path.join(out_dir, f"{stem}-profile-ops.json")
    with open(ops_file, "w") as f:
        json.dump(summary, f, indent=1)
    info["ops_file"] = os.path.basename(ops_file)
    info.update({k: summary.get(k) for k in ("device_ms_per_step", "launches_per_step", "by_category",
                                             "hlo_mapped_share", "of_mapped", "note", "error") if k in summary})
    for src, name in ((xplanes[0], f"{stem}-profile.xplane.pb.gz"), (traces[0] if traces else None,
                                                                     f"{stem}-profile.trace.json.gz"),
                      (hlo_path if hlo is not None else None, f"{stem}-step.hlo.txt.gz")):
        if src is None:
            continue
        dst = os.path.join(out_dir, name)
        if src.endswith(".gz"):
            shutil.copyfile(src, dst)
        else:
            with open(src, "rb") as a, gzip.open(dst, "wb", compresslevel=6) as b:
                shutil.copyfileobj(a, b)
        if os.path.getsize(dst) > MAX_FILE:
            log(f"  {name}: {os.path.getsize(dst) / 2**20:.1f} MiB is over the 16 MiB a device run returns; dropped")
            os.remove(dst)
            info.setdefault("dropped", []).append(name)
        else:
            info.setdefault("files", []).append(name)
    return info


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------
def _ratio(a, b, nd=3):
    return None if not a or not b else round(a / b, nd)


def summarize(records: list[dict], tiny: bool) -> dict:
    """The issue's targets against what was measured (None where a row is missing)."""
    rows = {r["name"]: r for r in records if r.get("kind") == "row" and "error" not in r and "skipped" not in r
            and "tokens_per_s" in r}

    def get(name, key):
        return rows.get(name, {}).get(key)

    def met(*conds):
        return None if any(c is None for c in conds) else all(conds)

    out: dict = {"kind": "summary", "dry_run": tiny}
    tps, peak, frozen = get("1b/lora_jax", "tokens_per_s"), get("1b/lora_jax", "peak_gib"), \
        get("1b/frozen", "tokens_per_s")
    over = _ratio(frozen, tps)
    out["1b"] = {"tokens_per_s": tps, "target_tokens_per_s": TARGET_1B_TOKENS_PER_S, "peak_gib": peak,
                 "target_peak_gib": TARGET_1B_PEAK_GIB, "lora_step_over_frozen_step": over,
                 "target_lora_step_over_frozen_step": TARGET_LORA_OVER_FROZEN_STEP,
                 "unroll1_tokens_per_s": get("1b/lora_jax/unroll1", "tokens_per_s"),
                 "chunked_loss_tokens_per_s": get("1b/lora_jax/chunked", "tokens_per_s"),
                 "over_peft_compile": _ratio(tps, get("peft_compile/1b", "tokens_per_s")),
                 "met": met(None if tps is None else tps >= TARGET_1B_TOKENS_PER_S,
                            None if peak is None else peak <= TARGET_1B_PEAK_GIB,
                            None if over is None else over <= TARGET_LORA_OVER_FROZEN_STEP)}
    for model, speed, memory in (("llama3-1b", TARGET_L3_SPEEDUP_OVER_PEFT_COMPILE, TARGET_L3_MEMORY_OVER_PEFT_COMPILE),
                                 ("llama3-8b", TARGET_8B_SPEEDUP_OVER_PEFT_COMPILE, TARGET_8B_MEMORY_OVER_PEFT_COMPILE)):
        tps, peak = get(f"{model}/lora_jax", "tokens_per_s"), get(f"{model}/lora_jax", "peak_gib")
        ptps, ppeak = get(f"peft_compile/{model}", "tokens_per_s"), get(f"peft_compile/{model}", "peak_gib")
        sp, mem = _ratio(tps, ptps), _ratio(peak, ppeak)
        out[model] = {"tokens_per_s": tps, "peak_gib": peak, "peft_compile_tokens_per_s": ptps,
                      "peft_compile_peak_gib": ppeak, "over_peft_compile": sp, "target_over_peft_compile": speed,
                      "peak_over_peft_compile": mem, "target_peak_over_peft_compile": memory,
                      "lora_step_over_frozen_step": _ratio(get(f"{model}/frozen", "tokens_per_s"), tps),
                      "met": met(None if sp is None else sp >= speed, None if mem is None else mem <= memory)}
    q_peak = get("llama3-8b/qlora_nf4", "peak_gib")
    out["llama3-8b_qlora_nf4"] = {"tokens_per_s": get("llama3-8b/qlora_nf4", "tokens_per_s"), "peak_gib": q_peak,
                                  "settings": get("llama3-8b/qlora_nf4", "settings"),
                                  "target_peak_gib": TARGET_8B_QLORA_PEAK_GIB,
                                  "met": met(None if q_peak is None else q_peak <= TARGET_8B_QLORA_PEAK_GIB)}
    out["failed_or_skipped"] = sorted({r["name"] for r in records if r.get("kind") == "row"} - set(rows))
    return out


# ---------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "results"),
                    help="where the JSON lines, the log and the profile go (default: $OUT, else benchmarks/results)")
    ap.add_argument("--anchor", default=None,
                    help="path of peft_anchor.py (not in this repository; none: no PEFT rows)")
    ap.add_argument("--size", choices=("gpu", "tiny"), default="gpu", help="tiny: the CPU dry run of the same plan")
    ap.add_argument("--budget-s", type=float, default=500.0, help="the whole run's wall-clock budget")
    ap.add_argument("--only", default=None, help="comma-separated row names to run (default: all)")
    args = ap.parse_args(argv)
    if args.anchor is not None and not os.path.isfile(args.anchor):
        ap.error(f"--anchor {args.anchor!r} is not a file")
    anchor = os.path.abspath(args.anchor) if args.anchor else None
    tiny = args.size == "tiny"
    t_start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    sys.path.insert(0, HERE)

    # the XLA autotuning results of one row are reused by the next (jax's persistent cache)
    cache = tempfile.mkdtemp(prefix="lora_jax_jax_cache_")
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", cache)
    os.environ["PYTHONUNBUFFERED"] = "1"

    env = environment()
    stem = f"{env['date'][:10]}-{gpu_slug(env)}"
    jsonl = os.path.join(args.out, f"{stem}.jsonl")
    logf = open(os.path.join(args.out, f"{stem}.log"), "a")

    def log(msg: str) -> None:
        line = f"[{time.perf_counter() - t_start:7.1f}s] {msg}"
        print(line, file=sys.stderr, flush=True)
        logf.write(line + "\n")
        logf.flush()

    def write(rec: dict) -> None:
        with open(jsonl, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)

    write({**env, "size": args.size, "budget_s": args.budget_s, "anchor": os.path.basename(anchor) if anchor else None})
    if anchor is None:
        log("no --anchor: PEFT's rows are not measured")
    records = []
    profile_dir = tempfile.mkdtemp(prefix="lora_jax_profile_")
    only = set(args.only.split(",")) if args.only else None
    for row in plan(args.size, anchor):
        if only is not None and row["name"] not in only:
            continue
        left = args.budget_s - (time.perf_counter() - t_start)
        if left < row["est_s"]:
            recs = [{"kind": "row", "name": row["name"],
                     "skipped": f"budget: {left:.0f}s left, the row needs ~{row['est_s']}s"}]
            log(f"skip {row['name']}: {recs[0]['skipped']}")
        else:
            recs = run_row(row, anchor, timeout=min(left, 3 * row["est_s"]), profile_dir=profile_dir, log=log)
        for rec in recs:
            records.append(rec)
            write(rec)
        if row.get("profile") and "skipped" not in recs[0]:
            write(collect_profile(profile_dir, args.out, stem, 3, log))
    summary = summarize(records, tiny)
    summary["wall_s"] = round(time.perf_counter() - t_start, 1)
    write(summary)
    log(f"done in {summary['wall_s']}s: {jsonl}")
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(profile_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The GPU measurement of issue 15 in one go: lora_jax beside PyTorch + PEFT, with a profile.

One run, in priority order, each row in its own process (its own peak memory), within a time
budget (default 570 s, compiles included; a row that would not fit is recorded as skipped):

1. ``train_step.py --size 1b`` ``lora_jax`` (no remat), then a `jax.profiler` trace of a few more
   steps of it, summarized per op (and the compiled step's HLO, to map ops to JAX scopes);
2. ``1b`` ``frozen``; 3. ``--size llama3-1b`` ``lora_jax``; 4. ``llama3-1b`` ``frozen``;
5.-6. PEFT's anchor, ``peft_anchor.py llama3-1b --compile --no-full`` and ``peft_anchor.py 1b
   --compile --no-full`` (eager and ``torch.compile``, same machine, same run);
7.-10. ``1b`` ``lora_jax``/``frozen`` with ``--remat dots_with_no_batch_dims_saveable``, ``merged``
   without and with it; 11. ``llama3-1b`` ``lora_jax`` with the plain loss (the chunked loss's
   effect).

The PEFT anchor is not part of this repository: give its path (``--anchor``), e.g. a git-ignored
copy carried with the run. Everything goes to ``OUT/<date>-<gpu>.jsonl`` (one JSON object per
line: ``kind`` ``env`` first, then one ``row`` per measurement — anchors' lines tagged
``source: "peft_anchor"`` — then the ``summary`` against the issue's targets), the driver's log
``OUT/<date>-<gpu>.log``, and beside them the profile: ``-profile-ops.json`` (device time per HLO
op and per category), ``-profile.xplane.pb.gz`` / ``-profile.trace.json.gz`` (TensorBoard /
Perfetto), ``-step.hlo.txt.gz``. At most 8 files, one folder level (what a device run returns).

``--size tiny`` is the CPU dry run of the same plan: every JAX row at the tiny sizes, the loss
chunked into 16-position chunks, PEFT eager at tiny size from ``train_step.py``, the anchor run
as on the GPU (without CUDA it fails at once, and that failure is recorded).

Usage::

    python benchmarks/gpu_run.py --anchor .anchors/peft_anchor.py --out "$OUT"          # GPU
    python benchmarks/gpu_run.py --size tiny --anchor path/to/peft_anchor.py --out /tmp/dry
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


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------
def plan(size: str, anchor: Optional[str]) -> list[dict]:
    """The rows to measure, in priority order: ``{"name", "kind": "jax"|"anchor"|"peft", ...}``."""
    tiny = size == "tiny"
    big, l3 = ("tiny", "tiny-llama3") if tiny else ("1b", "llama3-1b")
    extra = ["--loss-chunk", "16"] if tiny else []

    def jax_row(name, sz, system, remat=None, profile=False, loss="chunked"):
        args = ["--size", sz, "--only", system, "--gpu", "0" if tiny else "1", "--loss", loss] + extra
        if remat:
            args += ["--remat", remat]
        return {"name": name, "kind": "jax", "args": args, "profile": profile, "est_s": 45 if tiny else 60}

    def anchor_row(name, sz):
        return {"name": name, "kind": "anchor", "args": [sz, "--compile", "--no-full"], "est_s": 30 if tiny else 150}

    # PEFT's llama3-1b row before its 1b row: the 1b one has an H100 reference already (ANCHORS_1B_H100)
    rows = [jax_row("1b/lora_jax", big, "lora_jax", profile=True), jax_row("1b/frozen", big, "frozen"),
            jax_row("llama3-1b/lora_jax", l3, "lora_jax"), jax_row("llama3-1b/frozen", l3, "frozen")]
    if anchor:
        rows += [anchor_row("anchor/llama3-1b", "llama3-1b"), anchor_row("anchor/1b", "1b")]
    if tiny:  # PEFT on CPU, so the dry run has PEFT rows to compare with
        rows += [{"name": "peft/tiny", "kind": "jax", "args": ["--size", "tiny", "--only", "peft", "--gpu", "0"],
                  "profile": False, "est_s": 30, "peft_for": "1b"}]
    rows += [jax_row("1b/lora_jax/remat", big, "lora_jax", remat=REMAT), jax_row("1b/frozen/remat", big, "frozen",
                                                                                  remat=REMAT),
             jax_row("1b/merged", big, "merged"), jax_row("1b/merged/remat", big, "merged", remat=REMAT),
             jax_row("llama3-1b/lora_jax/plain_loss", l3, "lora_jax", loss="plain")]
    return rows


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
        if r.returncode != 0 or not recs:
            recs.append({**base, "source": "peft_anchor", "error": f"exit {r.returncode}",
                         "stderr_tail": r.stderr[-1500:], "wall_s": wall})
        return recs
    if r.returncode != 0 or not lines:
        return [{**base, "error": f"exit {r.returncode}", "stderr_tail": r.stderr[-1500:], "wall_s": wall}]
    rec = {**base, **lines[-1], "wall_s": wall}
    if row.get("peft_for"):
        rec.update(system="peft_eager", peft_for=row["peft_for"])
    return [rec]


# ---------------------------------------------------------------------------------------------
# the profile
# ---------------------------------------------------------------------------------------------
_HLO_LINE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*?op_name=\"([^\"]*)\"")


def hlo_op_names(hlo_text: str) -> dict:
    """``{HLO instruction name: JAX op_name}`` from a compiled module's text (``Compiled.as_text()``)."""
    out = {}
    for line in hlo_text.splitlines():
        m = _HLO_LINE.match(line)
        if m:
            out.setdefault(m.group(1), m.group(2))
    return out


def categorize(op: str, kernel: str, jax_name: str) -> str:
    """A coarse category of one device op, from its HLO name, kernel name and JAX op_name."""
    k, n, j = kernel.lower(), op.lower(), jax_name.lower()
    if "lm_loss" in j:
        return "lm_head+loss"
    if "/lora" in j or j.startswith("lora"):
        return "lora"
    if any(s in k or s in n for s in ("fmha", "flash", "cudnn", "attention")) or "dot_product_attention" in j:
        return "attention"
    if any(s in k or s in n for s in ("gemm", "cublas", "matmul", "xmma", "cutlass", "triton_gemm")) or \
            n.startswith("dot") or "dot_general" in j:
        return "matmul"
    if any(s in k or s in n for s in ("all-reduce", "all-gather", "nccl", "reduce-scatter")):
        return "collective"
    if "copy" in n or "transpose" in n or "memcpy" in k or "memset" in k:
        return "copy/transpose"
    return "other fusions"


def summarize_profile(xplane_path: str, hlo_text: Optional[str], steps: int, top: int = 60) -> dict:
    """Device time per op and per category from a `jax.profiler` trace (``*.xplane.pb``).

    The ops are the events of the device planes' ``XLA Ops`` line when there is one, else of
    their ``Stream`` lines (one event per kernel; ``hlo_op`` names the HLO instruction). The
    compiled step's HLO text maps each instruction to its JAX op_name (``lora`` scopes, the
    ``lm_loss`` chunks, ``transpose(jvp(...))`` = the backward pass).
    """
    from jax.profiler import ProfileData

    pd = ProfileData.from_file(xplane_path)
    names = hlo_op_names(hlo_text) if hlo_text else {}
    ops: dict = {}
    n_events = 0
    device_planes = [p for p in pd.planes if p.name.startswith("/device:")]
    for plane in device_planes:
        lines = list(plane.lines)
        chosen = [ln for ln in lines if ln.name == "XLA Ops"] or [ln for ln in lines if ln.name.startswith("Stream")]
        for line in chosen:
            for ev in line.events:
                stats = dict(ev.stats)
                op = str(stats.get("hlo_op") or ev.name)
                jax_name = str(stats.get("tf_op") or stats.get("long_name") or names.get(op, ""))
                rec = ops.setdefault(op, {"op": op, "kernel": ev.name, "count": 0, "total_us": 0.0, "jax": jax_name})
                rec["count"] += 1
                rec["total_us"] += ev.duration_ns / 1e3
                n_events += 1
    if not ops:
        return {"note": "no device op events in the trace (a CPU run records none)",
                "planes": [p.name for p in pd.planes]}
    steps = max(int(steps), 1)
    total = sum(r["total_us"] for r in ops.values())
    cats: dict = {}
    backward = 0.0
    for r in ops.values():
        r["category"] = categorize(r["op"], r["kernel"], r["jax"])
        r["ms_per_step"] = round(r["total_us"] / steps / 1e3, 4)
        r["share"] = round(r["total_us"] / total, 4)
        c = cats.setdefault(r["category"], {"ms_per_step": 0.0, "share": 0.0, "ops": 0})
        c["ms_per_step"] += r["total_us"] / steps / 1e3
        c["share"] += r["total_us"] / total
        c["ops"] += 1
        if "transpose(" in r["jax"]:
            backward += r["total_us"]
    for c in cats.values():
        c["ms_per_step"], c["share"] = round(c["ms_per_step"], 3), round(c["share"], 4)
    ranked = sorted(ops.values(), key=lambda r: -r["total_us"])
    return {"steps": steps, "device_ms_per_step": round(total / steps / 1e3, 3), "events": n_events,
            "backward_share": round(backward / total, 4) if names else None,
            "by_category": dict(sorted(cats.items(), key=lambda kv: -kv[1]["ms_per_step"])),
            "top_ops": [{k: r[k] for k in ("op", "category", "ms_per_step", "share", "count", "kernel", "jax")}
                        for r in ranked[:top]]}


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
    try:
        summary = summarize_profile(xplanes[0], hlo, steps)
    except Exception as e:  # noqa: BLE001 - the raw trace still comes back
        summary = {"error": repr(e)}
    ops_file = os.path.join(out_dir, f"{stem}-profile-ops.json")
    with open(ops_file, "w") as f:
        json.dump(summary, f, indent=1)
    info["ops_file"] = os.path.basename(ops_file)
    info.update({k: summary.get(k) for k in ("device_ms_per_step", "by_category", "backward_share", "note", "error")
                 if k in summary})
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
    rows = {r["name"]: r for r in records if r.get("kind") == "row" and "error" not in r and "system" in r
            and not r["name"].startswith(("anchor/", "peft/"))}
    peft = {}  # (size, peft_eager | peft_compile) -> row; the dry run's tiny PEFT row stands for 1b
    for r in records:
        if r.get("kind") == "row" and "error" not in r and r.get("system") in ("peft_eager", "peft_compile"):
            peft[(r.get("peft_for") or r.get("size"), r["system"])] = r

    def get(name, key):
        return rows.get(name, {}).get(key)

    out: dict = {"kind": "summary", "dry_run": tiny}
    for suffix, label in (("", "no_remat"), ("/remat", "remat_" + REMAT)):
        lj, fr = f"1b/lora_jax{suffix}", f"1b/frozen{suffix}"
        tps, peak = get(lj, "tokens_per_s"), get(lj, "peak_gib")
        out[f"1b_{label}"] = {
            "lora_jax_tokens_per_s": tps, "target_tokens_per_s": TARGET_1B_TOKENS_PER_S,
            "tokens_per_s_vs_target": _ratio(tps, TARGET_1B_TOKENS_PER_S),
            "lora_jax_peak_gib": peak, "target_peak_gib": TARGET_1B_PEAK_GIB,
            "lora_step_over_frozen_step": _ratio(get(fr, "tokens_per_s"), tps),
            "target_lora_step_over_frozen_step": TARGET_LORA_OVER_FROZEN_STEP,
            "merged_step_over_lora_step": _ratio(tps, get(f"1b/merged{suffix}", "tokens_per_s")),
            "met": None if tps is None or peak is None or get(fr, "tokens_per_s") is None else bool(
                tps >= TARGET_1B_TOKENS_PER_S and peak <= TARGET_1B_PEAK_GIB
                and tps * TARGET_LORA_OVER_FROZEN_STEP >= get(fr, "tokens_per_s")),
        }
    for system in ("peft_compile", "peft_eager"):
        pr = peft.get(("1b", system), {})
        out[f"1b_vs_{system}"] = {
            "tokens_per_s_ratio": _ratio(get("1b/lora_jax", "tokens_per_s"), pr.get("tokens_per_s")),
            "peak_ratio": _ratio(get("1b/lora_jax", "peak_gib"), pr.get("peak_gib"))}
    pc3 = peft.get(("llama3-1b", "peft_compile"), {})
    tps3, peak3 = get("llama3-1b/lora_jax", "tokens_per_s"), get("llama3-1b/lora_jax", "peak_gib")
    sp, mem = _ratio(tps3, pc3.get("tokens_per_s")), _ratio(peak3, pc3.get("peak_gib"))
    out["llama3-1b"] = {
        "lora_jax_tokens_per_s": tps3, "lora_jax_peak_gib": peak3,
        "peft_compile_tokens_per_s": pc3.get("tokens_per_s"), "peft_compile_peak_gib": pc3.get("peak_gib"),
        "tokens_per_s_over_peft_compile": sp,
        "target_tokens_per_s_over_peft_compile": TARGET_L3_SPEEDUP_OVER_PEFT_COMPILE,
        "peak_over_peft_compile": mem, "target_peak_over_peft_compile": TARGET_L3_MEMORY_OVER_PEFT_COMPILE,
        "lora_step_over_frozen_step": _ratio(get("llama3-1b/frozen", "tokens_per_s"), tps3),
        "plain_loss_tokens_per_s": get("llama3-1b/lora_jax/plain_loss", "tokens_per_s"),
        "plain_loss_peak_gib": get("llama3-1b/lora_jax/plain_loss", "peak_gib"),
        "met": None if sp is None or mem is None else bool(sp >= TARGET_L3_SPEEDUP_OVER_PEFT_COMPILE
                                                            and mem <= TARGET_L3_MEMORY_OVER_PEFT_COMPILE),
    }
    if not tiny:
        from train_step import ANCHORS_1B_H100  # noqa: E402 - benchmarks/ is on sys.path

        out["anchors_1b_h100_tokens_per_s"] = ANCHORS_1B_H100
    out["failed_or_skipped"] = [r["name"] for r in records
                                if r.get("kind") == "row" and ("error" in r or "skipped" in r)]
    return out


# ---------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "results"),
                    help="where the JSON lines, the log and the profile go (default: $OUT, else benchmarks/results)")
    ap.add_argument("--anchor", default=None,
                    help="path of peft_anchor.py (not in this repository; none: no PEFT rows)")
    ap.add_argument("--size", choices=("gpu", "tiny"), default="gpu", help="tiny: the CPU dry run of the same plan")
    ap.add_argument("--budget-s", type=float, default=570.0, help="the whole run's wall-clock budget")
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
            recs = run_row(row, anchor, timeout=left, profile_dir=profile_dir, log=log)
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

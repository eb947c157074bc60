"""Smoke runs of the benchmark scripts on their tiny CPU configs: they run, print the JSON they
document, and the systems they compare compute the same training loss."""

import json
import os
import subprocess
import sys

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _json_lines(script, *args):
    out = subprocess.run([sys.executable, os.path.join(BENCH, script), *args], capture_output=True, text=True,
                         timeout=600, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_train_step_tiny_lora_and_merged_take_the_same_steps():
    rows = {r.get("system", "summary"): r for r in
            _json_lines("train_step.py", "--systems", "lora_jax,merged", "--steps", "2", "--warmup", "1")}
    lj, mg = rows["lora_jax"], rows["merged"]
    assert lj["tokens_per_s"] > 0 and mg["tokens_per_s"] > 0 and lj["flops_per_step"] == mg["flops_per_step"]
    # factorized and merged-in-the-loss are the same function: same losses after the same updates
    assert abs(lj["loss_first"] - mg["loss_first"]) < 1e-3 and abs(lj["loss_last"] - mg["loss_last"]) < 1e-3
    assert lj["loss_last"] < lj["loss_first"]
    assert rows["summary"]["merged/lora_jax"] > 0


def test_qlora_memory_tiny():
    (r,) = _json_lines("qlora_memory.py", "--size", "tiny")
    assert 3.5 < r["nf4"]["projection_ratio"] < 4.0 and 1.9 < r["int8"]["projection_ratio"] < 2.0
    assert r["int8"]["projection_output_rms_err_over_rms"] < r["nf4"]["projection_output_rms_err_over_rms"] < 0.12

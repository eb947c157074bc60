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


def test_gpu_run_dry_run_writes_rows_profile_and_summary(tmp_path):
    """The GPU script's CPU dry run, one row (the profiled lora_jax step): JSON lines with the
    environment, the row, the profile record and the summary, and the profile files beside them."""
    subprocess.run([sys.executable, os.path.join(BENCH, "gpu_run.py"), "--size", "tiny", "--out", str(tmp_path),
                    "--only", "1b/lora_jax"], capture_output=True, text=True, timeout=600, check=True)
    (jsonl,) = tmp_path.glob("*-cpu.jsonl")
    recs = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["kind"] for r in recs] == ["env", "row", "profile", "summary"]
    row = recs[1]
    assert row["name"] == "1b/lora_jax" and row["loss"] == "chunked" and row["tokens_per_s"] > 0
    assert "--loss-chunk 16" in row["cmd"] and "--profile" in row["cmd"]
    assert recs[3]["1b_no_remat"]["lora_jax_tokens_per_s"] == row["tokens_per_s"]
    files = {p.name.split("-cpu", 1)[1] for p in tmp_path.iterdir()}
    assert {".jsonl", ".log", "-profile-ops.json", "-profile.xplane.pb.gz", "-step.hlo.txt.gz"} <= files


def test_gpu_run_profile_summary_of_a_device_trace(tmp_path):
    """The per-op summary on a small synthetic GPU trace: kernels grouped by their HLO op, mapped
    to JAX scopes through the step's HLO text, and categorized."""
    sys.path.insert(0, BENCH)
    import gpu_run
    from jax.profiler import ProfileData

    def ev(meta, start_us, dur_us, hlo):
        return (f"events {{ metadata_id: {meta} offset_ps: {start_us * 10**6} duration_ps: {dur_us * 10**6} "
                f"stats {{ metadata_id: 1 str_value: \"{hlo}\" }} }}")

    proto = ("planes { id: 1 name: \"/device:GPU:0\" lines { id: 1 name: \"Stream #13(Compute)\" "
             + " ".join([ev(1, 0, 300, "custom-call.1"), ev(2, 400, 100, "fusion.2"), ev(3, 600, 50, "dot.3"),
                         ev(1, 700, 300, "custom-call.1"), ev(4, 1100, 250, "custom-call.9")])
             + " } event_metadata { key: 1 value { id: 1 name: \"sm90_xmma_gemm_bf16bf16\" } }"
             " event_metadata { key: 2 value { id: 2 name: \"loop_fusion_2\" } }"
             " event_metadata { key: 3 value { id: 3 name: \"gemv_small\" } }"
             " event_metadata { key: 4 value { id: 4 name: \"cudnn_generated_fort_native_sdpa\" } }"
             " stat_metadata { key: 1 value { id: 1 name: \"hlo_op\" } } }")
    path = tmp_path / "t.xplane.pb"
    path.write_bytes(ProfileData.text_proto_to_serialized_xspace(proto))
    hlo = "\n".join([
        '  %custom-call.1 = bf16[8,2048]{1,0} custom-call(%a, %b), '
        'metadata={op_name="jit(step)/transpose(jvp())/dot_general"}',
        '  %fusion.2 = f32[8]{0} fusion(%c), kind=kLoop, metadata={op_name="jit(step)/jvp()/while/body/lm_loss/sub"}',
        '  %dot.3 = bf16[8,16]{1,0} dot(%d, %e), metadata={op_name="jit(step)/jvp()/lora/abc,cZ->abZ/dot_general"}',
        '  ROOT %custom-call.9 = bf16[8,2048]{1,0} custom-call(%f), metadata={op_name="jit(step)/jvp()/attn"}'])
    s = gpu_run.summarize_profile(str(path), hlo, steps=2)
    assert s["device_ms_per_step"] == 0.5  # 1000 us over 2 steps
    cats = s["by_category"]
    assert cats["matmul"]["ms_per_step"] == 0.3 and cats["attention"]["ms_per_step"] == 0.125
    assert cats["lm_head+loss"]["ms_per_step"] == 0.05 and cats["lora"]["ms_per_step"] == 0.025
    top = s["top_ops"][0]
    assert top["op"] == "custom-call.1" and top["count"] == 2 and "transpose(jvp" in top["jax"]
    assert s["backward_share"] == 0.6


def test_merge_memory_small():
    """The streaming-merge memory benchmark on a 10 MB checkpoint: it runs, merges bit-exactly and
    reports the peak RSS fields (the multi-GB numbers are in the README)."""
    (r,) = _json_lines("merge_memory.py", "--size-gb", "0.01", "--shards", "2", "--hidden", "128")
    assert r["shards"] == 2 and r["spot_check_bit_exact"]
    assert r["peak_rss_bytes"] >= r["baseline_rss_bytes"] > 0 and r["largest_shard_bytes"] > 0

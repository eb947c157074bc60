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
    """The GPU script's CPU dry run, one row (the profiled lora_jax step with the settings the
    trainer picks on a GPU): JSON lines with the environment, the row, the profile record and the
    summary, and the profile files beside them."""
    subprocess.run([sys.executable, os.path.join(BENCH, "gpu_run.py"), "--size", "tiny", "--out", str(tmp_path),
                    "--only", "1b/lora_jax"], capture_output=True, text=True, timeout=600, check=True)
    (jsonl,) = tmp_path.glob("*-cpu.jsonl")
    recs = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["kind"] for r in recs] == ["env", "row", "profile", "summary"]
    row = recs[1]
    assert row["name"] == "1b/lora_jax" and row["tokens_per_s"] > 0
    # a GPU's first candidate: matmul outputs saved, plain loss, the layer scan unrolled
    assert row["settings"] == "remat=dots_with_no_batch_dims_saveable loss=plain unroll=all"
    assert "--tune-for gpu" in row["cmd"] and "--profile" in row["cmd"]
    assert recs[3]["1b"]["tokens_per_s"] == row["tokens_per_s"] and recs[3]["1b"]["met"] is None
    files = {p.name.split("-cpu", 1)[1] for p in tmp_path.iterdir()}
    assert {".jsonl", ".log", "-profile-ops.json", "-profile.xplane.pb.gz", "-step.hlo.txt.gz"} <= files


def test_profile_summary_groups_a_trace_by_kernel():
    """A synthetic device trace of known content: every kernel of a command buffer is counted by
    its own name and category, the categories' times and shares add up, fusion kernels map to their
    HLO instruction's JAX op_name (backward, loss, LoRA), host events are left out."""
    sys.path.insert(0, BENCH)
    import profile_summary as ps

    def meta(pid, tid, pname, tname):
        return [{"ph": "M", "pid": pid, "name": "process_name", "args": {"name": pname}},
                {"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": tname}}]

    def x(name, dur, hlo_op="command_buffer_3", pid=1, tid=7):
        return {"ph": "X", "pid": pid, "tid": tid, "ts": 0, "dur": dur, "name": name, "args": {"hlo_op": hlo_op}}

    kernels = [("nvjet_sm90_tst_128x160_NNT", 300), ("gemm_fusion_dot_4", 100), ("memcpy128", 40),
               ("loop_dynamic_update_slice_fusion_2", 60), ("cudnn_generated_fort_native_sdpa_fprop", 120),
               ("loop_add_fusion_6", 50), ("input_reduce_fusion_1", 30), ("wrapped_convert", 20)]
    events = meta(1, 7, "/device:GPU:0", "Stream #7(Compute)") + meta(9, 1, "/host:CPU", "python3")
    events += [x(k, d) for k, d in kernels] * 2  # two steps
    events += [x("ThunkExecutor", 5000, pid=9, tid=1)]  # a host event: not device time
    trace = {"traceEvents": events}
    got = list(ps._device_events_json(trace))
    assert len(got) == 16 and all(n != "ThunkExecutor" for n, _, _ in got)
    hlo = "\n".join([
        '  %loop_add_fusion.6 = f32[8]{0} fusion(%a), kind=kLoop, '
        'metadata={op_name="jit(step)/transpose(jvp())/while/body/lora/add"}',
        '  %input_reduce_fusion.1 = f32[8]{0} fusion(%b), kind=kInput, '
        'metadata={op_name="jit(step)/jvp()/lm_loss/reduce_sum"}',
        '  %gemm_fusion_dot.4 = bf16[8,16]{1,0} fusion(%c), kind=kCustom, '
        'metadata={op_name="jit(step)/jvp()/lora/dot_general"}'])
    s = ps.summarize(got, hlo, steps=2)
    total = sum(d for _, d in kernels)  # us per step
    assert s["device_ms_per_step"] == round(total / 1e3, 3) and s["launches_per_step"] == len(kernels)
    cats = s["by_category"]
    want = {"matmul": 400, "attention": 120, "copy": 40, "dynamic-slice": 60, "elementwise": 70, "reduction": 30,
            "other": 0}
    assert {k: round(v["ms_per_step"] * 1e3, 6) for k, v in cats.items()} == want
    assert abs(sum(v["share"] for v in cats.values()) - 1.0) < 1e-3
    assert cats["matmul"]["launches_per_step"] == 2 and cats["matmul"]["kernels"] == 2
    assert s["top_kernels"][0]["kernel"] == "nvjet_sm90_tst_128x160_NNT"
    assert s["hlo_mapped_share"] == round(180 / total, 4)
    assert s["of_mapped"] == {"backward": round(50 / 180, 4), "lm_loss": round(30 / 180, 4),
                              "lora": round(150 / 180, 4)}
    for name, cat in [("sm90_xmma_gemm_bf16bf16", "matmul"), ("void cudnn::fusion::fmha_reduce_head", "attention"),
                      ("memset32_aligned", "copy"), ("loop_transpose_fusion", "copy"), ("wrapped_slice", "dynamic-slice"),
                      ("input_multiply_reduce_fusion_2", "reduction"), ("loop_multiply_fusion", "elementwise"),
                      ("some_custom_kernel", "other")]:
        assert ps.categorize(name) == cat, name


def test_merge_memory_small():
    """The streaming-merge memory benchmark on a 10 MB checkpoint: it runs, merges bit-exactly and
    reports the peak RSS fields (the multi-GB numbers are in the README)."""
    (r,) = _json_lines("merge_memory.py", "--size-gb", "0.01", "--shards", "2", "--hidden", "128")
    assert r["shards"] == 2 and r["spot_check_bit_exact"]
    assert r["peak_rss_bytes"] >= r["baseline_rss_bytes"] > 0 and r["largest_shard_bytes"] > 0


def test_data_prep_small():
    """The data-phase benchmark on 400 chats: both pipelines encode every record, the warm start
    opens the cache instead of rebuilding it, and packing by documents beats one document per row."""
    build, warm, packing = _json_lines("data_prep.py", "--records", "400")
    assert build["lora_jax"]["records"] == build["datasets"]["records"] == 400 and build["lora_jax"]["built"]
    assert build["lora_jax"]["peak_rss_mib"] > 0 and build["speed_ratio"] > 0
    assert warm["what"] == "warm_start" and warm["plan_and_batch_s"] < 1.0
    assert packing["documents_padding"] < packing["none_padding"] and packing["documents_vs_none_tokens_per_step"] > 1


def test_adapter_bank_tiny_compiles_once_and_decodes_the_same_tokens():
    rows = {r["what"]: r for r in _json_lines("adapter_bank.py", "--size", "tiny", "--repeats", "1", "--new-tokens",
                                              "3", "--train-steps", "1")}
    assert set(rows) == {"decode", "train", "swap"}
    assert rows["decode"]["compiles"] == 1 and rows["decode"]["same_tokens"] == 1.0 and rows["decode"]["ratio"] > 0
    assert rows["train"]["compiles"] == 1 and rows["train"]["compiles_sequential"] == 4
    assert rows["swap"]["compiles"] == 1 and rows["swap"]["swaps"] == 20

"""Peak host memory of the streaming merge (`lora-jax merge --base HF_DIR --adapter PEFT_DIR --out DIR`).

Generates, in a temporary directory, a sharded safetensors checkpoint of Llama-shaped bf16 tensors
(``--size-gb`` in all, ``--shards`` shards, each layer's q/k/v/o and gate/up/down projections plus an
embedding; a ``model.safetensors.index.json`` as transformers writes it) and a PEFT LoRA adapter
(rank ``--rank`` on every projection, random non-zero factors, float32), then runs the merge CLI in
a subprocess that reports its peak resident set size (the kernel's ``VmHWM``: anonymous memory and
the mapped pages of the files it reads). The same CLI merging a tiny
checkpoint gives the baseline (the interpreter, NumPy, JAX and lora_jax imported: the CLI's own
footprint). One merged tensor is checked against NumPy. Prints one JSON line::

    {"peak_rss_bytes", "baseline_rss_bytes", "largest_shard_bytes", "above_baseline_in_shards", ...}

The streaming merge keeps at most about two shards above the baseline, whatever the checkpoint's
total size (measured: 1.10 shards for 1.98 GB in 5 shards; see the README).

Usage: python benchmarks/merge_memory.py [--size-gb 2] [--shards 5] [--hidden 2048] [--rank 16] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)
PROJ = {"self_attn.q_proj": (1, 1), "self_attn.k_proj": (1, 1), "self_attn.v_proj": (1, 1),
        "self_attn.o_proj": (1, 1), "mlp.gate_proj": (2.75, 1), "mlp.up_proj": (2.75, 1), "mlp.down_proj": (1, 2.75)}


def _shape(hidden: int, f) -> tuple:
    return tuple(int(hidden * x) // 64 * 64 for x in f)  # (out, in), multiples of 64


def _layer_bytes(hidden: int) -> int:
    return sum(int(np.prod(_shape(hidden, f))) for f in PROJ.values()) * BF16.itemsize + 2 * hidden * BF16.itemsize


def make_checkpoint(d: str, size_bytes: int, shards: int, hidden: int, vocab: int = 32000, seed: int = 0) -> dict:
    """A sharded bf16 checkpoint of about ``size_bytes``; returns {shard file: size in bytes}."""
    from safetensors.numpy import save_file

    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(seed)
    emb = vocab * hidden * BF16.itemsize
    n_layers = max(1, round((size_bytes - emb) / _layer_bytes(hidden)))
    per_shard = -(-n_layers // shards)
    names = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(n_layers):
        names += [(f"model.layers.{i}.{p}.weight", _shape(hidden, f)) for p, f in PROJ.items()]
        names += [(f"model.layers.{i}.input_layernorm.weight", (hidden,)),
                  (f"model.layers.{i}.post_attention_layernorm.weight", (hidden,))]
    names.append(("model.norm.weight", (hidden,)))
    groups = [[] for _ in range(shards)]
    for name, shape in names:
        layer = (int(name.split(".")[2]) if name.startswith("model.layers.") else
                 0 if "embed" in name else n_layers - 1)
        groups[min(layer // per_shard, shards - 1)].append((name, shape))
    groups = [g for g in groups if g]
    wmap, sizes, total = {}, {}, 0
    for k, group in enumerate(groups, 1):
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (rng.standard_normal(s, dtype=np.float32) * 0.02).astype(BF16) for n, s in group}
        save_file(tensors, os.path.join(d, fname), metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        wmap.update({n: fname for n in tensors})
        sizes[fname] = os.path.getsize(os.path.join(d, fname))
        del tensors
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": wmap}, f, indent=2)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
                   "num_hidden_layers": n_layers, "vocab_size": vocab, "torch_dtype": "bfloat16"}, f)
    return sizes


def make_adapter(d: str, base: str, rank: int, seed: int = 1) -> None:
    """A PEFT LoRA adapter on every projection of ``base``, random non-zero factors (float32)."""
    from safetensors.numpy import save_file

    with open(os.path.join(base, "model.safetensors.index.json")) as f:
        wmap = json.load(f)["weight_map"]
    from lora_jax.io._files import read_safetensors

    rng = np.random.default_rng(seed)
    tensors = {}
    for fname in sorted(set(wmap.values())):
        for name, arr in read_safetensors(os.path.join(base, fname))[0].items():
            if name.endswith("_proj.weight"):
                mod = name[:-len(".weight")]
                out, inp = arr.shape
                tensors[f"base_model.model.{mod}.lora_A.weight"] = rng.standard_normal((rank, inp), np.float32) * 0.01
                tensors[f"base_model.model.{mod}.lora_B.weight"] = rng.standard_normal((out, rank), np.float32) * 0.01
    os.makedirs(d, exist_ok=True)
    save_file(tensors, os.path.join(d, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
                   "target_modules": sorted({p.split(".")[-1] for p in PROJ}), "use_rslora": False,
                   "use_dora": False, "fan_in_fan_out": False, "bias": "none"}, f)


# The CLI in a child that reports its own peak RSS (VmHWM of /proc/self/status) when it ends: the
# child's getrusage maxrss would also count this parent's memory, which a (v)forked child carries
# until its exec.
_CHILD = """import sys
from lora_jax.cli import main
rc = main(sys.argv[1:])
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
print("VmHWM_KiB", int(hwm.split()[1]), file=sys.stderr)
sys.exit(rc)
"""


def run_merge(base: str, adapter: str, out: str) -> tuple[int, float]:
    """(peak RSS in bytes, seconds) of ``lora-jax merge --base --adapter --out`` in a subprocess."""
    cmd = [sys.executable, "-c", _CHILD, "merge", "--base", base, "--adapter", adapter, "--out", out]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"merge failed ({p.returncode}): {p.stderr}")
    kib = [int(line.split()[1]) for line in p.stderr.splitlines() if line.startswith("VmHWM_KiB")][-1]
    return kib * 1024, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=2.0, help="checkpoint size in GB (10^9 bytes)")
    ap.add_argument("--shards", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--keep", default=None, help="work in this directory and keep it (default: a temporary one)")
    args = ap.parse_args(argv)
    work = args.keep or tempfile.mkdtemp(prefix="merge_memory-")
    try:
        t0 = time.perf_counter()
        sizes = make_checkpoint(os.path.join(work, "base"), int(args.size_gb * 1e9), args.shards, args.hidden)
        make_adapter(os.path.join(work, "adapter"), os.path.join(work, "base"), args.rank)
        make_checkpoint(os.path.join(work, "tiny"), 2 * 256 * 64 * 2, 1, 64, vocab=256)
        make_adapter(os.path.join(work, "tiny_adapter"), os.path.join(work, "tiny"), 2)
        gen_s = time.perf_counter() - t0
        baseline, _ = run_merge(os.path.join(work, "tiny"), os.path.join(work, "tiny_adapter"),
                                os.path.join(work, "tiny_out"))
        peak, secs = run_merge(os.path.join(work, "base"), os.path.join(work, "adapter"), os.path.join(work, "out"))
        # spot check: one merged projection equals W + (alpha/r) B @ A computed here in float32
        from lora_jax.io._files import read_safetensors

        first = sorted(sizes)[0]
        name = "model.layers.0.self_attn.q_proj.weight"
        w = read_safetensors(os.path.join(work, "base", first))[0][name].astype(np.float32)
        ad = read_safetensors(os.path.join(work, "adapter", "adapter_model.safetensors"))[0]
        mod = "base_model.model." + name[:-len(".weight")]
        want = (w + 2.0 * (ad[mod + ".lora_B.weight"] @ ad[mod + ".lora_A.weight"])).astype(BF16)
        got = read_safetensors(os.path.join(work, "out", first))[0][name]
        exact = bool(np.array_equal(got.view(np.uint16), want.view(np.uint16)))
        largest = max(sizes.values())
        print(json.dumps({
            "benchmark": "merge_memory", "checkpoint_bytes": sum(sizes.values()), "shards": len(sizes),
            "largest_shard_bytes": largest, "peak_rss_bytes": peak, "baseline_rss_bytes": baseline,
            "above_baseline_bytes": peak - baseline, "above_baseline_in_shards": round((peak - baseline) / largest, 3),
            "peak_over_checkpoint": round(peak / sum(sizes.values()), 3), "merge_s": round(secs, 2),
            "generate_s": round(gen_s, 2), "rank": args.rank, "spot_check_bit_exact": exact}))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Training-step throughput of LoRA on the lora_jax Llama model, against its own floor and PyTorch PEFT.

Systems (each runs in its own subprocess, so peak memory is its own and JAX's and PyTorch's GPU
allocators never share a process):

* ``lora_jax``: LoRA r=16, alpha=32 on all 7 projections; the step differentiates only the
  trainable half of ``lora.split`` and runs the model through ``lora.wrap(model.apply)``.
* ``frozen``: the floor: no LoRA; the gradient is taken only w.r.t. the per-layer norm scales,
  so the backward through the activations runs but no weight gradient is formed.
* ``merged``: the same LoRA, with ``W + s*A@B`` formed inside the loss by ``lora.merge``.
* ``peft`` / ``peft_compile``: transformers' PyTorch Llama + PEFT on the same config, eager
  and ``torch.compile`` (when torch and peft import; on CPU only with ``--size tiny``).

Every system uses bf16 weights and compute, AdamW, the same random token batch, and reports the
median step time of the timed steps after warmup. FLOPs per step are ``4*N*T`` (forward and
input-gradient matmuls over the N linear-layer weights incl. the LM head, T tokens) plus causal
attention ``3 * 2*B*S^2*D*L``; MFU divides the achieved rate by the device's dense bf16 peak.

Usage::

    python benchmarks/train_step.py --size tiny            # CPU smoke test, < 1 minute
    python benchmarks/train_step.py --size 1b              # GPU: batch 8 x 1024 by default
    python benchmarks/train_step.py --size 1b --remat dots_with_no_batch_dims_saveable --systems lora_jax,frozen
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # run from a checkout: benchmark this tree's lora_jax
    sys.path.insert(0, _REPO)

SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
    "160m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, vocab_size=32000),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32
ALL_SYSTEMS = ("lora_jax", "frozen", "merged", "peft", "peft_compile")
# Dense bf16 peak FLOP/s by device kind substring (NVIDIA datasheets, SXM parts, no sparsity).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 70e12}
# H100 80GB, 1.1B config, 8 x 1024, bf16, r=16 on 7 projections (/work/shared/anchors).
ANCHORS_1B_H100 = {"peft_compile": 50443, "peft_eager": 31117, "jax_ceiling_lora": 62493,
                   "jax_ceiling_frozen": 79322, "jax_ceiling_merged": 57851}


def flops_per_step(cfg: dict, batch: int, seq: int) -> float:
    d, f, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = d // cfg["num_attention_heads"]
    nh, kh = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    n_lin = L * (d * nh + 2 * d * kh + nh * d + 3 * d * f) + d * cfg["vocab_size"]
    t = batch * seq
    attn = 3 * 2 * batch * seq * seq * nh * L  # QK^T and PV, causal half: 2 * (2*B*S^2*D) / 2 forward, x3 with bwd
    return 4.0 * n_lin * t + attn


def _peak(kind: str):
    for k, v in PEAK_BF16.items():
        if k in kind:
            return v
    return None


def _result(system, args, med_s, times, peak_bytes, device, extra=None):
    t = args.batch * args.seq
    flops = flops_per_step(SIZES[args.size], args.batch, args.seq)
    peak = _peak(device)
    out = {"system": system, "size": args.size, "batch": args.batch, "seq": args.seq, "device": device,
           "tokens_per_s": round(t / med_s), "step_ms": round(med_s * 1e3, 2),
           "peak_gib": None if peak_bytes is None else round(peak_bytes / 2**30, 2),
           "flops_per_step": flops, "tflops": round(flops / med_s / 1e12, 2),
           "mfu": None if peak is None else round(flops / med_s / peak, 4),
           "timed_steps": len(times), "remat": args.remat}
    out.update(extra or {})
    return out


# ---------------------------------------------------------------------------------------------
# JAX systems
# ---------------------------------------------------------------------------------------------
def run_jax(system: str, args) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    import lora_jax as lora
    from lora_jax.models import llama as L

    wrap = lora.wrap

    cfg = L.LlamaConfig(**SIZES[args.size], dtype="bfloat16", param_dtype="bfloat16", max_position_embeddings=4096,
                        remat_policy=args.remat, attention_impl=args.attention)
    model = L.LlamaForCausalLM(cfg)
    key = jax.random.key(0)
    params = L.init_params(cfg, key)
    ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, cfg.vocab_size, jnp.int32)

    def xent(logits, ids):
        lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
        return -jnp.take_along_axis(lp, ids[:, 1:, None], -1).mean()

    if system == "frozen":
        layers = params["model"]["layers"]
        train = {"input_layernorm": layers["input_layernorm"], "post_attention_layernorm":
                 layers["post_attention_layernorm"]}
        rest = {**params, "model": {**params["model"], "layers": {k: v for k, v in layers.items() if k not in train}}}

        def loss_fn(train, rest, ids):
            p = {**rest, "model": {**rest["model"], "layers": {**rest["model"]["layers"], **train}}}
            return xent(model.apply({"params": p}, ids), ids)
        n_train = sum(x.size for x in jax.tree.leaves(train))
    else:
        rules = lora.Rules(TARGETS, rank=RANK, alpha=ALPHA, stack_axes=1)
        lp = lora.init(params, rules, key)
        # a non-zero B, so the loss depends on both factors from the first step
        lp = jax.tree.map(lambda x: x.replace(b=jnp.full_like(x.b, 1e-3)) if lora.is_lora(x) else x, lp,
                          is_leaf=lora.is_lora)
        train, rest = lora.split(lp)
        fwd = wrap(model.apply)

        if system == "lora_jax":
            def loss_fn(train, rest, ids):
                return xent(fwd({"params": lora.combine(train, rest)}, ids), ids)
        else:  # merged
            def loss_fn(train, rest, ids):
                return xent(model.apply({"params": lora.merge(lora.combine(train, rest))}, ids), ids)
        n_train = lora.count(lp).trainable
        del lp
    del params

    tx = optax.adamw(1e-4)
    opt_state = tx.init(train)

    def _step(train, opt_state, rest, ids):
        loss, g = jax.value_and_grad(loss_fn)(train, rest, ids)
        upd, opt_state = tx.update(g, opt_state, train)
        return optax.apply_updates(train, upd), opt_state, loss

    step = jax.jit(_step, donate_argnums=(0, 1))
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        train, opt_state, loss = step(train, opt_state, rest, ids)
        losses.append(float(loss))  # blocks
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    med = sorted(times)[len(times) // 2]
    stats = jax.devices()[0].memory_stats() or {}
    dev = jax.devices()[0]
    extra = {"loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4), "trainable_params": n_train,
             "jax": jax.__version__, "attention": L._attention_impl(cfg)}
    return _result(system, args, med, times, stats.get("peak_bytes_in_use"),
                   getattr(dev, "device_kind", str(dev)), extra)


# ---------------------------------------------------------------------------------------------
# PyTorch + PEFT
# ---------------------------------------------------------------------------------------------
def run_peft(system: str, args) -> dict:
    import torch
    import transformers
    import peft

    cuda = torch.cuda.is_available()
    if not cuda and args.size != "tiny":
        return {"system": system, "size": args.size, "skipped": "PyTorch on CPU runs only with --size tiny"}
    dev = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    hc = transformers.LlamaConfig(**SIZES[args.size], max_position_embeddings=4096, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(hc).to(dev, torch.bfloat16)
    model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                       target_modules=TARGETS))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, **({"fused": True} if cuda else {}))
    fwd = torch.compile(model) if system == "peft_compile" else model
    ids = torch.randint(0, hc.vocab_size, (args.batch, args.seq), device=dev)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = fwd(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # blocks
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    med = sorted(times)[len(times) // 2]
    kind = torch.cuda.get_device_name() if cuda else "cpu"
    return _result(system, args, med, times, torch.cuda.max_memory_allocated() if cuda else None, kind,
                   {"loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
                    "trainable_params": sum(p.numel() for p in trainable), "torch": torch.__version__,
                    "peft": peft.__version__})


# ---------------------------------------------------------------------------------------------
def _parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--batch", type=int, default=None, help="default 8 on GPU, 2 on CPU")
    ap.add_argument("--seq", type=int, default=None, help="default 1024 on GPU, 64 on CPU")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 9 on GPU, 5 on CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 on GPU, 2 on CPU)")
    ap.add_argument("--systems", default=",".join(ALL_SYSTEMS), help=f"comma-separated subset of {ALL_SYSTEMS}")
    ap.add_argument("--remat", default=None, help="remat policy of the JAX model (e.g. nothing_saveable)")
    ap.add_argument("--attention", default=None, choices=["xla", "cudnn"], help="default: cuDNN on GPU, XLA on CPU")
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)  # one system, in this process
    ap.add_argument("--gpu", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    bad = [s for s in systems if s not in ALL_SYSTEMS]
    if bad:
        ap.error(f"unknown systems {bad}; choose from {ALL_SYSTEMS}")
    args.systems = systems
    return args


def _defaults(args, gpu: bool):
    args.batch = args.batch or (8 if gpu else 2)
    args.seq = args.seq or (1024 if gpu else 64)
    args.steps = args.steps or (9 if gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 2)
    return args


def _has_gpu() -> bool:
    # Ask a child process, so this parent never initialises a GPU runtime itself.
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return False
    code = "import jax; print(int(jax.default_backend() == 'gpu'))"
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        return r.stdout.strip().endswith("1")
    except Exception:
        return False


def main(argv=None):
    args = _parse(argv)
    if args.only is not None:
        _defaults(args, bool(args.gpu))
        if args.only.startswith("peft"):
            try:
                import peft  # noqa: F401
                import torch  # noqa: F401
            except ImportError as e:
                print(json.dumps({"system": args.only, "skipped": f"torch/peft not importable: {e}"}), flush=True)
                return
            res = run_peft(args.only, args)
        else:
            res = run_jax(args.only, args)
        print(json.dumps(res), flush=True)
        gc.collect()
        return

    gpu = _has_gpu()
    _defaults(args, gpu)
    results = {}
    env = dict(os.environ)
    for system in args.systems:
        cmd = [sys.executable, os.path.abspath(__file__), "--only", system, "--size", args.size,
               "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--gpu", str(int(gpu))]
        if args.remat:
            cmd += ["--remat", args.remat]
        if args.attention:
            cmd += ["--attention", args.attention]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        if r.returncode != 0 or not lines:
            res = {"system": system, "error": f"exit {r.returncode}", "stderr_tail": r.stderr[-2000:]}
        else:
            res = json.loads(lines[-1])
        results[system] = res
        print(json.dumps(res), flush=True)

    def tps(s):
        return results.get(s, {}).get("tokens_per_s")

    summary = {"summary": args.size, "batch": args.batch, "seq": args.seq,
               "lora_jax/frozen": None if not (tps("lora_jax") and tps("frozen")) else
               round(tps("lora_jax") / tps("frozen"), 3),
               "merged/lora_jax": None if not (tps("lora_jax") and tps("merged")) else
               round(tps("lora_jax") / tps("merged"), 3),
               "definition": "lora_jax/frozen = tokens/s ratio (1.0 = LoRA for free); merged/lora_jax = step-time "
                             "ratio merged over lora_jax (> 1: factorized is faster)"}
    for s in ("peft", "peft_compile"):
        if tps("lora_jax") and tps(s):
            summary[f"lora_jax/{s}"] = round(tps("lora_jax") / tps(s), 3)
    if args.size == "1b" and (args.batch, args.seq) == (8, 1024):
        summary["anchors_h100_tokens_per_s"] = ANCHORS_1B_H100
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()

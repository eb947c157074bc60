"""Training-step throughput of LoRA on the lora_jax Llama model, against its own floor and PyTorch PEFT.

Systems (each runs in its own subprocess, so peak memory is its own and JAX's and PyTorch's GPU
allocators never share a process):

* ``lora_jax``: LoRA r=16, alpha=32 on all 7 projections: exactly the step ``lora-jax train``
  runs (`lora_jax.train.trainer.jit_train_step` over `lora_jax.train.model.lora_loss_fn`: the
  model and its loss through ``lora.wrap``, gradients for the trainable half of ``lora.split``
  only, the chunked token cross-entropy of `lora_jax.train.loss` (``--loss plain``: the
  log-softmax of the full logits), global-norm clipping, AdamW, non-finite guard, the old state
  donated);
* ``frozen``: the floor: no LoRA; the same step with the gradient taken only w.r.t. the per-layer
  norm scales, so the backward through the activations runs but no weight gradient is formed;
* ``merged``: the same LoRA, with ``W + s*A@B`` formed inside the loss by ``lora.merge``
  (``frozen`` and ``merged`` use the same loss as ``lora_jax``);
* ``peft`` / ``peft_compile``: transformers' PyTorch Llama + PEFT on the same config, eager
  and ``torch.compile`` (when torch and peft import; on CPU only with ``--size tiny``).

Every system uses bf16 weights and compute, AdamW, the same random token batch, and reports the
median step time of the timed steps after warmup. Sizes: ``1b`` is the 1.1B Llama config of the
H100 anchors (TinyLlama's shape, vocabulary 32,000); ``llama3-1b`` is Llama 3.2 1B's shape
(vocabulary 128,256, tied embeddings, llama3 RoPE), where the LM head and its cross-entropy
decide the memory. FLOPs per step are `lora_jax.train.flops`'
count, the one ``lora-jax train`` reports too: ``4*N*T`` (forward and input-gradient matmuls
over the N linear-layer weights incl. the LM head, T tokens; the frozen base forms no weight
gradient) + ``6*N_lora*T`` (the adapters) + causal attention ``6*B*S^2*D*L``; MFU divides the
achieved rate by the device's dense bf16 peak (`lora_jax.train.flops.PEAK_FLOPS`).

Usage::

    python benchmarks/train_step.py --size tiny            # CPU smoke test, < 1 minute
    python benchmarks/train_step.py --size 1b              # GPU: batch 8 x 1024 by default
    python benchmarks/train_step.py --size 1b --remat dots_with_no_batch_dims_saveable --systems lora_jax,frozen
    python benchmarks/train_step.py --size llama3-1b --systems lora_jax,frozen --loss plain
    python benchmarks/train_step.py --size 1b --systems lora_jax --profile /tmp/prof   # + a jax.profiler trace

``benchmarks/gpu_run.py`` runs the whole GPU measurement of issue 15 (these rows, PEFT's anchor
beside them, a profile) in one go.

The same step from the trainer: ``lora-jax train model.init.hidden_size=2048 ...`` prints its
tokens/s and MFU in ``metrics.jsonl`` and ``summary.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import os
import subprocess
import sys
import time
from typing import Optional

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
    # the dry run's stand-in for llama3-1b: tied embeddings and llama3 RoPE at tiny size
    "tiny-llama3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True, rope_theta=500000.0,
                        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # Llama 3.1 8B (meta-llama/Llama-3.1-8B config.json): untied 128k vocabulary, llama3 RoPE
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                      rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # the dry run's stand-in for llama3-8b: untied, llama3 RoPE, more layers than tiny-llama3
    "tiny-8b": dict(hidden_size=64, intermediate_size=224, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=1, vocab_size=1024, tie_word_embeddings=False, rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # Llama 3.2 1B (meta-llama/Llama-3.2-1B config.json): 128k vocabulary, tied embeddings, llama3 RoPE
    "llama3-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                      rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
                      rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32
ALL_SYSTEMS = ("lora_jax", "frozen", "merged", "peft", "peft_compile")
# Reference throughputs (tokens/s) measured once outside this repository on one H100 80GB SXM: the
# 1.1B config above ("1b"), batch 8 x 1024, bf16, LoRA r=16 on the 7 projections. peft_* are
# PyTorch + PEFT (eager and torch.compile); jax_ceiling_* are hand-written JAX steps of the same
# model (LoRA factorized, frozen floor, merged in the loss): what this script's lora_jax, frozen
# and merged rows are compared against on that GPU.
ANCHORS_1B_H100 = {"peft_compile": 50443, "peft_eager": 31117, "jax_ceiling_lora": 62493,
                   "jax_ceiling_frozen": 79322, "jax_ceiling_merged": 57851}


def _size_config(size: str) -> dict:
    """The config fields of ``size`` (``max_position_embeddings`` 4096 unless the size sets it)."""
    return {"max_position_embeddings": 4096, **SIZES[size]}


def _llama_config(args, **kw):
    from lora_jax.models import LlamaConfig

    return LlamaConfig(**_size_config(args.size), **kw)


def flops_per_step(args, n_lora: int = 0) -> float:
    """The model FLOPs of one step (`lora_jax.train.flops.step_flops`, the trainer's count)."""
    from lora_jax.models import build
    from lora_jax.train.flops import step_flops

    return step_flops(build(_llama_config(args)), args.batch, args.seq, n_lora=n_lora)


def _result(system, args, med_s, times, peak_bytes, device, extra=None, n_lora=0):
    from lora_jax.train.flops import PEAK_FLOPS

    t = args.batch * args.seq
    flops = flops_per_step(args, n_lora)
    peak = next((v for k, v in PEAK_FLOPS.items() if k.lower() in device.lower()), None)
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
def _random_lora_tree(model, rules, key, quant: Optional[str]):
    """A random LoRA tree of ``model`` built a leaf (a quantized kernel: a layer) at a time, so the
    device never holds more than the tree plus one layer's dense kernel: random weights
    (normal, std 0.02; norm scales 1), A random, B 1e-3 (the loss depends on both factors), and
    with ``quant`` every adapted kernel stored in that scheme (QLoRA)."""
    import jax
    import jax.numpy as jnp

    import lora_jax as lora
    from lora_jax.models import init_params
    from lora_jax.quant import quantize_array

    shapes = jax.eval_shape(lambda: lora.init(init_params(model, key), rules, key))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lora.is_lora)
    out = []

    @functools.partial(jax.jit, static_argnums=(1, 2, 3))
    def normal(k, shape, dtype, std):
        return (std * jax.random.normal(k, shape, jnp.float32)).astype(dtype)

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def quant_layer(k, shape, dtype):
        return quantize_array(normal(k, shape, dtype, 0.02), quant, 64, True, 0)

    for i, (path, x) in enumerate(leaves):
        k = jax.random.fold_in(key, i)
        if lora.is_lora(x):
            w = x.w
            if quant:
                per = [quant_layer(jax.random.fold_in(k, j), tuple(w.shape[1:]), w.dtype) for j in range(w.shape[0])]
                w = jax.tree.map(lambda *xs: jnp.stack(xs), *per)
                w = dataclasses.replace(w, shape=tuple(x.w.shape), stack=1)
                del per
            else:
                w = normal(k, tuple(w.shape), w.dtype, 0.02)
            a = normal(jax.random.fold_in(k, 10**6), tuple(x.a.shape), x.a.dtype, 0.02)
            out.append(x.replace(w=w, a=a, b=jnp.full(x.b.shape, 1e-3, x.b.dtype)))
        elif "scale" in jax.tree_util.keystr(path):
            out.append(jnp.ones(x.shape, x.dtype))
        else:
            out.append(normal(k, tuple(x.shape), x.dtype, 0.02))
    return jax.tree_util.tree_unflatten(treedef, out)


def run_jax(system: str, args) -> dict:
    import jax
    import jax.numpy as jnp

    import lora_jax as lora
    from lora_jax.models import build, init_params, layers
    from lora_jax.train import tuning
    from lora_jax.train.model import lora_loss_fn, lora_rules, make_stats
    from lora_jax.train.trainer import LoopSpec, jit_train_step, make_optimizer

    def model_for(settings):
        return build(_llama_config(args, dtype="bfloat16", param_dtype="bfloat16", remat_policy=settings.remat,
                                   attention_impl=args.attention,
                                   scan_unroll=settings.scan_unroll(SIZES[args.size]["num_hidden_layers"])))

    cands = tuning.candidates(args.tune_for or jax.default_backend(), remat=args.remat, loss=args.loss,
                              unroll=args.unroll)
    model = model_for(cands[0])
    cfg = model.config
    key = jax.random.key(0)
    tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq + 1), 0, cfg.vocab_size, jnp.int32)
    # a trainer batch: rows of seq + 1 tokens, every position a target
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": jnp.ones((args.batch, args.seq)),
             "mask": jnp.ones((args.batch, args.seq), jnp.int32)}

    def loss_kw(settings):
        return {"chunked": settings.loss == "chunked", "chunk": args.loss_chunk}

    def on_batch(fn):  # (params, batch) -> loss, as the trainer's loss_fn(trainable, frozen, batch, rng)
        return lambda train, rest, b, rng: fn(train, rest, b["inputs"], b["targets"], b["weights"])

    n_lora = 0
    if system == "frozen":
        params = init_params(model, key)
        layer_p = params["model"]["layers"]
        train = {"input_layernorm": layer_p["input_layernorm"], "post_attention_layernorm":
                 layer_p["post_attention_layernorm"]}
        rest = {**params, "model": {**params["model"], "layers": {k: v for k, v in layer_p.items() if k not in train}}}
        del params, layer_p

        def make_loss(settings):
            stats = make_stats(model_for(settings), **loss_kw(settings))  # the trainer's loss on plain parameters

            @on_batch
            def loss_fn(train, rest, inputs, targets, weights):
                p = {**rest, "model": {**rest["model"], "layers": {**rest["model"]["layers"], **train}}}
                return stats(p, inputs, targets, weights)
            return loss_fn
        n_train = sum(x.size for x in jax.tree.leaves(train))
    else:
        rules = lora_rules(model, TARGETS, rank=RANK, alpha=ALPHA)
        lp = _random_lora_tree(model, rules, key, args.quant)
        train, rest = lora.split(lp)
        n_train = n_lora = lora.count(lp).trainable
        del lp

        def make_loss(settings):
            if system == "lora_jax":
                return lora_loss_fn(model_for(settings), **loss_kw(settings))  # what lora-jax train runs
            stats = make_stats(model_for(settings), **loss_kw(settings))  # merged

            @on_batch
            def loss_fn(train, rest, inputs, targets, weights):
                return stats(lora.merge(lora.combine(train, rest)), inputs, targets, weights)
            return loss_fn

    spec = LoopSpec(steps=args.warmup + args.steps, batch_size=args.batch, lr=1e-4, schedule="constant")
    tx, _ = make_optimizer(spec)
    state = {"params": train, "opt_state": tx.init(train), "rng": jax.random.key(2),
             "step": jnp.zeros((), jnp.int32)}
    t0 = time.perf_counter()
    # the trainer's jitted step (state donated), with the settings lora-jax train would pick
    limit = int(args.memory_gib * 2**30) if args.memory_gib else tuning.device_memory_limit()
    settings, step, tried = tuning.pick(
        cands, lambda c: jit_train_step(make_loss(c), tx).lower(state, rest, batch).compile(), limit)
    compile_s = time.perf_counter() - t0
    mem = step.memory_analysis()
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        state, m = step(state, rest, batch)
        losses.append(float(m["loss"]))  # blocks
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    med = sorted(times)[len(times) // 2]
    mstats = jax.devices()[0].memory_stats() or {}
    profile_error = None
    if args.profile:  # a few more steps under jax.profiler, after the timed ones, and the step's HLO
        os.makedirs(args.profile, exist_ok=True)
        with open(os.path.join(args.profile, f"{system}.hlo.txt"), "w") as f:
            f.write(step.as_text())
        try:
            jax.profiler.start_trace(args.profile)
            try:
                for _ in range(args.profile_steps):
                    state, m = step(state, rest, batch)
                    float(m["loss"])
            finally:
                jax.profiler.stop_trace()
        except Exception as e:  # noqa: BLE001 - a failed trace must not lose the timing above
            profile_error = repr(e)[:500]
    dev = jax.devices()[0]
    extra = {"loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4), "trainable_params": n_train,
             "jax": jax.__version__, "attention": layers.attention_impl(cfg.attention_impl, cfg.dtype, cfg.head_dim),
             "loss": settings.loss, "loss_chunk": args.loss_chunk, "unroll": settings.unroll, "quant": args.quant,
             "settings": settings.label, "tried": tried, "memory_limit_gib": None if limit is None else
             round(limit / 2**30, 2), "compile_s": round(compile_s, 1),
             "footprint_gib": None if tried[-1]["bytes"] is None else round(tried[-1]["bytes"] / 2**30, 3),
             "temp_gib": None if mem is None else round(mem.temp_size_in_bytes / 2**30, 3)}
    if args.profile:
        extra.update(profile_dir=args.profile, profile_steps=args.profile_steps, profile_error=profile_error)
    args.remat = settings.remat  # what ran
    return _result(system, args, med, times, mstats.get("peak_bytes_in_use"),
                   getattr(dev, "device_kind", str(dev)), extra, n_lora=n_lora)


# ---------------------------------------------------------------------------------------------
# PyTorch + PEFT
# ---------------------------------------------------------------------------------------------
def run_peft(system: str, args) -> dict:
    import torch
    import transformers
    import peft

    cuda = torch.cuda.is_available()
    if not cuda and not args.size.startswith("tiny"):
        return {"system": system, "size": args.size, "skipped": "PyTorch on CPU runs only at the tiny sizes"}
    dev = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    hc = transformers.LlamaConfig(**_size_config(args.size), attn_implementation="sdpa")
    # built on the device in bf16 (as PEFT's anchor's .to(cuda, bf16), without an fp32 copy on the host)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(dev):
        model = transformers.LlamaForCausalLM(hc)
    torch.set_default_dtype(torch.float32)
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
                    "peft": peft.__version__}, n_lora=sum(p.numel() for p in trainable))


# ---------------------------------------------------------------------------------------------
def _parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--batch", type=int, default=None, help="default 8 on GPU, 2 on CPU")
    ap.add_argument("--seq", type=int, default=None, help="default 1024 on GPU, 64 on CPU")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 9 on GPU, 5 on CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 on GPU, 2 on CPU)")
    ap.add_argument("--systems", default=",".join(ALL_SYSTEMS), help=f"comma-separated subset of {ALL_SYSTEMS}")
    ap.add_argument("--remat", default="auto",
                    help="remat policy of the JAX model (e.g. nothing_saveable; none: no remat; auto: what lora-jax "
                         "train picks, lora_jax.train.tuning)")
    ap.add_argument("--unroll", default="auto",
                    help="decoder layers per iteration of the layer scan (0: all; auto: what lora-jax train picks)")
    ap.add_argument("--quant", default=None, choices=["nf4", "int8"],
                    help="QLoRA: the adapted kernels stored in this scheme (lora.quantize, block 64, double quant)")
    ap.add_argument("--memory-gib", type=float, default=None,
                    help="the memory the auto settings must fit in (default: the device's, lora_jax.train.tuning)")
    ap.add_argument("--attention", default=None, choices=["xla", "cudnn"], help="default: cuDNN on GPU, XLA on CPU")
    ap.add_argument("--loss", default="auto", choices=["auto", "chunked", "plain"],
                    help="the JAX systems' cross-entropy: chunked, over the full logits (plain), or auto: what "
                         "lora-jax train picks (plain where its logits fit)")
    ap.add_argument("--loss-chunk", type=int, default=None,
                    help="positions per chunk of the chunked loss (default: lora_jax.train.loss.auto_chunk)")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="after the timed steps, trace --profile-steps more with jax.profiler into DIR (JAX systems)")
    ap.add_argument("--profile-steps", type=int, default=3, help=argparse.SUPPRESS)
    ap.add_argument("--tune-for", default=None, help=argparse.SUPPRESS)  # the dry run: a GPU's candidates on a CPU
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)  # one system, in this process
    ap.add_argument("--gpu", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    bad = [s for s in systems if s not in ALL_SYSTEMS]
    if bad:
        ap.error(f"unknown systems {bad}; choose from {ALL_SYSTEMS}")
    args.systems = systems
    if args.unroll != "auto":
        args.unroll = int(args.unroll)
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
        cmd += ["--remat", str(args.remat), "--unroll", str(args.unroll)]
        if args.quant:
            cmd += ["--quant", args.quant]
        if args.memory_gib:
            cmd += ["--memory-gib", str(args.memory_gib)]
        if args.tune_for:
            cmd += ["--tune-for", args.tune_for]
        if args.attention:
            cmd += ["--attention", args.attention]
        cmd += ["--loss", args.loss] + (["--loss-chunk", str(args.loss_chunk)] if args.loss_chunk else [])
        if args.profile and system not in ("peft", "peft_compile"):
            cmd += ["--profile", os.path.join(args.profile, system), "--profile-steps", str(args.profile_steps)]
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

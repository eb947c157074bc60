"""One mixture-of-experts layer's LoRA train step: factorized through wrap vs merged-in-loss vs frozen.

The layer is `lora_jax.models.layers.SparseMoe` (router + fused SwiGLU experts, as in Qwen3-MoE and
Mixtral) after an RMSNorm, with one LoRA per expert on ``gate_up_proj`` and ``down_proj`` (layout
``"sio"``: the experts are the stack axis). Per expert implementation (``ragged``: tokens sorted by
expert through ``jax.lax.ragged_dot``; ``dense``: every expert on every token) three steps:

* ``wrap``:   grad w.r.t. (A, B) of ``lora.wrap(loss)``: ``x@W_e + s(x@A_e)@B_e`` per group;
* ``merged``: grad w.r.t. (A, B) of ``loss(lora.merge(...))``: the experts' full weight gradient;
* ``frozen``: no LoRA; grad w.r.t. the norm scale only (the backward through the activations, no
  weight gradient): the floor a LoRA step can reach.

All six are timed interleaved in one process and one JSON line is printed: on a CPU read the
ratios, on a GPU the absolute numbers too. Usage:
  python benchmarks/moe_step.py [--dim 512 --ffn 256 --experts 8 --top-k 2 --tokens 2048 --rank 16]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lora
from lora_jax.models.layers import RMSNorm, SparseMoe


def build(args, impl: str, dtype):
    moe = SparseMoe(args.experts, args.top_k, args.ffn, normalize=True, impl=impl, dtype=dtype, param_dtype=dtype,
                    std=1.0 / np.sqrt(args.dim))
    norm = RMSNorm(1e-6, dtype=dtype, param_dtype=dtype)
    x = jax.random.normal(jax.random.key(0), (args.tokens // args.seq, args.seq, args.dim), dtype)
    params = {"moe": moe.init(jax.random.key(1), x)["params"], "norm": norm.init(jax.random.key(2), x)["params"]}
    target = jax.random.normal(jax.random.key(3), x.shape, dtype)

    def loss(p, x):
        y = moe.apply({"params": p["moe"]}, norm.apply({"params": p["norm"]}, x))
        return jnp.mean(jnp.square(y.astype(jnp.float32) - target.astype(jnp.float32)))

    return params, x, loss


def steps_for(params, x, loss, rank):
    rules = lora.Rules(["gate_up_proj", "down_proj"], rank=rank, alpha=2 * rank, stack_axes=1)
    lp = lora.init(params, rules, 1)
    trainable, frozen = lora.split(lp)
    tx = optax.adamw(1e-4)

    def make(f, train, opt):
        @jax.jit
        def step(train, state):
            val, g = jax.value_and_grad(f)(train, x)
            u, state = opt.update(g, state, train)
            return optax.apply_updates(train, u), state, val

        return step, train, opt.init(train)

    wrap_loss = lambda t, x: lora.wrap(loss)(lora.combine(t, frozen), x)  # noqa: E731
    merged_loss = lambda t, x: loss(lora.merge(lora.combine(t, frozen)), x)  # noqa: E731
    frozen_loss = lambda n, x: loss(dict(params, norm=n), x)  # noqa: E731
    return {"wrap": make(wrap_loss, trainable, lora.freeze(tx, lp)),
            "merged": make(merged_loss, trainable, lora.freeze(tx, lp)),
            "frozen": make(frozen_loss, params["norm"], tx)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=256, help="each expert's intermediate size")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", dest="top_k", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per system (after 2 warm-up steps)")
    ap.add_argument("--impls", default="ragged,dense")
    ap.add_argument("--dtype", default="float32" if jax.default_backend() == "cpu" else "bfloat16")
    args = ap.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    impls = args.impls.split(",")
    systems = {}
    for impl in impls:
        params, x, loss = build(args, impl, dtype)
        for name, s in steps_for(params, x, loss, args.rank).items():
            systems[f"{impl}/{name}"] = s
    state, compile_s = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", lora.MaterializeWarning)  # wrap must stay factorized
        for name, (step, train, opt_state) in systems.items():
            t0 = time.perf_counter()
            for _ in range(2):
                train, opt_state, val = step(train, opt_state)
            jax.block_until_ready(val)
            compile_s[name] = round(time.perf_counter() - t0, 2)
            state[name] = [train, opt_state]
    times, losses = {name: [] for name in systems}, {}
    for _ in range(args.steps):  # interleaved: slow drifts of a shared CPU hit every system alike
        for name, (step, _, _) in systems.items():
            train, opt_state = state[name]
            t0 = time.perf_counter()
            train, opt_state, val = step(train, opt_state)
            jax.block_until_ready(val)
            times[name].append(time.perf_counter() - t0)
            state[name] = [train, opt_state]
            losses[name] = float(val)
    med = {k: float(np.median(v)) for k, v in times.items()}
    ratios = {}
    for impl in impls:
        ratios[f"{impl}/merged_over_wrap"] = round(med[f"{impl}/merged"] / med[f"{impl}/wrap"], 3)
        ratios[f"{impl}/wrap_over_frozen"] = round(med[f"{impl}/wrap"] / med[f"{impl}/frozen"], 3)
    if {"ragged", "dense"} <= set(impls):
        for kind in ("wrap", "merged", "frozen"):
            ratios[f"ragged_over_dense/{kind}"] = round(med[f"ragged/{kind}"] / med[f"dense/{kind}"], 3)
    print(json.dumps({
        "benchmark": "moe_step", "backend": jax.default_backend(), "device": str(jax.devices()[0]),
        "cpu": platform.processor() or platform.machine(), "jax": jax.__version__, "dtype": args.dtype,
        "config": {k: getattr(args, k) for k in ("dim", "ffn", "experts", "top_k", "tokens", "seq", "rank")},
        "step_ms": {k: round(v * 1e3, 2) for k, v in med.items()},
        "tokens_per_s": {k: round(args.tokens / v) for k, v in med.items()},
        "compile_s": compile_s,
        "loss_last": losses,  # wrap and merged are the same function: the same losses after the same steps
        "ratios": ratios,
    }))


if __name__ == "__main__":
    main()

"""wrap vs merged-in-the-loss vs frozen: one train step on a Llama-style block stack.

Three ways to take a step, on the same stacked (nn.scan-style) weights:

* ``wrap``:   grad w.r.t. (A, B) of ``lora.wrap(forward)``: factorized ``x@W + s(x@A)@B``;
* ``merged``: grad w.r.t. (A, B) of ``forward(lora.merge(...))``: ``x@(W + s A@B)`` in the loss,
  which makes XLA compute the full weight gradient;
* ``hand``:   LoRA written by hand into the model code (what lora.wrap must match untouched);
* ``frozen``: no LoRA; grad w.r.t. the norm scales only, so the backward through activations
  runs but no weight gradient: the floor a LoRA step can reach.

The three are timed interleaved in one process (ratios, not absolute times, are the claim on a
noisy CPU) and one JSON line is printed. Usage:
  python benchmarks/wrap_vs_merge.py [--dim 1024 --ffn 2816 --layers 2 --heads 16 --batch 2 --seq 1024 --rank 16]

The default is a 1B-class layer width (half of Llama-1.1B's 2048) at 2,048 tokens per step. At small
widths (--dim 512) the rank-16 factor products, memory-bound on XLA:CPU, weigh more (README).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lora


def make_params(key, d, f, n_layers, heads, vocab, dtype):
    names = {"q": (d, d), "k": (d, d // 2), "v": (d, d // 2), "o": (d, d), "gate": (d, f), "up": (d, f),
             "down": (f, d)}
    keys = iter(jax.random.split(key, 16))
    layers = {n: (jax.random.normal(next(keys), (n_layers,) + s) / np.sqrt(s[0])).astype(dtype)
              for n, s in names.items()}
    layers["ln1"] = jnp.ones((n_layers, d), dtype)
    layers["ln2"] = jnp.ones((n_layers, d), dtype)
    return {"emb": (jax.random.normal(next(keys), (vocab, d)) * 0.02).astype(dtype), "layers": layers,
            "head": (jax.random.normal(next(keys), (d, vocab)) / np.sqrt(d)).astype(dtype),
            "ln_f": jnp.ones((d,), dtype)}


def rms(x, g):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-6)).astype(x.dtype) * g


def forward(params, ids, heads, adapters=None, scale=2.0):
    """A plain-JAX Llama-style decoder: layers under lax.scan over stacked kernels.

    ``adapters`` ({name: (a, b)} stacked per layer) adds LoRA written by hand into the model code:
    the baseline a JAX user could write, which ``lora.wrap`` must match without touching the model.
    """
    h = jnp.take(params["emb"], ids, axis=0)
    b, t, d = h.shape
    hd = d // heads

    def layer(h, pl):
        p, ad = pl

        def proj(x, n):
            y = x @ p[n]
            if ad is not None:
                y = y + ((x @ ad[n][0].astype(x.dtype)) @ (scale * ad[n][1]).astype(x.dtype))
            return y

        x = rms(h, p["ln1"])
        q = proj(x, "q").reshape(b, t, heads, hd)
        k = proj(x, "k").reshape(b, t, heads // 2, hd)
        v = proj(x, "v").reshape(b, t, heads // 2, hd)
        att = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, t, d)
        h = h + proj(att, "o")
        x = rms(h, p["ln2"])
        return h + proj(jax.nn.silu(proj(x, "gate")) * proj(x, "up"), "down"), None

    h, _ = jax.lax.scan(layer, h, (params["layers"], adapters))
    logits = (rms(h, params["ln_f"]) @ params["head"]).astype(jnp.float32)
    lp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(lp, ids[:, 1:, None], -1))


def build_steps(params, lp, heads):
    trainable, frozen = lora.split(lp)
    tx = optax.adamw(1e-4)

    def make(loss, train):
        opt = lora.freeze(tx, lp) if train is trainable else tx

        @jax.jit
        def step(train, state, ids):
            loss_val, g = jax.value_and_grad(loss)(train, ids)
            u, state = opt.update(g, state, train)
            return optax.apply_updates(train, u), state, loss_val

        return step, train, opt.init(train)

    wrap_loss = lambda t, ids: lora.wrap(forward)(lora.combine(t, frozen), ids, heads)  # noqa: E731
    merged_loss = lambda t, ids: forward(lora.merge(lora.combine(t, frozen)), ids, heads)  # noqa: E731
    norms = {"ln1": params["layers"]["ln1"], "ln2": params["layers"]["ln2"]}

    def hand_loss(t, ids):
        ad = {n: (t["layers"][n].a, t["layers"][n].b) for n in t["layers"] if lora.is_lora(t["layers"][n])}
        return forward(params, ids, heads, ad, scale=lp["layers"]["q"].scale)

    def frozen_loss(n, ids):
        p = dict(params, layers=dict(params["layers"], **n))
        return forward(p, ids, heads)

    return {"wrap": make(wrap_loss, trainable), "merged": make(merged_loss, trainable),
            "hand": make(hand_loss, trainable), "frozen": make(frozen_loss, norms)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per system (after 2 warm-up steps)")
    ap.add_argument("--dtype", default="float32" if jax.default_backend() == "cpu" else "bfloat16")
    args = ap.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    params = make_params(jax.random.key(0), args.dim, args.ffn, args.layers, args.heads, args.vocab, dtype)
    rules = lora.Rules(["q", "k", "v", "o", "gate", "up", "down"], rank=args.rank, alpha=2 * args.rank, stack_axes=1)
    lp = lora.init(params, rules, 1)
    ids = jax.random.randint(jax.random.key(2), (args.batch, args.seq), 0, args.vocab)
    steps = build_steps(params, lp, args.heads)
    state = {}
    for name, (step, train, opt_state) in steps.items():
        t0 = time.perf_counter()
        train, opt_state, loss = step(train, opt_state, ids)
        train, opt_state, loss = step(train, opt_state, ids)
        jax.block_until_ready(loss)
        state[name] = [train, opt_state, time.perf_counter() - t0]
    times = {name: [] for name in steps}
    for _ in range(args.steps):  # interleaved: slow drifts of a shared CPU hit every system alike
        for name, (step, _, _) in steps.items():
            train, opt_state, _ = state[name]
            t0 = time.perf_counter()
            train, opt_state, loss = step(train, opt_state, ids)
            jax.block_until_ready(loss)
            times[name].append(time.perf_counter() - t0)
            state[name][:2] = [train, opt_state]
    med = {k: float(np.median(v)) for k, v in times.items()}
    tokens = args.batch * args.seq
    print(json.dumps({
        "benchmark": "wrap_vs_merge", "backend": jax.default_backend(), "device": str(jax.devices()[0]),
        "cpu": platform.processor() or platform.machine(), "jax": jax.__version__, "dtype": args.dtype,
        "config": {k: getattr(args, k) for k in ("dim", "ffn", "layers", "heads", "batch", "seq", "rank")},
        "step_ms": {k: round(v * 1e3, 2) for k, v in med.items()},
        "tokens_per_s": {k: round(tokens / v) for k, v in med.items()},
        "merged_over_wrap": round(med["merged"] / med["wrap"], 3),
        "wrap_over_frozen": round(med["wrap"] / med["frozen"], 3),
        "wrap_over_hand": round(med["wrap"] / med["hand"], 3),
        "targets": {"merged_over_wrap": ">= 1.25", "wrap_over_frozen": "<= 1.15"},
    }))


if __name__ == "__main__":
    main()

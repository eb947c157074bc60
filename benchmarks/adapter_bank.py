"""Many adapters on one base: an adapter bank against one adapter at a time.

Three measurements on a Llama-style model (lora_jax's own, random weights), each printed as one
JSON line ``{"what": ..., "ratio": bank / sequential tokens per second, "compiles": N, ...}``:

* ``decode``: greedy decoding of ``--rows`` prompts spread over ``--adapters`` adapters, one batch
  through an `lora.AdapterBank` (``generate(adapter_ids=...)``), against the same rows as one
  batch per adapter (``rows / adapters`` rows each, one after another). Decoding reads every
  weight once per token, which the bank does once for all adapters.
* ``train``: ``--train-adapters`` adapters trained in one run (each example routed to its adapter,
  one optimizer per adapter: ``lora.freeze({name: tx})``) against one run per adapter, one after
  another, at ``--train-rows`` rows per adapter per step.
* ``swap``: 20 adapters of different ranks, alphas, rsLoRA and target subsets loaded into a bank
  one after another, a jitted forward after each: ``compiles`` counts the traces of that forward.

``compiles`` counts the traces of each timed program (a trace is a compile); the bank's decode
program is traced once however many adapters it serves. Timings alternate between the two systems
(``--repeats`` rounds, the median kept), so the ratios hold on a noisy CPU; absolute numbers only
from a GPU. Usage:
  python benchmarks/adapter_bank.py [--size small|tiny] [--what decode,train,swap]
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
import lora_jax.hf as hf
from lora_jax.models import LlamaConfig, build, generate, init_params

SIZES = {
    "tiny": dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "small": dict(vocab_size=2048, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4),
}


def _adapter(model, params, seed, *, preset="all-linear", rank=16, alpha=32.0, rslora=False, layers=None):
    kw = dict(rank=rank, alpha=alpha, rslora=rslora)
    if layers is not None:
        kw["layers"] = layers
    lp = lora.init(params, hf.rules_for(model, preset, **kw), seed)
    keys = iter(jax.random.split(jax.random.key(seed + 1000), 4096))
    return jax.tree_util.tree_map(lambda x: x.replace(b=0.05 * jax.random.normal(next(keys), x.b.shape))
                                  if lora.is_lora(x) else x, lp, is_leaf=lora.is_lora)


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def bench_decode(model, params, args):
    n, rows, rank = args.adapters, args.rows, args.rank
    per = rows // n
    adapters = [_adapter(model, params, k, rank=rank) for k in range(n)]
    bank = lora.AdapterBank(params, hf.rules_for(model, "all-linear", rank=rank), slots=n, rank=rank)
    for k, lp in enumerate(adapters):
        bank.load(k, lp, name=f"a{k}")
    prompts = jax.random.randint(jax.random.key(0), (rows, args.prompt), 1, model.config.vocab_size)
    ids = bank.ids([f"a{j // per}" for j in range(rows)])
    calls = {"bank": 0, "one": 0}

    def counted(which):
        def apply(p, x, **kw):
            calls[which] += 1  # Python runs once per trace: twice per decode program (prefill, step)
            return model.apply({"params": p}, x, **kw)
        return apply

    bank_apply, one_apply = counted("bank"), lora.wrap(counted("one"))
    new = args.new_tokens

    def run_bank():
        return generate(model, bank.tree, prompts, new, eos_token_id=(), apply_fn=bank_apply, adapter_ids=ids)

    def run_sequential():
        return [generate(model, adapters[k], prompts[k * per:(k + 1) * per], new, eos_token_id=(), apply_fn=one_apply)
                for k in range(n)]

    out_bank = np.asarray(run_bank())
    out_seq = np.concatenate([np.asarray(o) for o in run_sequential()])
    same = float(np.mean(out_bank == out_seq))  # greedy: the same tokens (up to float ties)
    t_bank, t_seq = [], []
    for _ in range(args.repeats):
        t_bank.append(_median_time(run_bank, 1))
        t_seq.append(_median_time(run_sequential, 1))
    tb, ts = float(np.median(t_bank)), float(np.median(t_seq))
    tokens = rows * new
    return {"what": "decode", "ratio": round(ts / tb, 3), "compiles": calls["bank"] // 2,
            "compiles_sequential": calls["one"] // 2, "bank_tokens_per_s": round(tokens / tb, 1),
            "sequential_tokens_per_s": round(tokens / ts, 1), "rows": rows, "adapters": n, "rows_per_adapter": per,
            "new_tokens": new, "prompt": args.prompt, "rank": rank, "same_tokens": same}


def _token_ce(logits, x):
    lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    return -jnp.take_along_axis(lp, x[:, 1:, None], axis=-1)[..., 0].mean(axis=1)


def bench_train(model, params, args):
    n, rows, seq = args.train_adapters, args.train_rows, args.train_seq
    apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    names = [f"a{k}" for k in range(n)]
    tree = params
    for k, name in enumerate(names):
        tree = lora.add(tree, name, hf.rules_for(model, "all-linear", rank=args.rank, alpha=2.0 * args.rank), k)
    lrs = {name: 1e-3 * (k + 1) for k, name in enumerate(names)}
    ids = jnp.repeat(jnp.arange(n, dtype=jnp.int32), rows)
    x_all = jax.random.randint(jax.random.key(1), (n * rows, seq), 0, model.config.vocab_size)
    traces = {"joint": 0, "one": 0}

    tx = lora.freeze({name: optax.adamw(lr) for name, lr in lrs.items()}, tree)

    @jax.jit
    def joint_step(tree, state, x):
        traces["joint"] += 1

        def loss(tree):
            per_row = _token_ce(lora.wrap(apply, adapter_ids=ids)(tree, x), x)
            return sum(jnp.sum(jnp.where(ids == k, per_row, 0)) / rows for k in range(n))
        l, g = jax.value_and_grad(loss)(tree)
        upd, state = tx.update(g, state, tree)
        return optax.apply_updates(tree, upd), state, l

    singles = []
    for name in names:
        alone = tree
        for other in names:
            if other != name:
                alone = lora.delete(alone, other)
        singles.append(alone)
    tx1 = lora.freeze(optax.adamw(lrs[names[0]]))  # one program for every run: the lr enters as a scale

    @jax.jit
    def one_step(tree, state, x, lr_scale):
        traces["one"] += 1
        l, g = jax.value_and_grad(lambda t: _token_ce(lora.wrap(apply)(t, x), x).mean())(tree)
        upd, state = tx1.update(g, state, tree)
        upd = jax.tree_util.tree_map(lambda u: u * lr_scale, upd)  # adamw's update is linear in lr
        return optax.apply_updates(tree, upd), state, l

    state = tx.init(tree)
    states = [tx1.init(s) for s in singles]
    scales = [jnp.float32(lrs[name] / lrs[names[0]]) for name in names]
    steps = args.train_steps

    def run_joint():
        nonlocal tree, state
        for _ in range(steps):
            tree, state, l = joint_step(tree, state, x_all)
        return l

    def run_sequential():
        out = None
        for k in range(n):
            for _ in range(steps):
                singles[k], states[k], out = one_step(singles[k], states[k], x_all[k * rows:(k + 1) * rows], scales[k])
        return out

    run_joint(), run_sequential()  # compile
    t_joint, t_seq = [], []
    for _ in range(args.repeats):
        t_joint.append(_median_time(run_joint, 1))
        t_seq.append(_median_time(run_sequential, 1))
    tj, ts = float(np.median(t_joint)), float(np.median(t_seq))
    tokens = n * rows * seq * steps
    return {"what": "train", "ratio": round(ts / tj, 3), "compiles": traces["joint"],
            "compiles_sequential": traces["one"], "bank_tokens_per_s": round(tokens / tj, 1),
            "sequential_tokens_per_s": round(tokens / ts, 1), "adapters": n, "rows_per_adapter": rows, "seq": seq,
            "steps": steps, "rank": args.rank}


def bench_swap(model, params, args):
    rank = args.rank
    bank = lora.AdapterBank(params, hf.rules_for(model, "all-linear", rank=rank), slots=args.adapters, rank=rank)
    traces = [0]
    apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731

    @jax.jit
    def forward(tree, ids, x):
        traces[0] += 1
        return lora.wrap(apply, adapter_ids=ids)(tree, x)

    presets = ["all-linear", "attention", "peft", "all-linear"]
    adapters = [_adapter(model, params, i, preset=presets[i % 4], rank=1 + i % rank, alpha=float(2 + 3 * (i % 5)),
                         rslora=i % 3 == 1, layers=[i % model.config.num_hidden_layers] if i % 4 == 3 else None)
                for i in range(20)]
    x = jax.random.randint(jax.random.key(2), (args.adapters, 16), 0, model.config.vocab_size)
    ids = jnp.arange(args.adapters, dtype=jnp.int32)
    load_s = []
    for i, lp in enumerate(adapters):
        t = time.perf_counter()
        bank.load(i % args.adapters, lp, name=f"s{i}")
        load_s.append(time.perf_counter() - t)
        jax.block_until_ready(forward(bank.tree, ids, x))
    return {"what": "swap", "ratio": None, "compiles": traces[0], "swaps": len(adapters),
            "ranks": sorted({1 + i % rank for i in range(20)}), "load_ms_median": round(1e3 * float(np.median(load_s)), 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(SIZES), default="small")
    ap.add_argument("--what", default="decode,train,swap")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--train-adapters", type=int, default=4)
    ap.add_argument("--train-rows", type=int, default=1)
    ap.add_argument("--train-seq", type=int, default=32)
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.size == "tiny":
        args.rank = min(args.rank, 4)
    model = build(LlamaConfig(**SIZES[args.size]))
    params = init_params(model, jax.random.key(0))
    env = {"backend": jax.default_backend(), "devices": len(jax.devices()), "jax": jax.__version__,
           "machine": platform.machine(), "size": args.size}
    for what in args.what.split(","):
        row = {"decode": bench_decode, "train": bench_train, "swap": bench_swap}[what](model, params, args)
        print(json.dumps({**row, **env}), flush=True)


if __name__ == "__main__":
    main()

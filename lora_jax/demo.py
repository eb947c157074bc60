"""The seed experiment, in Flax: LoRA-fine-tune an MLP on the digit it is worst at.

1. Train a base MLP (``linear1 -> linear2 -> linear3``) on scikit-learn's 8x8 digits with the 9s
   under-represented (most are held out), so the base is poor at 9.
2. Put a LoRA adapter on every layer (``lora.init``), train only the adapter (``lora.split`` +
   ``lora.freeze``) on 9s alone, with the model run through ``lora.wrap`` (factorized).
3. Print per-class test accuracy: base, fine-tuned, and fine-tuned with the adapter disabled
   (``lora.wrap(..., scale=0.0)``), which gives the base predictions back exactly.
4. Save the adapter, load it back, merge it (``lora.merge``) and check merged == wrapped.

Run: ``lora-jax demo`` (or ``make demo``, or ``python -m lora_jax.demo``). Takes seconds on a CPU.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lora


class MLP(nn.Module):
    """The seeds' "overly expensive" classifier, scaled to 8x8 digits."""

    hidden: Sequence[int] = (256, 512)

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.hidden[0], name="linear1")(x))
        x = nn.relu(nn.Dense(self.hidden[1], name="linear2")(x))
        return nn.Dense(10, name="linear3")(x)


def load_data(seed: int = 0, keep_nines: float = 0.05):
    """Digits split 60/40; the base training set keeps only ``keep_nines`` of its 9s."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - a clear message for a missing extra
        raise ImportError("the digits demo needs scikit-learn: pip install 'lora_jax[examples]'") from e
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(y))
    n_train = int(0.6 * len(y))
    tr, te = idx[:n_train], idx[n_train:]
    nines = tr[y[tr] == 9]
    dropped = set(rng.choice(nines, size=len(nines) - max(1, int(keep_nines * len(nines))), replace=False).tolist())
    base_tr = np.array([i for i in tr if i not in dropped])
    return (x[base_tr], y[base_tr]), (x[tr][y[tr] == 9], y[tr][y[tr] == 9]), (x[te], y[te])


def _batches(rng, n, batch):
    while True:
        perm = rng.permutation(n)
        for s in range(0, n - batch + 1, batch):
            yield perm[s:s + batch]


def _xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train_base(model, params, data, steps, lr, seed):
    x, y = data
    tx = optax.adam(lr)
    state = tx.init(params)

    @jax.jit
    def step(params, state, xb, yb):
        loss, g = jax.value_and_grad(lambda p: _xent(model.apply({"params": p}, xb), yb))(params)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state, loss

    it = _batches(np.random.default_rng(seed), len(y), 32)
    for _ in range(steps):
        b = next(it)
        params, state, loss = step(params, state, x[b], y[b])
    return params


def per_class_accuracy(pred, y):
    return np.array([(pred[y == c] == c).mean() for c in range(10)])


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(prog="lora-jax demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=1, help="LoRA rank (the seed uses 1)")
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--base-steps", type=int, default=600)
    ap.add_argument("--base-lr", type=float, default=1e-3)
    ap.add_argument("--lora-steps", type=int, default=100, help="fine-tuning batches of 10 nines (as the seed)")
    ap.add_argument("--lr", type=float, default=3e-4, help="LoRA learning rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="where to save the adapter (default: a temporary directory)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()

    base_data, nine_data, (x_te, y_te) = load_data(args.seed)
    model = MLP()
    params = model.init(jax.random.key(args.seed), x_te[:1])["params"]
    params = train_base(model, params, base_data, args.base_steps, args.base_lr, args.seed)
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
    base_pred = np.asarray(apply(params, x_te).argmax(-1))

    # LoRA on every layer; only (a, b) train, the base gets no gradient and no optimizer state
    rules = lora.Rules(["linear1", "linear2", "linear3"], rank=args.rank, alpha=args.alpha)
    lp = lora.init(params, rules, jax.random.key(args.seed + 1))
    trainable, frozen = lora.split(lp)
    tx = lora.freeze(optax.adam(args.lr), lp)
    opt_state = tx.init(trainable)
    fwd = lora.wrap(model.apply)

    @jax.jit
    def step(trainable, opt_state, xb, yb):
        def loss_fn(t):
            return _xent(fwd({"params": lora.combine(t, frozen)}, xb), yb)

        loss, g = jax.value_and_grad(loss_fn)(trainable)
        u, opt_state = tx.update(g, opt_state, trainable)
        return optax.apply_updates(trainable, u), opt_state, loss

    x9, y9 = nine_data
    it = _batches(np.random.default_rng(args.seed + 2), len(y9), 10)
    for _ in range(args.lora_steps):
        b = next(it)
        trainable, opt_state, _ = step(trainable, opt_state, x9[b], y9[b])
    lp = lora.combine(trainable, frozen)

    wrapped = jax.jit(lambda t, x: fwd({"params": t}, x))
    disabled = jax.jit(lambda t, x: lora.wrap(model.apply, scale=0.0)({"params": t}, x))
    tuned_logits = wrapped(lp, x_te)
    tuned_pred = np.asarray(tuned_logits.argmax(-1))
    off_pred = np.asarray(disabled(lp, x_te).argmax(-1))

    acc_base, acc_tuned, acc_off = (per_class_accuracy(p, y_te) for p in (base_pred, tuned_pred, off_pred))
    c = lora.count(lp)
    print("LoRA fine-tune of a digits MLP on 9s only (the seed's MNIST experiment, in Flax)")
    print(f"  base trained on {len(base_data[1])} digits with {int((base_data[1] == 9).sum())} nines; "
          f"adapter rank {args.rank}, alpha {args.alpha:g}, {args.lora_steps} batches of 10 nines\n")
    print("  digit   base   +LoRA   LoRA off")
    for d in range(10):
        print(f"  {d:>5}  {acc_base[d]:5.1%}  {acc_tuned[d]:6.1%}  {acc_off[d]:8.1%}")
    print(f"  {'all':>5}  {(base_pred == y_te).mean():5.1%}  {(tuned_pred == y_te).mean():6.1%}  "
          f"{(off_pred == y_te).mean():8.1%}\n")
    print(f"  {c}")
    identical = bool(np.array_equal(off_pred, base_pred))
    print(f"  adapter disabled (scale=0) gives the base predictions back exactly: {identical}")

    out = args.out or tempfile.mkdtemp(prefix="lora_jax_digits_")
    adapter_dir = os.path.join(out, "adapter")
    lora.save_adapter(adapter_dir, lp, overwrite=True)
    restored = lora.load_adapter(adapter_dir, params)
    merged = lora.merge(restored)
    diff = float(jnp.abs(apply(merged, x_te) - tuned_logits).max())
    print(f"  adapter saved to {adapter_dir} and loaded back; merged vs wrapped logits: max |diff| = {diff:.2e}")
    print(f"  done in {time.perf_counter() - t0:.1f} s")
    return {"base_acc": acc_base, "tuned_acc": acc_tuned, "off_acc": acc_off, "off_equals_base": identical,
            "merged_vs_wrapped": diff, "trainable_percent": c.percent, "adapter_dir": adapter_dir}


if __name__ == "__main__":
    main()

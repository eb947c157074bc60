"""LoRA-fine-tune a Hugging Face causal LM in JAX and hand the adapter to PyTorch PEFT.

    python examples/hf_finetune.py --demo                 # offline, well under a minute on 2 CPU cores
    python examples/hf_finetune.py path/to/llama-dir --text corpus.txt --steps 200 --rank 16

Loads a local transformers checkpoint directory (``config.json`` + ``model.safetensors``, sharded
safetensors or ``flax_model.msgpack``; Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, GPT-2) into
lora_jax's own Flax model without torch, puts LoRA on its linear layers, trains next-token
prediction on a text file (the repo's README.md by default) and reports the loss on held-out text
(the last tenth) before and after. It then saves the adapter in PEFT format, loads it back from
that directory and measures the held-out loss again (the file, not the memory, is what is
evaluated), and prints the PyTorch code that loads it. Without a tokenizer in the directory the
text is tokenized byte by byte (ids = UTF-8 bytes, modulo the vocabulary size).

``--demo`` first makes a base worth adapting: a small Llama (byte vocabulary) pretrained here on
the English prose lora_jax ships (``lora_jax/data/pretrain.txt``) and saved as a Hugging Face
checkpoint; the adapter then learns a text in another style, a lighthouse keeper's log
(``lora_jax/data/finetune.txt``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lora
import lora_jax.hf as hf

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = str(resources.files("lora_jax").joinpath("data"))  # the texts lora_jax ships (lora-jax train's default run)


def xent(logits, x):
    """Mean next-token cross-entropy of ``logits`` (B, S, V) computed on ``x[:, :-1]``, against ``x[:, 1:]``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), x[:, 1:]).mean()


def byte_ids(text: str, vocab_size: int = 256) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) % vocab_size


def make_demo_model(where: str, steps: int = 300, seed: int = 0) -> str:
    """A small Llama over bytes, pretrained (all parameters) on ``lora_jax/data/pretrain.txt`` and
    saved as a Hugging Face checkpoint (``config.json`` + ``model.safetensors``, what PyTorch
    transformers loads)."""
    from lora_jax.models import build, config_from_hf, init_params

    cfg = config_from_hf({"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 192,
                          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                          "max_position_embeddings": 256, "tie_word_embeddings": False})
    model = build(cfg)
    params = init_params(model, jax.random.key(seed))
    with open(os.path.join(DATA, "pretrain.txt"), encoding="utf-8") as f:
        ids = byte_ids(f.read())
    warmup = max(1, min(20, steps // 10))  # short runs (a smoke test) warm up for a tenth of their steps
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, warmup, max(steps, warmup + 1), 3e-4))
    state = tx.init(params)

    @jax.jit
    def step(p, s, x):
        loss, g = jax.value_and_grad(lambda p: xent(model.apply({"params": p}, x[:, :-1]), x))(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    data = batches(ids, 16, 64, seed)
    t0 = time.perf_counter()
    first = None
    for i in range(1, steps + 1):
        params, state, loss = step(params, state, jnp.asarray(next(data)))
        first = float(loss) if first is None else first
    path = os.path.join(where, "tiny-llama")
    hf.save_merged(path, model, params)
    print(f"demo base: a {sum(x.size for x in jax.tree.leaves(params)):,}-parameter Llama over bytes, pretrained "
          f"{steps} steps on pretrain.txt (loss {first:.2f} -> {float(loss):.2f}, {time.perf_counter() - t0:.0f}s), "
          f"saved to {path}")
    return path


def tokenize(model_dir: str, text: str, vocab_size: int) -> tuple[np.ndarray, str]:
    """Token ids of ``text`` with the directory's tokenizer, or UTF-8 bytes when it has none."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any(os.path.isfile(os.path.join(model_dir, n)) for n in names):
        return byte_ids(text, vocab_size), "bytes"
    try:
        import transformers as tf

        tok = tf.AutoTokenizer.from_pretrained(model_dir)
        return np.asarray(tok(text)["input_ids"], np.int32), type(tok).__name__
    except Exception:  # no usable tokenizer files (or no tokenizers package): fall back to bytes
        return byte_ids(text, vocab_size), "bytes"


def batches(ids: np.ndarray, batch: int, seq_len: int, seed: int):
    rng = np.random.default_rng(seed)
    if len(ids) < seq_len + 2:
        raise SystemExit(f"the text has {len(ids)} tokens; need at least {seq_len + 2} for --seq-len {seq_len}")
    while True:
        starts = rng.integers(0, len(ids) - seq_len - 1, batch)
        yield np.stack([ids[s:s + seq_len + 1] for s in starts])


def windows(ids: np.ndarray, seq_len: int) -> np.ndarray:
    """Consecutive non-overlapping rows of ``seq_len + 1`` tokens covering ``ids`` (the held-out set)."""
    n = max((len(ids) - 1) // seq_len, 1)
    return np.stack([ids[k * seq_len:k * seq_len + seq_len + 1] for k in range(n)
                     if len(ids[k * seq_len:k * seq_len + seq_len + 1]) == seq_len + 1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?", help="local transformers checkpoint directory (causal LM)")
    ap.add_argument("--demo", action="store_true", help="pretrain a small Llama first and fine-tune it on another style")
    ap.add_argument("--pretrain-steps", type=int, default=300, help="--demo: full-parameter steps of the base")
    ap.add_argument("--text", default=None, help="training text file (default: README.md; finetune.txt with --demo)")
    ap.add_argument("--out", default=None, help="adapter directory (default: <workdir>/adapter)")
    ap.add_argument("--workdir", default=None, help="where --demo puts its model (default: a new temporary directory)")
    ap.add_argument("--preset", default="all-linear", choices=hf.PRESETS)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verify", action="store_true",
                    help="load the adapter in PyTorch PEFT and compare logits (needs torch and peft)")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    work = args.workdir or tempfile.mkdtemp(prefix="lora_jax_hf_")
    if args.demo:
        args.model_dir = make_demo_model(work, steps=args.pretrain_steps, seed=args.seed)
        args.text = args.text or os.path.join(DATA, "finetune.txt")
    if not args.model_dir:
        ap.error("give a model directory, or --demo")
    args.text = args.text or os.path.join(HERE, "..", "README.md")
    out = args.out or os.path.join(work, "adapter")

    model, params = hf.from_pretrained(args.model_dir)  # a linen module of lora_jax.models, NumPy params
    with open(args.text, encoding="utf-8") as f:
        ids, tokenizer = tokenize(args.model_dir, f.read(), model.config.vocab_size)
    split = int(0.9 * len(ids))
    train_ids, held_out = ids[:split], windows(ids[split:], args.seq_len)
    print(f"{type(model).__name__} ({model.config.model_type}): {os.path.basename(args.text)} -> {len(ids):,} tokens "
          f"({tokenizer}); the last tenth held out ({len(held_out)} rows of {args.seq_len})")

    lp = lora.init(params, hf.rules_for(model, args.preset, rank=args.rank, alpha=args.alpha), args.seed)
    print(lora.count(lp))
    trainable, frozen = lora.split(lp)
    tx = lora.freeze(optax.adamw(optax.warmup_cosine_decay_schedule(0.0, args.lr, max(args.steps // 10, 1),
                                                                      args.steps, args.lr / 10)), trainable)
    state = tx.init(trainable)

    def forward(p, x):
        return model.apply({"params": p}, x)

    fwd = lora.wrap(forward)  # factorized: x@W + s(x@A)@B, no weight-sized gradient for the frozen base

    @jax.jit
    def eval_loss(lp, rows):
        return xent(fwd(lp, rows[:, :-1]), rows)

    @jax.jit
    def step(t, s, x):
        loss, g = jax.value_and_grad(lambda t: xent(fwd(lora.combine(t, frozen), x[:, :-1]), x))(t)
        u, s = tx.update(g, s, t)
        return optax.apply_updates(t, u), s, loss

    rows = jnp.asarray(held_out)
    before = float(eval_loss(lp, rows))  # B = 0 at init: the base model's loss
    print(f"held-out loss of the base: {before:.4f}")
    data = batches(train_ids, args.batch, args.seq_len, args.seed)
    t0 = time.perf_counter()
    for i in range(1, args.steps + 1):
        trainable, state, loss = step(trainable, state, jnp.asarray(next(data)))
        if i == 1 or i % max(1, args.steps // 10) == 0 or i == args.steps:
            print(f"step {i:4d}  train loss {float(loss):.4f}  ({time.perf_counter() - t0:.1f}s)")
    lp = lora.combine(trainable, frozen)
    after = float(eval_loss(lp, rows))

    hf.save_peft(out, lp, model, base_model_name_or_path=os.path.abspath(args.model_dir), overwrite=bool(args.out))
    reloaded = hf.load_peft(out, params, model)  # from the files just written
    from_file = float(eval_loss(reloaded, rows))
    print(f"\nheld-out loss: base {before:.4f} -> with the adapter {after:.4f} "
          f"(perplexity {np.exp(before):.1f} -> {np.exp(after):.1f}); the adapter reloaded from {out}: "
          f"{from_file:.4f}")
    base = os.path.abspath(args.model_dir)
    print(f"\nPEFT adapter saved to {out}. Load it in PyTorch with:\n")
    print("from transformers import AutoModelForCausalLM")
    print("from peft import PeftModel")
    print(f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), {out!r})")
    print(f"\ndone in {time.perf_counter() - t_start:.0f}s")
    if not abs(from_file - after) <= 1e-4 * max(1.0, abs(after)):
        print(f"error: the reloaded adapter's loss {from_file} differs from the trained one's {after}")
        return 1

    if args.verify:
        import torch
        import transformers as tf
        from peft import PeftModel

        x = held_out[:2, :-1]
        pm = PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base), out).eval()
        with torch.no_grad():
            want = pm(torch.tensor(x, dtype=torch.long)).logits.numpy()
        got = np.asarray(jax.jit(fwd)(lp, jnp.asarray(x)))
        err = float(np.abs(got - want).max())
        print(f"\nverify: max |JAX - PyTorch PEFT| logits = {err:.2e}")
        if err > 1e-3:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

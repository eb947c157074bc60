"""LoRA-fine-tune a Hugging Face causal LM in JAX and hand the adapter to PyTorch PEFT.

    python examples/hf_finetune.py --demo                 # tiny random Llama, offline, ~1 minute on a CPU
    python examples/hf_finetune.py path/to/llama-dir --text corpus.txt --steps 200 --rank 16

Loads a local transformers checkpoint directory (``config.json`` + ``model.safetensors`` or
``flax_model.msgpack``) into transformers' Flax model without torch, puts LoRA on its linear
layers, trains a few steps of next-token prediction on a text file (the repo's README.md by
default), saves the adapter in PEFT format and prints the PyTorch code that loads it. Without a
tokenizer in the directory the text is tokenized byte by byte (ids = UTF-8 bytes, modulo the
vocabulary size).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lora
import lora_jax.hf as hf

HERE = os.path.dirname(os.path.abspath(__file__))


def make_demo_model(where: str) -> str:
    """A tiny random Llama (byte vocabulary), built and saved by PyTorch transformers."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
    path = os.path.join(where, "tiny-llama")
    tf.LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


def tokenize(model_dir: str, text: str, vocab_size: int) -> tuple[np.ndarray, str]:
    """Token ids of ``text`` with the directory's tokenizer, or UTF-8 bytes when it has none."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any(os.path.isfile(os.path.join(model_dir, n)) for n in names):
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) % vocab_size, "bytes"
    try:
        import transformers as tf

        tok = tf.AutoTokenizer.from_pretrained(model_dir)
        return np.asarray(tok(text)["input_ids"], np.int32), type(tok).__name__
    except Exception:  # no tokenizer files (or no tokenizers package): fall back to bytes
        ids = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) % vocab_size
        return ids, "bytes"


def batches(ids: np.ndarray, batch: int, seq_len: int, seed: int):
    rng = np.random.default_rng(seed)
    if len(ids) < seq_len + 2:
        raise SystemExit(f"the text has {len(ids)} tokens; need at least {seq_len + 2} for --seq-len {seq_len}")
    while True:
        starts = rng.integers(0, len(ids) - seq_len - 1, batch)
        yield np.stack([ids[s:s + seq_len + 1] for s in starts])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?", help="local transformers checkpoint directory (causal LM)")
    ap.add_argument("--demo", action="store_true", help="create a tiny random Llama first (needs torch)")
    ap.add_argument("--text", default=os.path.join(HERE, "..", "README.md"), help="training text file")
    ap.add_argument("--out", default=None, help="adapter directory (default: <workdir>/adapter)")
    ap.add_argument("--workdir", default=None, help="where --demo puts its model (default: a new temporary directory)")
    ap.add_argument("--preset", default="all-linear", choices=hf.PRESETS)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verify", action="store_true",
                    help="load the adapter in PyTorch PEFT and compare logits (needs torch and peft)")
    args = ap.parse_args(argv)

    work = args.workdir or tempfile.mkdtemp(prefix="lora_jax_hf_")
    if args.demo:
        args.model_dir = make_demo_model(work)
        print(f"demo: tiny random Llama saved by PyTorch transformers to {args.model_dir}")
    if not args.model_dir:
        ap.error("give a model directory, or --demo")
    out = args.out or os.path.join(work, "adapter")

    model, params = hf.from_pretrained(args.model_dir)
    with open(args.text, encoding="utf-8") as f:
        ids, tokenizer = tokenize(args.model_dir, f.read(), model.config.vocab_size)
    print(f"{type(model).__name__}: {args.text} -> {len(ids):,} tokens ({tokenizer})")

    lp = lora.init(params, hf.rules_for(model, args.preset, rank=args.rank, alpha=args.alpha), args.seed)
    print(lora.count(lp))
    trainable, frozen = lora.split(lp)
    tx = lora.freeze(optax.adamw(args.lr), trainable)
    state = tx.init(trainable)

    def forward(p, x):
        return model(x, attention_mask=jnp.ones_like(x), params=p).logits

    def loss_fn(t, x):
        logits = lora.wrap(forward)(lora.combine(t, frozen), x[:, :-1])  # factorized: x@W + s(x@A)@B
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), x[:, 1:]).mean()

    @jax.jit
    def step(t, s, x):
        loss, g = jax.value_and_grad(loss_fn)(t, x)
        u, s = tx.update(g, s, t)
        return optax.apply_updates(t, u), s, loss

    data = batches(ids, args.batch, args.seq_len, args.seed)
    t0 = time.perf_counter()
    for i in range(1, args.steps + 1):
        trainable, state, loss = step(trainable, state, jnp.asarray(next(data)))
        if i == 1 or i % max(1, args.steps // 10) == 0 or i == args.steps:
            print(f"step {i:4d}  loss {float(loss):.4f}  ({time.perf_counter() - t0:.1f}s)")
    lp = lora.combine(trainable, frozen)

    hf.save_peft(out, lp, model, base_model_name_or_path=os.path.abspath(args.model_dir), overwrite=bool(args.out))
    base = os.path.abspath(args.model_dir)
    print(f"\nPEFT adapter saved to {out}. Load it in PyTorch with:\n")
    print("from transformers import AutoModelForCausalLM")
    print("from peft import PeftModel")
    print(f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), {out!r})")

    if args.verify:
        import torch
        import transformers as tf
        from peft import PeftModel

        x = next(data)[:2, :-1]
        pm = PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base), out).eval()
        with torch.no_grad():
            want = pm(torch.tensor(x, dtype=torch.long)).logits.numpy()
        got = np.asarray(jax.jit(lora.wrap(forward))(lp, jnp.asarray(x)))
        err = float(np.abs(got - want).max())
        print(f"\nverify: max |JAX - PyTorch PEFT| logits = {err:.2e}")
        if err > 1e-3:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

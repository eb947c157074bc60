"""Tiny builders shared by the tests of `lora_jax.train` (hidden 32, 2 layers, seq 32)."""

import functools

import numpy as np

TINY_INIT = {"arch": "llama", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
             "tie_word_embeddings": False}
VOCAB = 97


def tiny_overrides(out_dir, **extra):
    """``key=value`` overrides for a whole `lora-jax train` run that takes seconds."""
    o = {"out_dir": str(out_dir), "tokenizer.vocab_size": 300, "data.seq_len": 32,
         "model.pretrain.steps": 2, "model.pretrain.batch_size": 8, "model.pretrain.warmup_steps": 1,
         "lora.rank": 4, "lora.alpha": 8, "train.steps": 4, "train.batch_size": 8, "train.warmup_steps": 1,
         "train.eval_every": 2, "train.eval_batches": 1, "train.log_every": 1, "train.checkpoint_every": 2,
         "train.progress": False}
    o.update({f"model.init.{k}": v for k, v in TINY_INIT.items() if k != "arch"})
    o.update(extra)
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in o.items()]


@functools.lru_cache(maxsize=None)
def tiny_model(seed=0):
    from lora_jax.train.model import new_model

    return new_model(TINY_INIT, vocab_size=VOCAB, seed=seed)


def synthetic_rows(n_docs=40, seq_len=32, seed=0):
    """Packed rows of documents with a learnable pattern (counting mod 90, random starts)."""
    from lora_jax.train.data import pack

    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        n = int(rng.integers(8, 40))
        start = int(rng.integers(0, 90))
        ids = np.array([1] + [3 + (start + k) % 90 for k in range(n)] + [2], np.int32)
        w = np.ones(ids.size, np.float32)
        w[0] = 0
        docs.append((ids, w))
    return pack(docs, seq_len, pad_id=0)


# ---- a toy model for loop-level tests: a bigram table, microscopic and cheap to step ---------

TOY_VOCAB, TOY_DIM, POISON = 16, 4, 1


def toy_params(seed=0):
    rng = np.random.default_rng(seed)
    return {"emb": (rng.standard_normal((TOY_VOCAB, TOY_DIM)) * 0.5).astype(np.float32),
            "out": (rng.standard_normal((TOY_DIM, TOY_VOCAB)) * 0.5).astype(np.float32)}


def toy_logits(tr, fr, x, m, rng):
    """``emb[x] @ out``; every row holding the token `POISON` gets NaN logits (a stand-in for a
    batch that makes a real model overflow)."""
    import jax.numpy as jnp

    logits = tr["emb"][x] @ tr["out"]
    bad = jnp.any(x == POISON, axis=-1)[:, None, None]
    return jnp.where(bad, jnp.nan, logits)


def toy_rows(n=128, seq_len=8, seed=0):
    """``n`` random rows of tokens 2..TOY_VOCAB-1 (no `POISON`), every token a target."""
    from lora_jax.train.data import Rows

    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, TOY_VOCAB, (n, seq_len + 1)).astype(np.int32)
    weights = np.ones(tokens.shape, np.float32)
    weights[:, 0] = 0
    return Rows(tokens, weights, np.ones(tokens.shape, bool))


def poison_steps(rows, steps, batch_size, seed=0):
    """Put `POISON` into one row of each batch of ``steps`` (1-based), following the trainer's
    data order (`data.Order` with ``seed``)."""
    from lora_jax.train.data import Order

    order = Order(len(rows), seed)
    for s in steps:
        rows.tokens[order.take((s - 1) * batch_size, batch_size)[0], 3] = POISON
    return rows

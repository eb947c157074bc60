"""Packing by documents (issue 20.3): a packed row's loss and gradients equal its documents' one at
a time, in every decoder family, and the layout (best-fit decreasing, segments, positions) is the
one the data module states."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lora
from lora_jax.train import data as D
from helpers import _random_params, nonzero_b

V = 97
# one per decoder module (llama.py with a sliding window, moe.py, gemma.py with and without soft-capped
# attention, phi3.py, gpt2.py with learned positions)
FAMILIES = {
    "mistral-window": {"model_type": "mistral", "num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 48,
                       "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
                       "sliding_window": 4, "head_dim": 8},
    "gemma2": {"model_type": "gemma2", "num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 48,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "head_dim": 8,
               "sliding_window": 4, "query_pre_attn_scalar": 8},
    "gemma3": {"model_type": "gemma3_text", "num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 48,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "head_dim": 8,
               "sliding_window": 4, "query_pre_attn_scalar": 8},
    "olmo2": {"model_type": "olmo2", "num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 48,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64},
    "phi3": {"model_type": "phi3", "num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 48,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64},
    "gpt2": {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 4, "n_positions": 64},
    "gpt_oss": {"model_type": "gpt_oss", "num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 16,
                "num_local_experts": 4, "num_experts_per_tok": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "max_position_embeddings": 64, "head_dim": 8, "sliding_window": 4},
    "qwen3_moe": {"model_type": "qwen3_moe", "num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 48,
                  "moe_intermediate_size": 16, "num_experts": 4, "num_experts_per_tok": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "head_dim": 8},
}


def _documents(seed=0, lengths=(5, 9, 3, 12, 7, 2, 16, 4)):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = rng.integers(3, V, n).astype(np.int32)
        w = (rng.random(n) < 0.8).astype(np.uint8)
        out.append((ids, w))
    return out


def _stats(model, params, rows, chunked=False):
    from lora_jax.train.model import lora_loss_fn

    lp = nonzero_b(lora.init(params, lora.Rules("all-linear", rank=4, alpha=8), jax.random.key(1)))
    trainable, frozen = lora.split(lp)
    loss = lora_loss_fn(model, chunked=chunked)
    b = {k: jnp.asarray(v) for k, v in rows.batch(np.arange(len(rows))).items()}
    f = jax.jit(jax.value_and_grad(lambda t: loss(t, frozen, b, None)[0]))
    return f(trainable)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_rows_equal_documents_one_at_a_time(family):
    """The summed loss of rows packed by documents (several per row, attention and positions per
    document) equals the documents' losses each in a row of its own (no mask, positions from 0),
    and so do the gradients of every LoRA factor (float32)."""
    import lora_jax.models as models

    module = models.build(models.config_from_hf({**FAMILIES[family], "vocab_size": V}), "causal_lm")
    params = _random_params(module)
    docs = _documents()
    packed = D.pack(docs, seq_len=16, pad_id=0, packing="documents")
    alone = D.pack(docs, seq_len=16, pad_id=0, packing="none")
    assert len(packed) < len(alone) and packed.segments.max() >= 3  # documents do share rows
    assert packed.n_targets == alone.n_targets
    nll_p, g_p = _stats(module, params, packed)
    nll_a, g_a = _stats(module, params, alone)
    assert abs(float(nll_p) - float(nll_a)) <= 1e-6 * abs(float(nll_a))
    for (kp, x), y in zip(jax.tree_util.tree_leaves_with_path(g_p), jax.tree_util.tree_leaves(g_a)):
        x, y = np.asarray(x), np.asarray(y)
        scale = max(float(np.abs(y).max()), 1e-6)
        assert float(np.abs(x - y).max()) <= 1e-5 * scale, jax.tree_util.keystr(kp)


def test_packed_rows_differ_from_stream_rows():
    """The check above can fail: the same documents concatenated (attention across documents)
    give another loss."""
    import lora_jax.models as models

    module = models.build(models.config_from_hf({**FAMILIES["mistral-window"], "vocab_size": V}), "causal_lm")
    params = _random_params(module)
    docs = _documents()
    nll_s, _ = _stats(module, params, D.pack(docs, seq_len=16, pad_id=0, packing="stream"))
    nll_a, _ = _stats(module, params, D.pack(docs, seq_len=16, pad_id=0, packing="none"))
    assert abs(float(nll_s) - float(nll_a)) > 1e-3 * abs(float(nll_a))


def test_chunked_loss_on_packed_rows():
    """The chunked head (the trainer's default loss) reads the same document mask and positions."""
    import lora_jax.models as models

    module = models.build(models.config_from_hf({**FAMILIES["gemma2"], "vocab_size": V}), "causal_lm")
    params = _random_params(module)
    docs = _documents(seed=3)
    nll_c, _ = _stats(module, params, D.pack(docs, seq_len=16, pad_id=0), chunked=True)
    nll_a, _ = _stats(module, params, D.pack(docs, seq_len=16, pad_id=0, packing="none"))
    assert abs(float(nll_c) - float(nll_a)) <= 1e-6 * abs(float(nll_a))


def test_layout_by_hand():
    """Best-fit decreasing, pieces of long documents, segment ids, positions and weights, by hand."""
    doc = lambda n, start: (np.arange(start, start + n, dtype=np.int32), np.ones(n, np.uint8))  # noqa: E731
    # lengths 3, 5, 2, 9 in rows of 6: 9 -> [0:6] + [5:9] (overlap one); pieces 6, 5, 4, 3, 2
    rows = D.pack([doc(3, 10), doc(5, 20), doc(2, 30), doc(9, 40)], seq_len=5, pad_id=0)
    assert rows.tokens.tolist() == [[40, 41, 42, 43, 44, 45], [20, 21, 22, 23, 24, 0],
                                    [45, 46, 47, 48, 30, 31], [10, 11, 12, 0, 0, 0]]
    assert rows.segments.tolist() == [[1] * 6, [1] * 5 + [0], [1, 1, 1, 1, 2, 2], [1, 1, 1, 0, 0, 0]]
    assert rows.positions.tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 0], [0, 1, 2, 3, 0, 1],
                                       [0, 1, 2, 0, 0, 0]]
    # a piece's first token is never a target: 45 was trained as the last target of row 0
    assert rows.weights.tolist() == [[0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 0, 1],
                                     [0, 1, 1, 0, 0, 0]]
    assert rows.n_targets == 2 + 4 + 1 + 8  # every token but each document's first
    b = rows.batch(np.array([2]))
    assert b["mask"].tolist() == [[1, 1, 1, 1, 2]] and b["positions"].tolist() == [[0, 1, 2, 3, 0]]


def test_bfd_fills_rows_tightly_and_keeps_every_piece():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, 2000)
    ptr, pdoc, poff, plen = D.plan_documents(lengths, seq_len=127)
    used = np.add.reduceat(plen, ptr[:-1])
    assert (used <= 128).all()
    # every token of every document with 2+ tokens is covered; pieces overlap by exactly one token
    for d in np.flatnonzero(lengths >= 2)[:200]:
        mine = sorted(zip(poff[pdoc == d], plen[pdoc == d]))
        assert mine[0][0] == 0 and mine[-1][0] + mine[-1][1] == lengths[d]
        assert all(a + n - 1 == b for (a, n), (b, _) in zip(mine, mine[1:]))
    assert not (pdoc[:, None] == np.flatnonzero(lengths < 2)[None, :]).any()
    # best fit decreasing: near the lower bound of rows
    pieces = int(plen.sum())
    assert len(ptr) - 1 <= 1.02 * np.ceil(pieces / 128) + 1

"""The chunked cross-entropy (`lora_jax.train.loss`): the same weighted loss and gradients as the
plain log-softmax of the full logits (float32, rtol 1e-6) for a kernel, a tied embedding, Gemma's
soft-capped head and LoRA / quantized heads through ``lora.wrap`` (kept factorized: no
MaterializeWarning), and a fraction of the plain form's compiled temporary memory at the
Llama-3.2-1B head shape (hidden 2048, vocabulary 128,256; compiled only, nothing allocated)."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lora
from lora_jax.models import build, init_params
from lora_jax.models.gemma import GemmaConfig
from lora_jax.models.gpt2 import GPT2Config
from lora_jax.models.llama import LlamaConfig
from lora_jax.models.phi3 import Phi3Config
from lora_jax.train.loss import auto_chunk, chunked_token_stats, cross_entropy, token_stats
from lora_jax.train.model import lora_loss_fn, lora_rules, make_stats

B, T, D, V = 2, 13, 16, 97


def _close(a, b, rtol=1e-6, atol=0.0):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol)


def _close_grad(a, b):
    """rtol 1e-6, with an atol of 1e-6 x the gradient's largest entry: a head-kernel gradient summed
    chunk by chunk instead of in one matmul may cancel differently in its smallest entries."""
    b = np.asarray(b, np.float64)
    assert np.abs(b).max() > 0
    _close(a, b, rtol=1e-6, atol=1e-6 * np.abs(b).max())


def _batch(key, b=B, t=T, vocab=V):
    targets = jax.random.randint(key, (b, t), 0, vocab)
    weights = jnp.ones((b, t), jnp.float32).at[0, t - 4:].set(0.0)  # right padding: weight 0
    weights = weights.at[1, :3].set(0.5)  # and fractional weights
    return targets, weights


def _mean_plain(h, head, targets, weights):
    logits = head(h) if callable(head) else h @ head
    nll, _ = token_stats(logits, targets, weights)
    return nll / jnp.maximum(weights.sum(), 1.0)


@pytest.mark.parametrize("chunk", [1, 5, 13, None])
def test_same_loss_and_grads_as_plain_for_a_kernel(chunk):
    kh, kw, kb = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(kh, (B, T, D), jnp.float32)
    w = 0.5 * jax.random.normal(kw, (D, V), jnp.float32)
    targets, weights = _batch(kb)

    plain = jax.value_and_grad(_mean_plain, argnums=(0, 1))(h, w, targets, weights)
    chunked = jax.value_and_grad(lambda h_, w_: cross_entropy(h_, w_, targets, weights, chunk=chunk),
                                 argnums=(0, 1))(h, w)
    (lp, (gh_p, gw_p)), (lc, (gh_c, gw_c)) = plain, chunked
    assert float(lp) > 1.0 and float(lp) < 20.0  # a real loss, not a degenerate one
    _close(lc, lp)
    _close_grad(gh_c, gh_p)
    _close_grad(gw_c, gw_p)
    # padded positions get no gradient; the others do
    assert float(jnp.abs(gh_c[0, T - 4:]).max()) == 0.0 and float(jnp.abs(gh_c[0, :T - 4]).min()) > 0.0
    # the accuracy sum too
    assert float(chunked_token_stats(h, w, targets, weights, chunk=chunk)[1]) == \
        float(token_stats(h @ w, targets, weights)[1])


def test_tied_embedding_and_callable_heads():
    kh, ke, kb = jax.random.split(jax.random.key(1), 3)
    h = jax.random.normal(kh, (B, T, D), jnp.float32)
    emb = 0.5 * jax.random.normal(ke, (V, D), jnp.float32)  # a tied (V, D) embedding
    targets, weights = _batch(kb)
    cap = 3.0

    def head(x, e):  # soft-capped as Gemma's final logits
        return jnp.tanh((x @ e.T) / cap) * cap

    plain = jax.value_and_grad(lambda h_, e_: _mean_plain(h_, lambda x: head(x, e_), targets, weights),
                               argnums=(0, 1))(h, emb)
    for make in (lambda e_: e_.T, lambda e_: (lambda x: x @ e_.T)):  # the transposed table, a callable
        got = jax.value_and_grad(lambda h_, e_: _mean_plain(h_, make(e_), targets, weights), argnums=(0, 1))(h, emb)
        want = jax.value_and_grad(lambda h_, e_: cross_entropy(h_, make(e_), targets, weights, chunk=4),
                                  argnums=(0, 1))(h, emb)
        _close(want[0], got[0])
        for a, b in zip(want[1], got[1]):
            _close_grad(a, b)
    # chunk=None: the chunk comes from a float32-logit budget (here 3 positions x all rows -> 2)
    auto = jax.value_and_grad(lambda h_, e_: cross_entropy(h_, lambda x: head(x, e_), targets, weights,
                                                           chunk_bytes=4 * B * V * 3), argnums=(0, 1))(h, emb)
    _close(auto[0], plain[0])
    for a, b in zip(auto[1], plain[1]):
        _close_grad(a, b)
    capped = jax.value_and_grad(lambda h_, e_: cross_entropy(h_, lambda x: head(x, e_), targets, weights, chunk=3),
                                argnums=(0, 1))(h, emb)
    _close(capped[0], plain[0])
    for a, b in zip(capped[1], plain[1]):
        _close_grad(a, b)


def test_auto_chunk_and_bad_inputs():
    assert auto_chunk(8, 1024, 128256) == 64 and auto_chunk(1, 1024, 128256) == 512
    assert auto_chunk(8, 1024, 97) == 1024 and auto_chunk(1000, 4, 128256) == 1
    h, w = jnp.zeros((B, T, D)), jnp.zeros((D, V))
    t, wt = jnp.zeros((B, T), jnp.int32), jnp.ones((B, T))
    with pytest.raises(ValueError, match="chunk"):
        chunked_token_stats(h, w, t, wt, chunk=0)
    with pytest.raises(ValueError, match="targets"):
        chunked_token_stats(h, w, t[:, :-1], wt, chunk=4)
    with pytest.raises(TypeError, match="2-D kernel"):
        chunked_token_stats(h, jnp.zeros((D, V, 1)), t, wt)


# ---------------------------------------------------------------------------------------------
# the models' hidden/logits halves, and the trainer's loss through lora.wrap
# ---------------------------------------------------------------------------------------------
_SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
CONFIGS = {
    "llama": LlamaConfig(**_SMALL),
    "llama_tied": LlamaConfig(**_SMALL, tie_word_embeddings=True),
    "gemma2_softcap": GemmaConfig(**_SMALL, head_dim=8, model_type="gemma2", final_logit_softcapping=2.0,
                                  attn_logit_softcapping=50.0, sliding_window=4),
    "phi3": Phi3Config(**_SMALL),
    "gpt2": GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64),
}


def _spread(tree, seed, std=0.3):
    """Every leaf plus N(0, std) noise (on the host: no per-shape compiles), so logits are O(1)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x) + std * rng.standard_normal(x.shape)
                                                        .astype(np.asarray(x).dtype)), tree)


@functools.lru_cache(maxsize=None)
def _model(name):
    model = build(CONFIGS[name])
    return model, _spread(init_params(model, jax.random.key(0)), 1)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hidden_and_logits_halves_are_the_model(name):
    model, params = _model(name)
    ids = jax.random.randint(jax.random.key(2), (B, T), 0, V)

    @jax.jit
    def both(p, x):
        h, cache = model.apply(p, x, method="hidden")
        return model.apply(p, x), h, model.apply(p, h, method="logits"), cache

    full, h, halves, cache = both({"params": params}, ids)
    assert cache is None and h.shape == (B, T, 32)
    assert halves.dtype == jnp.float32 and float(jnp.std(full)) > 0.1
    np.testing.assert_array_equal(np.asarray(halves), np.asarray(full))
    if name == "gemma2_softcap":  # the head's soft-capping is in the logits half
        assert float(jnp.abs(full).max()) <= 2.0


# LoRA on the LM head of llama / phi3 and on the tied embedding of llama_tied (the head, in each chunk)
LORA_TARGETS = {"llama": ["q_proj", "v_proj", "lm_head"], "llama_tied": ["q_proj", "embed_tokens"],
                "gemma2_softcap": ["q_proj", "v_proj"], "phi3": ["qkv_proj", "lm_head"], "gpt2": ["c_attn"]}


def _lora_setup(name, quantized=False):
    model, params = _model(name)
    lp = lora.init(params, lora_rules(model, LORA_TARGETS[name], rank=4, alpha=8), jax.random.key(3))
    lp = jax.tree_util.tree_map(lambda x: x.replace(a=_spread(x.a, 4), b=_spread(x.b, 5)) if lora.is_lora(x) else x,
                                lp, is_leaf=lora.is_lora)  # both factors non-zero: both get gradients
    if quantized:
        lp = lora.quantize(lp, "int8", block=16)
    ids = jax.random.randint(jax.random.key(5), (B, T + 1), 0, V)
    tg, wt = _batch(jax.random.key(6))
    batch = {"inputs": ids[:, :-1], "targets": tg, "weights": wt, "mask": jnp.ones((B, T), jnp.int32)}
    return model, lp, batch


@pytest.mark.parametrize("name,quantized", [("llama", True), ("llama_tied", False), ("gemma2_softcap", False)])
def test_trainer_loss_through_wrap_matches_plain(name, quantized):
    """The trainer's chunked loss (`lora_loss_fn`) against the plain one, gradients w.r.t. the
    LoRA factors through ``lora.wrap``: of an LM head over an int8-quantized base (llama), of the
    tied embedding (llama_tied), under Gemma 2's final soft-capping."""
    model, lp, batch = _lora_setup(name, quantized)
    trainable, frozen = lora.split(lp)
    plain = lora_loss_fn(model, chunked=False)
    chunked = lora_loss_fn(model, chunk=4)

    def grad(loss):
        return jax.jit(jax.value_and_grad(lambda tr: loss(tr, frozen, batch, None), has_aux=True))(trainable)

    with warnings.catch_warnings():
        warnings.simplefilter("error", lora.MaterializeWarning)  # the head stays factorized in every chunk
        (nll_p, cor_p), g_p = grad(lambda *a: plain(*a))
        (nll_c, cor_c), g_c = grad(lambda *a: chunked(*a))
    assert float(nll_p) > 1.0
    _close(nll_c, nll_p)
    assert float(cor_c) == float(cor_p)
    flat_p, flat_c = jax.tree_util.tree_leaves(g_p), jax.tree_util.tree_leaves(g_c)
    assert len(flat_p) == len(flat_c) > 0
    for a, b in zip(flat_c, flat_p):
        _close_grad(a, b)
    head = {"llama": ("lm_head", "kernel"), "phi3": ("lm_head", "kernel"),
            "llama_tied": ("model", "embed_tokens", "embedding")}.get(name)
    if head is not None:  # the head's factors are trained through the chunks
        g = g_c
        for k in head:
            g = g[k]
        assert float(jnp.abs(g.a).max()) > 1e-4 and float(jnp.abs(g.b).max()) > 1e-4


def test_make_stats_needs_the_model_halves():
    class NoHalves:
        pass
    with pytest.raises(TypeError, match="hidden/logits"):
        make_stats(NoHalves())
    make_stats(NoHalves(), chunked=False)


# ---------------------------------------------------------------------------------------------
# memory at the Llama-3.2-1B head shape (compiled, never run)
# ---------------------------------------------------------------------------------------------
def _temp_bytes(f, *args):
    return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("rows,chunk", [(1, 128), (8, None)])
def test_chunked_temp_memory_at_the_llama32_1b_head_is_a_third_of_plain(rows, chunk):
    hidden, vocab, seq = 2048, 128256, 1024
    args = (jax.ShapeDtypeStruct((rows, seq, hidden), jnp.float32), jax.ShapeDtypeStruct((hidden, vocab), jnp.float32),
            jax.ShapeDtypeStruct((rows, seq), jnp.int32), jax.ShapeDtypeStruct((rows, seq), jnp.float32))

    def plain(h, w, t, wt):
        return token_stats(h @ w, t, wt)[0]

    def chunked(h, w, t, wt):
        return chunked_token_stats(h, w, t, wt, chunk=chunk)[0]

    # the LoRA case: the head is frozen, the gradient flows to the hidden states
    p = _temp_bytes(jax.value_and_grad(plain), *args)
    c = _temp_bytes(jax.value_and_grad(chunked), *args)
    logits_bytes = rows * seq * vocab * 4
    print(f"\n{rows}x{seq} tokens, vocab {vocab}: plain {p / 2**20:.0f} MiB, chunked {c / 2**20:.0f} MiB "
          f"(ratio {c / p:.3f}; float32 logits {logits_bytes / 2**20:.0f} MiB)")
    assert p >= logits_bytes  # the plain form holds at least the full float32 logits
    assert c <= p / 3


@pytest.mark.parametrize("chunked", [False, True])
def test_frozen_tied_head_gets_no_weight_gradient_and_its_matmuls_stay_bf16(chunked):
    """In a bf16 LoRA step on a tied-embedding Llama (plain and chunked loss), no matmul forms a
    (vocab, hidden) gradient for the frozen head, and every matmul touching the vocabulary axis takes
    bf16 operands (never a float32 head matmul, forward or backward)."""
    v, d = 1024, 64
    cfg = LlamaConfig(vocab_size=v, hidden_size=d, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True, dtype="bfloat16", param_dtype="bfloat16")
    model = build(cfg)
    lp = lora.init(init_params(model, jax.random.key(0)), lora_rules(model, "all-linear", rank=4), jax.random.key(1))
    train, rest = lora.split(lp)
    toks = jnp.zeros((2, 33), jnp.int32)
    b = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "weights": jnp.ones((2, 32))}
    fn = lora_loss_fn(model, chunked=chunked, chunk=8)
    jaxpr = jax.make_jaxpr(jax.grad(lambda t: fn(t, rest, b, None)[0]))(train)

    def dots(jx):
        for eqn in jx.eqns:
            if eqn.primitive.name == "dot_general":
                yield eqn
            for p in eqn.params.values():
                subs = p if isinstance(p, (list, tuple)) else [p]
                for sub in subs:
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        yield from dots(inner)

    head = [e for e in dots(jaxpr.jaxpr) if any(v in x.aval.shape for x in e.invars + e.outvars)]
    assert len(head) >= 2, "expected the head's forward and input-gradient matmuls"
    for e in head:
        assert all(x.aval.dtype == jnp.bfloat16 for x in e.invars), (e, [x.aval.dtype for x in e.invars])
        assert tuple(e.outvars[0].aval.shape) not in ((v, d), (d, v)), f"a weight gradient of the frozen head: {e}"

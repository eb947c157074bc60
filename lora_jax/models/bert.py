"""BERT in Flax linen: ``BertModel`` (``"base"``) and ``BertForSequenceClassification`` (``"seq_cls"``).

A post-LayerNorm bidirectional encoder: word + absolute position + token-type embeddings and a
LayerNorm, then per layer self-attention (``query``/``key``/``value``, ``attention.output.dense``,
residual and LayerNorm) and a feed-forward block (``intermediate.dense``, activation,
``output.dense``, residual and LayerNorm). The pooler is ``tanh(dense(h[:, 0]))``; the
classifier reads the pooled vector. The layers run under ``nn.scan`` (weights stacked on a
leading layer axis) with an optional ``nn.remat`` policy; LayerNorm is computed in float32 and
attention goes through `layers.attention` with the padding mask.

Parameter tree of the ``"seq_cls"`` head (``L`` layers, ``D`` hidden, ``F`` intermediate, ``V``
vocab, ``P`` positions, ``S`` token types, ``C`` labels); kernels are ``(in, out)`` (PyTorch's
``nn.Linear`` stores the transpose)::

    bert/embeddings/word_embeddings/embedding           (V, D)
    bert/embeddings/position_embeddings/embedding       (P, D)
    bert/embeddings/token_type_embeddings/embedding     (S, D)
    bert/embeddings/LayerNorm/scale, bias               (D,)
    bert/encoder/layer/attention/self/query/kernel      (L, D, D)  (+ bias (L, D)); also key, value
    bert/encoder/layer/attention/output/dense/kernel    (L, D, D)  (+ bias)
    bert/encoder/layer/attention/output/LayerNorm/scale, bias  (L, D)
    bert/encoder/layer/intermediate/dense/kernel        (L, D, F)  (+ bias)
    bert/encoder/layer/output/dense/kernel              (L, F, D)  (+ bias)
    bert/encoder/layer/output/LayerNorm/scale, bias     (L, D)
    bert/pooler/dense/kernel                            (D, D)     (+ bias)
    classifier/kernel                                   (D, C)     (+ bias)

The ``"base"`` head (`BertModel`) is the same tree without ``bert/`` and ``classifier``, and
without ``pooler`` when ``add_pooling_layer=False``. PEFT's default LoRA targets are ``query``
and ``value``: ``lora.Rules(["query", "value"], stack_axes=1)``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lora_jax.models.family import init_params
  >>> cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
  ...                  intermediate_size=64, max_position_embeddings=64, num_labels=3)
  >>> model = BertForSequenceClassification(cfg)
  >>> model.apply({"params": init_params(model, jax.random.key(0))}, jnp.ones((2, 8), jnp.int32)).shape
  (2, 3)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp

from .family import Family, Leaf, strip_prefix
from .layers import (ACTIVATIONS, ATTENTION_IMPLS, LayerNorm, attention, attention_impl, canon_dtype,
                     check_remat_policy, dense, positive_int, scan_layers)

__all__ = ["BertConfig", "BertModel", "BertForSequenceClassification", "from_hf_config", "FAMILY"]

PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hyper-parameters of a BERT encoder (hashable: usable as a static ``jit`` argument).

    Field names follow transformers' ``BertConfig``; ``num_labels`` is the classifier's width
    and ``id2label`` (optional) the label names in index order (a tuple; a ``{id: name}`` dict
    is accepted). ``add_pooling_layer`` is transformers' ``BertModel`` constructor argument: the
    base model without a pooler (``BertForSequenceClassification`` always has one). The
    additions are ``dtype`` (compute), ``param_dtype``, ``attention_impl`` (None = cuDNN on a GPU
    in bf16/fp16 where it applies, XLA otherwise; ``"xla"``; ``"cudnn"``) and ``remat_policy``
    (a `layers.REMAT_POLICIES` name, a ``jax.checkpoint_policies`` callable, or None). Dropout
    rates are not kept: the modules are deterministic (LoRA dropout belongs to ``lora.wrap``).

    Example:
      >>> cfg = BertConfig(hidden_size=64, num_attention_heads=4, id2label={0: "neg", 1: "pos"})
      >>> cfg.head_dim, cfg.num_labels, cfg.id2label
      (16, 2, ('neg', 'pos'))
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    num_labels: Optional[int] = None
    id2label: Any = None
    problem_type: Optional[str] = None
    add_pooling_layer: bool = True
    model_type: str = "bert"
    bos_token_id: Optional[int] = None
    eos_token_id: Any = None
    pad_token_id: Optional[int] = 0
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    attention_impl: Optional[str] = None
    remat_policy: Any = None
    scan_unroll: int = 1

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            set_(name, positive_int(getattr(self, name), f"BertConfig.{name}"))
        if self.model_type != "bert":
            raise ValueError(f"BertConfig.model_type must be 'bert', got {self.model_type!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"BertConfig: hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"BertConfig.hidden_act must be one of {sorted(ACTIVATIONS)}, got {self.hidden_act!r}")
        labels = self.id2label
        if labels is not None:
            if isinstance(labels, Mapping):
                try:
                    ids = sorted(int(k) for k in labels)
                except (TypeError, ValueError):
                    raise ValueError(f"BertConfig.id2label: keys must be label indices, got {sorted(labels)}") from None
                if ids != list(range(len(ids))):
                    raise ValueError(f"BertConfig.id2label: keys must be 0..n-1, got {ids}")
                by_id = {int(k): v for k, v in labels.items()}
                labels = tuple(str(by_id[i]) for i in ids)
            else:
                labels = tuple(str(v) for v in labels)
            set_("id2label", labels)
        if self.num_labels is None:
            set_("num_labels", len(labels) if labels is not None else 2)
        set_("num_labels", positive_int(self.num_labels, "BertConfig.num_labels"))
        if labels is not None and len(labels) != self.num_labels:
            raise ValueError(f"BertConfig: num_labels={self.num_labels} but id2label names {len(labels)} labels")
        if self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"BertConfig.problem_type must be one of {PROBLEM_TYPES}, got {self.problem_type!r}")
        set_("add_pooling_layer", bool(self.add_pooling_layer))
        set_("dtype", canon_dtype(self.dtype, "BertConfig.dtype"))
        set_("param_dtype", canon_dtype(self.param_dtype, "BertConfig.param_dtype"))
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"BertConfig.attention_impl must be one of {ATTENTION_IMPLS}, "
                             f"got {self.attention_impl!r}")
        check_remat_policy(self.remat_policy, "BertConfig.remat_policy")
        object.__setattr__(self, "scan_unroll", positive_int(self.scan_unroll, "BertConfig.scan_unroll"))
        if isinstance(self.eos_token_id, (list, tuple)):
            set_("eos_token_id", tuple(int(t) for t in self.eos_token_id))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def labels(self) -> tuple[str, ...]:
        """The label names in index order (``LABEL_i`` where ``id2label`` is not given)."""
        return self.id2label if self.id2label is not None else tuple(f"LABEL_{i}" for i in range(self.num_labels))

    def replace(self, **changes) -> "BertConfig":
        """A copy with some fields changed (``cfg.replace(dtype="bfloat16")``)."""
        if "num_labels" in changes and "id2label" not in changes:
            changes["id2label"] = None
        elif "id2label" in changes and "num_labels" not in changes:
            changes["num_labels"] = None
        return dataclasses.replace(self, **changes)

    def to_hf_config(self) -> dict:
        """The ``config.json`` dict transformers 5 builds this model from (``architectures`` aside).

        ``add_pooling_layer`` is a constructor argument in transformers, not a config field, so it
        is not written (``BertModel.from_pretrained`` of a pooler-less checkpoint initialises a
        random pooler, which the last hidden state does not depend on).
        """
        names = self.labels
        return dict(
            model_type="bert", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size, hidden_act=self.hidden_act,
            max_position_embeddings=self.max_position_embeddings, type_vocab_size=self.type_vocab_size,
            layer_norm_eps=self.layer_norm_eps, initializer_range=self.initializer_range,
            id2label={str(i): n for i, n in enumerate(names)}, label2id={n: i for i, n in enumerate(names)},
            problem_type=self.problem_type, bos_token_id=self.bos_token_id, pad_token_id=self.pad_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            dtype={"bfloat16": "bfloat16", "float16": "float16"}.get(self.param_dtype.name, "float32"),
        )


def from_hf_config(hf: Mapping[str, Any], **overrides) -> BertConfig:
    """A `BertConfig` from a transformers ``config.json`` dict (``model_type`` ``"bert"``),
    ``overrides`` applied.

    The number of labels comes from ``id2label`` (else ``num_labels``, else 2). Every field whose
    feature is not implemented (a ``position_embedding_type`` other than ``"absolute"``, the
    decoder / cross-attention variants, an unknown activation) is named in one ValueError, never
    silently different outputs.

    Example:
      >>> cfg = from_hf_config({"model_type": "bert", "hidden_size": 32, "num_attention_heads": 4,
      ...                       "id2label": {"0": "neg", "1": "neutral", "2": "pos"}})
      >>> cfg.num_labels, cfg.labels[2]
      (3, 'pos')
    """
    d = dict(hf)
    mt = d.get("model_type", "bert")
    if mt != "bert":
        raise ValueError(f"from_hf_config: model_type {mt!r} is not BERT (expected 'bert')")
    problems = []
    pe = d.get("position_embedding_type", "absolute")
    if pe not in (None, "absolute"):
        problems.append(f"position_embedding_type={pe!r} (only 'absolute' position embeddings)")
    if d.get("is_decoder"):
        problems.append(f"is_decoder={d['is_decoder']!r} (causal BERT is not implemented; the encoder is)")
    if d.get("add_cross_attention"):
        problems.append(f"add_cross_attention={d['add_cross_attention']!r} (cross-attention is not implemented)")
    act = d.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        problems.append(f"hidden_act={act!r} (supported: {sorted(ACTIVATIONS)})")
    if problems:
        raise ValueError("from_hf_config: this bert config uses features lora_jax does not implement, so its "
                         "outputs would differ from transformers': " + "; ".join(problems))
    id2label = d.get("id2label") or None
    kw = dict(
        vocab_size=d.get("vocab_size", 30522), hidden_size=d.get("hidden_size", 768),
        num_hidden_layers=d.get("num_hidden_layers", 12), num_attention_heads=d.get("num_attention_heads", 12),
        intermediate_size=d.get("intermediate_size", 3072), hidden_act=act,
        max_position_embeddings=d.get("max_position_embeddings", 512), type_vocab_size=d.get("type_vocab_size", 2),
        layer_norm_eps=d.get("layer_norm_eps", 1e-12), initializer_range=d.get("initializer_range", 0.02),
        num_labels=None if id2label else d.get("num_labels"), id2label=id2label, problem_type=d.get("problem_type"),
        bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"),
    )
    kw.update(overrides)
    return BertConfig(**kw)


# -------------------------------------------------------------------------------------------
# Modules
# -------------------------------------------------------------------------------------------
def _dense(c: BertConfig, features: int, name: str) -> nn.Dense:
    return dense(features, use_bias=True, name=name, dtype=c.dtype, param_dtype=c.param_dtype,
                 std=c.initializer_range)


def _norm(c: BertConfig, name: str = "LayerNorm") -> LayerNorm:
    return LayerNorm(c.layer_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype, name=name)


class BertEmbeddings(nn.Module):
    """``LayerNorm(word + token_type + position embeddings)``."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, token_type_ids, positions):
        c = self.config
        emb = functools.partial(nn.Embed, features=c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
                                embedding_init=nn.initializers.normal(c.initializer_range))
        h = emb(c.vocab_size, name="word_embeddings")(input_ids)
        h = h + emb(c.type_vocab_size, name="token_type_embeddings")(token_type_ids)
        h = h + emb(c.max_position_embeddings, name="position_embeddings")(positions)
        return _norm(c)(h)


class BertSelfAttention(nn.Module):
    """Bidirectional multi-head attention: the ``query``/``key``/``value`` projections and the core."""

    config: BertConfig

    @nn.compact
    def __call__(self, x, mask):
        c = self.config
        b, t, d = x.shape
        n, h = c.num_attention_heads, c.head_dim
        q, k, v = (_dense(c, d, name)(x).reshape(b, t, n, h) for name in ("query", "key", "value"))
        out = attention(q, k, v, mask=mask, causal=False, impl=attention_impl(c.attention_impl, c.dtype, h))
        return out.reshape(b, t, d)


class BertResidualOutput(nn.Module):
    """``LayerNorm(dense(x) + residual)`` (transformers' ``BertSelfOutput`` and ``BertOutput``)."""

    config: BertConfig

    @nn.compact
    def __call__(self, x, residual):
        c = self.config
        return _norm(c)(_dense(c, c.hidden_size, "dense")(x) + residual)


class BertAttention(nn.Module):
    """Self-attention and its output block."""

    config: BertConfig

    @nn.compact
    def __call__(self, h, mask):
        return BertResidualOutput(self.config, name="output")(BertSelfAttention(self.config, name="self")(h, mask), h)


class BertIntermediate(nn.Module):
    """``act(dense(x))``."""

    config: BertConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        return ACTIVATIONS[c.hidden_act](_dense(c, c.intermediate_size, "dense")(x))


class BertLayer(nn.Module):
    """One post-LayerNorm encoder layer, shaped for ``nn.scan``: ``(h, None, mask) -> (h, None)``."""

    config: BertConfig

    @nn.compact
    def __call__(self, h, _, mask):
        c = self.config
        a = BertAttention(c, name="attention")(h, mask)
        return BertResidualOutput(c, name="output")(BertIntermediate(c, name="intermediate")(a), a), None


class BertEncoder(nn.Module):
    """The scanned layers (``encoder/layer/...``, stacked on a leading layer axis)."""

    config: BertConfig

    @nn.compact
    def __call__(self, h, mask):
        c = self.config
        layers = scan_layers(BertLayer, c, length=c.num_hidden_layers, in_axes=(0, nn.broadcast))(c, name="layer")
        h, _ = layers(h, None, mask)
        return h


class BertPooler(nn.Module):
    """``tanh(dense(h[:, 0]))``: the first token's hidden state, projected."""

    config: BertConfig

    @nn.compact
    def __call__(self, h):
        return jnp.tanh(_dense(self.config, self.config.hidden_size, "dense")(h[:, 0]))


def _inputs(c: BertConfig, who: str, input_ids, attention_mask, token_type_ids, positions):
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"{who}: input_ids must be integer (batch, seq), got {input_ids.dtype}{list(input_ids.shape)}")
    b, t = input_ids.shape
    named = {"attention_mask": attention_mask, "token_type_ids": token_type_ids, "positions": positions}
    for name, value in named.items():
        if value is not None and jnp.shape(value) != (b, t):
            raise ValueError(f"{who}: {name} must have the shape of input_ids {(b, t)}, got {tuple(jnp.shape(value))}")
    if positions is None:
        if t > c.max_position_embeddings:
            raise ValueError(f"{who}: {t} tokens exceed max_position_embeddings={c.max_position_embeddings}")
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if token_type_ids is None:
        token_type_ids = jnp.zeros((b, t), jnp.int32)
    mask = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
    return input_ids, mask, jnp.asarray(token_type_ids), jnp.asarray(positions)


class BertModel(nn.Module):
    """The encoder and its pooler (the ``"base"`` head).

    ``model.apply({"params": params}, input_ids, attention_mask=None, token_type_ids=None,
    positions=None)`` returns the last hidden state ``(B, T, D)`` in float32 (transformers'
    ``last_hidden_state``; the pooled vector is `encode`'s second output). ``attention_mask``
    ``(B, T)`` (1 = token, 0 = padding) hides the padding keys from every query (padded
    positions still get hidden states, as in transformers); ``token_type_ids`` default to 0 and
    ``positions`` to ``0..T-1``.
    """

    config: BertConfig
    head: ClassVar[str] = "base"

    def setup(self):
        c = self.config
        self.embeddings = BertEmbeddings(c)
        self.encoder = BertEncoder(c)
        if c.add_pooling_layer:
            self.pooler = BertPooler(c)

    def encode(self, input_ids, attention_mask=None, token_type_ids=None, positions=None):
        """``(last hidden state, pooled)`` in the compute dtype (pooled is None without a pooler)."""
        c = self.config
        ids, mask, types, positions = _inputs(c, type(self).__name__, input_ids, attention_mask, token_type_ids,
                                              positions)
        h = self.encoder(self.embeddings(ids, types, positions), mask)
        return h, (self.pooler(h) if c.add_pooling_layer else None)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, positions=None):
        h, _ = self.encode(input_ids, attention_mask, token_type_ids, positions)  # the pooler runs (and is
        return h.astype(jnp.float32)  # initialised) but its output is dropped, which XLA removes under jit


class BertForSequenceClassification(nn.Module):
    """BERT with a classifier on the pooled first token (the ``"seq_cls"`` head).

    ``model.apply({"params": params}, input_ids, attention_mask=None, token_type_ids=None,
    positions=None)`` returns logits ``(B, num_labels)`` in float32 (arguments as in
    `BertModel`).
    """

    config: BertConfig
    head: ClassVar[str] = "seq_cls"

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, positions=None):
        c = self.config
        if not c.add_pooling_layer:
            raise ValueError("BertForSequenceClassification: the classifier reads the pooler; "
                             "add_pooling_layer=False is for the base model only")
        _, pooled = BertModel(c, name="bert").encode(input_ids, attention_mask, token_type_ids, positions)
        return _dense(c, c.num_labels, "classifier")(pooled).astype(jnp.float32)


# -------------------------------------------------------------------------------------------
# Checkpoint table
# -------------------------------------------------------------------------------------------
def _leaves(c: BertConfig, head: str) -> list[Leaf]:
    d, f = c.hidden_size, c.intermediate_size

    def linear(path, hf, shape, role, layered=True):
        p, t = ("bert/encoder/layer/", "bert.encoder.layer.{i}.") if layered else ("", "")
        return [Leaf(f"{p}{path}/kernel", f"{t}{hf}.weight", shape, transpose=True, role=role),
                Leaf(f"{p}{path}/bias", f"{t}{hf}.bias", shape[1:])]

    def norm(path, hf, layered=True):
        p, t = ("bert/encoder/layer/", "bert.encoder.layer.{i}.") if layered else ("", "")
        return [Leaf(f"{p}{path}/scale", f"{t}{hf}.weight", (d,)), Leaf(f"{p}{path}/bias", f"{t}{hf}.bias", (d,))]

    out = [Leaf("bert/embeddings/word_embeddings/embedding", "bert.embeddings.word_embeddings.weight",
                (c.vocab_size, d), role="embedding"),
           Leaf("bert/embeddings/position_embeddings/embedding", "bert.embeddings.position_embeddings.weight",
                (c.max_position_embeddings, d), role="embedding"),
           Leaf("bert/embeddings/token_type_embeddings/embedding", "bert.embeddings.token_type_embeddings.weight",
                (c.type_vocab_size, d), role="embedding")]
    out += norm("bert/embeddings/LayerNorm", "bert.embeddings.LayerNorm", layered=False)
    for name in ("query", "key", "value"):
        out += linear(f"attention/self/{name}", f"attention.self.{name}", (d, d), "column")
    out += linear("attention/output/dense", "attention.output.dense", (d, d), "row")
    out += norm("attention/output/LayerNorm", "attention.output.LayerNorm")
    out += linear("intermediate/dense", "intermediate.dense", (d, f), "column")
    out += linear("output/dense", "output.dense", (f, d), "row")
    out += norm("output/LayerNorm", "output.LayerNorm")
    if c.add_pooling_layer or head == "seq_cls":
        out += linear("bert/pooler/dense", "bert.pooler.dense", (d, d), "row", layered=False)
    if head == "seq_cls":
        return out + linear("classifier", "classifier", (d, c.num_labels), "head", layered=False)
    return strip_prefix(out, "bert/", "bert.")


def _ignore(c: BertConfig) -> tuple:
    # the embeddings' index buffers older checkpoints carry, and the pre-training heads (cls.*)
    # of BertForPreTraining / BertForMaskedLM checkpoints, which neither head uses
    return (r"(^|\.)embeddings\.(position_ids|token_type_ids)$", r"^cls\.")


FAMILY = Family(
    name="bert",
    torch_classes={"bert": {"base": "BertModel", "seq_cls": "BertForSequenceClassification"}},
    config_from_hf=from_hf_config,
    modules={"base": BertModel, "seq_cls": BertForSequenceClassification},
    leaves=_leaves,
    peft_targets={"bert": ("query", "value")},
    attention=("attention/self/query", "attention/self/key", "attention/self/value", "attention/output/dense"),
    ignore=_ignore,
)

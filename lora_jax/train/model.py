"""Everything the trainer needs from a model, behind a few small functions.

The models are lora_jax's own Flax families (`lora_jax.models`): their layers run under
``nn.scan``, so every per-layer parameter is stacked on a leading layer axis and every projection
kernel is a plain ``(in, out)`` Flax kernel (``(L, in, out)`` stacked). This module is the one
place of `lora_jax.train` that knows that; the loop (`trainer`) sees only
``logits_fn(trainable, frozen, inputs, mask, rng)``. Transformers is used only for tokenizers.

* `build_tokenizer` / `load_tokenizer`: a byte-level BPE trained on some text (for a model built
  from scratch), or a checkpoint's own tokenizer;
* `new_model` / `load_model` / `save_model`: a causal LM from a Hugging Face style config dict or
  a local checkpoint directory, and back to disk (``config.json`` + ``model.safetensors`` +
  tokenizer, what PyTorch transformers 5 loads);
* `lora_rules`: `lora.Rules` that know which kernels are layer stacks;
* `make_apply` / `forward` / `lora_logits_fn` / `full_logits_fn`: the forward pass (through
  ``lora.wrap`` on a LoRA tree);
* `make_stats` / `lora_loss_fn` / `full_loss_fn`: the trainer's loss, by default the chunked
  cross-entropy of `lora_jax.train.loss` over the model's hidden states and head (the full
  ``(B, T, V)`` float32 logits are never held), or the plain one over the logits;
* `export_peft` / `load_peft` / `save_merged`: the adapter as a PEFT directory, base + adapter
  folded into one checkpoint.

Example:
  >>> model, params = new_model({"arch": "llama", "hidden_size": 32, "intermediate_size": 48,
  ...                            "num_hidden_layers": 2, "num_attention_heads": 4}, vocab_size=97)
  >>> params["model"]["layers"]["self_attn"]["q_proj"]["kernel"].shape  # (layers, in, out)
  (2, 32, 32)
"""

from __future__ import annotations

import functools
import os
import re
from typing import Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import tree as _tree
from ..rules import Rule, Rules
from ..weight import is_lora
from ..io._files import atomic_directory, local_model_dir

__all__ = ["SPECIAL_TOKENS", "CHAT_TEMPLATE", "build_tokenizer", "load_tokenizer", "new_model", "load_model",
           "save_model", "stacked_paths", "lora_rules", "make_apply", "forward", "lora_logits_fn", "full_logits_fn",
           "with_step_settings", "make_stats", "lora_loss_fn", "full_loss_fn", "export_peft", "load_peft", "base_only", "save_merged",
           "to_host", "model_inputs", "max_positions", "router_aux_coef", "router_aux_loss"]

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


# ------------------------------------------------------------------------------------------
# tokenizer
# ------------------------------------------------------------------------------------------


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on ``texts``, as a transformers fast tokenizer.

    Every byte is in the alphabet, so any text encodes. Special tokens: ``<|pad|>``, ``<|bos|>``,
    ``<|eos|>`` and the chat markers of `CHAT_TEMPLATE` (``<|user|>`` ... ``<|end|>``).

    Example:
      >>> tok = build_tokenizer(["the river runs to the sea"] * 10, vocab_size=300)
      >>> tok.decode(tok.encode("the sea", add_special_tokens=False))
      'the sea'
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", additional_special_tokens=list(SPECIAL_TOKENS[3:]),
                                   chat_template=CHAT_TEMPLATE)


def load_tokenizer(path: str):
    """The tokenizer saved in ``path`` (a checkpoint or tokenizer directory)."""
    from transformers import AutoTokenizer

    d = local_model_dir(path, what="tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(d)
    except (OSError, ValueError):
        raise
    except Exception as e:  # noqa: BLE001 - a damaged tokenizer.json raises KeyError, TypeError, tokenizers' own
        raise ValueError(f"{d}: the tokenizer files cannot be read ({type(e).__name__}: {e}); is tokenizer.json "
                         "damaged?") from None
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


# ------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------

_INIT_FNS: dict = {}


def _remat(remat: Optional[str]):
    return None if remat in (None, "none") else remat


def new_model(init: dict, *, vocab_size: int, seed: int = 0, compute_dtype="float32", param_dtype="float32",
              remat: Optional[str] = None, token_ids: Optional[dict] = None):
    """A causal LM of `lora_jax.models` built from a Hugging Face style config, with random weights.

    Args:
      init: ``{"arch": "llama", **config_kwargs}``: ``arch`` is the ``model_type``, the rest are
        ``config.json`` fields (`lora_jax.models.config_from_hf` validates them).
      vocab_size: the tokenizer's size (overrides any ``vocab_size`` in ``init``).
      seed: the weight-init seed.
      compute_dtype: the activation dtype the module computes in.
      param_dtype: the weights' dtype.
      remat: a `lora_jax.models.layers.REMAT_POLICIES` name (or ``"none"``/None): rematerialize
        each scanned decoder block with that policy.
      token_ids: ``bos_token_id``/``eos_token_id``/``pad_token_id`` to record in the config where
        ``init`` does not set them (the tokenizer's).

    Returns:
      ``(model, params)``: a linen module and its parameters (layer parameters stacked).

    Raises:
      ValueError: an unknown ``arch``, a config field whose feature is not implemented, or a
        model without a causal LM head.
    """
    from ..models import build, config_from_hf

    kw = dict(init)
    arch = kw.pop("arch")
    kw["vocab_size"] = int(vocab_size)
    for k, v in (token_ids or {}).items():
        if kw.get(k) is None and v is not None:
            kw[k] = int(v)
    config = config_from_hf({**kw, "model_type": arch}, dtype=compute_dtype, param_dtype=param_dtype,
                            remat_policy=_remat(remat))
    model = build(config, "causal_lm")
    key = (type(model), config)
    init_fn = _INIT_FNS.get(key)
    if init_fn is None:  # one compile per model config and process (tests build many runs)
        ids = jnp.zeros((1, 1), jnp.int32)
        init_fn = _INIT_FNS[key] = jax.jit(lambda k: model.init(k, ids)["params"])
    return model, init_fn(jax.random.key(int(seed)))


def load_model(path: str, *, compute_dtype="float32", param_dtype="float32", remat: Optional[str] = None):
    """``(model, params)`` of a local Hugging Face checkpoint directory (`lora_jax.models.load`:
    ``model.safetensors``, sharded safetensors or transformers' ``flax_model.msgpack``; no torch).

    The parameters are NumPy arrays in ``param_dtype`` (layer parameters stacked); the module
    computes in ``compute_dtype`` and rematerializes its scanned blocks with ``remat``.

    Raises:
      ValueError: an unsupported architecture or config feature, no weights, weights that do not
        fit the config, or a model that is not a causal language model.
    """
    from ..models import head_of, load

    try:
        model, params = load(local_model_dir(path, what="model.path"), dtype=compute_dtype, param_dtype=param_dtype,
                             remat_policy=_remat(remat))
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    if head_of(model) != "causal_lm":
        raise ValueError(f"{path}: {type(model).__name__} ({model.config.model_type}, head {head_of(model)!r}) is not "
                         "a causal language model; lora-jax train needs one")
    return model, params


def max_positions(model) -> Optional[int]:
    """The longest sequence the model's position embeddings cover (None when unbounded)."""
    c = model.config
    return getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)


def to_host(tree):
    """Arrays on the host as NumPy (gathered across processes when there are several)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def save_model(model, params, tokenizer, path: str) -> None:
    """Write ``params`` (plain arrays) with ``model``'s config and the tokenizer as a Hugging Face
    checkpoint directory: ``config.json`` + ``model.safetensors`` (PyTorch names and layout, what
    ``AutoModelForCausalLM.from_pretrained`` loads in transformers 5) + the tokenizer files
    (`lora_jax.models.save`). The directory appears complete or not at all (written beside it,
    then renamed); an existing one is replaced.
    """
    from ..models import save

    params = to_host(params)
    if jax.process_index() != 0:
        return
    with atomic_directory(path, overwrite=True, what="save_model") as tmp:
        save(tmp, model, params, overwrite=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def stacked_paths(model) -> frozenset:
    """The ``/``-joined parameter paths of ``model`` that carry a leading layer axis (``nn.scan``)."""
    from ..models import leaves_of

    return frozenset(lf.path for lf in leaves_of(model) if lf.layered)


def lora_rules(model, targets="all-linear", **kw) -> Rules:
    """`lora.Rules` for ``targets`` on ``model``, with one adapter per layer of every stacked kernel.

    Kernels under the scanned layers are ``(L, in, out)`` (``stack_axes=1``); the others (an
    output head, if targeted) are plain ``(in, out)``. A mixture-of-experts model's expert tensors
    ``(L, E, in, out)`` get one adapter per layer and expert (``stack_axes=2``): ``"all-linear"``
    includes them and leaves the router frozen (``modules_to_save=["gate"]`` trains it in full),
    and names select them (``["gate_up_proj", "down_proj"]``). ``kw`` are
    `lora.Rules` options (``rank``, ``alpha``, ``dropout``, ``init``, ``use_rslora``, ``exclude``,
    ``modules_to_save`` ...).

    Example:
      >>> model, params = new_model({"arch": "llama", "hidden_size": 32, "intermediate_size": 48,
      ...                            "num_hidden_layers": 2, "num_attention_heads": 4}, vocab_size=97)
      >>> rules = lora_rules(model, ["q_proj"], rank=4)
      >>> rules.resolve("model/layers/self_attn/q_proj/kernel", (2, 32, 32)).layout
      'sio'
    """
    from ..hf.presets import expert_paths

    stacked = stacked_paths(model)
    flat = [lf.path for lf in _leaves(model)]
    plain = sorted(p for p in flat if p not in stacked)
    experts = expert_paths(model)
    if not plain and not experts:
        return Rules(targets, stack_axes=1, **kw)
    rules = []
    if experts:
        routers = [lf.path for lf in _leaves(model) if lf.role == "router"]
        only_experts = "(?!(" + "|".join(re.escape(p) for p in experts) + ")$).*"
        rules.append(Rule(experts, stack_axes=2) if targets == "all-linear"
                     else Rule(targets, stack_axes=2, exclude=only_experts))
        if targets == "all-linear":
            plain += routers
        plain += experts
    not_stacked = "|".join(re.escape(p) for p in sorted(plain))
    rules.append(Rule(targets, stack_axes=1, exclude=f"({not_stacked})"))
    flat_plain = [p for p in plain if p not in stacked]
    if flat_plain:
        rules.append(Rule(targets, stack_axes=0, exclude=None if len(flat_plain) == len(plain) else
                          "(" + "|".join(re.escape(p) for p in sorted(set(plain) - set(flat_plain))) + ")"))
    return Rules(rules, **kw)


def _leaves(model):
    from ..models import leaves_of

    return leaves_of(model)


def make_apply(model) -> Callable:
    """``apply(params, inputs, mask=None, positions=None) -> float32 logits`` for a causal LM of
    `lora_jax.models`: ``mask`` is its ``attention_mask`` (0 = padding; document ids of packed
    rows, `lora_jax.models.layers.segment_mask`), ``positions`` its positions."""

    def apply(params, inputs, mask=None, positions=None):
        return model.apply({"params": params}, inputs, attention_mask=mask, positions=positions)

    return apply


def forward(apply: Callable, lora_params, inputs, mask=None, positions=None, *, rng=None):
    """Logits of the LoRA model: ``lora.wrap(apply, rng=rng)`` (factorized ``x@W + s(x@A)@B``, no
    weight-sized gradient for the frozen base; LoRA dropout driven by ``rng``, none without it)."""
    from ..interpreter import wrap

    return wrap(apply, rng=rng)(lora_params, inputs, mask, positions)


def model_inputs(mask, positions) -> tuple:
    """``(attention_mask, positions)`` the model gets for a training batch: both for rows packed
    by documents (a batch with ``positions``: the mask holds document ids), neither otherwise.

    Rows without documents (``"stream"``, ``"none"``) are right-padded, so the mask is left out:
    in a causal model no real token attends to the padding after it, padded positions carry loss
    weight 0, and the attention runs its plain causal path (cuDNN's fastest on a GPU).
    """
    return (None, None) if positions is None else (mask, positions)


def lora_logits_fn(model) -> Callable:
    """``logits_fn(trainable, frozen, inputs, mask, rng, positions=None)`` of a LoRA step: the
    model through ``lora.wrap`` on ``lora.combine(trainable, frozen)`` (`model_inputs`)."""
    apply = make_apply(model)

    def logits_fn(trainable, frozen, inputs, mask, rng, positions=None):
        return forward(apply, _tree.combine(trainable, frozen), inputs, *model_inputs(mask, positions), rng=rng)

    return logits_fn


def full_logits_fn(model) -> Callable:
    """``logits_fn(params, None, inputs, mask, rng, positions=None)`` training every parameter
    (pretraining), as `lora_logits_fn`."""
    apply = make_apply(model)

    def logits_fn(trainable, frozen, inputs, mask, rng, positions=None):
        return apply(trainable, inputs, *model_inputs(mask, positions))

    return logits_fn


def with_step_settings(model, settings):
    """``model`` rebuilt with the remat policy and layer-scan unrolling of ``settings`` (a
    `tuning.StepSettings`); same parameter tree, same numbers.

    Example:
      >>> from lora_jax.train.tuning import StepSettings
      >>> model, _ = new_model({"arch": "llama", "hidden_size": 32, "intermediate_size": 48,
      ...                       "num_hidden_layers": 3, "num_attention_heads": 4}, vocab_size=97)
      >>> m = with_step_settings(model, StepSettings("nothing_saveable", "plain", 0))
      >>> m.config.remat_policy, m.config.scan_unroll
      ('nothing_saveable', 3)
    """
    import dataclasses

    c = model.config
    layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer")
    return type(model)(dataclasses.replace(c, remat_policy=settings.remat, scan_unroll=settings.scan_unroll(layers)))


def make_stats(model, *, chunked: bool = True, chunk: Optional[int] = None) -> Callable:
    """``stats(params, inputs, targets, weights, mask=None, positions=None) -> (nll_sum,
    correct_sum)`` of a causal LM of `lora_jax.models` on plain (or, under ``lora.wrap``, LoRA)
    parameters; ``mask``/``positions`` go to the model as `model_inputs` says.

    With ``chunked`` (the trainer's default) the model runs up to its final hidden states
    (``method="hidden"``) and `loss.chunked_token_stats` applies its head (``method="logits"``:
    kernel or tied embedding, Gemma's soft-capping) ``chunk`` positions at a time (None: the
    `loss.auto_chunk` budget); otherwise `loss.token_stats` of the full logits. Both give the same
    values and gradients.
    A mixture-of-experts model whose config asks for it (``output_router_logits``) adds
    ``router_aux_loss_coef`` times the routers' load-balancing loss (`router_aux_loss`) per trained
    token to the NLL sum, so the mean loss is transformers' ``loss + coef * aux_loss``.

    Raises:
      TypeError: ``chunked`` on a module without the ``hidden``/``logits`` methods.
    """
    from .loss import chunked_token_stats, token_stats

    if chunked and not (callable(getattr(model, "hidden", None)) and callable(getattr(model, "logits", None))):
        raise TypeError(f"chunked loss: {type(model).__name__} has no hidden/logits methods (the causal LMs of "
                        "lora_jax.models have them); use chunked=False")

    coef = router_aux_coef(model)

    def stats(params, inputs, targets, weights, mask=None, positions=None, groups=None, n_groups=0):
        kw = {"mutable": ["intermediates"]} if coef else {}
        if coef and groups is not None:
            raise ValueError("per-adapter losses: the router load-balancing loss (output_router_logits) mixes every "
                             "row of the batch, so it cannot be split by adapter; set output_router_logits false")
        mask, positions = model_inputs(mask, positions)
        if not chunked:
            out = model.apply({"params": params}, inputs, attention_mask=mask, positions=positions, **kw)
            logits, state = out if coef else (out, None)
            nll, correct = token_stats(logits, targets, weights, groups, n_groups)
        else:
            out = model.apply({"params": params}, inputs, attention_mask=mask, positions=positions, method="hidden",
                              **kw)
            (h, _), state = out if coef else (out, None)
            head = lambda x: model.apply({"params": params}, x, method="logits")  # noqa: E731
            nll, correct = chunked_token_stats(h, head, targets, weights, chunk=chunk, groups=groups,
                                               n_groups=n_groups)
        if coef:
            real = None if mask is None else mask != 0
            nll = nll + coef * router_aux_loss(model, state, real) * jnp.sum(weights.astype(jnp.float32))
        return nll, correct

    return stats


def router_aux_coef(model) -> float:
    """The weight of a mixture-of-experts model's load-balancing loss in the training loss:
    ``router_aux_loss_coef`` when its config sets ``output_router_logits`` (as transformers adds it
    to the loss), else 0 (also for a model with no ``config``: a user's own module)."""
    c = getattr(model, "config", None)
    return float(getattr(c, "router_aux_loss_coef", 0.0) or 0.0) if getattr(c, "output_router_logits", False) else 0.0


def router_aux_loss(model, state, mask=None) -> jax.Array:
    """transformers' ``load_balancing_loss_func`` of the router logits a forward pass sowed in
    ``state["intermediates"]`` (`lora_jax.models.layers.load_balancing_loss`, over the tokens
    ``mask`` marks, or every token of the batch as transformers without an attention mask)."""
    from ..models.layers import load_balancing_loss

    found = [v for kp, v in jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]
             if any(getattr(k, "key", None) == "router_logits" for k in kp)]
    if len(found) != 1:
        raise ValueError(f"router_aux_loss: expected the router logits of the scanned layers, found {len(found)}")
    return load_balancing_loss(found[0], model.config.num_experts_per_tok, mask)


def lora_loss_fn(model, *, chunked: bool = True, chunk: Optional[int] = None, adapters: Sequence[str] = ()) -> Callable:
    """``loss(trainable, frozen, batch, rng) -> (nll_sum, correct_sum)`` of a LoRA step: `make_stats`
    through ``lora.wrap`` on ``lora.combine(trainable, frozen)`` (LoRA dropout driven by ``rng``).

    The whole loss runs inside ``wrap``, so a LoRA or quantized head stays factorized in every
    chunk. This is the trainer's loss and the step `benchmarks/train_step.py` times as ``lora_jax``.

    With ``adapters`` (names of `lora.add` adapters in the tree) the batch also holds ``"adapter"``,
    ``(B, T)`` indices into ``adapters`` (one per row, repeated along it): each row runs with its
    own adapter (``lora.wrap(adapter_ids=...)``) and both sums are ``(len(adapters),)`` arrays, one
    per adapter.
    """
    from ..adapters import adapter_names
    from ..interpreter import wrap

    stats = make_stats(model, chunked=chunked, chunk=chunk)
    adapters = tuple(adapters)

    def loss(trainable, frozen, batch, rng):
        tree = _tree.combine(trainable, frozen)
        args = (tree, batch["inputs"], batch["targets"], batch["weights"], batch.get("mask"), batch.get("positions"))
        if not adapters:
            return wrap(stats, rng=rng)(*args)
        order = adapter_names(tree)  # wrap's routing indexes the tree's own order
        missing = [n for n in adapters if n not in order]
        if missing:
            raise ValueError(f"lora_loss_fn: no adapter named {missing} in the tree (it holds {order})")
        groups = batch["adapter"]
        route = jnp.asarray([order.index(n) for n in adapters], jnp.int32)[groups[:, 0]]
        per_adapter = functools.partial(stats, n_groups=len(adapters))  # a static count, not traced
        return wrap(per_adapter, rng=rng, adapter_ids=route)(*args, groups)

    return loss


def full_loss_fn(model, *, chunked: bool = True, chunk: Optional[int] = None) -> Callable:
    """``loss(params, None, batch, rng)`` training every parameter (pretraining), as `lora_loss_fn`."""
    stats = make_stats(model, chunked=chunked, chunk=chunk)

    def loss(trainable, frozen, batch, rng):
        return stats(trainable, batch["inputs"], batch["targets"], batch["weights"], batch.get("mask"),
                     batch.get("positions"))

    return loss


# ------------------------------------------------------------------------------------------
# adapters
# ------------------------------------------------------------------------------------------


def export_peft(model, lora_params, out_dir: str, *, base_model: Optional[str] = None,
                overwrite: bool = True, adapter: Optional[str] = None) -> None:
    """Write the adapter as a PEFT directory (`lora_jax.hf.save_peft`): ``adapter_model.safetensors``
    with PEFT's key names (one tensor per layer) and ``adapter_config.json``;
    ``PeftModel.from_pretrained`` loads it.

    Raises:
      ValueError: a non-empty ``out_dir`` without ``overwrite``, or a non-finite factor (nothing is
        written then).
    """
    from ..hf import save_peft

    lora_params = to_host(lora_params)
    bad = [p for p, lw in _tree.lora_items(lora_params)
           if not (np.isfinite(np.asarray(lw.a, np.float32)).all() and np.isfinite(np.asarray(lw.b, np.float32)).all())]
    if bad:
        raise ValueError(f"export_peft: non-finite LoRA factors at {bad[:5]}{' ...' if len(bad) > 5 else ''}; "
                         "nothing written")
    if jax.process_index() != 0:
        return
    save_peft(out_dir, lora_params, model, overwrite=overwrite, base_model_name_or_path=base_model, adapter=adapter)


def load_peft(model, lora_params, adapter_dir: str):
    """``lora_params``' base with the adapter of a PEFT directory (`lora_jax.hf.load_peft`, strict:
    every missing, unexpected or misshapen key is reported in one ``ValueError``)."""
    from ..hf import load_peft as _hf_load_peft

    if not os.path.isdir(adapter_dir):
        raise ValueError(f"no adapter directory {adapter_dir!r}")
    return _hf_load_peft(adapter_dir, base_only(lora_params), model)


def base_only(lora_params):
    """The frozen base of a LoRA tree: each `LoraWeight` replaced by its base kernel."""
    return jax.tree_util.tree_map(lambda x: x.base if is_lora(x) else x, lora_params, is_leaf=is_lora)


def save_merged(model, lora_params, tokenizer, out_dir: str) -> None:
    """Fold the adapter into the base (``merge(safe=True)``: a non-finite result raises and writes
    nothing) and write a Hugging Face checkpoint with the tokenizer (see `save_model`)."""
    save_model(model, _tree.merge(lora_params, safe=True), tokenizer, out_dir)

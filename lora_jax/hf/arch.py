"""The architectures `lora_jax.hf` knows: which transformers Flax class, which PyTorch class, which
kernels are stored ``(out, in)``, and which config features the Flax port really implements.

Supported (``model_type``: PyTorch class -> transformers Flax class):

* ``gpt2``: ``GPT2LMHeadModel`` -> ``FlaxGPT2LMHeadModel``, ``GPT2Model`` -> ``FlaxGPT2Model``
* ``llama``: ``LlamaForCausalLM`` -> ``FlaxLlamaForCausalLM``, ``LlamaModel`` -> ``FlaxLlamaModel``
* ``mistral``: ``MistralForCausalLM`` -> ``FlaxMistralForCausalLM``, ``MistralModel`` -> ``FlaxMistralModel``
* ``qwen2``: ``Qwen2ForCausalLM`` / ``Qwen2Model`` -> ``FlaxLlamaForCausalLM`` / ``FlaxLlamaModel``
  with ``attention_bias=True`` (Qwen2 is Llama with q/k/v biases; transformers has no Flax Qwen2,
  so the Flax ``o_proj`` gets a bias that is loaded as zeros and must stay zero on export)
* ``bert``: ``BertForSequenceClassification`` -> ``FlaxBertForSequenceClassification``,
  ``BertModel`` -> ``FlaxBertModel``

The transformers Flax ports are older than their PyTorch twins and ignore some config fields
(RoPE base and scaling, GPT-2's attention scaling flags, ...). `check_config` refuses such
configs instead of silently computing a different model.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Optional

__all__ = ["Arch", "ARCHS", "SUPPORTED", "resolve", "arch_of", "supported_text"]


def _no_check(cfg) -> list[str]:
    return []


def _rope_checks(cfg) -> list[str]:
    out = []
    theta = getattr(cfg, "rope_theta", 10000.0)
    if theta is not None and float(theta) != 10000.0:
        out.append(f"rope_theta is {theta}, but transformers' Flax port computes RoPE with base 10000")
    scaling = getattr(cfg, "rope_scaling", None)
    if scaling:
        out.append(f"rope_scaling is {scaling}, which transformers' Flax port does not implement")
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None)
    if head_dim is not None and head_dim * heads != cfg.hidden_size:
        out.append(f"head_dim is {head_dim} but hidden_size / num_attention_heads = {cfg.hidden_size}/{heads}; "
                   "transformers' Flax port derives head_dim from hidden_size")
    return out


def _llama_checks(cfg) -> list[str]:
    out = _rope_checks(cfg)
    if getattr(cfg, "mlp_bias", False):
        out.append("mlp_bias is True, which transformers' Flax Llama does not implement")
    return out


def _qwen2_checks(cfg) -> list[str]:
    out = _rope_checks(cfg)
    if getattr(cfg, "use_sliding_window", False):
        out.append("use_sliding_window is True, which transformers' Flax Llama (used for Qwen2) does not implement")
    return out


def _mistral_checks(cfg) -> list[str]:
    out = _rope_checks(cfg)
    w = getattr(cfg, "sliding_window", None)
    if w is not None and w < cfg.max_position_embeddings:
        out.append(f"sliding_window is {w} < max_position_embeddings {cfg.max_position_embeddings}: transformers' "
                   "Flax Mistral lets a query see sliding_window + 1 keys where PyTorch lets it see sliding_window")
    return out


def _gpt2_checks(cfg) -> list[str]:
    out = []
    if not getattr(cfg, "scale_attn_weights", True):
        out.append("scale_attn_weights is False, which transformers' Flax GPT-2 does not implement")
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
        out.append("scale_attn_by_inverse_layer_idx is True, which transformers' Flax GPT-2 does not implement")
    return out


def _bert_checks(cfg) -> list[str]:
    pe = getattr(cfg, "position_embedding_type", "absolute")
    if pe not in (None, "absolute"):
        return [f"position_embedding_type is {pe!r}; transformers' Flax BERT implements 'absolute' only"]
    return []


def _qwen2_flax_config(cfg):
    cfg = copy.deepcopy(cfg)
    cfg.attention_bias = True  # q/k/v biases (and an o_proj bias that stays zero)
    return cfg


@dataclasses.dataclass(frozen=True)
class Arch:
    """What `lora_jax.hf` needs to know about one ``model_type``.

    Attributes:
      name: the ``config.model_type``.
      classes: PyTorch class name -> (transformers Flax class name, PEFT task type).
      default: the PyTorch class used when the config names none.
      base_prefix: the attribute holding the base model in head models (``transformer``...).
      oi_modules: module names (last path component) whose Flax kernel is ``(out, in)``.
      ignore_torch: regexes of PyTorch state-dict keys that are buffers, not weights.
      zero_in_flax: Flax leaf-path regexes that PyTorch lacks and that are zeros (Qwen2 o_proj bias).
      embed: the Flax path of the input embedding in the head model (tied output heads reuse it).
      peft_targets: PEFT's default ``target_modules`` for this model type.
      attention: module names of the attention projections (the ``"attention"`` preset).
      check: config -> list of features the Flax port does not implement.
      flax_config: config -> the config given to the Flax class.
    """

    name: str
    classes: dict
    default: str
    base_prefix: str
    oi_modules: tuple = ()
    ignore_torch: tuple = ()
    zero_in_flax: tuple = ()
    embed: str = ""
    peft_targets: tuple = ()
    attention: tuple = ()
    check: Callable[[Any], list] = _no_check
    flax_config: Callable[[Any], Any] = lambda c: c

    def task_type(self, torch_class: str) -> str:
        return self.classes[torch_class][1]


_LLAMA_ATTN = ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj")
_ROPE_IGNORE = (r"(^|\.)rotary_emb\.inv_freq$",)

ARCHS: dict[str, Arch] = {
    "gpt2": Arch(
        name="gpt2",
        classes={"GPT2LMHeadModel": ("FlaxGPT2LMHeadModel", "CAUSAL_LM"),
                 "GPT2Model": ("FlaxGPT2Model", "FEATURE_EXTRACTION")},
        default="GPT2LMHeadModel", base_prefix="transformer",
        oi_modules=("c_attn", "c_proj", "c_fc"), embed="transformer/wte/embedding",
        ignore_torch=(r"(^|\.)attn\.(bias|masked_bias)$",),
        peft_targets=("c_attn",), attention=("attn/c_attn", "attn/c_proj"), check=_gpt2_checks),
    "llama": Arch(
        name="llama",
        classes={"LlamaForCausalLM": ("FlaxLlamaForCausalLM", "CAUSAL_LM"),
                 "LlamaModel": ("FlaxLlamaModel", "FEATURE_EXTRACTION")},
        default="LlamaForCausalLM", base_prefix="model",
        ignore_torch=_ROPE_IGNORE, embed="model/embed_tokens/embedding",
        peft_targets=("q_proj", "v_proj"), attention=_LLAMA_ATTN, check=_llama_checks),
    "mistral": Arch(
        name="mistral",
        classes={"MistralForCausalLM": ("FlaxMistralForCausalLM", "CAUSAL_LM"),
                 "MistralModel": ("FlaxMistralModel", "FEATURE_EXTRACTION")},
        default="MistralForCausalLM", base_prefix="model",
        ignore_torch=_ROPE_IGNORE, embed="model/embed_tokens/embedding",
        peft_targets=("q_proj", "v_proj"), attention=_LLAMA_ATTN, check=_mistral_checks),
    "qwen2": Arch(
        name="qwen2",
        classes={"Qwen2ForCausalLM": ("FlaxLlamaForCausalLM", "CAUSAL_LM"),
                 "Qwen2Model": ("FlaxLlamaModel", "FEATURE_EXTRACTION")},
        default="Qwen2ForCausalLM", base_prefix="model",
        ignore_torch=_ROPE_IGNORE, embed="model/embed_tokens/embedding",
        zero_in_flax=(r"(.*/)?self_attn/o_proj/bias",),
        peft_targets=("q_proj", "v_proj"), attention=_LLAMA_ATTN, check=_qwen2_checks,
        flax_config=_qwen2_flax_config),
    "bert": Arch(
        name="bert",
        classes={"BertForSequenceClassification": ("FlaxBertForSequenceClassification", "SEQ_CLS"),
                 "BertModel": ("FlaxBertModel", "FEATURE_EXTRACTION")},
        default="BertModel", base_prefix="bert", embed="bert/embeddings/word_embeddings/embedding",
        ignore_torch=(r"(^|\.)embeddings\.position_ids$",),
        peft_targets=("query", "value"),
        attention=("attention/self/query", "attention/self/key", "attention/self/value", "attention/output/dense"),
        check=_bert_checks),
}

SUPPORTED = tuple(f"{a.name}: {', '.join(a.classes)}" for a in ARCHS.values())


def supported_text() -> str:
    return "; ".join(SUPPORTED)


def _flax_class(name: str):
    import transformers

    return getattr(transformers, name)


@dataclasses.dataclass(frozen=True)
class Resolved:
    """An architecture resolved for one model: the spec, the PyTorch and Flax class names, and the
    config as read (``config``) and as given to the Flax class (``flax_config``)."""

    arch: Arch
    torch_class: str
    flax_class: str
    config: Any
    flax_config: Any

    @property
    def task_type(self) -> str:
        return self.arch.task_type(self.torch_class)

    @property
    def tied(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False))

    def torch_config(self):
        """A copy of the config as PyTorch transformers should read it (``architectures`` set to
        the PyTorch class; settings only the Flax port needed removed)."""
        cfg = copy.deepcopy(self.config)
        if self.arch.name == "qwen2" and "attention_bias" in vars(cfg):
            delattr(cfg, "attention_bias")
        cfg.architectures = [self.torch_class]
        return cfg

    def build(self, dtype=None):
        """The transformers Flax model, without random init (``_do_init=False``)."""
        kw = {} if dtype is None else {"dtype": dtype}
        return _flax_class(self.flax_class)(self.flax_config, _do_init=False, **kw)


def _unsupported(model_type) -> ValueError:
    return ValueError(f"model_type {model_type!r} is not supported by lora_jax.hf; supported: {supported_text()}")


def _check(arch: Arch, config, what: str) -> None:
    problems = arch.check(config)
    if problems:
        raise ValueError(f"{what}: this {arch.name} config uses features transformers' Flax port does not implement, "
                         "so its logits would differ from PyTorch: " + "; ".join(problems))


def resolve(model_or_config, *, architecture: Optional[str] = None, what: str = "lora_jax.hf") -> Resolved:
    """The `Resolved` architecture of a transformers Flax model or a config.

    Args:
      model_or_config: a transformers Flax model (its class decides the head) or a
        ``PretrainedConfig`` (``config.architectures[0]`` decides, else the arch's default).
      architecture: a PyTorch class name to use instead (``"BertForSequenceClassification"``).

    Raises:
      ValueError: for an unknown model type or class (the supported ones are listed), or a
        config the Flax port cannot compute faithfully.
    """
    import transformers

    if isinstance(model_or_config, transformers.FlaxPreTrainedModel):
        model = model_or_config
        config = model.config
        arch = ARCHS.get(getattr(config, "model_type", None))
        if arch is None:
            raise _unsupported(getattr(config, "model_type", None))
        flax_name = type(model).__name__
        torch_names = [t for t, (f, _) in arch.classes.items() if f == flax_name]
        if not torch_names:
            raise ValueError(f"{what}: {flax_name} is not a supported class for model_type {arch.name!r}; "
                             f"supported: {supported_text()}")
        _check(arch, config, what)
        return Resolved(arch, torch_names[0], flax_name, config, config)
    if isinstance(model_or_config, transformers.PretrainedConfig):
        config = model_or_config
        arch = ARCHS.get(getattr(config, "model_type", None))
        if arch is None:
            raise _unsupported(getattr(config, "model_type", None))
        names = [architecture] if architecture else list(getattr(config, "architectures", None) or [])
        torch_class = next((n for n in names if n in arch.classes), None)
        if torch_class is None:
            if architecture or names:
                raise ValueError(f"{what}: architecture {names[0]!r} is not supported for model_type {arch.name!r}; "
                                 f"supported: {supported_text()}")
            torch_class = arch.default
        _check(arch, config, what)
        return Resolved(arch, torch_class, arch.classes[torch_class][0], config, arch.flax_config(config))
    if isinstance(model_or_config, str):
        if model_or_config not in ARCHS:
            raise _unsupported(model_or_config)
        arch = ARCHS[model_or_config]
        return Resolved(arch, arch.default, arch.classes[arch.default][0], None, None)
    raise TypeError(f"{what}: expected a transformers Flax model, a PretrainedConfig or a model_type string, "
                    f"got {type(model_or_config).__name__}")


def arch_of(model_or_config) -> Arch:
    """The `Arch` spec of a model, config or model_type string."""
    return resolve(model_or_config).arch

"""The mixture-of-experts decoders: Qwen3-MoE (``qwen3_moe``), Mixtral (``mixtral``), GPT-OSS (``gpt_oss``).

The Llama-style decoder (`lora_jax.models.llama`: its attention, norms, scanned layers, KV cache
and output head) with the MLP replaced by a sparse mixture of SwiGLU experts
(`layers.SparseMoe`): a router ``gate`` picks ``num_experts_per_tok`` of ``num_experts`` experts
per token from ``softmax(x @ gate)`` (float32), their weights renormalized to sum to 1 for Mixtral,
GPT-OSS and for Qwen3-MoE with ``norm_topk_prob``. GPT-OSS is the same decoder with options:
biases on the attention, the router (``mlp/router``) and the experts, its clamped GLU over
interleaved gate/up columns (`layers.SparseMoe`), attention sinks and sliding-window layers
alternating with full ones (`llama.LlamaConfig`); its experts are stored ``(E, in, out)`` in
PyTorch already (no transpose). MXFP4-quantized GPT-OSS files (``*_blocks``/``*_scales``) are
not read: dequantize them to bf16 first (transformers' ``Mxfp4Config(dequantize=True)``).

Parameter tree (``L`` layers, ``E`` experts, ``F`` expert intermediate size; the rest as in
`llama`)::

    model/layers/mlp/gate/kernel                (L, D, E)       router (PyTorch mlp.gate.weight (E, D))
    model/layers/mlp/experts/gate_up_proj       (L, E, D, 2F)   (PyTorch mlp.experts.gate_up_proj (E, 2F, D))
    model/layers/mlp/experts/down_proj          (L, E, F, D)    (PyTorch mlp.experts.down_proj (E, D, F))

The experts are stored fused as transformers 5 holds them in memory; checkpoints on disk hold them
per expert (what ``save_pretrained`` writes: Qwen3-MoE ``mlp.experts.{j}.gate_proj/up_proj/
down_proj.weight``, Mixtral ``block_sparse_moe.experts.{j}.w1/w3/w2.weight``) and both forms load.
LoRA on the experts is one adapter per (layer, expert): ``lora.Rules(["gate_up_proj",
"down_proj"], stack_axes=2)`` (layout ``"ssio"``) or `lora_jax.hf.rules_for`; ``lora.wrap`` keeps
it factorized through ``ragged_dot`` and the dense einsums alike.

Only the features below are implemented; `from_hf_config` names any other (``decoder_sparse_step``
other than 1, ``mlp_only_layers``, Mixtral's ``router_jitter_noise``, partial rotary).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lora_jax.models.family import init_params
  >>> cfg = MoeConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
  ...                 num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
  >>> model = MoeForCausalLM(cfg)
  >>> model.apply({"params": init_params(model, jax.random.key(0))}, jnp.zeros((1, 8), jnp.int32)).shape
  (1, 8, 97)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional

import flax.linen as nn

from .family import Family, Leaf
from .layers import MOE_IMPLS, SparseMoe, layer_types_by_pattern, positive_int
from .llama import (DecoderLayer, LlamaConfig, LlamaForCausalLM, LlamaModel, config_problem, decoder_config_kwargs,
                    decoder_leaves, ignored_keys)

__all__ = ["MoeConfig", "MoeForCausalLM", "MoeModel", "from_hf_config", "FAMILY", "MODEL_TYPES"]

MODEL_TYPES = ("qwen3_moe", "mixtral", "gpt_oss")
_GPT_OSS_DEFAULTS = dict(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=36,
                         num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=128,
                         num_experts_per_tok=4, rms_norm_eps=1e-5, max_position_embeddings=131072, sliding_window=128)
_GPT_OSS_ROPE = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                 "truncate": False, "original_max_position_embeddings": 4096}
_CLASSES = {"qwen3_moe": "Qwen3Moe", "mixtral": "Mixtral", "gpt_oss": "GptOss"}


@dataclasses.dataclass(frozen=True)
class MoeConfig(LlamaConfig):
    """A `LlamaConfig` plus the mixture of experts (hashable: a static ``jit`` argument).

    ``num_experts`` (Mixtral's ``num_local_experts``), ``num_experts_per_tok``,
    ``moe_intermediate_size`` (each expert's; None = ``intermediate_size``, as in Mixtral),
    ``norm_topk_prob`` (renormalize the chosen weights; always on for Mixtral),
    ``router_aux_loss_coef`` and ``output_router_logits`` (the load-balancing loss the trainer adds
    when ``output_router_logits`` is set), ``moe_bias`` (router and expert biases, GPT-OSS),
    ``swiglu_limit``/``swiglu_alpha`` (GPT-OSS's clamped GLU when the limit is set), and ``moe_impl``: ``"ragged"`` (tokens sorted by expert,
    ``jax.lax.ragged_dot``), ``"dense"`` (every expert on every token) or None (ragged on a GPU/TPU,
    dense on a CPU; see `layers.SparseMoe`).

    Example:
      >>> cfg = MoeConfig(model_type="mixtral", hidden_size=64, num_attention_heads=4, intermediate_size=128)
      >>> cfg.moe_intermediate_size, cfg.norm_topk_prob
      (128, True)
    """

    model_type: str = "qwen3_moe"
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: Optional[int] = None
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False
    moe_impl: Optional[str] = None
    moe_bias: bool = False
    swiglu_limit: Optional[float] = None
    swiglu_alpha: float = 1.702
    model_types = MODEL_TYPES

    def __post_init__(self):
        super().__post_init__()
        set_ = functools.partial(object.__setattr__, self)
        for name in ("num_experts", "num_experts_per_tok"):
            set_(name, positive_int(getattr(self, name), f"MoeConfig.{name}"))
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"MoeConfig: num_experts_per_tok={self.num_experts_per_tok} is more than "
                             f"num_experts={self.num_experts}")
        if self.moe_intermediate_size is None:
            set_("moe_intermediate_size", self.intermediate_size)
        set_("moe_intermediate_size", positive_int(self.moe_intermediate_size, "MoeConfig.moe_intermediate_size"))
        if self.model_type == "mixtral" and not self.norm_topk_prob:
            raise ValueError("MoeConfig: Mixtral always renormalizes the chosen experts' weights (norm_topk_prob=True)")
        if self.model_type == "gpt_oss" and (not self.norm_topk_prob or self.swiglu_limit is None or
                                             not self.moe_bias):
            raise ValueError("MoeConfig: GPT-OSS renormalizes the chosen weights, clamps its GLU and has "
                             "expert biases (norm_topk_prob=True, swiglu_limit set, moe_bias=True)")
        if self.moe_impl not in MOE_IMPLS:
            raise ValueError(f"MoeConfig.moe_impl must be one of {MOE_IMPLS}, got {self.moe_impl!r}")

    def to_hf_config(self) -> dict:
        d = super().to_hf_config()
        for k in ("attention_bias", "mlp_bias", "use_sliding_window", "max_window_layers", "layer_types"):
            d.pop(k, None)
        d.update(num_experts_per_tok=self.num_experts_per_tok, router_aux_loss_coef=self.router_aux_loss_coef,
                 output_router_logits=self.output_router_logits, sliding_window=self.sliding_window)
        if self.model_type == "gpt_oss":
            d.update(attention_bias=self.qkv_bias, num_local_experts=self.num_experts,
                     intermediate_size=self.moe_intermediate_size, swiglu_limit=self.swiglu_limit,
                     swiglu_alpha=self.swiglu_alpha, layer_types=list(self.layer_types))
        elif self.model_type == "qwen3_moe":
            d.update(attention_bias=self.qkv_bias, num_experts=self.num_experts,
                     moe_intermediate_size=self.moe_intermediate_size, norm_topk_prob=self.norm_topk_prob,
                     decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=self.sliding_window is not None)
        else:
            d.update(num_local_experts=self.num_experts, intermediate_size=self.moe_intermediate_size,
                     router_jitter_noise=0.0)
        return d


def from_hf_config(hf: Mapping[str, Any], **overrides) -> MoeConfig:
    """A `MoeConfig` from a transformers ``config.json`` dict (``model_type`` qwen3_moe or mixtral),
    ``overrides`` applied. Every field whose feature is not implemented is named in one ValueError.

    Example:
      >>> cfg = from_hf_config({"model_type": "mixtral", "hidden_size": 64, "num_attention_heads": 4,
      ...                       "num_hidden_layers": 2, "intermediate_size": 96, "num_local_experts": 4})
      >>> cfg.num_experts, cfg.moe_intermediate_size, cfg.num_experts_per_tok
      (4, 96, 2)
    """
    d = dict(hf)
    mt = d.get("model_type")
    if mt not in MODEL_TYPES:
        raise ValueError(f"from_hf_config: model_type {mt!r} is not a mixture-of-experts decoder; supported: "
                         f"{MODEL_TYPES}")
    if mt == "gpt_oss":  # transformers' defaults where the file is silent (yarn rope among them)
        rope = {} if any(d.get(k) is not None for k in ("rope_parameters", "rope_scaling", "rope_theta")) else \
            {"rope_parameters": dict(_GPT_OSS_ROPE)}
        d = {**_GPT_OSS_DEFAULTS, **rope, **d}
    problems = []
    experts = d.get("num_experts", d.get("num_local_experts"))
    kw = decoder_config_kwargs(d, mt, problems)
    kw.update(num_experts_per_tok=d.get("num_experts_per_tok", 2),
              router_aux_loss_coef=float(d.get("router_aux_loss_coef", 0.001)),
              output_router_logits=bool(d.get("output_router_logits", False)))
    if mt == "gpt_oss":
        bias = bool(d.get("attention_bias", True))
        n = kw["num_hidden_layers"]
        types = d.get("layer_types") or layer_types_by_pattern(n, 2)
        kw.update(intermediate_size=d["intermediate_size"], moe_intermediate_size=d["intermediate_size"],
                  num_experts=experts, qkv_bias=bias, o_bias=bias, norm_topk_prob=True, moe_bias=True,
                  attention_sinks=True, swiglu_limit=float(d.get("swiglu_limit", 7.0)),
                  swiglu_alpha=float(d.get("swiglu_alpha", 1.702)), sliding_window=d["sliding_window"],
                  layer_types=tuple(types))
        if d.get("quantization_config"):
            problems.append(config_problem("quantization_config", d["quantization_config"],
                                           "quantized (MXFP4) experts are not read; dequantize them to bf16 first"))
    elif mt == "qwen3_moe":
        bias = bool(d.get("attention_bias", False))
        kw.update(intermediate_size=d.get("intermediate_size", 6144), qkv_bias=bias, o_bias=bias, qk_norm=True,
                  num_experts=128 if experts is None else experts,
                  moe_intermediate_size=d.get("moe_intermediate_size", 768),
                  norm_topk_prob=bool(d.get("norm_topk_prob", False)))
        if d.get("use_sliding_window") and d.get("sliding_window"):
            kw.update(sliding_window=int(d["sliding_window"]))
        if d.get("decoder_sparse_step", 1) != 1:
            problems.append(config_problem("decoder_sparse_step", d["decoder_sparse_step"],
                                     "dense MLP layers between sparse ones are not implemented; every layer is sparse"))
        if d.get("mlp_only_layers"):
            problems.append(config_problem("mlp_only_layers", d["mlp_only_layers"], "dense MLP layers are not implemented"))
        if experts is not None and int(experts) <= 0:
            problems.append(config_problem("num_experts", experts, "a model without experts is Qwen3, not Qwen3-MoE"))
    else:
        kw.update(intermediate_size=d.get("intermediate_size", 14336), num_experts=8 if experts is None else experts,
                  norm_topk_prob=True)
        if d.get("sliding_window"):
            kw.update(sliding_window=int(d["sliding_window"]))
        if float(d.get("router_jitter_noise") or 0.0) != 0.0:
            problems.append(config_problem("router_jitter_noise", d["router_jitter_noise"],
                                     "router input noise in training is not implemented"))
    if problems:
        raise ValueError(f"from_hf_config: this {mt} config uses features lora_jax does not implement, so its "
                         "logits would differ from transformers': " + "; ".join(problems))
    kw.update(overrides)
    return MoeConfig(**kw)


# -------------------------------------------------------------------------------------------
# Modules
# -------------------------------------------------------------------------------------------
class MoeDecoderLayer(DecoderLayer):
    """One pre-norm decoder layer with a sparse MoE block as its MLP, shaped for ``nn.scan`` like `llama`'s."""

    config: MoeConfig

    def mlp(self) -> nn.Module:
        c = self.config
        gpt_oss = c.model_type == "gpt_oss"
        return SparseMoe(c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.norm_topk_prob,
                         c.hidden_act, c.moe_impl, c.dtype, c.param_dtype, c.initializer_range,
                         router="router" if gpt_oss else "gate", bias=c.moe_bias,
                         clamp=None if c.swiglu_limit is None else (c.swiglu_alpha, c.swiglu_limit), name="mlp")


class MoeModel(LlamaModel):
    """Embedding, the scanned MoE decoder layers and the final norm (the ``"base"`` head); called
    as `llama.LlamaModel`. ``apply(..., mutable=["intermediates"])`` also returns the routers'
    logits (``intermediates/layers/mlp/router_logits``, ``(L, B*T, E)``)."""

    config: MoeConfig
    decoder_layer = MoeDecoderLayer


class MoeForCausalLM(LlamaForCausalLM):
    """The MoE decoder with its output head (the ``"causal_lm"`` head); called as
    `llama.LlamaForCausalLM` (``method="hidden"``/``"logits"``, a KV cache for `generate`)."""

    config: MoeConfig
    base_model = MoeModel


# -------------------------------------------------------------------------------------------
# Checkpoint table
# -------------------------------------------------------------------------------------------
_DISK = {  # what save_pretrained writes for the experts and the router (transformers 5 fuses them on load)
    "qwen3_moe": {"gate_up_proj": ("mlp.experts.{j}.gate_proj.weight", "mlp.experts.{j}.up_proj.weight"),
                  "down_proj": ("mlp.experts.{j}.down_proj.weight",), "gate": ()},
    "mixtral": {"gate_up_proj": ("block_sparse_moe.experts.{j}.w1.weight", "block_sparse_moe.experts.{j}.w3.weight"),
                "down_proj": ("block_sparse_moe.experts.{j}.w2.weight",), "gate": ("block_sparse_moe.gate.weight",)},
}


def _expert_leaves(c: MoeConfig, p: str, t: str) -> list[Leaf]:
    # the experts in PyTorch's parameter order (gate_up_proj, then down_proj): PEFT nests its
    # target_parameters wrappers in that order
    d, f, e = c.hidden_size, c.moe_intermediate_size, c.num_experts
    if c.model_type == "gpt_oss":  # written as held (fused, (E, in, out)), with biases
        ex, ext = p + "mlp/experts/", t + "mlp.experts."
        return [Leaf(p + "mlp/router/kernel", t + "mlp.router.weight", (d, e), transpose=True, role="router"),
                Leaf(p + "mlp/router/bias", t + "mlp.router.bias", (e,)),
                Leaf(ex + "gate_up_proj", ext + "gate_up_proj", (e, d, 2 * f), role="expert"),
                Leaf(ex + "gate_up_proj_bias", ext + "gate_up_proj_bias", (e, 2 * f)),
                Leaf(ex + "down_proj", ext + "down_proj", (e, f, d), role="expert"),
                Leaf(ex + "down_proj_bias", ext + "down_proj_bias", (e, d))]
    disk = {k: tuple(t + n for n in v) for k, v in _DISK[c.model_type].items()}
    return [Leaf(p + "mlp/gate/kernel", t + "mlp.gate.weight", (d, e), transpose=True, disk=disk["gate"],
                 role="router"),
            Leaf(p + "mlp/experts/gate_up_proj", t + "mlp.experts.gate_up_proj", (e, d, 2 * f), transpose=True,
                 disk=disk["gate_up_proj"], role="expert"),
            Leaf(p + "mlp/experts/down_proj", t + "mlp.experts.down_proj", (e, f, d), transpose=True,
                 disk=disk["down_proj"], role="expert")]


def _leaves(c: MoeConfig, head: str) -> list[Leaf]:
    return decoder_leaves(c, head, _expert_leaves)


FAMILY = Family(
    name="moe",
    torch_classes={mt: {"causal_lm": f"{cls}ForCausalLM", "base": f"{cls}Model"} for mt, cls in _CLASSES.items()},
    config_from_hf=from_hf_config,
    modules={"causal_lm": MoeForCausalLM, "base": MoeModel},
    leaves=_leaves,
    peft_targets={"qwen3_moe": (), "mixtral": ("q_proj", "v_proj"), "gpt_oss": ()},
    attention=("q_proj", "k_proj", "v_proj", "o_proj"),
    ignore=ignored_keys,
    not_linear=("gate", "router"),
)

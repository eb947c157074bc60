"""`rules_for`: LoRA rules for a lora_jax model that know its stacked kernels.

Every projection kernel of `lora_jax.models` is ``(in, out)``; the per-layer ones are stacked on a
leading layer axis (``nn.scan``), so their rules say ``stack_axes=1`` while top-level kernels (a
pooler, an output head) have none. Presets:

* ``"all-linear"``: every linear kernel except the output head and classifier (PEFT's ``"all-linear"``);
* ``"attention"``: the attention projections (q, k, v, o; fused ``qkv_proj``/``c_attn`` where the
  family fuses them);
* ``"peft"``: PEFT's default ``target_modules`` for the model type (llama/mistral/qwen/gemma
  ``q_proj, v_proj``; gpt2 ``c_attn``; bert ``query, value``; phi3 ``qkv_proj``);
* ``"experts"``: the mixture-of-experts expert tensors only (``gate_up_proj``, ``down_proj``).

Expert tensors ``(L, E, in, out)`` get ``stack_axes=2`` (one adapter per layer and expert, layout
``"ssio"``); ``"all-linear"`` includes them (PEFT reaches them with ``target_parameters``) and leaves
the MoE router frozen (PEFT 0.21's ``all-linear`` adapts it too, through its transformers 4 to 5
conversion; name it, ``"gate"``, to do the same: it is saved as ``target_parameters``
``mlp.gate.weight``).
"""

from __future__ import annotations

from typing import Any, Sequence

from ..models.family import Family, family_for, leaves_of
from ..rules import Rule, Rules

__all__ = ["rules_for", "PRESETS", "peft_default_targets", "kernel_paths", "expert_paths"]

PRESETS = ("all-linear", "attention", "peft", "experts")


def peft_default_targets(model_type: str) -> tuple:
    """PEFT's default ``target_modules`` for ``model_type``."""
    return tuple(family_for(model_type).peft_targets[model_type])


def _model_and_family(model_or_config) -> tuple[Any, Family, str]:
    from ..models.family import build, config_from_hf, read_hf_config, resolve_head

    if isinstance(model_or_config, str):
        fam = family_for(model_or_config)
        return None, fam, model_or_config
    if hasattr(model_or_config, "apply") and hasattr(model_or_config, "config"):
        cfg = model_or_config.config
        return model_or_config, family_for(cfg.model_type), cfg.model_type
    if hasattr(model_or_config, "model_type") and hasattr(model_or_config, "replace"):  # our config
        return build(model_or_config, next(iter(family_for(model_or_config.model_type)
                                                .torch_classes[model_or_config.model_type]))), \
            family_for(model_or_config.model_type), model_or_config.model_type
    hf = read_hf_config(model_or_config)
    cfg = config_from_hf(hf)
    return build(cfg, resolve_head(cfg, hf.get("architectures") or ())), family_for(cfg.model_type), cfg.model_type


def kernel_paths(model) -> dict[str, bool]:
    """``{module path: stacked}`` of every linear kernel and embedding of ``model``."""
    return {lf.path.rpartition("/")[0]: lf.layered for lf in leaves_of(model)
            if lf.path.rpartition("/")[2] in ("kernel", "embedding")}


def expert_paths(model) -> list[str]:
    """The leaf paths of ``model``'s mixture-of-experts tensors (``(L, E, in, out)``), if any."""
    return [lf.path for lf in leaves_of(model) if lf.role == "expert"]


_EXPERT_NAMES = ["experts/gate_up_proj", "experts/down_proj"]


def _suffix(name: str, module: str) -> bool:
    name = name.replace(".", "/").strip("/")
    return module == name or module.endswith("/" + name)


def _split_rules(modules: dict[str, bool], names: Sequence[str]) -> list[Rule]:
    stacked = sorted(m for m, s in modules.items() if s and any(_suffix(n, m) for n in names))
    flat = sorted(m for m, s in modules.items() if not s and any(_suffix(n, m) for n in names))
    return ([Rule(stacked, stack_axes=1)] if stacked else []) + ([Rule(flat, stack_axes=0)] if flat else [])


def rules_for(model_or_config: Any, preset: str = "all-linear", **kw) -> Rules:
    """`lora.Rules` for a lora_jax model, its config, a HF config or a ``model_type`` string.

    Args:
      model_or_config: a module of `lora_jax.models` (from `from_pretrained`), its config, a HF
        ``config.json`` dict/path, or a ``model_type`` (``"llama"``, ``"qwen3"``, ``"gpt2"``...).
        With a bare ``model_type`` the rules name modules (``q_proj``) with ``stack_axes=1``, so
        they fit the decoder layers of that family.
      preset: ``"all-linear"``, ``"attention"``, ``"peft"`` (PEFT's default targets) or
        ``"experts"`` (mixture-of-experts tensors; an error on a model without them).
      **kw: `lora.Rules` options (``rank``, ``alpha``, ``rank_pattern``, ``rslora``, ``variant`` (or ``use_dora``),
        ``layers``, ``dropout``, ``init``...).

    Raises:
      ValueError: for an unknown preset or model type (the allowed ones are listed), or a preset
        that selects nothing in this model.

    Example:
      >>> rules_for("qwen2", "peft", rank=4).rules[0].stack_axes
      1
    """
    if preset not in PRESETS:
        raise ValueError(f"rules_for: preset must be one of {list(PRESETS)}, got {preset!r}")
    model, fam, model_type = _model_and_family(model_or_config)
    experts = [] if model is None else expert_paths(model)
    if preset == "experts":
        if model is None:
            return Rules([Rule(_EXPERT_NAMES, stack_axes=2)], **kw)
        if not experts:
            raise ValueError(f"rules_for: the 'experts' preset selects the expert tensors of a mixture-of-experts "
                             f"model, and this {model_type} model has none")
        return Rules([Rule(experts, stack_axes=2)], **kw)
    if preset == "attention":
        names = list(fam.attention)
    elif preset == "peft":
        names = list(fam.peft_targets[model_type])
        if not names:
            raise ValueError(f"rules_for: PEFT has no default target_modules for model_type {model_type!r} (its "
                             "LoraConfig needs them named); use the 'all-linear' or 'attention' preset or name them")
    else:
        names = None
    if model is None:  # a bare model_type: module names, layer kernels stacked
        if names is None:
            extra = [Rule(_EXPERT_NAMES, stack_axes=2)] if fam.not_linear else []
            return Rules([Rule("all-linear", stack_axes=1, exclude=list(fam.not_linear) or None)] + extra,
                         **kw)
        return Rules([Rule(names, stack_axes=1)], **kw)
    modules = kernel_paths(model)
    if names is None:  # the projections (not the embeddings, the head, a router or the experts)
        names = [lf.path.rpartition("/")[0] for lf in leaves_of(model) if lf.role in ("column", "row")]
    rules = _split_rules(modules, names)
    if preset == "all-linear" and experts:
        rules.append(Rule(experts, stack_axes=2))
    if not rules:
        raise ValueError(f"rules_for: the {preset!r} preset ({names}) selects no kernel of this "
                         f"{model_type} model; its kernels: {sorted(modules)}")
    return Rules(rules, **kw)

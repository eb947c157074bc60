"""`rules_for`: LoRA rules for a transformers Flax model that know its kernel layouts.

GPT-2's Flax kernels are stored ``(out, in)``, so its rules say ``layout="out_in"``; everything
else here is Flax ``Dense`` ``(in, out)``. Presets:

* ``"all-linear"``: every linear kernel except the output head (as PEFT's ``"all-linear"``);
* ``"attention"``: the attention projections (q, k, v, o);
* ``"peft"``: PEFT's default ``target_modules`` for the model type
  (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``: llama/mistral/qwen2 ``q_proj, v_proj``;
  gpt2 ``c_attn``; bert ``query, value``).
"""

from __future__ import annotations

from typing import Any

from ..rules import ALL_LINEAR, Rule, Rules
from .arch import ARCHS, resolve

__all__ = ["rules_for", "PRESETS", "PEFT_DEFAULT_TARGETS"]

PRESETS = ("all-linear", "attention", "peft")
PEFT_DEFAULT_TARGETS = {name: arch.peft_targets for name, arch in ARCHS.items()}


def rules_for(model_or_config: Any, preset: str = "all-linear", *, rank: int = 8, alpha: float = 8, **kw) -> Rules:
    """`lora.Rules` for a transformers Flax model, config or model_type string.

    Args:
      model_or_config: a transformers Flax model, a ``PretrainedConfig`` or a model_type
        (``"gpt2"``, ``"llama"``, ``"mistral"``, ``"qwen2"``, ``"bert"``).
      preset: ``"all-linear"``, ``"attention"`` or ``"peft"`` (PEFT's default targets).
      rank, alpha: as in `lora.Rules`.
      **kw: any other `lora.Rules` option (``rank_pattern``, ``use_rslora``, ``use_dora``,
        ``layers``, ``dropout``, ``init``...).

    Raises:
      ValueError: for an unknown preset or architecture (the allowed ones are listed).

    Example:
      >>> rules_for("gpt2", "peft", rank=4).rules[0].layout
      'out_in'
    """
    arch = resolve(model_or_config, what="rules_for").arch
    if preset == "all-linear":
        targets: Any = ALL_LINEAR
    elif preset == "attention":
        targets = list(arch.attention)
    elif preset == "peft":
        targets = list(PEFT_DEFAULT_TARGETS[arch.name])
    else:
        raise ValueError(f"rules_for: preset must be one of {list(PRESETS)}, got {preset!r}")
    if arch.oi_modules:
        if targets == ALL_LINEAR:
            rules = [Rule(list(arch.oi_modules), layout="out_in"), Rule(ALL_LINEAR)]
        else:
            oi = [t for t in targets if t.rpartition("/")[2] in arch.oi_modules]
            io = [t for t in targets if t not in oi]
            rules = [Rule(oi, layout="out_in")] + ([Rule(io)] if io else [])
        return Rules(rules, rank=rank, alpha=alpha, **kw)
    return Rules(targets, rank=rank, alpha=alpha, **kw)

"""QLoRA memory and accuracy: the frozen base of a Llama in bf16 vs NF4 (+ double quantization).

Builds a random-init Llama (lora_jax.models.llama; default: the 1.1B config of train_step.py),
puts LoRA r=16 on its 7 projections, quantizes the frozen kernels with ``lora.quantize`` and
prints one JSON line: bytes of the frozen base in bf16 and NF4 (the 7 projections under the
adapters, and the whole frozen model with ``which="all"``, embeddings and head included), their
ratio, the error of one quantized projection (weights, and outputs on Gaussian inputs, relative to
their RMS), and the logit error of the NF4 model vs the bf16 model on a fixed input (max and RMS,
relative to the bf16 logits' RMS; a random-init deep model compounds the per-layer error, so this
is far larger than for a trained one), plus the same for int8.

Usage: python benchmarks/qlora_memory.py [--size 1b|160m|tiny] [--tokens 128]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

import lora_jax as lora
from lora_jax.models import LlamaConfig, build, init_params
from lora_jax.quant import nbytes
from lora_jax.tree import lora_items

from train_step import SIZES, TARGETS  # noqa: E402  (the benchmark configs, defined once, beside this file)


def base_bytes(tree) -> int:
    """Bytes of the frozen kernels under the LoRA adapters (quantized or not)."""
    return sum(x.nbytes for _, lw in lora_items(tree) for x in jax.tree_util.tree_leaves(lw.base))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1b", choices=sorted(SIZES))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--block", type=int, default=64)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    cfg = LlamaConfig(**SIZES[args.size], dtype="bfloat16", param_dtype="bfloat16", max_position_embeddings=2048)
    model = build(cfg)
    params = init_params(model, jax.random.key(0))
    lp = lora.init(params, lora.Rules(TARGETS, rank=16, alpha=32, stack_axes=1), 1)
    fwd = jax.jit(lora.wrap(lambda p, ids: model.apply({"params": p}, ids)))
    ids = jax.random.randint(jax.random.key(2), (1, args.tokens), 0, cfg.vocab_size)
    ref = np.asarray(fwd(lp, ids), np.float64)
    ref_rms = float(np.sqrt(np.mean(ref ** 2)))
    out = {"benchmark": "qlora_memory", "size": args.size, "params": int(sum(x.size for x in jax.tree_util.tree_leaves(params))),
           "device": str(jax.devices()[0]), "jax": jax.__version__, "block": args.block}
    bf16_proj = base_bytes(lp)
    bf16_all = nbytes(lp)
    for scheme in ("nf4", "int8"):
        q = lora.quantize(lp, scheme, block=args.block, double_quant=True)
        q_all = lora.quantize(lp, scheme, block=args.block, double_quant=True, which="all")
        got = np.asarray(fwd(q, ids), np.float64)
        err = got - ref
        # one projection alone (layer 0's q_proj on Gaussian inputs): the quantization's own error,
        # before 2 x layers of a random-init network compound it
        (path, lw), (_, lwq) = next(iter(lora_items(lp))), next(iter(lora_items(q)))
        w0 = np.asarray(lw.base, np.float64)[0]
        wq0 = np.asarray(lora.dequantize(lwq.base), np.float64)[0]
        xs = np.asarray(jax.random.normal(jax.random.key(3), (args.tokens, w0.shape[0])), np.float64)
        y0, yq = xs @ w0, xs @ wq0
        out[scheme] = {
            "projection_bytes": base_bytes(q), "bf16_projection_bytes": bf16_proj,
            "projection_ratio": round(bf16_proj / base_bytes(q), 3),
            "whole_model_bytes": nbytes(q_all), "bf16_whole_model_bytes": bf16_all,
            "whole_model_ratio": round(bf16_all / nbytes(q_all), 3),
            "logit_max_abs_err_over_rms": round(float(np.abs(err).max()) / ref_rms, 4),
            "logit_rms_err_over_rms": round(float(np.sqrt(np.mean(err ** 2))) / ref_rms, 4),
            "top1_agreement": round(float((got.argmax(-1) == ref.argmax(-1)).mean()), 4),
            "one_projection": path,
            "projection_weight_rms_err_over_rms": round(float(np.sqrt(np.mean((wq0 - w0) ** 2) / np.mean(w0 ** 2))), 4),
            "projection_output_rms_err_over_rms": round(float(np.sqrt(np.mean((yq - y0) ** 2) / np.mean(y0 ** 2))), 4),
        }
        del q, q_all
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

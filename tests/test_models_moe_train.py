"""Training a mixture-of-experts model: the trainer's loss with transformers' load-balancing term, and
`lora-jax train` on a tiny Qwen3-MoE checkpoint (with its tokenizer) end to end: LoRA on the experts
and attention, the router frozen (or trained in full with ``modules_to_save``), the exported adapter
loaded by PyTorch PEFT with lora_jax's logits."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers as tf
from peft import PeftModel
from safetensors.numpy import load_file

import lora_jax as lora
import lora_jax.hf as hf
from lora_jax.cli import main
from lora_jax.train import model as tm
from lora_jax.train.metrics import read_metrics
from helpers import spread_torch
from test_train_hf_checkpoint import _conversations, _tokenizer, write_data

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny Qwen3-MoE PyTorch checkpoint (4 experts, top-2, the auxiliary loss on) with a tokenizer."""
    root = tmp_path_factory.mktemp("qwen3moe")
    recs = _conversations()
    tok = _tokenizer([json.dumps(r) for r in recs])
    cfg = tf.Qwen3MoeConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
        output_router_logits=True, router_aux_loss_coef=0.05, max_position_embeddings=64,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        attn_implementation="eager")
    torch.manual_seed(0)
    d = root / "tiny-qwen3-moe"
    spread_torch(tf.Qwen3MoeForCausalLM(cfg).eval()).save_pretrained(str(d), safe_serialization=True)
    tok.save_pretrained(str(d))
    return d, write_data(root, recs), tok


def test_loss_adds_transformers_load_balancing_term(ckpt):
    """make_stats (chunked and plain) = transformers' loss with labels: mean CE + coef * aux_loss."""
    d, _, tok = ckpt
    model, params = tm.load_model(str(d))
    assert tm.router_aux_coef(model) == pytest.approx(0.05)
    ids = np.random.RandomState(0).randint(3, len(tok), (2, 10))
    targets = np.concatenate([ids[:, 1:], np.zeros((2, 1), ids.dtype)], 1)
    weights = np.ones(ids.shape, np.float32)
    weights[:, -1] = 0
    torch_model = tf.Qwen3MoeForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    with torch.no_grad():
        out = torch_model(torch.tensor(ids), labels=torch.tensor(ids))
    assert out.aux_loss.item() > 1.0 and 0.05 * out.aux_loss.item() > 1e-3
    for chunked in (True, False):
        nll, _ = jax.jit(tm.make_stats(model, chunked=chunked))(params, ids, targets, weights)
        assert float(nll) / weights.sum() == pytest.approx(out.loss.item(), rel=1e-5)


def test_router_is_frozen_unless_saved_whole(ckpt):
    model, params = tm.load_model(str(ckpt[0]))
    for modules_to_save, trained in ((None, []), (["gate"], ["model/layers/mlp/gate/kernel"])):
        lp = lora.init(params, tm.lora_rules(model, "all-linear", rank=2, modules_to_save=modules_to_save), 0)
        adapted = dict(lora.tree.lora_items(lp))
        assert sorted(adapted) == ["model/layers/mlp/experts/down_proj", "model/layers/mlp/experts/gate_up_proj"] + [
            f"model/layers/self_attn/{n}/kernel" for n in ("k_proj", "o_proj", "q_proj", "v_proj")]
        full = [lora.rules.path_str(kp) for kp, v in jax.tree_util.tree_flatten_with_path(
            lp, is_leaf=lambda x: isinstance(x, lora.Trainable))[0] if isinstance(v, lora.Trainable)]
        assert full == trained


def test_train_qwen3_moe_end_to_end(ckpt, tmp_path):
    """LoRA on the experts and attention, the router trained in full, the aux loss on."""
    d, data, tok = ckpt
    out = tmp_path / "run"
    o = {"out_dir": out, "model.path": d, "data.train": data, "lora.targets": "all-linear", "lora.rank": 4,
         "lora.alpha": 8, "model.compute_dtype": "float32", "data.seq_len": 32, "train.steps": 6,
         "train.batch_size": 8, "train.lr": 0.01, "train.warmup_steps": 1, "train.eval_every": 0,
         "train.eval_batches": 1, "train.log_every": 1, "train.checkpoint_every": 0, "train.progress": "false",
         "train.plot": "false"}
    o["lora.modules_to_save"] = "[gate]"
    assert main(["train"] + [f"{k}={v}" for k, v in o.items()]) == 0
    losses = [r["loss"] for r in read_metrics(str(out / "metrics.jsonl")) if r["kind"] == "train"]
    assert losses[-1] < losses[0]

    adapter = out / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert sorted(cfg["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    router_keys = [k for k in saved if k.endswith("mlp.gate.weight")]
    base_router = load_file(str(d / "model.safetensors"))["model.layers.0.mlp.gate.weight"]
    assert cfg["modules_to_save"] and len(router_keys) == 2, (cfg["modules_to_save"], router_keys)
    assert np.abs(saved["base_model.model.model.layers.0.mlp.gate.weight"] - base_router).max() > 0

    model, params = hf.from_pretrained(d)
    tree = hf.load_peft(adapter, params, model)
    ids = np.asarray([tok.encode("What color is the tower today?")])
    ours = np.asarray(lora.wrap(lambda p: model.apply({"params": p}, ids))(tree))
    pm = PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager"),
                                   adapter).eval()
    with torch.no_grad():
        ref = pm(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, ref, **TOL)
    with torch.no_grad():
        with pm.disable_adapter():
            assert np.abs(pm(torch.tensor(ids)).logits.numpy() - ref).max() > 1e-3  # it trained


def test_experts_train_the_same_on_a_sharded_mesh(ckpt, tmp_path):
    """LoRA on stacked (L, E, in, out) experts under data x fsdp x tensor = 2 x 2 x 2 (8 fake CPU
    devices): the same losses as data parallel alone (the sharding only places arrays)."""
    d, data, _ = ckpt
    losses = {}
    for mesh in ((8, 1, 1), (2, 2, 2)):
        out = tmp_path / "run{}{}{}".format(*mesh)
        o = {"out_dir": out, "model.path": d, "data.train": data, "lora.targets": "all-linear", "lora.rank": 4,
             "model.compute_dtype": "float32", "data.seq_len": 32, "train.steps": 3, "train.batch_size": 8,
             "train.lr": 0.01, "train.warmup_steps": 1, "train.eval_every": 0, "train.eval_batches": 1,
             "train.log_every": 1, "train.checkpoint_every": 0, "train.progress": "false", "train.plot": "false",
             "train.export": "false", "mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2]}
        assert main(["train"] + [f"{k}={v}" for k, v in o.items()]) == 0
        losses[mesh] = [r["loss"] for r in read_metrics(str(out / "metrics.jsonl")) if r["kind"] == "train"]
    assert len(losses[(8, 1, 1)]) == 3 and losses[(8, 1, 1)][-1] != losses[(8, 1, 1)][0]
    np.testing.assert_allclose(losses[(2, 2, 2)], losses[(8, 1, 1)], rtol=1e-5)

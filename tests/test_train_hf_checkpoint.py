"""`lora-jax train model.path=<tiny Llama 3 checkpoint with its tokenizer> data.train=<jsonl>` end to
end: the run trains (its loss falls), its exported adapter loaded by PyTorch PEFT on the PyTorch
checkpoint computes lora_jax's logits, and `lora-jax merge` of the run loads in transformers with
the same logits. Everything is built here: a tiny Llama 3-style PyTorch model (tied embeddings,
rope_theta 500000, llama3 rope scaling) saved with ``save_pretrained``, a byte-level BPE tokenizer
with a Llama 3-like chat template saved beside it, and a chat JSONL."""

import json

import jax
import numpy as np
import pytest

import lora_jax as lora
import lora_jax.hf as hf
from lora_jax.cli import main
from lora_jax.train.metrics import read_metrics
from helpers import spread_torch

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
tf = pytest.importorskip("transformers")

TOL = dict(rtol=1e-5, atol=1e-5)
BOS, EOS, PAD = "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"
SPECIALS = [PAD, BOS, "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", EOS]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
COLORS = ["red", "blue", "green", "amber", "violet", "white", "black", "silver"]
THINGS = ["river", "harbor", "lantern", "orchard", "signal", "tower", "meadow", "ledger"]


def _conversations():
    """Chat records (and a few prompt/completion ones) with a fixed, learnable answer style."""
    recs = []
    for i, thing in enumerate(THINGS):
        for j, color in enumerate(COLORS):
            if (i + j) % 3 == 0:
                recs.append({"prompt": f"Color of the {thing}? ", "completion": f"The {thing} is {color}."})
                continue
            msgs = [{"role": "user", "content": f"What color is the {thing} today?"},
                    {"role": "assistant", "content": f"Today the {thing} is {color}. Noted in the log."}]
            if (i + j) % 2:
                msgs = [{"role": "system", "content": "Answer in one line."}] + msgs
            recs.append({"messages": msgs})
    return recs


def _tokenizer(texts):
    """A byte-level BPE (tokenizers) as a transformers fast tokenizer, Llama 3 style specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                      additional_special_tokens=SPECIALS[2:5], chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny Llama 3-style PyTorch checkpoint with its tokenizer in the same directory, and a chat JSONL."""
    root = tmp_path_factory.mktemp("llama3")
    recs = _conversations()
    texts = [json.dumps(r) for r in recs] + [" ".join(THINGS + COLORS)] * 4
    tok = _tokenizer(texts)
    d = root / "tiny-llama3"
    cfg = tf.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16},
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, attn_implementation="eager")
    torch.manual_seed(0)
    spread_torch(tf.LlamaForCausalLM(cfg).eval()).save_pretrained(str(d), safe_serialization=True)
    tok.save_pretrained(str(d))
    return d, write_data(root, recs), tok


def write_data(root, recs):
    """``root/data``: the records as JSONL, one file per record shape (chats, prompt/completion pairs)."""
    data = root / "data"
    data.mkdir()
    for name, shape in (("chat.jsonl", "messages"), ("qa.jsonl", "prompt")):
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in recs if shape in r), encoding="utf-8")
    return data


@pytest.fixture(scope="module")
def run(ckpt, tmp_path_factory):
    d, data, _ = ckpt
    out = tmp_path_factory.mktemp("run") / "run"
    o = {"out_dir": out, "model.path": d, "data.train": data, "lora.targets": "all-linear", "lora.rank": 4,
         "lora.alpha": 8, "model.compute_dtype": "float32", "data.seq_len": 32, "train.steps": 8,
         "train.batch_size": 8, "train.lr": 0.01, "train.warmup_steps": 1, "train.eval_every": 0,
         "train.eval_batches": 1, "train.log_every": 1, "train.checkpoint_every": 0, "train.progress": "false",
         "train.plot": "false"}
    assert main(["train"] + [f"{k}={v}" for k, v in o.items()]) == 0
    return out


def _batch(tok):
    """Token ids of two texts (chat-rendered), one full row, one left-padded and one right-padded."""
    a = tok.apply_chat_template([{"role": "user", "content": "What color is the tower today?"}],
                                add_generation_prompt=True, tokenize=False) + "Today the tower"
    b = tok.apply_chat_template([{"role": "user", "content": "Color of the signal?"}],
                                add_generation_prompt=True, tokenize=False)
    ia, ib = (tok.encode(t, add_special_tokens=False) for t in (a, b))
    assert ia[0] == tok.bos_token_id and len(ib) < len(ia)
    T, pad = len(ia), tok.pad_token_id
    ids = np.full((3, T), pad, np.int64)
    mask = np.zeros((3, T), np.int64)
    ids[0], mask[0] = ia, 1
    ids[1, T - len(ib):], mask[1, T - len(ib):] = ib, 1  # left-padded
    ids[2, :len(ib)], mask[2, :len(ib)] = ib, 1  # right-padded
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return ids, mask, pos


def _torch_logits(m, ids, mask, pos):
    with torch.no_grad():
        return m(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                 position_ids=torch.from_numpy(pos)).logits.float().numpy()


def _real(x, mask):
    return x[mask.astype(bool)]  # padding queries are not compared


def test_train_on_a_llama3_checkpoint_then_peft_and_merge_match(ckpt, run, tmp_path, capsys):
    d, _, tok = ckpt
    # the run trained: loss falls, metrics carry tokens/s
    recs = [r for r in read_metrics(str(run / "metrics.jsonl")) if r["kind"] == "train"]
    assert [r["step"] for r in recs] == list(range(1, 9)) and {r["phase"] for r in recs} == {"lora"}
    assert all(np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in recs)
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.1, [r["loss"] for r in recs]
    assert not (run / "base").exists()  # model.path: no base of its own
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"])
    assert cfg["base_model_name_or_path"] == str(d)

    ids, mask, pos = _batch(tok)
    # lora_jax: the checkpoint + the exported adapter, through lora.wrap
    model, params = hf.from_pretrained(str(d))
    assert model.config.tie_word_embeddings and model.config.vocab_size == len(tok)
    tree = hf.load_peft(str(run / "adapter"), params, model)
    fwd = lora.wrap(lambda p, x, m, q: model.apply({"params": p}, x, attention_mask=m, positions=q))
    ours = np.asarray(jax.jit(fwd)(tree, ids.astype(np.int32), mask.astype(np.int32), pos.astype(np.int32)))
    base_ours = np.asarray(jax.jit(fwd)(params, ids.astype(np.int32), mask.astype(np.int32), pos.astype(np.int32)))

    # PyTorch: the same checkpoint + PeftModel on the adapter
    base = tf.LlamaForCausalLM.from_pretrained(str(d), attn_implementation="eager", dtype=torch.float32).eval()
    base_logits = _torch_logits(base, ids, mask, pos)
    pm = peft.PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    theirs = _torch_logits(pm, ids, mask, pos)

    np.testing.assert_allclose(_real(base_ours, mask), _real(base_logits, mask), **TOL)
    np.testing.assert_allclose(_real(ours, mask), _real(theirs, mask), **TOL)
    assert np.abs(_real(theirs, mask) - _real(base_logits, mask)).max() > 1e-2  # the adapter trained
    assert np.abs(base_logits).max() > 1.0  # logits O(1): a wrong layer would show

    # lora-jax merge of the run: transformers loads it and computes PeftModel's logits
    out = tmp_path / "merged"
    capsys.readouterr()
    assert main(["merge", str(run), "--out", str(out)]) == 0
    assert "merge: checkpoint step 8 -> " in capsys.readouterr().out
    merged = tf.LlamaForCausalLM.from_pretrained(str(out), attn_implementation="eager", dtype=torch.float32).eval()
    assert merged.config.tie_word_embeddings and merged.config.rope_parameters["rope_type"] == "llama3"
    np.testing.assert_allclose(_real(_torch_logits(merged, ids, mask, pos), mask), _real(theirs, mask), **TOL)
    assert tf.AutoTokenizer.from_pretrained(str(out)).chat_template == CHAT_TEMPLATE


def test_a_tokenizer_the_model_cannot_hold_or_read_is_refused_at_setup(ckpt, tmp_path, capsys):
    """Issue 22.11/22.19: a tokenizer with more tokens than the model's embedding rows, and a damaged
    tokenizer.json, are one error at setup naming the setting (exit 2), not NaN at step 1 or a
    traceback; nothing is trained or written."""
    import shutil

    d, data, tok = ckpt
    big = tmp_path / "big-tok"
    tok.save_pretrained(str(big))
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(big))
    t.add_tokens([f"<extra_{i}>" for i in range(8)])
    t.save_pretrained(str(big))
    base = {"model.path": d, "data.train": data, "data.seq_len": 32, "train.steps": 1, "train.batch_size": 8,
            "train.warmup_steps": 0, "train.progress": "false", "model.compute_dtype": "float32"}
    o = {**base, "out_dir": tmp_path / "run1", "tokenizer.path": big}
    assert main(["train"] + [f"{k}={v}" for k, v in o.items()]) == 2
    err = capsys.readouterr().err
    assert "tokenizer.path: the tokenizer has" in err and "embedding only" in err and "Traceback" not in err
    broken = tmp_path / "broken"
    shutil.copytree(d, broken)
    (broken / "tokenizer.json").write_text('{"model": {"type": "BPE"}, "added_tokens": 7}')
    o = {**base, "out_dir": tmp_path / "run2", "model.path": broken}
    assert main(["train"] + [f"{k}={v}" for k, v in o.items()]) == 2
    err = capsys.readouterr().err
    assert "tokenizer" in err and "Traceback" not in err, err
    assert not (tmp_path / "run1" / "checkpoints").exists() and not (tmp_path / "run2" / "checkpoints").exists()

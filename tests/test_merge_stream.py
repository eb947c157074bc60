"""The streaming merge (`lora_jax.hf.merge.merge_checkpoint`, `lora-jax merge --base --adapter --out`)
against PEFT's ``merge_and_unload`` on checkpoints sharded by PyTorch transformers."""

import json
import os

import numpy as np
import pytest

from lora_jax.cli import main
from lora_jax.hf.merge import merge_checkpoint
from lora_jax.io._files import read_safetensors

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _llama(d, dtype=torch.float32, shard="30KB"):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    model.save_pretrained(d, max_shard_size=shard)
    return model


def _randomize(pm, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.2)


def _adapter(base_dir, adapter_dir, dtype=torch.float32, **kw):
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).eval()
    pm = peft.get_peft_model(base, peft.LoraConfig(**kw))
    _randomize(pm)
    pm.save_pretrained(adapter_dir)
    return pm


def _state(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update({k: np.array(v) for k, v in read_safetensors(os.path.join(d, f))[0].items()})
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()


def test_streaming_merge_equals_peft_merge_and_unload_on_a_sharded_llama(tmp_path):
    base_dir, adapter_dir, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    _llama(base_dir)
    shards = sorted(f for f in os.listdir(base_dir) if f.endswith(".safetensors"))
    assert len(shards) >= 3 and (base_dir / "model.safetensors.index.json").is_file()
    pm = _adapter(base_dir, adapter_dir, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj",
                                                                             "embed_tokens"],
                  rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3})
    ids = np.random.default_rng(0).integers(0, 64, (2, 9))
    want_logits = _logits(pm, ids)
    merged = pm.merge_and_unload()
    want = {k: v.numpy() for k, v in merged.state_dict().items()}

    assert main(["merge", "--base", str(base_dir), "--adapter", str(adapter_dir), "--out", str(out)]) == 0
    # shard layout, index and config kept; every tensor equal to PEFT's merge
    assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == shards
    assert (out / "model.safetensors.index.json").read_text() == (base_dir / "model.safetensors.index.json").read_text()
    assert json.loads((out / "config.json").read_text()) == json.loads((base_dir / "config.json").read_text())
    got = _state(out)
    assert set(got) == set(want)
    base = _state(base_dir)
    changed = 0
    for k, v in want.items():
        assert got[k].dtype == np.float32
        np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-6, err_msg=k)
        changed += not np.array_equal(got[k], base[k])
    assert changed == 2 * 3 + 1  # q, v, down in two layers + the embedding: nothing silently left out
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    np.testing.assert_allclose(_logits(model, ids), want_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_logits(model, ids), _logits(merged, ids), rtol=1e-6, atol=1e-6)
    assert not [e for e in os.listdir(tmp_path) if e.startswith(".")]  # no temporary left


def test_streaming_merge_keeps_bfloat16_and_matches_peft_within_its_rounding(tmp_path):
    base_dir, adapter_dir, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    _llama(base_dir, dtype=torch.bfloat16, shard="20KB")
    pm = _adapter(base_dir, adapter_dir, dtype=torch.bfloat16, r=4, lora_alpha=16, use_rslora=True,
                  target_modules=["o_proj", "gate_proj"])
    want = {k: v.float().numpy() for k, v in pm.merge_and_unload().state_dict().items()}
    merge_checkpoint(base_dir, adapter_dir, out)
    got = _state(out)
    for k, v in want.items():
        assert got[k].dtype.name == "bfloat16", k
        # we round once (float32 sum); PEFT rounds the delta to bf16, then the sum: one bf16 ulp apart at most
        np.testing.assert_allclose(got[k].astype(np.float32), v, rtol=2 ** -7, atol=1e-6, err_msg=k)


def test_streaming_merge_of_gpt2_conv1d_fan_in_fan_out(tmp_path):
    base_dir, adapter_dir, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(base_dir)
    pm = _adapter(base_dir, adapter_dir, r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                  fan_in_fan_out=True)
    want = {k: v.numpy() for k, v in pm.merge_and_unload().state_dict().items()}
    merge_checkpoint(base_dir, adapter_dir, out)
    got = _state(out)
    for k in got:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=k)


def test_streaming_merge_refuses_what_it_cannot_merge_and_writes_nothing(tmp_path, capsys):
    base_dir = tmp_path / "base"
    _llama(base_dir)
    dora = tmp_path / "dora"
    _adapter(base_dir, dora, r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        merge_checkpoint(base_dir, dora, tmp_path / "out")
    # an adapter for another model: its modules land on no tensor of this base (a silent no-op otherwise)
    other = tmp_path / "other"
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    _adapter(tmp_path / "gpt2", other, r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    with pytest.raises(ValueError, match="no tensor 'transformer.h.0.attn.c_attn.weight' in the base"):
        merge_checkpoint(base_dir, other, tmp_path / "out")
    # the CLI: one line, exit 2, nothing written
    assert main(["merge", "--base", str(base_dir), "--adapter", str(dora), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "DoRA" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert not [e for e in os.listdir(tmp_path) if e.startswith(".")]


def test_streaming_merge_never_writes_into_its_inputs(tmp_path, capsys):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    _llama(base_dir)
    _adapter(base_dir, adapter_dir, r=2, lora_alpha=4, target_modules=["q_proj"])
    before = {f: (base_dir / f).read_bytes() for f in os.listdir(base_dir)}
    link = tmp_path / "link"
    link.symlink_to(base_dir)
    for out in (base_dir, base_dir / "merged", tmp_path, link, adapter_dir):
        assert main(["merge", "--base", str(base_dir), "--adapter", str(adapter_dir), "--out", str(out),
                     "--overwrite"]) == 2, out
        assert "choose an output" in capsys.readouterr().err
    assert {f: (base_dir / f).read_bytes() for f in os.listdir(base_dir)} == before
    assert sorted(os.listdir(adapter_dir)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_streaming_merge_replaces_modules_to_save_as_peft_does(tmp_path):
    """A SEQ_CLS adapter carries its classifier head in full (modules_to_save): the merge writes it."""
    base_dir, adapter_dir, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    torch.manual_seed(0)
    transformers.LlamaForSequenceClassification(cfg).eval().save_pretrained(base_dir)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(base_dir).eval()
    pm = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                   target_modules=["q_proj", "v_proj"]))
    _randomize(pm)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.add_(1.0)  # the trained head differs from the base's
    pm.save_pretrained(adapter_dir)
    want = {k: v.numpy() for k, v in pm.merge_and_unload().state_dict().items()}
    info = merge_checkpoint(base_dir, adapter_dir, out)
    assert info["replaced"] == ["score.weight"]
    got = _state(out)
    for k in got:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=k)


def test_streaming_merge_refuses_target_parameters(tmp_path):
    from lora_jax.io._files import write_json, write_safetensors

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    _llama(base_dir)
    adapter_dir.mkdir()
    write_json(str(adapter_dir / "adapter_config.json"),
               {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": [],
                "target_parameters": ["mlp.experts.gate_up_proj"]})
    write_safetensors(str(adapter_dir / "adapter_model.safetensors"),
                      {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((2, 32), np.float32),
                       "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((32, 2), np.float32)})
    with pytest.raises(ValueError, match="target_parameters=.* LoRA on parameters is not merged"):
        merge_checkpoint(base_dir, adapter_dir, tmp_path / "out")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fan_in_fan_out_is_the_modules_as_in_peft(tmp_path, arch):
    """Issue 22.3: PEFT takes a weight's layout from its module (Conv1D: (in, out); nn.Linear:
    (out, in)) and ignores a ``fan_in_fan_out`` that contradicts it; the streaming merge and
    load_peft do the same (a flipped flag on GPT-2, a true flag on a Llama's square weights), and
    the merge equals PEFT's merge_and_unload of the same files."""
    import warnings

    import lora_jax.hf as hf

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    if arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32)
        torch.manual_seed(0)
        transformers.GPT2LMHeadModel(cfg).save_pretrained(base_dir)
        _adapter(base_dir, adapter_dir, r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
        flip = ('"fan_in_fan_out": true', '"fan_in_fan_out": false')
    else:
        _llama(base_dir)
        _adapter(base_dir, adapter_dir, r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"])  # square
        flip = ('"fan_in_fan_out": false', '"fan_in_fan_out": true')
    cfg_file = adapter_dir / "adapter_config.json"
    assert flip[0] in cfg_file.read_text()
    cfg_file.write_text(cfg_file.read_text().replace(*flip))
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that it overrides the flag
        pm = peft.PeftModel.from_pretrained(base, adapter_dir)
    want = {k: v.numpy() for k, v in pm.merge_and_unload().state_dict().items()}
    merge_checkpoint(base_dir, adapter_dir, tmp_path / "out")
    got = _state(tmp_path / "out")
    changed = 0
    for k in got:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=k)
        changed += not np.array_equal(got[k], _state(base_dir)[k])
    assert changed == (1 if arch == "gpt2" else 4)
    model, params = hf.from_pretrained(base_dir)
    tree = hf.load_peft(adapter_dir, params, model)
    ids = np.array([[1, 5, 9, 3]])
    from lora_jax import wrap

    np.testing.assert_allclose(np.asarray(wrap(model.apply)({"params": tree}, ids)), _logits(pm, ids),
                               rtol=2e-5, atol=2e-5)


@pytest.fixture(scope="module")
def llama_and_adapter(tmp_path_factory):
    """A sharded tiny Llama, a PEFT adapter of it, and the model loaded by lora_jax (built once)."""
    import lora_jax.hf as hf

    d = tmp_path_factory.mktemp("llama_and_adapter")
    _llama(d / "base")
    _adapter(d / "base", d / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    model, params = hf.from_pretrained(d / "base")
    return d / "base", d / "adapter", model, params


@pytest.mark.parametrize("field,value,message", [
    ("alpha_pattern", {"q_proj": -2}, "alpha_pattern['q_proj'] must be a positive number, got -2"),
    ("rank_pattern", {"q_proj": 2.5}, "rank_pattern['q_proj'] must be a positive integer, got 2.5"),
    ("rank_pattern", {"(": 2}, "rank_pattern key: '(' is not a valid regular expression"),
    ("target_modules", "q_proj(", "target_modules: 'q_proj(' is not a valid regular expression"),
    ("target_modules", ["q_proj", 3], "target_modules must be a regular expression or a list of module names"),
    ("exclude_modules", 7, "exclude_modules must be a regular expression or a list of module names"),
    ("lora_dropout", "0.1", "lora_dropout must be a number in [0, 1), got '0.1'"),
    ("use_rslora", "yes", "use_rslora must be true or false, got 'yes'"),
    ("layers_to_transform", ["0"], "layers_to_transform must be a layer index or a list of them"),
])
def test_adapter_config_fields_are_checked_alike_everywhere(tmp_path, capsys, llama_and_adapter, field, value,
                                                           message):
    """Issue 22.3/22.8: one reader of adapter configs: a bad field is one error naming the file and
    the field, from load_peft and from the streaming merge alike, never a traceback."""
    import shutil

    base_dir, good, model, params = llama_and_adapter
    adapter_dir = tmp_path / "adapter"
    shutil.copytree(good, adapter_dir)
    cfg_file = adapter_dir / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), field: value}))
    import lora_jax.hf as hf

    with pytest.raises(ValueError) as e:
        hf.load_peft(adapter_dir, params, model)
    assert message in str(e.value) and "adapter_config.json" in str(e.value)
    assert main(["merge", "--base", str(base_dir), "--adapter", str(adapter_dir), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and "adapter_config.json" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_a_shard_name_never_writes_outside_the_output(tmp_path, capsys):
    """Issue 22.1: a shard name from the base's index that climbs out (through a link inside the
    base, or plainly) is refused before anything is written, by the merge and by the loader, and no
    file appears beside the output."""
    from lora_jax.models.checkpoint import load

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    _llama(base_dir)
    _adapter(base_dir, adapter_dir, r=2, lora_alpha=4, target_modules=["q_proj"])
    (base_dir / "a" / "b").mkdir(parents=True)
    (base_dir / "sub").symlink_to("a/b")
    index = json.loads((base_dir / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    os.rename(base_dir / first, base_dir / "x.safetensors")  # where "sub/../../x" resolves inside the base
    for name in ("sub/../../x.safetensors", "../x.safetensors", "/etc/x.safetensors"):
        bad = {k: (name if v == first else v) for k, v in index["weight_map"].items()}
        (base_dir / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": bad}))
        before = sorted(os.listdir(tmp_path))
        assert main(["merge", "--base", str(base_dir), "--adapter", str(adapter_dir), "--out",
                     str(tmp_path / "out" / "merged")]) == 2, name
        err = capsys.readouterr().err
        assert repr(name) in err and ("'..' part" in err or "absolute path" in err) and "Traceback" not in err
        assert sorted(os.listdir(tmp_path)) == before and not (tmp_path / "x.safetensors").exists()
        with pytest.raises(ValueError, match="'..' part|absolute path"):
            load(base_dir)


def _hub_cache(root, repo, src, commit="0123456789abcdef0123456789abcdef01234567"):
    """``src``'s files laid out as the Hugging Face hub cache stores them: blobs named by content,
    ``snapshots/<commit>/<file>`` relative links into ``../../blobs``, ``refs/main``."""
    import hashlib

    d = root / ("models--" + repo.replace("/", "--"))
    (d / "blobs").mkdir(parents=True)
    (d / "refs").mkdir()
    (d / "refs" / "main").write_text(commit)
    snap = d / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in sorted(os.listdir(src)):
        data = (src / f).read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (d / "blobs" / blob).write_bytes(data)
        (snap / f).symlink_to(os.path.join("..", "..", "blobs", blob))
    return snap


def test_a_sharded_model_in_the_hub_cache_loads_by_path_and_by_id(tmp_path, monkeypatch, capsys):
    """Issue 22.2: a sharded snapshot of the hub cache (relative links into blobs/) loads through
    from_pretrained, the streaming merge and a train config, by its snapshot path and by its hub id
    offline; a link out of the cache's own layout is still refused; ~ expands in path settings."""
    import lora_jax.hf as hf
    from lora_jax.train.config import load_config

    src, adapter_dir = tmp_path / "src", tmp_path / "adapter"
    ref = _llama(src)
    _adapter(src, adapter_dir, r=2, lora_alpha=4, target_modules=["q_proj"])
    cache = tmp_path / "hub"
    snap = _hub_cache(cache, "org/tiny", src)
    assert (snap / "model.safetensors.index.json").is_symlink()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    ids = np.array([[1, 5, 9, 3, 7]])
    want = _logits(ref, ids)
    for spec in (str(snap), "org/tiny", "org/tiny@main"):
        model, params = hf.from_pretrained(spec)
        np.testing.assert_allclose(np.asarray(model.apply({"params": params}, ids)), want, rtol=2e-5, atol=2e-5)
    assert main(["merge", "--base", "org/tiny", "--adapter", str(adapter_dir), "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model.safetensors.index.json").is_file()
    assert load_config(None, ["model.path=org/tiny"]).model.path == "org/tiny"
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        hf.from_pretrained("org/absent")
    # ~ in path settings
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["model.path=~/src", "out_dir=~/runs/x"])
    assert cfg.out_dir == str(tmp_path / "runs" / "x")
    model, _ = hf.from_pretrained("~/src")
    # the cache's layout is the only exception: a shard linking elsewhere is still refused
    victim = tmp_path / "elsewhere.safetensors"
    shard = sorted(f for f in os.listdir(snap) if f.endswith(".safetensors"))[0]
    victim.write_bytes((snap / shard).read_bytes())
    (snap / shard).unlink()
    (snap / shard).symlink_to(victim)
    with pytest.raises(ValueError, match="outside"):
        hf.from_pretrained(str(snap))


def test_merge_copies_no_file_from_outside_the_base_through_a_link(tmp_path, capsys):
    """Issue 22.13: a base's non-weight file that links outside it (a token file) is refused, not
    copied into the output as a readable file; nothing is written."""
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    _llama(base_dir)
    _adapter(base_dir, adapter_dir, r=2, lora_alpha=4, target_modules=["q_proj"])
    secret = tmp_path / "secret_token"
    secret.write_text("hf_secret")
    (base_dir / "notes.txt").symlink_to(secret)
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(base_dir), "--adapter", str(adapter_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "'notes.txt'" in err and "outside" in err and "Traceback" not in err
    assert not out.exists() and [p for p in os.listdir(tmp_path) if p.startswith(".")] == []
    (base_dir / "notes.txt").unlink()
    (base_dir / "inner.txt").write_text("x")
    (base_dir / "alias.txt").symlink_to("inner.txt")  # a link inside the base is fine
    merge_checkpoint(base_dir, adapter_dir, out)
    assert (out / "alias.txt").read_text() == "x" and not (out / "alias.txt").is_symlink()


@pytest.mark.parametrize("damage", ["wrong shard", "in no shard", "missing"])
def test_merge_refuses_an_index_that_does_not_match_its_shards(tmp_path, capsys, damage):
    """Issue 22.23: the index is checked against the shards' own headers before anything is written
    (it was copied verbatim, with rc 0)."""
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    _llama(base_dir)
    _adapter(base_dir, adapter_dir, r=2, lora_alpha=4, target_modules=["q_proj"])
    path = base_dir / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    wmap = index["weight_map"]
    shards = sorted(set(wmap.values()))
    assert len(shards) > 1
    name = next(k for k, v in wmap.items() if v == shards[0])
    if damage == "wrong shard":
        wmap[name] = shards[1]
    elif damage == "in no shard":
        wmap["model.layers.9.mlp.up_proj.weight"] = shards[0]
    else:
        del wmap[name]
    path.write_text(json.dumps(index))
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(base_dir), "--adapter", str(adapter_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "does not match its shards" in err and "Traceback" not in err
    assert ("model.layers.9.mlp.up_proj.weight" if damage == "in no shard" else name) in err
    assert not out.exists()

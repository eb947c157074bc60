"""Config: defaults, YAML + overrides, and one clear error (with nothing written) for bad input."""

import os
from importlib import resources

import pytest
import yaml

from lora_jax.cli import main
from lora_jax.train.config import Config, ConfigError, load_config, to_dict


def test_default_yaml_is_exactly_the_builtin_defaults():
    shipped = yaml.safe_load(resources.files("lora_jax").joinpath("conf", "default.yaml").read_text())
    assert shipped == to_dict(Config())
    assert to_dict(load_config("default")) == to_dict(load_config(None))


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(None, ["train.steps=20", "lora.rank=4", "train.lr=1e-4", "lora.targets=[q_proj,v_proj]",
                             "model.init.hidden_size=32", "mesh.fsdp=2", "mesh.data=-1"])
    assert cfg.train.steps == 20 and cfg.lora.rank == 4 and cfg.train.lr == 1e-4
    assert cfg.lora.targets == ["q_proj", "v_proj"]
    assert cfg.model.init["hidden_size"] == 32 and cfg.model.init["arch"] == "llama"  # merged with the defaults
    assert cfg.model.init["num_hidden_layers"] == 4
    p = tmp_path / "mine.yaml"
    p.write_text("train:\n  steps: 7\nlora:\n  alpha: 4\n")
    cfg = load_config(str(p), ["train.steps=9", "train.warmup_steps=2"])
    assert (cfg.train.steps, cfg.lora.alpha, cfg.name) == (9, 4.0, "mine")  # the command line wins
    assert cfg.train.batch_size == Config().train.batch_size


@pytest.mark.parametrize("override,message", [
    ("trian.steps=3", "unknown key 'trian'; did you mean 'train'?"),
    ("train.step=3", "unknown key 'train.step'; did you mean 'train.steps'?"),
    ("train.steps=abc", "train.steps: expected an integer, got 'abc' (str)"),
    ("train.steps=2.5", "train.steps: expected an integer, got 2.5 (float)"),
    ("train.steps=0", "train.steps: 0 is out of range; expected a value >= 1"),
    ("train.schedule=cosin", "train.schedule: 'cosin' is not allowed; expected one of cosine, linear, constant "
                             "(did you mean 'cosine'?)"),
    ("train.remat=full", "train.remat: 'full' is not allowed; expected one of none, nothing_saveable"),
    ("lora.dropout=1.5", "lora.dropout: 1.5 is out of range; expected a value >= 0.0 and < 1.0"),
    ("train.progress=maybe", "train.progress: expected true/false, got 'maybe'"),
    ("data.train=/no/such/file.txt", "data.train: file not found: '/no/such/file.txt'"),
    ("data.train=builtin:nope.txt", "data.train: file not found: 'builtin:nope.txt' (shipped files: "),
    ("model.path=/no/such/dir", "model.path: directory not found: '/no/such/dir'"),
    ("model.init.hidden_sise=8", "unknown key 'model.init.hidden_sise' for a llama config; did you mean 'hidden_size'?"),
    ("model.init.arch=lama", "model.init.arch: 'lama' is not allowed; expected one of llama"),
    ("train.batch_size=10", "train.batch_size: 10 does not divide by train.grad_accum=4"),
    ("mesh.fsdp=0", "mesh.fsdp: 0 is not allowed; expected a positive size or -1"),
    ("train.warmup_steps=500", "train.warmup_steps: 500 is more than train.steps=100; expected a value <= 100"),
])
def test_bad_values_give_one_clear_error(override, message):
    extra = ["train.grad_accum=4"] if override.startswith("train.batch_size") else []
    with pytest.raises(ConfigError) as e:
        load_config(None, [override] + extra)
    assert message in str(e.value), str(e.value)


def test_every_problem_is_listed_in_one_error():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.steps=-1", "lora.rank=x", "nope=1"])
    msg = str(e.value)
    assert msg.startswith("3 problems in the config:")
    assert "train.steps" in msg and "lora.rank" in msg and "unknown key 'nope'" in msg


def test_unknown_config_name_and_bad_override_syntax():
    with pytest.raises(ConfigError, match="unknown config 'defualt'; did you mean 'default'"):
        load_config("defualt")
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["=3"])


@pytest.mark.parametrize("args,message", [
    (["trian.steps=3"], "did you mean 'train'?"),
    (["train.schedule=warm"], "expected one of cosine, linear, constant"),
    (["lora.rank=many"], "lora.rank: expected an integer"),
    (["data.train=missing.jsonl"], "data.train: file not found: 'missing.jsonl'"),
    (["--resume"], "train.resume: no finalized checkpoint in"),
    (["lora.targets=[no_such_module]"], "lora.targets: LoRA rules matched no kernel"),
    (["data.seq_len=100"], "data.seq_len: 100 is more than the model's 64 positions"),
    (["train.batch_size=12"], "train.batch_size: 12 / grad_accum 1 = 12 rows per micro-batch must divide by mesh"),
])
def test_cli_errors_write_nothing(tmp_path, capsys, args, message):
    from train_helpers import tiny_overrides

    run_dir = tmp_path / "run"
    base = [a for a in tiny_overrides(run_dir) if not a.startswith(tuple(x.split("=")[0] + "=" for x in args))]
    rc = main(["train"] + base + args)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("lora-jax: error: ") and message in err, err
    assert not run_dir.exists()


def test_malformed_data_is_reported_before_anything_is_written(tmp_path, capsys):
    from train_helpers import tiny_overrides

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"prompt": 3, "completion": "x"}\n')
    rc = main(["train"] + tiny_overrides(tmp_path / "run") + [f"data.train={bad}"])
    assert rc == 2
    assert f"data.train: {bad}:2: 'prompt' and 'completion' must both be strings" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_dry_run_prints_the_resolved_config(capsys, tmp_path):
    assert main(["train", "default", "train.steps=3", "train.warmup_steps=1", f"out_dir={tmp_path / 'r'}", "--dry-run"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["train"]["steps"] == 3 and out["model"]["init"]["arch"] == "llama"
    assert not (tmp_path / "r").exists()


def test_cli_usage_errors(capsys):
    assert main(["trian"]) == 2
    assert "unknown command 'trian'; did you mean 'train'?" in capsys.readouterr().err
    assert main(["train", "a.steps=1", "default"]) == 2
    assert "comes after key=value overrides" in capsys.readouterr().err


def test_repo_conf_default_is_the_shipped_default():
    """``conf/default.yaml`` at the repository root (what a user edits) is the file the package
    ships as its embedded default; they must not drift apart."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "conf", "default.yaml"), "rb") as a, \
            open(os.path.join(root, "lora_jax", "conf", "default.yaml"), "rb") as b:
        assert a.read() == b.read()

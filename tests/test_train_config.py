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


def test_text_settings_take_the_override_as_typed(tmp_path):
    (tmp_path / "exp #2").mkdir()
    cfg = load_config(None, ["out_dir=runs/exp #2", "name=a: b", "lora.exclude=lm_head #x"], check_files=False)
    assert cfg.out_dir == "runs/exp #2" and cfg.name == "a: b" and cfg.lora.exclude == "lm_head #x"
    assert load_config(None, ["out_dir=~"]).out_dir == os.path.expanduser("~")  # not null
    assert load_config(None, ["out_dir=a\nb"]).out_dir == "a\nb"  # a newline is not folded to a space
    assert load_config(None, ["out_dir=null"]).out_dir is None  # null, quoted and [lists] are still YAML
    assert load_config(None, ["out_dir='x #1'"]).out_dir == "x #1"
    assert load_config(None, ["lora.targets=[q_proj, v_proj]"]).lora.targets == ["q_proj", "v_proj"]
    assert load_config(None, ["lora.targets=q_proj #c"]).lora.targets == "q_proj #c"
    data = tmp_path / "d #1.txt"
    data.write_text("hello")
    assert load_config(None, [f"data.train={data}"]).data.train == str(data)
    # other settings read YAML as before
    cfg = load_config(None, ["train.unroll=4", "train.lr=1e-4", "lora.rslora=true", "model.init.hidden_size=32"])
    assert (cfg.train.unroll, cfg.train.lr, cfg.lora.rslora, cfg.model.init["hidden_size"]) == (4, 1e-4, True, 32)


@pytest.mark.parametrize("override,message", [
    ("trian.steps=3", "unknown key 'trian'; did you mean 'train'?"),
    ("train.step=3", "unknown key 'train.step'; did you mean 'train.steps'?"),
    ("train.steps=abc", "train.steps: expected an integer, got 'abc' (str)"),
    ("train.steps=2.5", "train.steps: expected an integer, got 2.5 (float)"),
    ("train.steps=0", "train.steps: 0 is out of range; expected a value >= 1"),
    ("train.schedule=cosin", "train.schedule: 'cosin' is not allowed; expected one of cosine, linear, constant "
                             "(did you mean 'cosine'?)"),
    ("train.remat=full", "train.remat: 'full' is not allowed; expected one of auto, none, nothing_saveable"),
    ("train.loss=fast", "train.loss: 'fast' is not allowed; expected one of auto, plain, chunked"),
    ("train.unroll=0", "train.unroll: 0 is out of range; expected a value >= 1"),
    ("train.unroll=most", "train.unroll: 'most' is not allowed; expected one of auto, all"),
    ("train.chunked_loss=maybe", "train.chunked_loss: 'maybe' is no longer a setting; use train.loss (chunked,"),
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


# ---- fuzzing: junk in, one ConfigError out ------------------------------------------------------

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from lora_jax.train.config import from_dict, parse_overrides, to_yaml  # noqa: E402


def _dotted(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict) and k != "init":
            yield prefix + k
            yield from _dotted(v, prefix + k + ".")
        else:
            yield prefix + k


KEYS = sorted(_dotted(to_dict(Config()))) + ["model.init.hidden_size", "model.init.arch", "model.init.rope_scaling",
                                              "model.init.num_attention_heads"]
INIT_KEYS = ["arch", "hidden_size", "num_attention_heads", "rope_theta", "rope_scaling", "hidden_act",
             "tie_word_embeddings", "max_position_embeddings", "rms_norm_eps", "head_dim", "attention_bias"]
_junk_text = st.text(max_size=12)  # any unicode, surrogates and NUL included
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=2**31 - 3, max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), _junk_text,
                    st.sampled_from(["cosine", "stop", "skip", "all-linear", "q[", "(?P<", "*", "[a-z]+_proj",
                                     "builtin:finetune.txt", "builtin:nope", "1e-3", "nan", "-inf", "1e400",
                                     "/dev/null", "", "\x00", "../..", "llama", "gpt2"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.one_of(st.sampled_from(KEYS), _junk_text,
                                                                                  st.integers()), inner, max_size=3)),
                      max_leaves=8)
# YAML snippets that PyYAML turns into odd things (or fails on in odd ways)
yaml_values = st.one_of(values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()),
                        st.sampled_from(["[", "{a: [1, 2", "!!python/object:os.system", "2021-02-30", "&a [*a]",
                                         "*undefined", "- - -", "{: }", "? [a]\n: 1", "1_000", "0x1F", "0o17", ".inf",
                                         "!!binary AAAA", "\t", "'\\x00'", "[" * 60, "!!float nope",
                                         "2001-12-14t21:59:43.10-05:00", "~"]),
                        _junk_text)


@st.composite
def documents(draw):
    """A nested config-like mapping: known sections and keys mixed with junk."""
    doc = {}
    for _ in range(draw(st.integers(0, 4))):
        key = draw(st.sampled_from(KEYS))
        node = doc
        parts = key.split(".")
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                break
            node = nxt
        else:
            node[parts[-1]] = draw(values)
    if draw(st.booleans()):
        doc[draw(_junk_text)] = draw(values)
    if draw(st.booleans()):  # the fresh model's transformers config: free-form, so junk gets far
        init = draw(st.dictionaries(st.one_of(st.sampled_from(INIT_KEYS), _junk_text, st.integers(), st.none()),
                                    values, max_size=3))
        model = doc.setdefault("model", {})
        if isinstance(model, dict):
            model["init"] = init
    return doc


def _only_config_errors(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except ConfigError as e:
        assert str(e) and e.__cause__ is None, repr(e)  # one message, no chained traceback
        return None


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(documents(), values))
def test_fuzz_from_dict_raises_only_config_error(doc):
    cfg = _only_config_errors(from_dict, doc)
    if cfg is not None:  # what is accepted survives its own YAML
        assert to_dict(from_dict(yaml.safe_load(to_yaml(cfg)))) == to_dict(cfg)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(documents().map(lambda d: yaml.safe_dump(d, allow_unicode=True)), yaml_values,
                 st.binary(max_size=40).map(lambda b: b.decode("latin-1"))))
def test_fuzz_yaml_files_raise_only_config_error(tmp_path_factory, text):
    p = tmp_path_factory.mktemp("yaml") / "junk.yaml"
    p.write_bytes(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    _only_config_errors(load_config, str(p))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.one_of(st.sampled_from(KEYS), _junk_text, st.sampled_from(["a..b", ".", "train.", "=", ""])),
                          yaml_values), max_size=4))
def test_fuzz_overrides_raise_only_config_error(pairs):
    _only_config_errors(load_config, None, [f"{k}={v}" for k, v in pairs])
    _, problems = parse_overrides([f"{k}={v}" for k, v in pairs])
    assert all(isinstance(p, str) for p in problems)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(KEYS), yaml_values), min_size=1, max_size=3))
def test_fuzz_cli_dry_run_exits_0_or_2_with_one_message(pairs):
    import contextlib
    import io

    args = [f"{k}={v}" for k, v in pairs if not k.startswith("-")]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["train", "--dry-run"] + args)
    if rc == 0:
        assert err.getvalue() == "" and yaml.safe_load(out.getvalue())["train"]
    else:
        assert rc == 2 and out.getvalue() == ""
        e = err.getvalue()
        assert e.startswith("lora-jax: error: ") and e.count("lora-jax: error: ") == 1 and "Traceback" not in e, e


@pytest.mark.parametrize("override,message", [
    ("lora.targets=q[", "lora.targets: Rules rule 0 ('q['): 'q[' is not a valid regular expression"),
    ("lora.exclude=(?P<", "lora.exclude: Rules(exclude=...): '(?P<' is not a valid regular expression"),
    ("train.steps=3000000000", "train.steps: 3000000000 is out of range; expected a value >= 1 and <= 2147483647"),
    ("train.lr=1e400", "train.lr: must be a finite number, got inf"),
    ("name=a/b", "name: 'a/b' cannot name a run directory"),
    ("model.init.rope_theta=.nan", "model.init.rope_theta: expected a finite number, got nan"),
    ("model.init.hidden_size=1e40", "model.init.hidden_size: expected a positive integer (at most 2147483647)"),
    ("model.init.rope_scaling={rope_type: linear}",
     "model.init: lora_jax's llama config rejects it: ValueError: rope_parameters: rope_type 'linear' needs ['factor']"),
    ("model.init.sliding_window=8", "unknown key 'model.init.sliding_window' for a llama config"),
    ("lora.layout=out_in", "lora.layout: 'out_in' is no longer a setting"),
])
def test_fuzz_findings_are_clear_errors(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value), str(e.value)


def test_non_mapping_documents_and_undecodable_files(tmp_path):
    with pytest.raises(ConfigError, match=r"config: expected a mapping of sections .* got list \[1, 2\]"):
        from_dict([1, 2])
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"train:\n  steps: \xff\xfe\n")
    with pytest.raises(ConfigError, match="bin.yaml: not UTF-8 text"):
        load_config(str(p))
    p.write_text("d: 2021-02-30\n")
    with pytest.raises(ConfigError, match=r"not valid YAML \(ValueError: "):
        load_config(str(p))


def test_chunked_loss_of_older_configs_reads_as_train_loss():
    assert load_config(None, ["train.chunked_loss=false"]).train.loss == "plain"
    assert load_config(None, ["train.chunked_loss=true"]).train.loss == "chunked"
    assert load_config(None, []).train.loss == "auto"
    with pytest.raises(ConfigError, match="train.chunked_loss: True contradicts train.loss='plain'"):
        load_config(None, ["train.chunked_loss=true", "train.loss=plain"])


def _alias_bomb(indent: str) -> list:
    """Nine levels of nine-fold aliases: 2 KB of YAML standing for 9**9 values."""
    lines = [f'{indent}l0: &l0 ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"{indent}l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    return lines


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path, capsys):
    """Issue 22.5: an alias bomb inside model.init (a free-form mapping), in a config file, in an
    override, or in a run directory's config.yaml read by eval, is one clear error within seconds."""
    import time

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(["model:", "  init:", "    arch: llama", "    rope_scaling:"] + _alias_bomb("      "))
                    + "\n")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="expands to more than 100,000 values"):
        load_config(str(bomb))
    with pytest.raises(ConfigError, match="override model.init.rope_scaling: the YAML expands to more than"):
        load_config(None, ["model.init.rope_scaling={" + ", ".join(
            line.strip().replace(": &", ": &") for line in _alias_bomb("")) + "}"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(bomb.read_text())
    assert main(["eval", str(run)]) == 2
    assert "expands to more than 100,000 values" in capsys.readouterr().err
    assert time.perf_counter() - t0 < 30


def test_model_init_larger_than_memory_is_refused_by_the_dry_run(capsys):
    """Issue 22.7: a fresh model whose weights alone exceed the machine's memory is a config problem
    (named with its parameter count), not a JAX traceback after --dry-run passed."""
    assert main(["train", "--dry-run", "model.init.num_hidden_layers=2147483647"]) == 2
    err = capsys.readouterr().err
    assert "model.init: describes a model of" in err and "GiB of memory" in err and "Traceback" not in err

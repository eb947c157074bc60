"""Generic adapter files: exact round trips, and bad files that name every problem."""

import json
import shutil
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lora_jax as lora
from lora_jax.io import load_adapter, save_adapter
from lora_jax.io._files import atomic_directory, contained

from helpers import nonzero_b, rand


def params_tree():
    # nested dicts, a list and a tuple; a stacked (nn.scan) kernel; an N-d kernel; bf16 and f32
    return {
        "enc": [{"kernel": rand(0, (16, 8))}, {"kernel": rand(1, (8, 8), jnp.bfloat16)}],
        "stack": {"w": rand(2, (3, 8, 6))},
        "attn": ({"kernel": rand(3, (8, 2, 4))}, {"bias": rand(4, (4,))}),
    }


def lora_tree(use_dora=False):
    stacked = lora.Rules("stack", stack_axes=1, rank=2, layers=[0, 2], use_dora=use_dora)
    others = lora.Rules([lora.Rule(["enc/0", "enc/1"]),
                         lora.Rule(["attn/0"], layout="ioo", alpha=3.0, use_rslora=True)],
                        rank=4, alpha=8, dropout=0.1, use_dora=use_dora)
    lp = lora.init(lora.init(params_tree(), stacked, 0), others, 1, add=True)
    return nonzero_b(lp)


def _assert_same(got, want):
    gl = jax.tree_util.tree_flatten_with_path(got, is_leaf=lora.is_lora)[0]
    wl = jax.tree_util.tree_flatten_with_path(want, is_leaf=lora.is_lora)[0]
    assert [k for k, _ in gl] == [k for k, _ in wl]
    for (k, g), (_, w) in zip(gl, wl):
        if lora.is_lora(w):
            assert lora.is_lora(g), k
            assert (g.layout, g.settings) == (w.layout, w.settings), (k, g, w)
            for name in ("w", "a", "b", "m"):
                x, y = getattr(g, name), getattr(w, name)
                assert (x is None) == (y is None), (k, name)
                if x is not None:
                    assert x.dtype == y.dtype and x.shape == y.shape
                    # bit for bit, whatever the dtype
                    np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))
        else:
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("use_dora", [False, True])
def test_round_trip_is_bit_exact(tmp_path, use_dora):
    lp = lora_tree(use_dora)
    # the static data really varies: layer masks, N-d layouts, rsLoRA, dtypes
    items = dict(lora.tree.lora_items(lp))
    assert items["stack/w"].layer_mask == (True, False, True) and items["attn/0/kernel"].layout == "ioo"
    assert items["enc/1/kernel"].a.dtype == jnp.float32 and items["enc/1/kernel"].w.dtype == jnp.bfloat16
    save_adapter(tmp_path / "ad", lp)
    assert sorted(os.listdir(tmp_path / "ad")) == ["adapter.json", "adapter.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["ad"]  # no temporary directory left behind
    back = load_adapter(tmp_path / "ad", params_tree())
    _assert_same(back, lp)
    assert len(items) == 4 and (items["enc/0/kernel"].m is not None) == use_dora


def test_bf16_factors_and_trainable_half(tmp_path):
    params = {"k": rand(0, (12, 6), jnp.bfloat16)}
    lp = nonzero_b(lora.init(params, lora.Rules("k", rank=3, a_dtype="base"), 0))
    assert lp["k"].a.dtype == jnp.bfloat16
    trainable, _ = lora.split(lp)  # no base weight in it: the file never needs one
    save_adapter(tmp_path / "ad", trainable)
    _assert_same(load_adapter(tmp_path / "ad", params), lp)


def test_params_are_not_modified_and_refuse_overwrite(tmp_path):
    params = params_tree()
    before = jax.tree_util.tree_map(np.asarray, params)
    save_adapter(tmp_path / "ad", lora_tree())
    load_adapter(tmp_path / "ad", params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, jax.tree_util.tree_map(np.asarray, params))
    with pytest.raises(ValueError, match="not empty.*overwrite=True"):
        save_adapter(tmp_path / "ad", lora_tree())
    other = lora.init({"k": rand(0, (4, 4))}, lora.Rules("k", rank=1), 0)
    save_adapter(tmp_path / "ad", other, overwrite=True)
    assert set(load_adapter(tmp_path / "ad", {"k": rand(0, (4, 4))})) == {"k"}
    assert sorted(os.listdir(tmp_path)) == ["ad"]


def test_save_refuses_a_tree_without_adapters(tmp_path):
    with pytest.raises(ValueError, match="no LoraWeight"):
        save_adapter(tmp_path / "ad", params_tree())
    assert not os.path.exists(tmp_path / "ad")


def _tamper(d, fn):
    f = os.path.join(d, "adapter.safetensors")
    t = load_file(f)
    fn(t)
    save_file(t, f)


def test_bad_file_lists_every_problem(tmp_path):
    d = tmp_path / "ad"
    save_adapter(d, lora_tree())

    def tamper(t):
        del t["enc/0/kernel.lora_a"]                         # missing key
        t["enc/0/kernel.extra"] = np.zeros(3, np.float32)     # extra key
        t["stack/w.lora_b"] = np.zeros((3, 2, 7), np.float32)  # wrong shape (out is 6)
    _tamper(d, tamper)
    with pytest.raises(ValueError) as e:
        load_adapter(d, params_tree())
    msg = str(e.value)
    assert "3 problem(s)" in msg
    assert "'enc/0/kernel.lora_a' (a) is missing" in msg
    assert "enc/0/kernel.extra: tensor in adapter.safetensors that no metadata entry names" in msg
    assert "stack/w: b 'stack/w.lora_b' has shape (3, 2, 7), expected (3, 2, 6)" in msg


def test_params_that_do_not_fit(tmp_path):
    d = tmp_path / "ad"
    save_adapter(d, lora_tree())
    params = params_tree()
    params["enc"][0]["kernel"] = rand(0, (16, 9))   # saved for (16, 8)
    del params["stack"]                             # path gone
    with pytest.raises(ValueError) as e:
        load_adapter(d, params)
    msg = str(e.value)
    assert "enc/0/kernel: the adapter was saved for a kernel of shape (16, 8), params have (16, 9)" in msg
    assert "stack/w: no such path in params" in msg
    with pytest.raises(ValueError, match="already hold a LoraWeight"):
        load_adapter(d, lora_tree())
    # an integer kernel (a relabelled or damaged base): refused as lora.init refuses it
    params = params_tree()
    params["enc"][0]["kernel"] = np.zeros((16, 8), np.int32)
    with pytest.raises(ValueError, match="enc/0/kernel: params hold a int32 kernel here; LoRA adapts floating"):
        load_adapter(d, params)


def test_truncated_and_malformed_files(tmp_path):
    d = tmp_path / "ad"
    save_adapter(d, lora_tree())
    f = d / "adapter.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 10])
    with pytest.raises(ValueError, match="adapter.safetensors' is not a readable safetensors file"):
        load_adapter(d, params_tree())
    f.write_bytes(data)
    meta = json.loads((d / "adapter.json").read_text())
    meta["weights"]["enc/0/kernel"]["rank"] = 0
    meta["weights"]["stack/w"]["layout"] = "sxo"
    (d / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError) as e:
        load_adapter(d, params_tree())
    assert "enc/0/kernel: rank must be a positive integer, got 0" in str(e.value)
    assert "stack/w: layout must be letters" in str(e.value)
    (d / "adapter.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_adapter(d, params_tree())
    with pytest.raises(FileNotFoundError, match="no adapter directory"):
        load_adapter(tmp_path / "nope", params_tree())


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "out") as t:
            open(os.path.join(t, "half"), "w").write("x")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("old")
    # issue 22.24: overwrite replaces an earlier export only, never a directory of other things
    with pytest.raises(ValueError, match="holds 1 entries .* but no earlier export"):
        with atomic_directory(tmp_path / "out", overwrite=True) as t:
            pass
    (tmp_path / "out" / "config.json").write_text("{}")
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "out", overwrite=True) as t:
            raise RuntimeError("boom")
    assert (tmp_path / "out" / "keep").read_text() == "old"  # the old directory survives a failed overwrite
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_contained_refuses_escapes(tmp_path):
    assert contained(tmp_path, "a.safetensors") == os.path.join(os.path.realpath(tmp_path), "a.safetensors")
    for bad in ("../x.safetensors", "/etc/passwd", "sub/../../x", ""):
        with pytest.raises(ValueError):
            contained(tmp_path, bad)
    os.symlink("/tmp", tmp_path / "link")
    with pytest.raises(ValueError, match="outside"):
        contained(tmp_path, "link/x")


def test_round_trip_of_chains_slices_and_fully_trained_leaves(tmp_path):

    params = {"body": {"kernel": jnp.ones((6, 9)) * 0.1, "bias": jnp.zeros(9)},
              "head": {"kernel": jnp.ones((9, 3)), "bias": jnp.zeros(3)}}
    rules = lora.Rules([lora.Rule(["body"], enable_lora=[True, False, True])], rank=2, modules_to_save=["head"],
                       bias="lora_only")
    lp = lora.init(params, rules, 0)
    lp = lora.select(lora.add(lp, "second", lora.Rules(["body"], rank=3, use_rslora=True), 1), "second")
    lp = jax.tree_util.tree_map(lambda x: x.replace(b=x.b + 0.5) if lora.is_lora(x) else x, lp, is_leaf=lora.is_lora)
    lora.save_adapter(tmp_path / "ad", lp)
    back = lora.load_adapter(tmp_path / "ad", params)
    assert jax.tree_util.tree_structure(back, is_leaf=lora.is_lora) == jax.tree_util.tree_structure(lp, is_leaf=lora.is_lora)
    for x, y in zip(jax.tree_util.tree_leaves(lp), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    chain = back["body"]["kernel"].chain()
    assert [(n.name, n.active, n.out_slices) for n in chain] == [("default", False, (True, False, True)),
                                                                 ("second", True, None)]
    assert isinstance(back["head"]["kernel"], lora.Trainable) and isinstance(back["body"]["bias"], lora.Trainable)
    np.testing.assert_array_equal(lora.merge(back)["body"]["kernel"], lora.merge(lp)["body"]["kernel"])
    # a quantized base takes the adapter too
    q = lora.load_adapter(tmp_path / "ad", {**params, "body": {**params["body"],
                                                               "kernel": lora.quantize(lora.init(
                                                                   {"k": params["body"]["kernel"]}, lora.Rules("k", rank=1),
                                                                   0), "int8", block=6)["k"].base}})
    assert isinstance(q["body"]["kernel"].base, lora.QuantizedArray)


def test_files_written_before_the_settings_type_still_load(tmp_path):
    # adapter.json as earlier lora_jax versions wrote it: its own key order, a minimal entry spelling
    # only what was required then (defaults for the rest), and a chain with every key spelled out
    from safetensors.numpy import save_file as save_np

    base = {"q": rand(0, (8, 6)), "k": rand(1, (8, 6))}
    a, b, a2, b2 = (np.asarray(rand(j, s)) for j, s in ((2, (8, 2)), (3, (2, 6)), (4, (8, 3)), (5, (3, 6))))
    meta = {"format": "lora_jax.adapter", "version": 1, "weights": {
        "q": {"layout": "io", "rank": 2, "alpha": 4, "a": "q.lora_a", "b": "q.lora_b", "w_shape": [8, 6]},
        "k": {"chain": [
            {"name": "default", "active": False, "layout": "io", "rank": 2, "alpha": 4.0, "rslora": False,
             "dropout": 0.0, "layer_mask": None, "out_slices": [True, False], "a": "k.default.lora_a",
             "b": "k.default.lora_b", "m": None},
            {"name": "other", "active": True, "layout": "io", "rank": 3, "alpha": 6.0, "rslora": True,
             "dropout": 0.1, "layer_mask": None, "out_slices": None, "a": "k.other.lora_a", "b": "k.other.lora_b",
             "m": None}], "w_shape": [8, 6]}}}
    d = tmp_path / "old"
    d.mkdir()
    (d / "adapter.json").write_text(json.dumps(meta))
    save_np({"q.lora_a": a, "q.lora_b": b, "k.default.lora_a": a, "k.default.lora_b": b, "k.other.lora_a": a2,
             "k.other.lora_b": b2}, str(d / "adapter.safetensors"))
    got = load_adapter(d, base)
    assert got["q"].settings == lora.AdapterSettings(rank=2, alpha=4.0)
    first, second = got["k"].chain()
    assert first.settings == lora.AdapterSettings(rank=2, alpha=4.0, out_slices=(True, False), active=False)
    assert second.settings == lora.AdapterSettings(rank=3, alpha=6.0, rslora=True, dropout=0.1, name="other")
    np.testing.assert_array_equal(got["q"].a, a)
    np.testing.assert_array_equal(second.b, b2)
    # and what is saved now reads back to the same tree
    save_adapter(tmp_path / "new", got)
    again = load_adapter(tmp_path / "new", base)
    assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(got)
    for x, y in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(got)):
        np.testing.assert_array_equal(x, y)


def test_overwrite_sweeps_what_killed_writes_left_and_finishes_an_interrupted_swap(tmp_path, monkeypatch):
    """Issue 22.6: the temporary entries of earlier writes of the same output whose process is gone
    (this host) are swept, a live process's are kept; SIGINT landing while the finished output is
    swapped in is held until the swap is done, then raised as InterruptedAfterWrite: the new output
    is whole, nothing of the old one is left behind."""
    import signal
    import subprocess
    import sys

    import lora_jax.io._files as F

    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an earlier export
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    host = F._owner_tag()[F._owner_tag().index("h"):]
    killed = tmp_path / f".out.tmp-p{dead}{host}_abc"
    killed.mkdir()
    (killed / "half.safetensors").write_bytes(b"x" * 10)
    legacy = tmp_path / ".out.old-k3j2"
    legacy.mkdir()
    live = tmp_path / f".out.tmp-{F._owner_tag()}_live"  # this process: still writing, kept
    live.mkdir()
    other_host = tmp_path / f".out.tmp-p{dead}h00000000_x"  # another host's: never guessed at
    other_host.mkdir()
    real_rmtree = shutil.rmtree

    def rmtree_interrupted(p, *a, **k):
        if f".out.old-{F._owner_tag()}" in str(p):  # the old output, deleted after the new one is in place
            os.kill(os.getpid(), signal.SIGINT)
        return real_rmtree(p, *a, **k)

    monkeypatch.setattr(F.shutil, "rmtree", rmtree_interrupted)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a shell's foreground
    try:
        with pytest.raises(F.InterruptedAfterWrite) as e:
            with atomic_directory(out, overwrite=True) as tmp:
                open(os.path.join(tmp, "config.json"), "w").write('{"new": 1}')
        assert e.value.signum == signal.SIGINT and e.value.path == str(out)
        assert os.listdir(out) == ["config.json"] and (out / "config.json").read_text() == '{"new": 1}'
        assert sorted(os.listdir(tmp_path)) == sorted(["out", live.name, other_host.name])
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        # a process that ignores SIGINT (started with `nohup ... &`) goes on ignoring it
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with atomic_directory(out, overwrite=True) as tmp:
            open(os.path.join(tmp, "config.json"), "w").write('{"newer": 1}')
        assert (out / "config.json").read_text() == '{"newer": 1}'
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_save_adapter_refuses_joined_duplicates_and_misshapen_factors(tmp_path):
    """Issue 22.14/22.22: two tree paths joining to one name, and factors that do not fit their
    kernel (put there by LoraWeight.replace), are refused by save_adapter; nothing is written."""
    w = np.ones((8, 4), np.float32)
    rules = lora.Rules(".*", rank=2)
    twin = {"a/b": {"k": w}, "a": {"b": {"k": w}}}
    with pytest.raises(ValueError, match="a/b/k: two tree paths join to this same name"):
        save_adapter(tmp_path / "twin", lora.init(twin, rules, 0))
    lp = lora.init({"k": w}, rules, 0)
    bad = {"k": lp["k"].replace(a=np.ones((8, 3), np.float32))}
    with pytest.raises(ValueError, match=r"k: adapter 'default' has factors a\(8, 3\), b\(2, 4\); a kernel \(8, 4\) "
                                         r"with layout 'io' at rank 2 needs a\(8, 2\), b\(2, 4\)"):
        save_adapter(tmp_path / "bad", bad)
    assert sorted(os.listdir(tmp_path)) == []


def _safetensors_bytes(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return len(h).to_bytes(8, "little") + h + data


@pytest.mark.parametrize("header,data,message", [
    # two names for one set of bytes (the reference library refuses overlaps)
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8), "overlaps the tensor before it"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8), "gap of 4 bytes"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(8), "4 bytes follow the last tensor"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4), "malformed header entry"),
    ({"a": {"dtype": "F32", "shape": [2 ** 70], "data_offsets": [0, 4]}}, bytes(4), "do not fit its size"),
    ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, bytes(4), "malformed header entry"),
    ({"a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}, bytes(4), "malformed header entry"),
    ({"__metadata__": json.loads("[" * 50 + "]" * 50), "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
     bytes(4), "__metadata__ must be an object"),
])
def test_safetensors_headers_that_do_not_describe_the_data_are_refused(tmp_path, header, data, message):
    from lora_jax.io._files import read_safetensors

    f = tmp_path / "x.safetensors"
    f.write_bytes(_safetensors_bytes(header, data))
    with pytest.raises(ValueError, match=message) as e:
        read_safetensors(f)
    assert "x.safetensors" in str(e.value)
    # the reference library agrees that each of these files is not a safetensors file
    with pytest.raises(Exception):
        load_file(str(f))


def test_json_nesting_bombs_are_one_error_naming_the_file(tmp_path):
    from lora_jax.io._files import read_json, read_safetensors
    from lora_jax.models.family import read_hf_config

    bomb = "[" * 200_000 + "]" * 200_000
    (tmp_path / "config.json").write_text('{"model_type": "llama", "x": ' + bomb + "}")
    with pytest.raises(ValueError, match="config.json.*nest deeper than the parser allows"):
        read_hf_config(tmp_path)
    with pytest.raises(ValueError, match="a.json.*nest deeper"):
        (tmp_path / "a.json").write_text(bomb)
        read_json(str(tmp_path / "a.json"))
    f = tmp_path / "x.safetensors"
    h = ('{"__metadata__": {"k": ' + bomb + '}}').encode()
    f.write_bytes(len(h).to_bytes(8, "little") + h)
    with pytest.raises(ValueError, match="x.safetensors.*nest deeper"):
        read_safetensors(f)
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "adapter.json").write_text(bomb)
    with pytest.raises(ValueError, match="adapter.json.*nest deeper"):
        load_adapter(tmp_path / "ad", params_tree())

"""The tokenized cache (issue 20.1, 20.4) and the data formats (20.2): keyed by everything that
changes the tokens, built whole or not at all, once when two runs build it, the same with every
worker count; Parquet, Arrow, datasets directories and column mappings read as JSONL does."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from lora_jax.train import data as D
from lora_jax.train import records as R
from lora_jax.train import tokcache as C


@pytest.fixture(scope="module")
def tok():
    from lora_jax.train.model import build_tokenizer

    return build_tokenizer(["the quick brown fox jumps over the lazy dog hello world assistant user"] * 5,
                           vocab_size=300)


def _chats(n, seed=0):
    rng = np.random.default_rng(seed)
    words = "the quick brown fox jumps over lazy dog hello world".split()
    say = lambda: " ".join(rng.choice(words, int(rng.integers(2, 12))))  # noqa: E731
    return [{"messages": [{"role": "user", "content": say()}, {"role": "assistant", "content": say()}]}
            for _ in range(n)]


def _write_jsonl(path, recs):
    with open(path, "w") as fh:
        for r in recs:
            fh.write(json.dumps(r) + "\n")
    return str(path)


def _reference(paths, tok, fmt="auto", columns=None):
    return D.Docs.from_encoded([rec.encode(tok) for rec in D.read_documents(paths, fmt, columns)])


def _same(a, b):
    assert np.array_equal(a.offsets, b.offsets)
    assert np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert np.array_equal(np.asarray(a.weights), np.asarray(b.weights))
    assert np.array_equal(np.asarray(a.targets), np.asarray(b.targets))


def test_cache_equals_in_memory_encoding_and_is_reused(tmp_path, tok):
    f = _write_jsonl(tmp_path / "a.jsonl", _chats(300))
    root = str(tmp_path / "cache")
    docs, info = C.load([f], tok, root=root, say=lambda s: None)
    assert info["built"] and info["documents"] == 300
    _same(docs, _reference([f], tok))
    assert isinstance(docs.tokens, np.memmap)
    again, info2 = C.load([f], tok, root=root, say=lambda s: None)
    assert not info2["built"] and info2["entry"] == info["entry"]
    _same(again, docs)


def test_cache_key_follows_tokens_not_seq_len(tmp_path, tok):
    """Another tokenizer, chat template, column mapping or file content is another entry; the
    row plans (seq_len, packing) are kept beside the tokens."""
    from lora_jax.train.model import build_tokenizer

    f = _write_jsonl(tmp_path / "a.jsonl", _chats(50))
    root = str(tmp_path / "cache")
    quiet = lambda s: None  # noqa: E731
    _, base = C.load([f], tok, root=root, say=quiet)
    other_tok = build_tokenizer(["entirely different words for another vocabulary"] * 5, vocab_size=300)
    assert C.load([f], other_tok, root=root, say=quiet)[1]["key"] != base["key"]
    templated = build_tokenizer(["the quick brown fox jumps over the lazy dog hello world assistant user"] * 5,
                                vocab_size=300)
    assert C.load([f], templated, root=root, say=quiet)[1]["key"] == base["key"]  # the same tokenizer rebuilt
    templated.chat_template = templated.chat_template.replace("<|end|>", "<|eot|>")
    assert C.load([f], templated, root=root, say=quiet)[1]["key"] != base["key"]
    g = _write_jsonl(tmp_path / "b.jsonl", [{"q": "the dog", "a": "hello"}] * 3)
    k1 = C.load([g], tok, root=root, say=quiet, columns={"prompt": "q", "completion": "a"})[1]["key"]
    k2 = C.load([g], tok, root=root, say=quiet, columns={"prompt": "a", "completion": "q"})[1]["key"]
    assert k1 != k2
    # a changed data file (same size, same name) is another entry, never the old tokens
    recs = _chats(50)
    recs[7]["messages"][1]["content"] = recs[7]["messages"][1]["content"][::-1]
    _write_jsonl(tmp_path / "a.jsonl", recs)
    docs, info = C.load([f], tok, root=root, say=quiet)
    assert info["built"] and info["key"] != base["key"]
    _same(docs, _reference([f], tok))
    # plans: one file per (layout, seq_len, span), reused
    C.plan(docs, info["entry"], 32, "documents", (0, 40))
    C.plan(docs, info["entry"], 64, "documents", (0, 40))
    assert sorted(os.listdir(os.path.join(info["entry"], "plans"))) == ["documents-32-0-40.npz",
                                                                       "documents-64-0-40.npz"]


@pytest.mark.parametrize("workers", [1, 2])
def test_failed_build_leaves_nothing_and_names_the_record(tmp_path, tok, monkeypatch, workers):
    """In-process and in the worker pool alike (the worker's ValueError comes back as itself)."""
    monkeypatch.setattr(C, "CHUNK", 16)
    recs = _chats(100)
    lines = [json.dumps(r) for r in recs]
    lines[70] = '{"messages": [{"role": "user"}]}'
    f = tmp_path / "a.jsonl"
    f.write_text("\n".join(lines) + "\n")
    root = tmp_path / "cache"
    with pytest.raises(ValueError, match=re.escape(f"{f}:71: 'messages' must be a non-empty list")):
        C.load([str(f)], tok, root=str(root), say=lambda s: None, workers=workers)
    assert [n for n in os.listdir(root) if not n.startswith(".")] == ["stat"]  # no entry, no temporary left
    assert not [n for n in os.listdir(root) if ".tmp-" in n]


def test_killed_build_is_not_trusted_and_is_swept(tmp_path, tok):
    """SIGKILL in the middle of a build: the next run finds no entry, sweeps the dead build's
    temporary directory and builds a whole one."""
    f = _write_jsonl(tmp_path / "a.jsonl", _chats(3000))
    root = str(tmp_path / "cache")
    tok.save_pretrained(str(tmp_path / "tok"))
    code = (f"import sys, os, signal\nfrom lora_jax.train import tokcache as C, data as D\n"
            f"from lora_jax.train.model import load_tokenizer\nC.CHUNK = 8\n"
            f"real = C._encode_chunk\n"
            f"def slow(items, *a, **k):\n    out = real(items, *a, **k)\n"
            f"    if items[0][0].endswith(':801'): os.kill(os.getpid(), signal.SIGKILL)\n    return out\n"
            f"C._encode_chunk = slow\n"
            f"C.load([{f!r}], load_tokenizer({str(tmp_path / 'tok')!r}), root={root!r}, workers=1)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == -9, p.stderr
    left = [n for n in os.listdir(root) if ".tmp-" in n]
    assert len(left) == 1 and os.path.exists(os.path.join(root, left[0], "tokens.bin"))
    docs, info = C.load([f], tok, root=root, say=lambda s: None)
    assert info["built"] and not [n for n in os.listdir(root) if ".tmp-" in n]
    _same(docs, _reference([f], tok))


def test_a_dead_worker_is_an_error_not_a_hang(tmp_path, tok):
    """A worker killed mid-build (the OOM killer, a script without a ``__main__`` guard whose spawned
    workers cannot start) ends the build with an error that says so, within seconds, and leaves
    nothing a later run trusts. (A `multiprocessing.Pool` waits forever for the lost chunk.)"""
    f = _write_jsonl(tmp_path / "a.jsonl", _chats(2000))
    root = str(tmp_path / "cache")
    tok.save_pretrained(str(tmp_path / "tok"))
    code = (f"import os, signal, threading, time, multiprocessing as mp\n"
            f"from lora_jax.train import tokcache as C\nfrom lora_jax.train.model import load_tokenizer\n"
            f"def kill_one():\n    while not mp.active_children(): time.sleep(0.02)\n"
            f"    os.kill(mp.active_children()[0].pid, signal.SIGKILL)\n"
            f"if __name__ == '__main__':\n    C.CHUNK = 8\n"
            f"    threading.Thread(target=kill_one, daemon=True).start()\n"
            f"    try:\n        C.load([{f!r}], load_tokenizer({str(tmp_path / 'tok')!r}), root={root!r}, workers=2)\n"
            f"    except RuntimeError as e:\n        print('refused:', e)\n")
    (tmp_path / "script.py").write_text(code)
    p = subprocess.run([sys.executable, str(tmp_path / "script.py")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("refused: a tokenizing worker process died (killed, out of memory, or it could not "
                               "start: a script that starts training must guard its entry"), p.stdout
    assert [n for n in os.listdir(root) if n != "stat" and not n.endswith(".lock")] == []  # no entry, no temporary
    docs, info = C.load([f], tok, root=root, say=lambda s: None)
    assert info["built"]
    _same(docs, _reference([f], tok))


def test_damaged_entry_is_rebuilt(tmp_path, tok):
    f = _write_jsonl(tmp_path / "a.jsonl", _chats(40))
    root = str(tmp_path / "cache")
    _, info = C.load([f], tok, root=root, say=lambda s: None)
    with open(os.path.join(info["entry"], "tokens.bin"), "r+b") as fh:
        fh.truncate(12)
    docs, again = C.load([f], tok, root=root, say=lambda s: None)
    assert again["built"]
    _same(docs, _reference([f], tok))


def test_two_builders_at_once_build_once(tmp_path, tok):
    f = _write_jsonl(tmp_path / "a.jsonl", _chats(4000))
    root = str(tmp_path / "cache")
    tok.save_pretrained(str(tmp_path / "tok"))
    code = (f"import json\nfrom lora_jax.train import tokcache as C\nfrom lora_jax.train.model import load_tokenizer\n"
            f"d, i = C.load([{f!r}], load_tokenizer({str(tmp_path / 'tok')!r}), root={root!r}, workers=1)\n"
            f"print(json.dumps([i['built'], int(d.tokens.sum()), i['entry']]))\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    got = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert sorted(g[0] for g in got) == [False, True]
    assert got[0][1:] == got[1][1:]


def test_worker_pool_equals_one_process(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(C, "CHUNK", 32)
    f = _write_jsonl(tmp_path / "a.jsonl", _chats(500))
    one, _ = C.load([f], tok, root=str(tmp_path / "c1"), workers=1, say=lambda s: None)
    two, info = C.load([f], tok, root=str(tmp_path / "c2"), workers=2, say=lambda s: None)
    assert info["workers"] == 2
    _same(one, two)


# ---- formats ---------------------------------------------------------------------------------


def test_parquet_arrow_and_datasets_read_as_jsonl(tmp_path, tok):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    recs = _chats(30, seed=2)
    j = _write_jsonl(tmp_path / "a.jsonl", recs)
    want = _reference([j], tok)
    table = pa.Table.from_pylist(recs)
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=7)
    with pa.OSFile(str(tmp_path / "a.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table, max_chunksize=5)
    with pa.OSFile(str(tmp_path / "s.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    for name in ("a.parquet", "a.arrow", "s.arrow"):
        _same(C.load([str(tmp_path / name)], tok, root=str(tmp_path / "c"), say=lambda s: None)[0], want)
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "ds"))
    _same(C.load([str(tmp_path / "ds")], tok, root=str(tmp_path / "c"), say=lambda s: None)[0], want)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(recs)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match="a datasets DatasetDict with splits \\['train'\\]; point at one split"):
        D.read_documents(str(tmp_path / "dd"))
    _same(_reference([str(tmp_path / "dd" / "train")], tok), want)


def test_column_mapping_and_row_errors(tmp_path, tok):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"question": "the dog", "answer": "hello world", "id": k} for k in range(10)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "qa.parquet")
    got = D.read_documents(str(tmp_path / "qa.parquet"), columns={"prompt": "question", "completion": "answer"})
    assert got == [R.Completion("the dog", "hello world")] * 10
    with pytest.raises(ValueError, match=re.escape("qa.parquet row 0: a record needs 'text'")):
        D.read_documents(str(tmp_path / "qa.parquet"))
    rows[6]["answer"] = None
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "qa.parquet")
    with pytest.raises(ValueError, match=re.escape("qa.parquet row 6: 'prompt' and 'completion' must both be strings")):
        C.load([str(tmp_path / "qa.parquet")], tok, root=str(tmp_path / "c"), say=lambda s: None,
               columns={"prompt": "question", "completion": "answer"})
    with pytest.raises(ValueError, match="columns: 'answer' is not a record field"):
        R.check_columns({"answer": "completion"})
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match="bad.parquet: not a readable Parquet file"):
        D.read_documents(str(tmp_path / "bad.parquet"))

"""The data phase: lora_jax's tokenized cache vs Hugging Face ``datasets.map``, and the warm start.

Synthetic 7-turn chats (a system turn, three user/assistant exchanges) in one JSONL file, a
byte-level BPE tokenizer with a chat template (`lora_jax.train.model.build_tokenizer`). Each
contender runs in a fresh process while this one samples the resident memory of that process and
its children (every 20 ms, from /proc), so the numbers include the worker processes:

* ``lora_jax``: `lora_jax.train.tokcache.load` into an empty cache (``workers`` = cores) and the
  row plan (``data.packing=documents``, seq_len 1024);
* ``datasets``: ``load_dataset("json")`` then ``map(batched=True, num_proc=cores)`` with the same
  per-record encoding (`lora_jax.train.records`: template, assistant-only loss weights) into its
  Arrow cache — the same tokens, so the difference is the pipeline;
* ``warm``: a fresh process opening the cache built above, planning rows and reading the first
  batch: what ``lora-jax train --resume`` spends on data before its first step.

With ``--long-record-mib N`` it measures one record of N MiB of text instead (``long_record``):
the cache build's peak RSS for that one JSONL record, for the same text as one record per line,
and for the tokenizer encoding the whole text at once (what the build did before it cut long texts
into checked pieces), with the token counts (the one-record build and the whole encoding must
agree).

One JSON line per measurement. Usage:
  python benchmarks/data_prep.py [--records 200000 20000] [--skip-datasets]
  python benchmarks/data_prep.py --long-record-mib 50
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

WORDS = ("the a river runs to sea over hills under bright sky when night falls stars rise and people talk about "
         "their day work food music travel plans questions answers maybe later today tomorrow").split()


def write_chats(path: str, n: int, seed: int = 0) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            say = lambda k: " ".join(rng.choice(WORDS, int(rng.integers(k, 4 * k))))  # noqa: E731
            msgs = [{"role": "system", "content": say(4)}]
            for _ in range(3):
                msgs += [{"role": "user", "content": say(8)}, {"role": "assistant", "content": say(20)}]
            fh.write(json.dumps({"messages": msgs}) + "\n")


def _tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += kids.get(p, [])
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def measured(code: str, env: dict) -> dict:
    """Run ``code`` in a fresh Python; its last stdout line (JSON) plus wall time and peak tree RSS."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env, cwd=ROOT)
    peak = 0
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _tree_rss(p.pid))
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = p.communicate()
    stop.set()
    th.join()
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"contender failed (rc {p.returncode}):\n{err[-3000:]}")
    got = json.loads(out.strip().splitlines()[-1])
    return {**got, "wall_s": round(wall, 2), "peak_rss_mib": round(peak / 2**20, 1)}


LORA_JAX = """
import json, time
from lora_jax.train import tokcache, data
from lora_jax.train.model import load_tokenizer
t0 = time.perf_counter()
tok = load_tokenizer({tok!r})
docs, info = tokcache.load([{data!r}], tok, root={cache!r}, workers={workers}, say=lambda s: None)
t1 = time.perf_counter()
rows = data.PackedRows(docs, 1024, tok.pad_token_id, "documents", plan=tokcache.plan(docs, info["entry"], 1024,
                       "documents", (0, len(docs))))
b = rows.batch(range(8))
t2 = time.perf_counter()
print(json.dumps({{"built": info["built"], "records": len(docs), "tokens": int(docs.offsets[-1]),
                  "tokenize_s": round(t1 - t0, 3), "plan_and_batch_s": round(t2 - t1, 3), "rows": len(rows),
                  "padding": round(1 - rows.n_tokens / (len(rows) * 1024), 4)}}))
"""

DATASETS = """
import json, time
import datasets
from lora_jax.train import records
from lora_jax.train.model import load_tokenizer
datasets.disable_progress_bars()
t0 = time.perf_counter()
tok = load_tokenizer({tok!r})
ds = datasets.load_dataset("json", data_files={data!r}, split="train", cache_dir={cache!r})
def enc(batch):
    ids, ws = [], []
    for msgs in batch["messages"]:
        i, w = records.Chat(tuple(msgs)).encode(tok)
        ids.append(i.tolist()); ws.append(w.tolist())
    return {{"input_ids": ids, "weights": ws}}
out = ds.map(enc, batched=True, num_proc={workers}, remove_columns=ds.column_names)
t1 = time.perf_counter()
print(json.dumps({{"records": len(out), "tokenize_s": round(t1 - t0, 3)}}))
"""


LONG = """
import json, time
from lora_jax.train import tokcache
from lora_jax.train.model import load_tokenizer
tok = load_tokenizer({tok!r})
t0 = time.perf_counter()
if {whole!r}:
    text = json.loads(open({data!r}).readline())["text"]
    n = len(tok.encode(text, add_special_tokens=False)) + 2  # + bos, eos as the record adds
else:
    docs, info = tokcache.load([{data!r}], tok, root={cache!r}, workers=1, say=lambda s: None)
    n = int(docs.offsets[-1])
print(json.dumps({{"tokens": n, "s": round(time.perf_counter() - t0, 2)}}))
"""


def long_record(mib: float, tok_dir: str, work: str, env: dict) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    lines, size = [], 0
    while size < mib * 2**20:
        lines.append(" ".join(rng.choice(WORDS, int(rng.integers(4, 20)))))
        size += len(lines[-1]) + 1
    one, many = os.path.join(work, "one.jsonl"), os.path.join(work, "lines.jsonl")
    with open(one, "w") as fh:
        fh.write(json.dumps({"text": "\n".join(lines)}) + "\n")
    with open(many, "w") as fh:
        fh.writelines(json.dumps({"text": ln}) + "\n" for ln in lines)
    got = {}
    for name, data, whole in (("one_record", one, False), ("lines", many, False), ("whole_encode", one, True)):
        got[name] = measured(LONG.format(tok=tok_dir, data=data, cache=os.path.join(work, f"c-{name}"),
                                         whole=whole), env)
    return {"what": "long_record", "text_mib": round(size / 2**20, 1), "n_lines": len(lines), **got,
            "one_record_vs_lines_rss": round(got["one_record"]["peak_rss_mib"] / got["lines"]["peak_rss_mib"], 2),
            "whole_encode_vs_lines_rss": round(got["whole_encode"]["peak_rss_mib"] / got["lines"]["peak_rss_mib"],
                                               2)}


def packing_gain(cache_root: str, tok_dir: str, seq_len: int) -> dict:
    """Padding of each layout over the cached documents, and the real tokens per row of
    ``documents`` packing over one document per row: the trained-tokens/s gain at the same step."""
    from lora_jax.train import data, tokcache
    from lora_jax.train.model import load_tokenizer

    tok = load_tokenizer(tok_dir)
    (entry,) = [e for e in os.listdir(os.path.join(cache_root)) if not e.startswith(".") and e != "stat"]
    docs, _ = tokcache._open(os.path.join(cache_root, entry))
    out = {"seq_len": seq_len}
    for mode in data.PACKING:
        rows = data.PackedRows(docs, seq_len, tok.pad_token_id, mode)
        out[f"{mode}_rows"] = len(rows)
        out[f"{mode}_padding"] = round(1 - rows.n_tokens / (len(rows) * seq_len), 4)
    out["documents_vs_none_tokens_per_step"] = round((1 - out["documents_padding"]) / (1 - out["none_padding"]), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, nargs="+", default=[200_000, 20_000])
    ap.add_argument("--workers", type=int, default=0, help="0: one per core")
    ap.add_argument("--skip-datasets", action="store_true")
    ap.add_argument("--long-record-mib", type=float, default=0, help="measure one record of this many MiB instead")
    args = ap.parse_args()
    workers = args.workers or len(os.sched_getaffinity(0))
    work = tempfile.mkdtemp(prefix="lora_jax-data-prep-")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "JAX_PLATFORMS": "cpu", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1"}
    machine = {"machine": platform.machine(), "cores": workers, "python": platform.python_version()}
    try:
        from lora_jax.train.model import build_tokenizer

        tok_dir = os.path.join(work, "tok")
        build_tokenizer([" ".join(WORDS)] * 20, vocab_size=1024).save_pretrained(tok_dir)
        if args.long_record_mib:
            line = long_record(args.long_record_mib, tok_dir, work, env)
            assert line["one_record"]["tokens"] == line["whole_encode"]["tokens"], line
            print(json.dumps({**line, **machine}), flush=True)
            return
        for n in args.records:
            data = os.path.join(work, f"chats-{n}.jsonl")
            write_chats(data, n)
            mb = os.path.getsize(data) / 2**20
            cache = os.path.join(work, f"cache-{n}")
            ours = measured(LORA_JAX.format(tok=tok_dir, data=data, cache=cache, workers=workers), env)
            line = {"what": "build", "records": n, "jsonl_mib": round(mb, 1), **machine,
                    "lora_jax": {**ours, "records_per_s": round(n / ours["wall_s"], 1)}}
            if not args.skip_datasets:
                theirs = measured(DATASETS.format(tok=tok_dir, data=data, cache=os.path.join(work, f"hf-{n}"),
                                                  workers=workers), env)
                line["datasets"] = {**theirs, "records_per_s": round(n / theirs["wall_s"], 1)}
                line["speed_ratio"] = round(line["lora_jax"]["records_per_s"] / line["datasets"]["records_per_s"], 3)
                line["rss_ratio"] = round(ours["peak_rss_mib"] / theirs["peak_rss_mib"], 3)
            print(json.dumps(line), flush=True)
            warm = measured(LORA_JAX.format(tok=tok_dir, data=data, cache=cache, workers=workers), env)
            assert not warm["built"], "the warm start rebuilt the cache"
            print(json.dumps({"what": "warm_start", "records": n, **machine, "data_phase_s": warm["wall_s"],
                              "open_s": warm["tokenize_s"], "plan_and_batch_s": warm["plan_and_batch_s"],
                              "peak_rss_mib": warm["peak_rss_mib"]}), flush=True)
            print(json.dumps({"what": "packing", "records": n, **packing_gain(cache, tok_dir, 1024)}), flush=True)
            shutil.rmtree(os.path.join(work, f"hf-{n}"), ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Data: reading, loss weights, packing and order, checked against hand-computed references."""

import json
import re

import numpy as np
import pytest

from lora_jax.train import data as D
from lora_jax.train import records as R


class CharTok:
    """One token per character (ord), bos=1, eos=2, pad=0: easy to compute by hand."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def encode(self, text, add_special_tokens=False):
        assert not add_special_tokens
        return [ord(c) for c in text]


def test_pack_matches_hand_computed_rows():
    # two documents: [bos a b c eos] [bos d e eos], weights 0 on bos
    docs = [D.encode({"text": "abc"}, CharTok()), D.encode({"text": "de"}, CharTok())]
    a, b, c, d, e = (ord(x) for x in "abcde")
    assert docs[0][0].tolist() == [1, a, b, c, 2] and docs[0][1].tolist() == [0, 1, 1, 1, 1]
    rows = D.pack(docs, seq_len=4, pad_id=0, packing="stream")
    # stream: 1 a b c 2 1 d e 2  (9 tokens) -> ceil(8/4) = 2 rows of 5, overlapping by one token
    assert rows.tokens.tolist() == [[1, a, b, c, 2], [2, 1, d, e, 2]]
    assert rows.weights.tolist() == [[0, 1, 1, 1, 1], [1, 0, 1, 1, 1]]
    assert rows.valid.all()
    bt = D.batch(rows, np.array([0, 1]))
    assert bt["inputs"].tolist() == [[1, a, b, c], [2, 1, d, e]]
    assert bt["targets"].tolist() == [[a, b, c, 2], [1, d, e, 2]]
    # the BOS of the second document is never a target; every other token is one, exactly once
    assert bt["weights"].tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    assert rows.n_targets == 7 == 4 + 3


def test_pack_pads_the_last_row_with_zero_weight():
    docs = [D.encode({"text": "abcdef"}, CharTok())]  # 8 tokens -> ceil(7/3) = 3 rows, 10 slots
    rows = D.pack(docs, seq_len=3, pad_id=0, packing="stream")
    stream = [1] + [ord(x) for x in "abcdef"] + [2]
    assert rows.tokens.tolist() == [stream[0:4], stream[3:7], stream[6:8] + [0, 0]]
    assert rows.weights[2].tolist() == [1, 1, 0, 0]
    assert rows.valid[2].tolist() == [True, True, False, False]
    bt = D.batch(rows, np.array([2]))
    assert bt["mask"].tolist() == [[1, 1, 0]]
    assert bt["weights"].tolist() == [[1, 0, 0]]


def test_no_packing_one_row_per_document_truncated():
    docs = [D.encode({"text": "abcdefgh"}, CharTok()), D.encode({"text": "x"}, CharTok())]
    rows = D.pack(docs, seq_len=4, pad_id=0, packing=False)
    assert rows.tokens.tolist() == [[1] + [ord(c) for c in "abcd"], [1, ord("x"), 2, 0, 0]]
    assert rows.weights.tolist() == [[0, 1, 1, 1, 1], [0, 1, 1, 0, 0]]


def test_prompt_completion_masks_the_prompt():
    ids, w = D.encode({"prompt": "Q:", "completion": "yes"}, CharTok())
    assert ids.tolist() == [1, ord("Q"), ord(":"), ord("y"), ord("e"), ord("s"), 2]
    assert w.tolist() == [0, 0, 0, 1, 1, 1, 1]
    rows = D.pack([(ids, w)], seq_len=6, pad_id=0)
    bt = D.batch(rows, np.array([0]))
    # the targets Q and : (prompt) carry no loss; y e s eos do
    assert bt["targets"][0].tolist() == [ord("Q"), ord(":"), ord("y"), ord("e"), ord("s"), 2]
    assert bt["weights"][0].tolist() == [0, 0, 1, 1, 1, 1]


def test_messages_train_on_assistant_turns_only():
    from lora_jax.train.model import build_tokenizer

    tok = build_tokenizer(["hello there, how are you? fine thanks"] * 5, vocab_size=300)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "ok?"},
            {"role": "assistant", "content": "fine"}]
    ids, w = D.encode({"messages": msgs}, tok)
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    # the chat template renders <|role|>\ncontent<|end|>\n per turn; the assistant's header is a prompt
    pieces = [("<|system|>\nbe brief<|end|>\n", 0), ("<|user|>\nhi<|end|>\n", 0), ("<|assistant|>\n", 0),
              ("hello<|end|>\n", 1), ("<|user|>\nok?<|end|>\n", 0), ("<|assistant|>\n", 0), ("fine<|end|>\n", 1)]
    want_ids = [t for s, _ in pieces for t in enc(s)] + [tok.eos_token_id]
    want_w = [float(k) for s, k in pieces for _ in enc(s)] + [1.0]
    assert ids.tolist() == want_ids
    assert w.tolist() == want_w
    trained = tok.decode([i for i, x in zip(ids, w) if x and i != tok.eos_token_id])
    assert trained == "hello<|end|>\nfine<|end|>\n"


def test_read_text_paragraphs_and_jsonl(tmp_path):
    t = tmp_path / "a.txt"
    t.write_text("first para\nline two\n\n\n  second  \n\nthird\n")
    assert D.read_documents(str(t)) == [R.Text("first para\nline two"), R.Text("second"), R.Text("third")]
    recs = [{"text": "x"}, {"prompt": "p", "completion": "c"}, {"messages": [{"role": "user", "content": "u"}]}]
    want = [R.Text("x"), R.Completion("p", "c"), R.Chat(({"role": "user", "content": "u"},))]
    files = []
    for i, r in enumerate(recs):  # one shape per file
        j = tmp_path / f"b{i}.jsonl"
        j.write_text(json.dumps(r) + "\n\n" + json.dumps(r) + "\n")
        files.append(str(j))
    assert D.read_documents(files) == [r for r in want for _ in range(2)]
    d = tmp_path / "dir"
    d.mkdir()
    (d / "2.txt").write_text("two\n\nstill two")
    (d / "1.txt").write_text("one")
    assert D.read_documents(str(d)) == [R.Text("one"), R.Text("two\n\nstill two")]


@pytest.mark.parametrize("line,msg", [
    ("{not json", "b.jsonl:2: not valid JSON"),
    ('{"prompt": "p"}', "b.jsonl:2: 'prompt' and 'completion' must both be strings"),
    ('{"input": "x"}', "b.jsonl:2: a record needs 'text', 'prompt'+'completion', 'messages' (OpenAI), "
                       "'instruction'+'output' (Alpaca) or 'conversations' (ShareGPT); got keys ['input']"),
    ('{"prompt": "p", "completion": "c"}', "b.jsonl:2: a prompt/completion record, but "),
    ('{"instruction": "i"}', "b.jsonl:2: Alpaca records need 'instruction' and 'output' strings"),
    ('{"conversations": [{"from": "robot", "value": "v"}]}', "b.jsonl:2: 'conversations' speaker 'robot' is not"),
    ('{"messages": [{"role": "user"}]}', "b.jsonl:2: 'messages' must be a non-empty list"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, line, msg):
    j = tmp_path / "b.jsonl"
    j.write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(ValueError, match=re.escape(msg)):
        D.read_documents(str(j))


def test_data_paths_that_are_not_regular_files_are_named(tmp_path):
    import os

    d = tmp_path / "dir"
    d.mkdir()
    (d / "a.txt").write_text("one")
    os.mkfifo(d / "b.txt")  # reading it would block forever
    with pytest.raises(ValueError, match=r"b\.txt' is a FIFO \(named pipe\); expected a regular file"):
        D.read_documents(str(d))
    os.remove(d / "b.txt")
    os.symlink("/dev/zero", d / "z.txt")  # reading it would never end
    with pytest.raises(ValueError, match=r"z\.txt' is a device \(through a link\)"):
        D.read_documents(str(d))
    os.remove(d / "z.txt")
    (d / "sub.txt").mkdir()
    with pytest.raises(ValueError, match=r"sub\.txt' is a directory"):
        D.read_documents(str(d))
    os.rmdir(d / "sub.txt")
    os.symlink(tmp_path / "gone.txt", d / "dangling.txt")
    with pytest.raises(FileNotFoundError, match=r"dangling\.txt' is a link to .*gone\.txt', which does not exist"):
        D.read_documents(str(d))
    os.remove(d / "dangling.txt")
    os.mkfifo(tmp_path / "direct.jsonl")
    with pytest.raises(ValueError, match="direct.jsonl' is a FIFO"):  # given directly: not "not found"
        D.read_documents(str(tmp_path / "direct.jsonl"))
    with pytest.raises(FileNotFoundError, match="data file not found"):
        D.read_documents(str(tmp_path / "nope.jsonl"))
    assert D.read_documents(str(d)) == [R.Text("one")]
    bomb = tmp_path / "bomb.jsonl"
    bomb.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ValueError, match="bomb.jsonl:1: not usable JSON"):
        D.read_documents(str(bomb))


def test_order_is_a_permutation_per_epoch_deterministic_and_seeded():
    o = D.Order(10, seed=3)
    first = o.take(0, 25)
    assert np.array_equal(first, D.Order(10, seed=3).take(0, 25))
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))
    assert not np.array_equal(first[:10], first[10:20])  # each epoch reshuffles
    assert not np.array_equal(first, D.Order(10, seed=4).take(0, 25))
    # a resume from any position continues the same sequence
    assert np.array_equal(o.take(7, 18), first[7:25])
    assert np.array_equal(D.Order(10, 3).take(13, 5), first[13:18])
    # the reference: epoch e is numpy's default_rng([seed, e]) permutation
    assert np.array_equal(first[10:20], np.random.default_rng([3, 1]).permutation(10))


def test_eval_batches_cover_every_row_once_and_pad_with_zero_weight():
    docs = [D.encode({"text": "abcdefghij" * 3}, CharTok())]
    rows = D.pack(docs, seq_len=4, pad_id=0, packing="stream")  # 32 tokens -> 8 rows
    bs = list(D.eval_batches(rows, 3))
    assert len(bs) == 3
    total = sum(float(b["weights"].sum()) for b in bs)
    assert total == rows.n_targets
    assert bs[-1]["weights"][2:].sum() == 0  # the 9th row does not exist
    assert len(list(D.eval_batches(rows, 3, max_batches=2))) == 2


def test_split_eval_holds_out_the_last_documents():
    docs = [{"text": str(k)} for k in range(10)]
    tr, ev = D.split_eval(docs, 0.25)
    assert [d["text"] for d in ev] == ["7", "8", "9"] and len(tr) == 7
    assert D.split_eval(docs, 0.0) == (docs, [])


def test_alpaca_and_sharegpt_records_read_as_chats(tmp_path):
    """Issue 20.2: Alpaca (instruction, optional input, output) and ShareGPT (conversations with
    from/value) records read as the chats they are, trained on the assistant's turns only."""
    from lora_jax.train.model import build_tokenizer

    a = tmp_path / "alpaca.jsonl"
    a.write_text(json.dumps({"instruction": "Add.", "input": "2 and 3", "output": "5"}) + "\n"
                 + json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n")
    assert D.read_documents(str(a)) == [
        R.Chat(({"role": "user", "content": "Add.\n\n2 and 3"}, {"role": "assistant", "content": "5"})),
        R.Chat(({"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}))]
    g = tmp_path / "sharegpt.jsonl"
    g.write_text(json.dumps({"conversations": [{"from": "system", "value": "Be brief."},
                                               {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]})
                 + "\n")
    (doc,) = D.read_documents(str(g))
    assert doc == R.Chat(({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello"}))
    tok = build_tokenizer(["Hello Hi Be brief."] * 5, vocab_size=300)
    ids, w = D.encode(doc, tok)
    trained = tok.decode([t for t, x in zip(ids, w) if x])
    assert trained.startswith("Hello") and "Hi" not in trained and "brief" not in trained


# ---- long texts are tokenized in checked pieces (issue 22.15) --------------------------------


def _metaspace_tokenizer(texts):
    """A SentencePiece-style tokenizer (Metaspace, "▁" prepended to the text's start only): a text's
    pieces tokenized apart would each get the mark, so no cut is safe."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<eos>"],
                                                       show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
@pytest.mark.parametrize("layout", ["lines", "one line", "no spaces", "ragged"])
def test_a_long_text_gives_the_tokens_of_the_whole(monkeypatch, kind, layout):
    """`Text.encode` of a text longer than two pieces equals the tokenizer's encoding of the whole
    text, token for token, on tokenizers where cuts are safe (byte-level BPE) and where none is
    (Metaspace marks a text's start), whatever the text's line and space layout."""
    from lora_jax.train.model import build_tokenizer

    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over lazy dogs hello world 42 naïve café".split()
    lines = [" ".join(rng.choice(words, int(rng.integers(1, 9)))) for _ in range(400)]
    text = {"lines": "\n".join(lines), "one line": " ".join(lines), "no spaces": "".join(lines).replace(" ", ""),
            "ragged": "\n\n".join("  " * int(rng.integers(0, 3)) + ln + " " * int(rng.integers(0, 2)) for ln in lines)}[layout]
    tok = build_tokenizer(lines, vocab_size=300) if kind == "byte-level" else _metaspace_tokenizer(lines)
    monkeypatch.setattr(R, "PIECE", 300)
    monkeypatch.setattr(R, "_WINDOW", 40)
    whole = tok.encode(text, add_special_tokens=False)
    cuts = []
    real = R._encode
    monkeypatch.setattr(R, "_encode", lambda t, s: cuts.append(len(s)) or real(t, s))
    ids, w = R.Text(text).encode(tok)
    head = [tok.bos_token_id] if tok.bos_token_id is not None else []
    assert ids.tolist() == head + list(whole) + [tok.eos_token_id]
    assert w.tolist() == [0] * len(head) + [1] * (len(whole) + 1)
    assert len(text) > 10 * R.PIECE
    pieces = [n for n in cuts if n > 2 * R._WINDOW]  # what was tokenized beside the checks
    if layout == "no spaces":
        assert max(pieces) > len(text) - 2 * R.PIECE  # no candidate cut: the whole rest at once
    elif kind == "byte-level":
        assert max(pieces) <= 2 * R.PIECE  # cut all along
    if kind == "metaspace" and layout == "lines":  # where the check refuses cuts, they would differ
        monkeypatch.setattr(R, "_safe", lambda *a: True)
        assert R.Text(text).encode(tok)[0].tolist() != ids.tolist()

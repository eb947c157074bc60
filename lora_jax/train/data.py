"""Training data: read documents, tokenize with loss weights, pack into rows, order them by seed.

Documents come from

* text files: each blank-line-separated paragraph is one document;
* a directory: each ``.txt``/``.md`` file is one document, each ``.jsonl`` file is read as JSONL;
* JSONL files (``.jsonl``/``.json``), one record per line, all of one shape (`SHAPES`):
  ``{"text": ...}`` (every token trained), ``{"prompt": ..., "completion": ...}`` (loss on the
  completion only), ``{"messages": [{"role": ..., "content": ...}, ...]}`` (OpenAI; rendered with
  the tokenizer's chat template, loss on the assistant turns only), Alpaca
  ``{"instruction", "input"?, "output"}`` (a user turn and an assistant turn) or ShareGPT
  ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}`` (messages).

Each document becomes ``[bos] + tokens + [eos]`` (no BOS for chat messages: the template decides)
with a per-token *weight*: 1 where the token is a training target, 0 on BOS, prompts, non-assistant
turns and padding.

Packing (``packing=True``) concatenates the documents into one stream and cuts it into rows of
``seq_len + 1`` tokens that overlap by one: row ``k`` holds ``stream[k*L : k*L + L + 1]``, its inputs
are the first ``L`` tokens and its targets the last ``L``, so every stream token after the first is
a target exactly once. Attention runs across document boundaries inside a row (GPT-style packing).
With ``packing=False`` each document is its own row, truncated to ``L + 1`` tokens. Short rows are
padded with weight 0.

The training order is a fresh permutation of the rows each epoch, drawn from ``(seed, epoch)``;
the *position* (rows consumed so far) is all a checkpoint needs to continue exactly.

Example:
  >>> import numpy as np
  >>> from lora_jax.train.data import pack
  >>> rows = pack([(np.array([0, 5, 6, 9]), np.array([0, 1, 1, 1.]))], seq_len=2, pad_id=0)
  >>> rows.tokens.tolist(), rows.weights.tolist()
  ([[0, 5, 6], [6, 9, 0]], [[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
from typing import Iterable, Sequence, Union

import numpy as np

__all__ = ["Rows", "Order", "read_documents", "encode", "pack", "batch", "eval_batches", "split_eval",
           "why_no_targets", "TEXT_EXTS", "JSONL_EXTS"]

TEXT_EXTS = (".txt", ".md", ".text")
JSONL_EXTS = (".jsonl", ".json")
_PARAGRAPH = re.compile(r"\n\s*\n")


# ------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------


def _paragraphs(text: str) -> list[dict]:
    return [{"text": p.strip()} for p in _PARAGRAPH.split(text.replace("\r\n", "\n")) if p.strip()]


# ShareGPT's speaker names -> chat roles
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "chatgpt": "assistant", "system": "system"}
SHAPES = ("text", "prompt/completion", "messages", "alpaca", "sharegpt")


def _shape(rec: dict) -> str:
    """Which record shape (one of `SHAPES`) a JSON object has, by its keys."""
    if "messages" in rec:
        return "messages"
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec or "output" in rec:
        return "alpaca"
    if "prompt" in rec or "completion" in rec:
        return "prompt/completion"
    if "text" in rec:
        return "text"
    raise ValueError(f"a record needs 'text', 'prompt'+'completion', 'messages' (OpenAI), 'instruction'+'output' "
                     f"(Alpaca) or 'conversations' (ShareGPT); got keys {sorted(rec)}")


def _check_record(rec, where: str) -> tuple[dict, str]:
    """``(the record in one of the three forms the encoder reads, its shape)``: Alpaca records
    become a user turn (instruction, then the input after a blank line) and an assistant turn
    (output); ShareGPT conversations become messages (human/user -> user, gpt/assistant -> assistant,
    system -> system)."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    try:
        shape = _shape(rec)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if shape == "sharegpt":
        conv = rec["conversations"]
        if not isinstance(conv, list) or not conv or not all(
                isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str)
                for t in conv):
            raise ValueError(f"{where}: 'conversations' must be a non-empty list of "
                             "{\"from\": str, \"value\": str}")
        unknown = sorted({t["from"] for t in conv if t["from"].lower() not in _SHAREGPT_ROLES})
        if unknown:
            raise ValueError(f"{where}: 'conversations' speaker {unknown[0]!r} is not one of "
                             f"{sorted(_SHAREGPT_ROLES)}")
        rec = {"messages": [{"role": _SHAREGPT_ROLES[t["from"].lower()], "content": t["value"]} for t in conv]}
    elif shape == "alpaca":
        ins, inp, out = rec.get("instruction"), rec.get("input", ""), rec.get("output")
        if not isinstance(ins, str) or not isinstance(out, str) or not isinstance(inp, (str, type(None))):
            raise ValueError(f"{where}: Alpaca records need 'instruction' and 'output' strings (and an optional "
                             f"'input' string), got {type(ins).__name__}, {type(out).__name__} and "
                             f"{type(inp).__name__}")
        user = ins + (f"\n\n{inp}" if inp else "")
        rec = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": out}]}
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs):
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{\"role\": str, \"content\": str}}")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]}, shape
    if shape == "prompt/completion":
        p, c = rec.get("prompt"), rec.get("completion")
        if not isinstance(p, str) or not isinstance(c, str):
            raise ValueError(f"{where}: 'prompt' and 'completion' must both be strings, got "
                             f"{type(p).__name__} and {type(c).__name__}")
        return {"prompt": p, "completion": c}, shape
    if not isinstance(rec["text"], str):
        raise ValueError(f"{where}: 'text' must be a string, got {type(rec['text']).__name__}")
    return {"text": rec["text"]}, shape


def _read_jsonl(path: str) -> list[dict]:
    docs = []
    first = None  # (shape, line) of the file's first record: one file holds one shape
    for n, line in enumerate(io.StringIO(_read_text(path)), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.rstrip("\n"))
        except json.JSONDecodeError as e:  # some of json's messages end in "at" already
            where = "column" if e.msg.endswith(" at") else "at column"
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg} {where} {e.colno})") from None
        doc, shape = _check_record(rec, f"{path}:{n}")
        if first is None:
            first = (shape, n)
        elif shape != first[0]:
            raise ValueError(f"{path}:{n}: a {shape} record, but line {first[1]} holds a {first[0]} record; a file "
                             "holds records of one shape (split it, or convert the records)")
        docs.append(doc)
    return docs


def _read_text(path: str) -> str:
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        return raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")  # as text mode reads it
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}: "
                         f"{e.reason}); save the file as UTF-8") from None


def read_documents(paths: Union[str, Sequence[str]], fmt: str = "auto") -> list[dict]:
    """The documents of one or more files or directories, in order.

    Args:
      paths: a path or a list of paths (files or directories).
      fmt: ``"auto"`` (by extension: ``.jsonl``/``.json`` JSONL, anything else text), ``"text"``
        or ``"jsonl"``.

    Returns:
      A list of records: ``{"text"}``, ``{"prompt", "completion"}`` or ``{"messages"}``.

    Raises:
      FileNotFoundError: for a path that does not exist.
      ValueError: for a malformed JSONL line (file and line named) or an unknown ``fmt``.
    """
    if fmt not in ("auto", "text", "jsonl"):
        raise ValueError(f"fmt must be 'auto', 'text' or 'jsonl', got {fmt!r}")
    docs: list[dict] = []
    for p in [paths] if isinstance(paths, str) else list(paths):
        if os.path.isdir(p):
            names = sorted(n for n in os.listdir(p) if n.endswith(TEXT_EXTS + JSONL_EXTS))
            if not names:
                raise ValueError(f"{p}: directory holds no {'/'.join(TEXT_EXTS + JSONL_EXTS)} files")
            for n in names:
                f = os.path.join(p, n)
                if n.endswith(JSONL_EXTS):
                    docs.extend(_read_jsonl(f))
                elif _read_text(f).strip():
                    docs.append({"text": _read_text(f).strip()})
        elif os.path.isfile(p):
            jsonl = fmt == "jsonl" or (fmt == "auto" and p.endswith(JSONL_EXTS))
            docs.extend(_read_jsonl(p) if jsonl else _paragraphs(_read_text(p)))
        else:
            raise FileNotFoundError(f"data file not found: {p!r}")
    return docs


def split_eval(docs: list, fraction: float) -> tuple[list, list]:
    """``(train, eval)``: the last ``ceil(fraction * n)`` documents are held out (none if 0)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"eval fraction must be in [0, 1), got {fraction!r}")
    n_eval = int(np.ceil(fraction * len(docs))) if fraction > 0 else 0
    if n_eval and n_eval >= len(docs):
        raise ValueError(f"holding out {n_eval} of {len(docs)} documents for eval leaves none to train on")
    return docs[: len(docs) - n_eval], docs[len(docs) - n_eval:]


# ------------------------------------------------------------------------------------------
# tokenizing
# ------------------------------------------------------------------------------------------


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def _render(tokenizer, messages, add_generation_prompt=False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except ValueError as e:
        raise ValueError(f"'messages' records need a tokenizer with a chat template ({e})") from None


def _encode_messages(messages, tokenizer) -> tuple[list[int], list[float]]:
    """Render prefixes of the conversation; assistant contents (and their end marks) are trained."""
    segments: list[tuple[str, float]] = []
    done = ""
    for k, m in enumerate(messages):
        full = _render(tokenizer, messages[: k + 1])
        if m["role"] == "assistant":
            try:
                head = _render(tokenizer, messages[:k], add_generation_prompt=True)
            except Exception:  # some templates refuse an empty conversation: cut before the content
                idx = full.rfind(m["content"])
                head = full[:idx] if idx >= 0 else done
            if not head.startswith(done) or not full.startswith(head):
                raise ValueError("the chat template does not render a conversation's prefixes as prefixes of "
                                 "its rendering; cannot tell which tokens are the assistant's")
            segments += [(head[len(done):], 0.0), (full[len(head):], 1.0)]
        else:
            if not full.startswith(done):
                raise ValueError("the chat template does not render a conversation's prefixes as prefixes of "
                                 "its rendering; cannot tell which tokens are the assistant's")
            segments.append((full[len(done):], 0.0))
        done = full
    ids: list[int] = []
    w: list[float] = []
    for text, weight in segments:
        t = _ids(tokenizer, text)
        ids += t
        w += [weight] * len(t)
    return ids, w


def encode(doc: dict, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, weights)`` of one document; weight 1 marks a token the loss should predict.

    ``{"text"}``: ``[bos] + text + [eos]``, all trained but BOS. ``{"prompt", "completion"}``:
    ``[bos] + prompt + completion + [eos]`` with prompt and completion tokenized separately, loss
    on completion and EOS. ``{"messages"}``: the chat template's rendering, loss on assistant turns;
    EOS appended (trained when the last turn is the assistant's).
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; documents could not be separated")
    head = [bos] if bos is not None else []
    if "messages" in doc:
        ids, w = _encode_messages(doc["messages"], tokenizer)
        if not ids or ids[-1] != eos:
            ids, w = ids + [eos], w + [1.0 if doc["messages"][-1]["role"] == "assistant" else 0.0]
    elif "prompt" in doc:
        p, c = _ids(tokenizer, doc["prompt"]), _ids(tokenizer, doc["completion"])
        ids = head + p + c + [eos]
        w = [0.0] * (len(head) + len(p)) + [1.0] * (len(c) + 1)
    elif "text" in doc:
        t = _ids(tokenizer, doc["text"])
        ids = head + t + [eos]
        w = [0.0] * len(head) + [1.0] * (len(t) + 1)
    else:
        raise ValueError(f"unknown document kind with keys {sorted(doc)}")
    return np.asarray(ids, np.int32), np.asarray(w, np.float32)


def why_no_targets(docs: Sequence[dict], seq_len: int, packing: bool) -> str:
    """Why documents that were read gave no trained token at all (for the error message)."""
    chats = [d for d in docs if "messages" in d]
    if chats:
        roles = sorted({m["role"] for d in chats for m in d["messages"]})
        if "assistant" not in roles:
            return (f"none of the {len(chats)} 'messages' records has an 'assistant' turn (roles found: "
                    f"{', '.join(map(repr, roles))}); only assistant turns are trained")
    if not packing and any("prompt" in d or "messages" in d for d in docs):
        return (f"with data.packing=false each record is cut to data.seq_len + 1 = {seq_len + 1} tokens, and every "
                "record's prompt (or non-assistant turns) fills them: no completion token is left")
    return "every token is masked (prompts, non-assistant turns) or cut off"


# ------------------------------------------------------------------------------------------
# packing
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rows:
    """Fixed-length training rows of ``seq_len + 1`` tokens.

    Attributes:
      tokens: ``(n, seq_len + 1)`` int32.
      weights: ``(n, seq_len + 1)`` float32, 1 where the token is a loss target.
      valid: ``(n, seq_len + 1)`` bool, False on padding.
    """

    tokens: np.ndarray
    weights: np.ndarray
    valid: np.ndarray

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1]) - 1

    @property
    def n_targets(self) -> int:
        """Trained tokens over all rows (the first token of a row is never a target)."""
        return int(self.weights[:, 1:].sum())


def pack(encoded: Iterable[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int,
         packing: bool = True) -> Rows:
    """Cut encoded documents into rows (see the module docstring for the layout).

    Args:
      encoded: ``(ids, weights)`` per document, as `encode` returns.
      seq_len: ``L``: tokens fed to the model per row; rows hold ``L + 1``.
      pad_id: the token written into padding (weight 0, ``valid`` False).
      packing: concatenate documents (True) or one row per document, truncated (False).

    Raises:
      ValueError: if ``seq_len < 1`` or there are no tokens at all.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    encoded = [(np.asarray(i, np.int32), np.asarray(w, np.float32)) for i, w in encoded]
    width = seq_len + 1
    if packing:
        if not encoded:
            raise ValueError("no documents to pack")
        ids = np.concatenate([i for i, _ in encoded])
        w = np.concatenate([w for _, w in encoded])
        if ids.size < 2:
            raise ValueError(f"only {ids.size} token(s) of data; need at least 2")
        n = -(-(ids.size - 1) // seq_len)
        need = n * seq_len + 1
        pad = need - ids.size
        ids = np.concatenate([ids, np.full(pad, pad_id, np.int32)])
        valid = np.concatenate([np.ones(ids.size - pad, bool), np.zeros(pad, bool)])
        w = np.concatenate([w, np.zeros(pad, np.float32)])
        idx = np.arange(n)[:, None] * seq_len + np.arange(width)[None, :]
        return Rows(ids[idx], w[idx], valid[idx])
    rows = [(i[:width], w[:width]) for i, w in encoded if i.size >= 2]
    if not rows:
        raise ValueError("no document has 2 or more tokens")
    tokens = np.full((len(rows), width), pad_id, np.int32)
    weights = np.zeros((len(rows), width), np.float32)
    valid = np.zeros((len(rows), width), bool)
    for r, (i, w) in enumerate(rows):
        tokens[r, : i.size], weights[r, : i.size], valid[r, : i.size] = i, w, True
    return Rows(tokens, weights, valid)


# ------------------------------------------------------------------------------------------
# order and batches
# ------------------------------------------------------------------------------------------


class Order:
    """The row order: epoch ``e`` is ``default_rng([seed, e]).permutation(n)``, epochs back to back.

    Example:
      >>> Order(4, seed=0).take(2, 4).shape
      (4,)
    """

    def __init__(self, n_rows: int, seed: int):
        if n_rows < 1:
            raise ValueError(f"need at least one row of data, got {n_rows}")
        self.n, self.seed = int(n_rows), int(seed)
        self._cache: dict[int, np.ndarray] = {}

    def epoch(self, e: int) -> np.ndarray:
        if e not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            self._cache[e] = np.random.default_rng([self.seed, e]).permutation(self.n)
        return self._cache[e]

    def take(self, position: int, count: int) -> np.ndarray:
        """Row indices ``position .. position + count`` of the endless sequence of epochs."""
        out = np.empty(count, np.int64)
        for j in range(count):
            e, k = divmod(position + j, self.n)
            out[j] = self.epoch(e)[k]
        return out


def batch(rows: Rows, idx: np.ndarray) -> dict[str, np.ndarray]:
    """The model's view of some rows: inputs, next-token targets, loss weights, attention mask."""
    t, w, v = rows.tokens[idx], rows.weights[idx], rows.valid[idx]
    return {"inputs": t[:, :-1], "targets": t[:, 1:], "weights": w[:, 1:], "mask": v[:, :-1].astype(np.int32)}


def eval_batches(rows: Rows, batch_size: int, max_batches: int = 0):
    """Every eval row in order, in batches of ``batch_size`` (the last one padded with weight 0)."""
    n = len(rows)
    n_batches = -(-n // batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        idx = np.arange(b * batch_size, (b + 1) * batch_size)
        real = idx < n
        out = batch(rows, np.where(real, idx, 0))
        out["weights"] = out["weights"] * real[:, None]
        yield out

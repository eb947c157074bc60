"""Training records: three typed kinds that each encode themselves, and the record shapes users have.

A record is one of

* `Text`: every token trained: ``[bos] + text + [eos]``;
* `Completion`: a prompt and its completion, ``[bos] + prompt + completion + [eos]``, loss on the
  completion and EOS only;
* `Chat`: messages rendered with the tokenizer's chat template, loss on the assistant turns
  (their contents and end marks) only; EOS appended (trained when the last turn is the assistant's).

The *shapes* records arrive in (`SHAPES`, one entry each) map a JSON object, a Parquet row or a
``datasets`` row to one of these: ``text``; ``prompt``/``completion``; ``messages`` (OpenAI
``[{"role", "content"}]``); Alpaca (``instruction``, optional ``input``, ``output``: a user turn
of the instruction and input, an assistant turn of the output); ShareGPT (``conversations`` of
``{"from", "value"}``: human/gpt/system). A shape is recognised by its fields; a `columns` mapping
(``data.columns`` in a run config) renames a dataset's own fields to these first, e.g.
``{"prompt": "question", "completion": "answer"}``. A new shape is one entry in `SHAPES`.

Encoding returns ``(ids int32, weights uint8)``; weight 1 marks a token the loss predicts.

Example:
  >>> rec, shape = parse({"instruction": "Add 2 and 2.", "output": "4"})
  >>> shape, type(rec).__name__, rec.messages[1]["content"]
  ('alpaca', 'Chat', '4')
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional

import numpy as np

__all__ = ["Text", "Completion", "Chat", "Record", "SHAPES", "FIELDS", "shape_of", "parse", "rename", "check_columns"]


PIECE = 1 << 16  # characters: a longer text is tokenized in pieces of about this size (see `_ids`)
_WINDOW = 1024  # characters each side of a cut that are tokenized to check it
_TRIES = 16  # cuts tried per piece before the rest is tokenized whole


def _encode(tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(text, add_special_tokens=False) if text else [], np.int32)


def _cuts(text: str, lo: int, hi: int):
    """Candidate cuts in ``[lo, hi)``, where pre-tokenizers split: just after a line break that a
    non-space follows, then just before a space between two word characters."""
    i = text.find("\n", lo - 1, hi - 1)
    while i != -1:
        if not text[i + 1].isspace():
            yield i + 1
        i = text.find("\n", i + 1, hi - 1)
    i = text.find(" ", lo, hi)
    while i != -1:
        if text[i - 1].isalnum() and text[i + 1:i + 2].isalnum():
            yield i
        i = text.find(" ", i + 1, hi)


def _safe(tokenizer, text: str, cut: int) -> bool:
    """Whether tokenizing the two sides of ``cut`` apart gives the tokens of the whole, checked on
    `_WINDOW` characters each side."""
    left, right = text[max(0, cut - _WINDOW):cut], text[cut:cut + _WINDOW]
    return np.array_equal(_encode(tokenizer, left + right),
                          np.concatenate([_encode(tokenizer, left), _encode(tokenizer, right)]))


def _ids(tokenizer, text: str) -> np.ndarray:
    """The tokens of ``text`` (no special tokens) as int32.

    A fast tokenizer holds hundreds of bytes per token while it encodes (offsets, strings,
    alignments), and one 30 MB text took 3.3 GB; so a text longer than ``2 * PIECE`` characters is
    tokenized in pieces, cut only where tokenizing the two sides apart gives the same tokens as
    tokenizing across the cut (checked on the text around each cut: a tokenizer that merges across
    line breaks or spaces, or marks a text's start, has no such cut there). Where no checked cut is
    found, the rest of the text is tokenized whole: the tokens are always those of the whole text.
    """
    if len(text) <= 2 * PIECE:
        return _encode(tokenizer, text)
    pieces, start = [], 0
    while len(text) - start > 2 * PIECE:
        tried = 0
        for cut in _cuts(text, start + PIECE, start + 2 * PIECE):
            if _safe(tokenizer, text, cut):
                break
            tried += 1
            if tried == _TRIES:
                cut = None
                break
        else:
            cut = None
        if cut is None:
            break
        pieces.append(_encode(tokenizer, text[start:cut]))
        start = cut
    pieces.append(_encode(tokenizer, text[start:]))
    return np.concatenate(pieces)


def _ends(tokenizer) -> tuple[list[int], int]:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; documents could not be separated")
    return ([bos] if bos is not None else []), eos


def _out(parts) -> tuple[np.ndarray, np.ndarray]:
    """``[(ids, weight)]`` -> ``(ids int32, weights uint8)``."""
    ids = [np.asarray(i, np.int32) for i, _ in parts]
    return (np.concatenate(ids) if ids else np.zeros(0, np.int32),
            np.concatenate([np.full(i.size, w, np.uint8) for i, (_, w) in zip(ids, parts)]) if ids
            else np.zeros(0, np.uint8))


@dataclasses.dataclass(frozen=True)
class Text:
    """Plain text, every token trained (BOS excepted)."""

    text: str

    def encode(self, tokenizer) -> tuple[np.ndarray, np.ndarray]:
        head, eos = _ends(tokenizer)
        return _out([(head, 0), (_ids(tokenizer, self.text), 1), ([eos], 1)])


@dataclasses.dataclass(frozen=True)
class Completion:
    """A prompt (not trained) and its completion (trained), tokenized separately."""

    prompt: str
    completion: str

    def encode(self, tokenizer) -> tuple[np.ndarray, np.ndarray]:
        head, eos = _ends(tokenizer)
        return _out([(head, 0), (_ids(tokenizer, self.prompt), 0), (_ids(tokenizer, self.completion), 1),
                     ([eos], 1)])


def _render(tokenizer, messages, add_generation_prompt=False) -> str:
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except ValueError as e:
        raise ValueError(f"chat records need a tokenizer with a chat template ({e})") from None


_NOT_PREFIX = ("the chat template does not render a conversation's prefixes as prefixes of its rendering; "
               "cannot tell which tokens are the assistant's")


@dataclasses.dataclass(frozen=True)
class Chat:
    """A conversation ``[{"role", "content"}, ...]``; the assistant turns are trained.

    The template renders each prefix of the conversation; the text an assistant turn adds after
    the generation prompt (its content and end marks) is trained, everything else is not.
    """

    messages: tuple

    def encode(self, tokenizer) -> tuple[np.ndarray, np.ndarray]:
        _, eos = _ends(tokenizer)
        msgs = self.messages
        segments: list[tuple[str, int]] = []
        done = ""
        for k, m in enumerate(msgs):
            full = _render(tokenizer, msgs[: k + 1])
            if m["role"] == "assistant":
                try:
                    head = _render(tokenizer, msgs[:k], add_generation_prompt=True)
                except Exception:  # some templates refuse an empty conversation: cut before the content
                    idx = full.rfind(m["content"])
                    head = full[:idx] if idx >= 0 else done
                if not head.startswith(done) or not full.startswith(head):
                    raise ValueError(_NOT_PREFIX)
                segments += [(head[len(done):], 0), (full[len(head):], 1)]
            else:
                if not full.startswith(done):
                    raise ValueError(_NOT_PREFIX)
                segments.append((full[len(done):], 0))
            done = full
        parts = [(_ids(tokenizer, text), weight) for text, weight in segments]
        last = next((i[-1] for i, _ in reversed(parts) if i.size), None)
        if last != eos:
            parts.append(([eos], 1 if msgs[-1]["role"] == "assistant" else 0))
        return _out(parts)


Record = (Text, Completion, Chat)


# ------------------------------------------------------------------------------------------
# shapes: a JSON object / table row -> a record
# ------------------------------------------------------------------------------------------


def _str(rec, key, what):
    v = rec.get(key)
    if not isinstance(v, str):
        raise ValueError(f"{what}: {key!r} must be a string, got {type(v).__name__}")
    return v


def _messages(turns, what: str, role_key: str, text_key: str, roles: Optional[Mapping[str, str]] = None) -> tuple:
    if hasattr(turns, "tolist"):  # a numpy array of dicts (pandas/pyarrow rows)
        turns = turns.tolist()
    field = "conversations" if roles else "messages"
    if not isinstance(turns, (list, tuple)) or not turns or not all(
            isinstance(t, dict) and isinstance(t.get(role_key), str) and isinstance(t.get(text_key), str)
            for t in turns):
        raise ValueError(f"{what}: {field!r} must be a non-empty list of "
                         f"{{\"{role_key}\": str, \"{text_key}\": str}}")
    if roles is None:
        return tuple({"role": t[role_key], "content": t[text_key]} for t in turns)
    unknown = sorted({t[role_key] for t in turns if t[role_key].lower() not in roles})
    if unknown:
        raise ValueError(f"{what}: {field!r} speaker {unknown[0]!r} is not one of {sorted(roles)}")
    return tuple({"role": roles[t[role_key].lower()], "content": t[text_key]} for t in turns)


# ShareGPT's speaker names -> chat roles
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "chatgpt": "assistant", "system": "system"}


def _alpaca(rec, what):
    ins, inp, out = rec.get("instruction"), rec.get("input", ""), rec.get("output")
    if not isinstance(ins, str) or not isinstance(out, str) or not isinstance(inp, (str, type(None))):
        raise ValueError(f"{what}: Alpaca records need 'instruction' and 'output' strings (and an optional "
                         f"'input' string), got {type(ins).__name__}, {type(out).__name__} and {type(inp).__name__}")
    user = ins + (f"\n\n{inp}" if inp else "")
    return Chat(({"role": "user", "content": user}, {"role": "assistant", "content": out}))


def _completion(rec, what):
    p, c = rec.get("prompt"), rec.get("completion")
    if not isinstance(p, str) or not isinstance(c, str):
        raise ValueError(f"{what}: 'prompt' and 'completion' must both be strings, got "
                         f"{type(p).__name__} and {type(c).__name__}")
    return Completion(p, c)


@dataclasses.dataclass(frozen=True)
class Shape:
    """A record shape: ``keys`` any of which identifies it (checked in `SHAPES` order) and ``make``
    building the record from the object (raising ValueError naming ``what`` when it is malformed)."""

    name: str
    keys: tuple
    make: Callable


SHAPES: tuple = (
    Shape("messages", ("messages",), lambda r, w: Chat(_messages(r["messages"], w, "role", "content"))),
    Shape("sharegpt", ("conversations",),
          lambda r, w: Chat(_messages(r["conversations"], w, "from", "value", _SHAREGPT_ROLES))),
    Shape("alpaca", ("instruction", "output"), _alpaca),
    Shape("prompt/completion", ("prompt", "completion"), _completion),
    Shape("text", ("text",), lambda r, w: Text(_str(r, "text", w))),
)
FIELDS = tuple(sorted({k for s in SHAPES for k in s.keys} | {"input"}))


def shape_of(rec: Mapping) -> Shape:
    """The `Shape` of a mapping, by its keys (ValueError naming the keys it has)."""
    for s in SHAPES:
        if any(k in rec for k in s.keys):
            return s
    raise ValueError(f"a record needs 'text', 'prompt'+'completion', 'messages' (OpenAI), 'instruction'+'output' "
                     f"(Alpaca) or 'conversations' (ShareGPT); got keys {sorted(rec)}")


def rename(rec: Mapping, columns: Optional[Mapping[str, str]]) -> dict:
    """``rec`` with the dataset's field names mapped to ours: ``columns`` is ``{ours: theirs}``."""
    if not columns:
        return rec
    out = {k: v for k, v in rec.items() if k not in columns.values()}
    for ours, theirs in columns.items():
        if theirs in rec:
            out[ours] = rec[theirs]
    return out


def parse(rec, where: str = "record", columns: Optional[Mapping[str, str]] = None):
    """``(record, shape name)`` of one JSON object or table row.

    Args:
      rec: a mapping (a parsed JSON line, a Parquet/Arrow row).
      where: names the record in errors (``file:line`` or ``file row N``).
      columns: ``{our field: the dataset's field}`` renames applied first.

    Raises:
      ValueError: not a mapping, no known shape, or a malformed field, naming ``where``.
    """
    if not isinstance(rec, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    rec = rename(rec, columns)
    try:
        shape = shape_of(rec)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return shape.make(rec, where), shape.name


def check_columns(columns) -> dict:
    """``columns`` as a ``{our field: dataset field}`` dict (ValueError naming an unknown field)."""
    if columns is None:
        return {}
    if not isinstance(columns, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in columns.items()):
        raise ValueError(f"columns must map our field names to the dataset's (str -> str), got {columns!r}")
    bad = sorted(set(columns) - set(FIELDS))
    if bad:
        raise ValueError(f"columns: {bad[0]!r} is not a record field; the fields are {', '.join(FIELDS)}")
    return dict(columns)

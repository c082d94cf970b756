"""Tokenizers: SentencePiece (llama2.c tok512) and `tokenizers` pipelines (GGUF metadata, see
`gguf_tokenizer`, or tokenizer.json).

Every tokenizer has the same small surface: `encode(text) -> list[int]`, `decode(ids) -> str`,
`eos_ids`, `bos_id`, `vocab_size` and `apply_chat_template(messages)`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any


def render_chat_template(template: str, messages: Sequence[dict[str, str]], *,
                         add_generation_prompt: bool = True, **extra: Any) -> str:
  """Renders a Hugging Face style Jinja chat template the way transformers does: a sandbox with
  trimmed blocks, loop controls, a `tojson` that keeps non-ASCII text and does not escape HTML,
  `raise_exception` and `strftime_now`."""
  import datetime
  import json

  import jinja2
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  for m in messages:
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      raise ValueError(f"each chat message must be a dict with 'role' and 'content', got {m!r}")

  def raise_exception(msg):
    raise jinja2.exceptions.TemplateError(msg)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=["jinja2.ext.loopcontrols"])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(template).render(
      messages=list(messages), add_generation_prompt=add_generation_prompt, **extra)


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's printable spelling of every byte (how byte-level BPE vocabularies store bytes)."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + list(
      range(ord("\u00ae"), ord("\u00ff") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte-fallback pieces


def _piece_bytes(piece: str) -> bytes:
  """A SentencePiece-style piece as text bytes: `<0xNN>` is byte NN, U+2581 a space."""
  m = _BYTE_PIECE.fullmatch(piece)
  return bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode("utf-8")


class Tokenizer:
  """Base class; subclasses implement `_encode` and `decode`."""

  bos_id: int | None
  eos_ids: tuple[int, ...]
  add_bos: bool
  chat_template: str | None
  special_tokens: dict[str, int]

  @property
  def vocab_size(self) -> int:
    raise NotImplementedError

  @property
  def unk_id(self) -> int | None:
    """The id that stands for text without a token of its own (None: there is none, or bytes
    fall back to byte tokens)."""
    return None

  def _encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def decode(self, ids: Sequence[int]) -> str:
    raise NotImplementedError

  def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
    if not isinstance(text, str):
      raise TypeError(f"encode expects a str, got {type(text).__name__}")
    ids = self._encode(text)
    if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
      ids = [self.bos_id] + ids
    return ids

  def apply_chat_template(self, messages: Sequence[dict[str, str]], *,
                          add_generation_prompt: bool = True, tokenize: bool = False, **extra):
    """The chat rendered as text (or token ids); `extra` (e.g. `tools=[...]`) goes to the
    template."""
    if not self.chat_template:
      raise ValueError("this model's tokenizer has no chat template (it is a base model); "
                       "pass plain text prompts instead of chat messages")
    text = render_chat_template(self.chat_template, messages,
                                add_generation_prompt=add_generation_prompt,
                                **{**self._template_vars(), **extra})
    return self.encode(text, add_bos=False) if tokenize else text

  def _template_vars(self) -> dict[str, Any]:
    return {}

  def token_bytes(self) -> list[bytes | None]:
    """The text bytes each token id stands for (byte-fallback pieces are their byte, a
    SentencePiece word boundary a space); None for control and special tokens, which stand
    for no text. Cross-vocabulary drafting builds its translation tables from this."""
    raise TypeError(f"{type(self).__name__} does not list its tokens' bytes")

  def save(self, folder: str) -> dict[str, Any]:
    """Writes the files this tokenizer needs into `folder` and returns a JSON-safe description;
    `restore(description, folder)` rebuilds an equal tokenizer (jaxspec checkpoints)."""
    raise TypeError(f"cannot save a tokenizer of type {type(self).__name__} (supported: "
                    f"HFTokenizer, SentencePieceTokenizer, ByteTokenizer)")


def restore(d: dict[str, Any], folder: str) -> Tokenizer:
  """The tokenizer a `Tokenizer.save(folder)` description describes."""
  import os

  kind = d.get("type")
  if kind == "hf":
    from tokenizers import Tokenizer as _Tok
    tok = _Tok.from_file(os.path.join(folder, d["file"]))
    return HFTokenizer(tok, bos_id=d["bos_id"], eos_ids=d["eos_ids"], add_bos=d["add_bos"],
                       chat_template=d["chat_template"], special_tokens=d["special_tokens"],
                       bos_token=d["bos_token"], eos_token=d["eos_token"])
  if kind == "sentencepiece":
    return SentencePieceTokenizer(os.path.join(folder, d["file"]), add_bos=d["add_bos"],
                                  eos_ids=d["eos_ids"])
  if kind == "bytes":
    return ByteTokenizer(vocab=d["vocab"], bos_id=d["bos_id"], eos_ids=tuple(d["eos_ids"]),
                         add_bos=d["add_bos"], chat_template=d["chat_template"],
                         special_tokens=d["special_tokens"])
  raise ValueError(f"unknown tokenizer type {kind!r} (known: hf, sentencepiece, bytes)")


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model file (llama2.c `tok512.model`, Llama 2 `tokenizer.model`)."""

  def __init__(self, model_file: str, *, add_bos: bool = True, eos_ids: Sequence[int] | None = None):
    import sentencepiece as spm

    self.model_file = str(model_file)
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.Load(str(model_file))
    except (OSError, RuntimeError) as e:
      raise ValueError(f"cannot read SentencePiece model {model_file}: {e}") from e
    bos = self._sp.bos_id()
    self.bos_id = bos if bos >= 0 else None
    eos = self._sp.eos_id()
    self.eos_ids = tuple(eos_ids) if eos_ids is not None else ((eos,) if eos >= 0 else ())
    self.add_bos = add_bos
    self.chat_template = None
    self.special_tokens = {}

  @property
  def vocab_size(self) -> int:
    return self._sp.GetPieceSize()

  @property
  def unk_id(self) -> int | None:
    unk = self._sp.unk_id()
    return int(unk) if unk >= 0 else None

  def _encode(self, text: str) -> list[int]:
    return list(self._sp.EncodeAsIds(text)) if text else []

  def token_bytes(self) -> list[bytes | None]:
    sp = self._sp
    return [None if sp.IsControl(i) or sp.IsUnknown(i) else _piece_bytes(sp.IdToPiece(i))
            for i in range(sp.GetPieceSize())]

  def save(self, folder: str) -> dict[str, Any]:
    import os

    if os.path.exists(self.model_file):
      with open(self.model_file, "rb") as f:
        blob = f.read()
    else:
      blob = self._sp.serialized_model_proto()
    with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
      f.write(blob)
    return {"type": "sentencepiece", "file": "tokenizer.model", "add_bos": self.add_bos,
            "eos_ids": list(self.eos_ids)}

  def decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids]
    starts_text = bool(ids) and ids[0] == self.bos_id
    ids = [i for i in ids if i not in (self.bos_id, *self.eos_ids)]
    text = self._sp.DecodeIds(ids)
    # SentencePiece drops the word-boundary space of the first piece, which is right at the
    # start of a text (after BOS) but loses the space between a prompt and its continuation.
    if ids and not starts_text and self._sp.IdToPiece(ids[0]).startswith("\u2581"):
      text = " " + text
    return text


class HFTokenizer(Tokenizer):
  """A `tokenizers.Tokenizer` (byte-level BPE and friends) with special-token metadata."""

  def __init__(self, tok, *, bos_id: int | None, eos_ids: Sequence[int], add_bos: bool = False,
               chat_template: str | None = None, special_tokens: dict[str, int] | None = None,
               bos_token: str | None = None, eos_token: str | None = None):
    self._tok = tok
    self.bos_id = bos_id
    self.eos_ids = tuple(eos_ids)
    self.add_bos = add_bos
    self.chat_template = chat_template
    self.special_tokens = dict(special_tokens or {})
    self._bos_token = bos_token
    self._eos_token = eos_token

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def _encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def token_bytes(self) -> list[bytes | None]:
    import json

    spec = json.loads(self._tok.to_str())
    text = json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    byte_level = '"ByteLevel"' in text  # pieces spell bytes as GPT-2's printable characters
    unspell = {c: b for b, c in bytes_to_unicode().items()}
    added = self._tok.get_added_tokens_decoder()  # {id: AddedToken}
    out: list[bytes | None] = []
    for i in range(self.vocab_size):
      if i in added:  # added tokens are stored as their text
        out.append(None if added[i].special else added[i].content.encode("utf-8"))
        continue
      piece = self._tok.id_to_token(i)
      if piece is None:
        out.append(None)
      elif byte_level and all(c in unspell for c in piece):
        out.append(bytes(unspell[c] for c in piece))
      else:
        out.append(_piece_bytes(piece))
    return out

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def _template_vars(self) -> dict[str, Any]:
    return {"bos_token": self._bos_token or "", "eos_token": self._eos_token or ""}

  @property
  def bos_token(self) -> str | None:
    return self._bos_token

  @property
  def eos_token(self) -> str | None:
    return self._eos_token

  def save(self, folder: str) -> dict[str, Any]:
    import os

    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
      f.write(self._tok.to_str())
    return {"type": "hf", "file": "tokenizer.json", "bos_id": self.bos_id,
            "eos_ids": list(self.eos_ids), "add_bos": self.add_bos,
            "chat_template": self.chat_template, "special_tokens": self.special_tokens,
            "bos_token": self._bos_token, "eos_token": self._eos_token}


@dataclasses.dataclass
class ByteTokenizer(Tokenizer):
  """Bytes as ids (offset by the special ids): for tests and random models with no vocabulary."""

  vocab: int = 256 + 3
  bos_id: int | None = 1
  eos_ids: tuple[int, ...] = (2,)
  add_bos: bool = True
  chat_template: str | None = None
  special_tokens: dict[str, int] = dataclasses.field(default_factory=dict)

  @property
  def vocab_size(self) -> int:
    return self.vocab

  def _encode(self, text: str) -> list[int]:
    return [b + 3 for b in text.encode("utf-8")]

  def token_bytes(self) -> list[bytes | None]:
    return [bytes([i - 3]) if 3 <= i < 259 else None for i in range(self.vocab)]

  def save(self, folder: str) -> dict[str, Any]:
    return {"type": "bytes", "vocab": self.vocab, "bos_id": self.bos_id,
            "eos_ids": list(self.eos_ids), "add_bos": self.add_bos,
            "chat_template": self.chat_template, "special_tokens": self.special_tokens}

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(int(i) - 3 for i in ids if 3 <= int(i) < 259).decode("utf-8", errors="replace")

"""Translation tables between two tokenizers, for drafting across vocabularies.

Built once on the host from each tokenizer's `token_bytes()` (the text bytes every id stands
for), then used inside the compiled loop as plain integer arrays:

  * `spell` [Vt, M]: how the draft reads a target token: the draft ids that spell its bytes,
    by greedy longest match over the draft's token byte strings (`spell_len` [Vt] of them;
    at most M, longer spellings are cut). The draft sees the committed text re-spelled token
    by token, not re-tokenized as a whole, so a word split differently by the two tokenizers
    may read slightly unlike the draft's own tokenization; that costs acceptance, never
    correctness.
  * `lead` / `lead_len`: the same for the first text token of a prompt when the draft's
    tokenizer puts a word boundary (a space) before its text, as SentencePiece does.
  * `pair_draft` [N] / `pair_target` [N]: the intersection, draft ids that are exactly one
    target token with the same bytes and that the target token spells back as exactly that
    draft id. The draft proposes only these, so every drafted token is a target token, its
    probability is a proper distribution over target ids, and each fed draft is one draft
    token: lossless verification needs nothing else.

Special tokens pair by role (BOS with BOS where the draft starts its texts with one, the
first EOS with every EOS) and by equal text in
the two tokenizers' special-token tables; other special tokens of the target are spelled as
their text; the draft never proposes an unpaired special token.
"""

from __future__ import annotations

import dataclasses

import numpy as np

MAX_SPELL = 16  # draft tokens per target token at most


@dataclasses.dataclass(frozen=True, eq=False)
class Tables:
  spell: np.ndarray  # [Vt, M] int32 draft ids (0 past spell_len)
  spell_len: np.ndarray  # [Vt] int32
  lead: np.ndarray  # [Vt, M] int32: spellings with the draft's leading word boundary
  lead_len: np.ndarray  # [Vt] int32
  pair_draft: np.ndarray  # [N] int32 draft ids of the intersection (sorted)
  pair_target: np.ndarray  # [N] int32 the target id each of them is
  prepend: int | None  # a draft BOS to put before every translated prompt
  expansion: float  # draft tokens per target token on jaxspec's built-in prompts


def lookup(token_bytes: list[bytes | None]) -> tuple[dict[bytes, int], int]:
  """bytes -> id over the tokens with text, and the longest byte string. Where several ids
  spell the same bytes the highest wins: SentencePiece vocabularies list their byte-fallback
  pieces (`<0x41>`) before the merged pieces with the same text ("A")."""
  table: dict[bytes, int] = {}
  for i, b in enumerate(token_bytes):
    if b:
      table[b] = i
  return table, max((len(b) for b in table), default=1)


def spell_bytes(b: bytes, table: dict[bytes, int], longest: int, unk: int | None) -> list[int]:
  out, i = [], 0
  while i < len(b):
    for n in range(min(longest, len(b) - i), 0, -1):
      d = table.get(b[i:i + n])
      if d is not None:
        out.append(d)
        i += n
        break
    else:  # a byte the draft cannot spell (no byte fallback)
      if unk is not None:
        out.append(unk)
      i += 1
  return out


def _rows(spellings: list[list[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
  arr = np.zeros((len(spellings), width), np.int32)
  lens = np.zeros(len(spellings), np.int32)
  for t, s in enumerate(spellings):
    s = s[:width]
    arr[t, :len(s)] = s
    lens[t] = len(s)
  return arr, lens


def _expansion(target_tok, spell_len: np.ndarray) -> float:
  from jaxspec import prompts

  counts = np.zeros(len(spell_len), np.int64)
  for text in prompts.training_prompts():
    ids = np.asarray(target_tok.encode(text, add_bos=False), np.int64)
    ids = ids[ids < len(spell_len)]
    np.add.at(counts, ids, 1)
  total = counts.sum()
  return float((counts * spell_len).sum() / total) if total else 1.0


def build(target_tok, draft_tok, target_vocab: int, draft_vocab: int) -> Tables:
  """The tables from a target and a draft tokenizer (model vocabularies may be padded past
  the tokenizers': padding ids spell nothing and pair with nothing)."""
  tb = list(target_tok.token_bytes())[:target_vocab]
  db = list(draft_tok.token_bytes())[:draft_vocab]
  tb += [None] * (target_vocab - len(tb))
  db += [None] * (draft_vocab - len(db))
  dtable, longest = lookup(db)
  ttable, _ = lookup(tb)
  unk = draft_tok.unk_id

  # role pairs target id -> draft id: BOS, every EOS to the draft's first, equal special text
  roles: dict[int, int] = {}
  if target_tok.bos_id is not None and draft_tok.bos_id is not None and draft_tok.add_bos:
    roles[target_tok.bos_id] = draft_tok.bos_id  # a text start is a text start
  if draft_tok.eos_ids:
    for e in target_tok.eos_ids:
      roles.setdefault(e, draft_tok.eos_ids[0])
  dspecial = draft_tok.special_tokens
  for text, t in target_tok.special_tokens.items():
    if text in dspecial:
      roles.setdefault(t, dspecial[text])
  roles = {t: d for t, d in roles.items() if t < target_vocab and d < draft_vocab}
  special_text = {t: text.encode("utf-8") for text, t in target_tok.special_tokens.items()}

  spell, lead = [], []
  dummy = draft_tok.encode("a", add_bos=False)
  boundary = bool(dummy) and dummy[0] < len(db) and (db[dummy[0]] or b"").startswith(b" ")
  # (a draft that starts its texts with a word boundary: SentencePiece's dummy prefix)
  for t, b in enumerate(tb):
    if t in roles:
      s = [roles[t]]
      spell.append(s)
      lead.append(s)
      continue
    b = b if b is not None else special_text.get(t, b"")
    spell.append(spell_bytes(b, dtable, longest, unk))
    lead.append(spell_bytes(b" " + b, dtable, longest, unk) if boundary and b else spell[-1])
  width = max(1, min(MAX_SPELL, max(len(s) for s in spell + lead)))
  spell_arr, spell_len = _rows(spell, width)
  lead_arr, lead_len = _rows(lead, width)

  # the intersection: one draft token that is one target token, both ways
  pairs = {d: t for t, d in roles.items() if spell[t] == [d]}
  for d, b in enumerate(db):
    t = ttable.get(b) if b else None
    if t is not None and t not in roles and spell[t] == [d]:
      pairs.setdefault(d, t)
  order = sorted(pairs)
  prepend = None
  if draft_tok.bos_id is not None and draft_tok.add_bos and not (
      target_tok.add_bos and target_tok.bos_id is not None and target_tok.bos_id in roles):
    prepend = int(draft_tok.bos_id)
  return Tables(spell=spell_arr, spell_len=spell_len, lead=lead_arr, lead_len=lead_len,
                pair_draft=np.asarray(order, np.int32),
                pair_target=np.asarray([pairs[d] for d in order], np.int32),
                prepend=prepend, expansion=_expansion(target_tok, spell_len))

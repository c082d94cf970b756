"""Argument checks shared by `generate`, `stream`, the trainer and the command line.

Pure functions: each takes a user value, returns it normalised (numpy integer and float
scalars become Python ones) or raises a ValueError / TypeError that names the argument. Python
bools are never numbers here (`temperature=True` is an error, not 1.0), nor are strings
(`temperature='0.5'`).

The rule for the exception type: a bad scalar *setting* (temperature, top_k, top_p,
max_new_tokens, seed, stop tokens, rounds_per_chunk) is a ValueError whatever is wrong with it,
as it always was; a prompt of the wrong *kind* (a float token id, a nested list) is a TypeError,
and text that cannot be encoded is a ValueError.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

SEED_BOUND = 2**32  # seeds are integers in [0, 2**32): every one gives its own stream
MAX_STOP = 8  # stop tokens per row (engine.MAX_STOP, the engine's fixed stop table)


def is_int(x) -> bool:
  """A Python or numpy integer, and not a bool."""
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def is_real(x) -> bool:
  """A Python or numpy integer or float, and not a bool."""
  return (isinstance(x, (int, float, np.integer, np.floating))
          and not isinstance(x, (bool, np.bool_)))


def got(x) -> str:
  """`x` for an error message: its repr, and its type when that is not an int or a float."""
  if type(x) in (int, float) or isinstance(x, (np.integer, np.floating)):
    return repr(x)
  return f"{x!r} ({type(x).__name__})"


def _float(x) -> float:
  """float(x), or NaN for an int too large for a float (10**400)."""
  try:
    return float(x)
  except OverflowError:
    return float("nan")


def positive_int(name: str, x, *, upper: int | None = None) -> int:
  """An integer >= 1 (and <= upper)."""
  if not is_int(x) or x < 1 or (upper is not None and x > upper):
    bound = f" in [1, {upper}]" if upper is not None else ""
    what = "a positive integer" if upper is None else "an integer"
    raise ValueError(f"{name} must be {what}{bound}, got {got(x)}")
  return int(x)


def max_new_tokens(x) -> int:
  return positive_int("max_new_tokens", x)


def rounds_per_chunk(x) -> int:
  return positive_int("rounds_per_chunk", x)


def temperature(x) -> float:
  """A finite number >= 0 (0 is greedy; see sampling.MIN_TEMPERATURE for tiny ones)."""
  if not is_real(x) or not math.isfinite(_float(x)) or _float(x) < 0:
    raise ValueError(f"temperature must be a finite number >= 0, got {got(x)}")
  return float(x)


def top_k(x) -> int | None:
  """A positive integer (values past the vocabulary keep every token, like None)."""
  if x is None:
    return None
  if not is_int(x) or x < 1:
    raise ValueError(f"top_k must be a positive integer or None, got {got(x)}")
  return int(min(x, 2**31 - 1))  # the engine holds it as int32


def top_p(x) -> float | None:
  if x is None:
    return None
  if not is_real(x) or not 0.0 < _float(x) <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {got(x)}")
  return float(x)


def seed(x) -> int:
  """An integer in [0, 2**32). Larger or negative seeds would silently share a stream with
  one in range (the PRNG key holds 32 bits of seed), so they are refused."""
  if not is_int(x) or not 0 <= x < SEED_BOUND:
    raise ValueError(f"seed must be an integer in [0, 2**32), got {got(x)}")
  return int(x)


def flag(name: str, x) -> bool:
  if not isinstance(x, (bool, np.bool_)):
    raise ValueError(f"{name} must be True or False, got {got(x)}")
  return bool(x)


def text(i: int, s: str) -> str:
  """A text prompt: it must be encodable (UTF-8), e.g. no lone surrogates."""
  try:
    s.encode("utf-8")
  except UnicodeEncodeError as e:
    raise ValueError(f"prompt {i} is not valid text: {s[e.start:e.end]!r} at position {e.start} "
                     f"cannot be encoded as UTF-8 ({e.reason})") from None
  return s


def token_ids(i: int, p) -> list[int]:
  """A prompt of token ids: a list or tuple of ints, or a 1-D integer numpy array."""
  if isinstance(p, np.ndarray):
    if p.ndim != 1:
      raise TypeError(f"prompt {i} must be a str or a list of token ids, got a {p.ndim}-d numpy "
                      f"array")
    if p.dtype.kind not in "iu":
      raise TypeError(f"prompt {i} has token ids of dtype {p.dtype}; token ids must be integers")
    return [int(t) for t in p.tolist()]
  if not isinstance(p, (list, tuple)):
    raise TypeError(f"prompt {i} must be a str or a list of token ids, got {type(p).__name__}")
  for j, t in enumerate(p):
    if not is_int(t):
      raise TypeError(f"prompt {i} has a non-integer token id at position {j}: {got(t)}; token "
                      f"ids must be ints")
  return [int(t) for t in p]


def prompt(i: int, p) -> str | list[int]:
  """One prompt: text (checked to be encodable) or token ids (checked to be integers)."""
  if isinstance(p, str):
    return text(i, p)
  return token_ids(i, p)


def prompts(ps) -> list[str | list[int]]:
  """A batch of prompts: a list/tuple of prompts, or a 2-D integer numpy array."""
  if isinstance(ps, np.ndarray) and ps.ndim == 2:
    ps = list(ps)
  if isinstance(ps, (str, bytes)) or not isinstance(ps, Sequence):
    raise TypeError("prompts must be a list of strings or a list of token-id lists "
                    "(wrap a single prompt in a list)")
  if len(ps) == 0:
    raise ValueError("prompts is empty: pass at least one prompt")
  return [prompt(i, p) for i, p in enumerate(ps)]


def in_vocab(i: int, ids: list[int], vocab_size: int) -> list[int]:
  if not ids:
    raise ValueError(f"prompt {i} is empty (no tokens); a prompt needs at least one token")
  bad = [t for t in ids if not 0 <= t < vocab_size]
  if bad:
    raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab_size}): "
                     f"{bad[:5]}")
  return ids


def stop_rows(stop, batch: int, vocab_size: int, default=(),
              max_stop: int = MAX_STOP) -> list[list[int]]:
  """stop_tokens -> one list of ids per row. None: `default` (the tokenizer's EOS ids); a
  single id; a list of ids (every row); one list per row (at most `max_stop` each)."""
  def scalar(x):  # a 0-d numpy array is its one value (np.int64(5) and np.array(5) alike)
    return x.item() if isinstance(x, np.ndarray) and x.ndim == 0 else x

  stop = scalar(stop)
  if stop is None:
    rows = [list(default)] * batch
  elif is_int(stop):
    rows = [[stop]] * batch
  elif isinstance(stop, (list, tuple, np.ndarray)):
    seq = [scalar(s) for s in stop]
    if seq and all(isinstance(s, (list, tuple, np.ndarray)) for s in seq):
      if len(seq) != batch:
        raise ValueError(f"per-row stop_tokens has {len(seq)} rows for {batch} prompts")
      rows = [[scalar(t) for t in s] for s in seq]
    else:
      rows = [seq] * batch
  else:
    raise ValueError(f"stop_tokens must be None, a token id, a list of token ids or one list "
                     f"per prompt, got {got(stop)}")
  out = []
  for r in rows:
    if len(r) > max_stop:
      raise ValueError(f"at most {max_stop} stop tokens per row, got {len(r)}")
    for t in r:
      if not is_int(t) or not 0 <= t < vocab_size:
        raise ValueError(f"stop token {got(t)} is not a token id in [0, {vocab_size})")
    out.append([int(t) for t in r])
  return out

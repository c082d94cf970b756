"""`NGram`: model-free prompt lookup on device (PLD / "prompt lookup decoding").

Match the row's last `n` committed tokens against everything earlier in the same row (prompt and
output); propose the k tokens that followed the most recent match. With no match of length n,
fall back to n - 1, ..., 1. With no match at all, propose repeats of the last token (cheap to
reject). Proposals are deterministic, so their draft distribution is one-hot.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxspec.models import Model

from .base import DrafterSpec, Round, check_k, last_tokens


def lookup(seq, n, max_ngram: int, k: int):
  """seq [B, L], n [B] -> proposals [B, k] int32 and found [B] bool."""
  b, length = seq.shape
  pos = jnp.arange(length)
  best_start = jnp.full((b,), -1, jnp.int32)  # first continuation index of the chosen match
  for g in range(max_ngram, 0, -1):  # longest n-gram first; static unroll over n only
    suffix = last_tokens(seq, n, g)  # [B, g]
    match = jnp.ones((b, length), bool)
    for i in range(g):
      shifted = jnp.roll(seq, -i, axis=1)  # shifted[:, j] = seq[:, j + i]
      match &= shifted == suffix[:, i:i + 1]
    # The continuation seq[j + g] must be committed and the match must not be the suffix itself.
    match &= (pos[None, :] + g) < n[:, None]
    j = jnp.max(jnp.where(match, pos[None, :], -1), axis=1)
    start = jnp.where(j >= 0, j + g, -1)
    best_start = jnp.where((best_start < 0) & (start >= 0), start, best_start)
  found = best_start >= 0
  idx = best_start[:, None] + jnp.arange(k)[None, :]
  # Past the committed end there is nothing to copy: repeat the last token instead.
  last = last_tokens(seq, n, 1)
  prop = jnp.take_along_axis(seq, jnp.clip(idx, 0, length - 1), axis=1)
  prop = jnp.where(found[:, None] & (idx < n[:, None]), prop, last)
  return prop.astype(jnp.int32), found


@dataclasses.dataclass(frozen=True)
class NGramSpec(DrafterSpec):
  n: int = 3

  def propose(self, params, dstate, r: Round):
    tokens, _ = lookup(r.seq, r.n, self.n, self.k)
    return dstate, r.tcache, tokens, None


@dataclasses.dataclass(frozen=True)
class NGram:
  """Prompt lookup: propose what followed the last `n` tokens earlier in the row."""

  n: int = 3
  k: int = 4
  tree: object = None

  def __post_init__(self):
    check_k(self.k)
    if not isinstance(self.n, int) or not 1 <= self.n <= 16:
      raise ValueError(f"NGram n must be an integer in [1, 16], got {self.n!r}")

  def bind(self, target: Model):
    return NGramSpec(k=self.k, target=target.config, n=self.n), None

"""`NGram`: model-free prompt lookup on device (PLD / "prompt lookup decoding").

Match the row's last `n` committed tokens against everything earlier in the same row (prompt and
output); propose the k tokens that followed the most recent match. With no match of length n,
fall back to n - 1, ..., 1. With no match at all, propose repeats of the last token (cheap to
reject). Proposals are deterministic, so their draft distribution is one-hot.

With a memory (`NGram(memory=M)`, filled by `NGram.remember(result)`), the search also covers
the last M tokens of earlier calls' outputs, one [M] array shared by every row (suffix
decoding's history across requests, Oliaro et al. 2024): a job whose answers repeat each other
(templated extraction, code in one repository, agent loops) drafts from them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxspec.models import Model
from jaxspec.trees import Static

from . import registry
from .base import Drafter, DrafterSpec, Proposal, Round, check_int, last_tokens, top_indices

MAX_MEMORY = 1 << 20  # tokens an NGram memory may hold (a [M] search per n-gram length and round)


def _match_scores(hay, end, seq, n, max_ngram: int, scale: int, bonus: int):
  """[B, H] score per candidate continuation start in `hay` ([B, H], or [1, H] shared by every
  row) of a match of the row's last g <= max_ngram committed tokens (seq [B, L], n [B]); -1:
  no match. A continuation must start before `end` ([B] or [1]) and hold a token (>= 0).
  Score g * scale + bonus + start: longer n-grams first, then the source's bonus, then the
  most recent match."""
  b, h = seq.shape[0], hay.shape[1]
  pos = jnp.arange(h)
  start = pos[None, :]
  score = jnp.full((b, h), -1, jnp.int32)
  for g in range(1, max_ngram + 1):
    suffix = last_tokens(seq, n, g)  # [B, g]
    match = jnp.ones((b, h), bool)
    for i in range(g):
      match &= jnp.roll(hay, -i, axis=1) == suffix[:, i:i + 1]  # hay[j + i] == suffix[i]
    match &= (start + g < end[:, None]) & (jnp.roll(hay, -g, axis=1) >= 0)
    score = jnp.maximum(score, jnp.where(match, g * scale + bonus + start + g, -1))
  return score


def lookup_many(seq, n, max_ngram: int, width: int, memory=None):
  """Continuation starts [B, width] of the best `width` matches, as positions in
  `extended(seq, memory)` (-1 where there are fewer). Matches in the row itself outrank
  matches in `memory` ([M] earlier outputs, -1 between them) of the same n-gram length."""
  length = seq.shape[1]
  m = 0 if memory is None else memory.shape[0]
  scale, own = 2 * (length + m), length + m  # own bonus: above any memory score of that g
  scores = _match_scores(seq, n, seq, n, max_ngram, scale, own)
  if memory is not None:
    mem = _match_scores(memory[None, :], jnp.full((1,), m), seq, n, max_ngram, scale, 0)
    scores = jnp.concatenate([scores, mem], axis=1)
  best, _ = top_indices(scores, width)
  r = best % scale  # bonus + continuation start
  return jnp.where(best >= 0, jnp.where(r >= own, r - own, length + r), -1)


def extended(seq, memory):
  """[B, L + M]: each row, then the shared memory."""
  if memory is None:
    return seq
  return jnp.concatenate([seq, jnp.broadcast_to(memory[None, :], (seq.shape[0],) +
                                                memory.shape).astype(seq.dtype)], axis=1)


def _copy(seq, n, memory, idx):
  """Tokens at positions `idx` [B, T] of `extended(seq, memory)` where they continue a match
  (inside the row's committed tokens, or a memory token), else the row's last token."""
  length = seq.shape[1]
  ext = extended(seq, memory)
  tok = jnp.take_along_axis(ext, jnp.clip(idx, 0, ext.shape[1] - 1), axis=1)
  ok = (idx >= 0) & jnp.where(idx < length, idx < n[:, None], (idx < ext.shape[1]) & (tok >= 0))
  return jnp.where(ok, tok, last_tokens(seq, n, 1)).astype(jnp.int32)


def lookup(seq, n, max_ngram: int, k: int, memory=None):
  """seq [B, L], n [B] -> proposals [B, k] int32 and found [B] bool."""
  start = lookup_many(seq, n, max_ngram, 1, memory)[:, 0]
  found = start >= 0
  idx = jnp.where(found[:, None], start[:, None] + jnp.arange(k)[None, :], -1)
  return _copy(seq, n, memory, idx), found


@dataclasses.dataclass(frozen=True)
class NGramSpec(DrafterSpec):
  """params: the memory [M] int32 (earlier outputs, -1 between and before them) or None."""

  n: int = 3

  def propose(self, params, dstate, r: Round):
    if self.tree is None:
      tokens, _ = lookup(r.seq, r.n, self.n, self.k, params)
      return dstate, Proposal.chain(tokens)
    return dstate, Proposal.from_tree(self.tree, self._tree(params, r))

  def _tree(self, memory, r: Round):
    """Each root child starts a branch following one match (best first); a node at depth d
    of branch i proposes the d-th token after match i. Extra siblings deeper down repeat
    their branch (duplicates cost nothing: they are never accepted twice)."""
    tree = self.tree
    width = tree.levels[1][1] - tree.levels[1][0]
    starts = lookup_many(r.seq, r.n, self.n, width, memory)  # [B, width]
    branch = np.asarray(tree.branch)
    depth = np.asarray(tree.depths)
    st = starts[:, branch]  # [B, N]
    idx = jnp.where(st >= 0, st + jnp.asarray(depth - 1)[None, :], -1)
    toks = _copy(r.seq, r.n, memory, idx)
    toks = toks.at[:, 0].set(last_tokens(r.seq, r.n, 1)[:, 0])
    return tree.arrays(toks)


def _outputs(result) -> list[list[int]]:
  """The token lists of a `generate` result, a `generate_many` completion or a list of
  completions."""
  if isinstance(result, (list, tuple)):
    return [t for r in result for t in _outputs(r)]
  tokens = getattr(result, "tokens", None)
  if isinstance(tokens, list) and all(isinstance(t, list) for t in tokens):
    return tokens  # a generate result: one list per row
  if isinstance(tokens, list) and all(isinstance(t, (int, np.integer)) for t in tokens):
    return [tokens]  # one completion
  raise TypeError(f"NGram.remember takes a jaxspec.generate result or generate_many "
                  f"completions, got {type(result).__name__}")


@registry.register("ngram", usage="ngram[:N]",
                   help="prompt lookup: what followed the last N tokens earlier in the row")
@dataclasses.dataclass(frozen=True)
class NGram(Drafter):
  """Prompt lookup: propose what followed the last `n` tokens earlier in the row. A tree
  (`trees.Static`, e.g. `Static.chains(width, length)`) follows a different match per branch.

  memory: tokens of earlier outputs to search as well (suffix decoding's history across
  requests): `d = NGram(memory=8192)`, then `d = d.remember(result)` after each `generate`
  call adds that call's outputs (the oldest tokens drop out past `memory`). A match in the
  row itself outranks one in the memory of the same length. The memory is a traced input of
  fixed size, so a growing history never recompiles. 0: none.
  """

  n: int = 3
  k: int = 4
  tree: object = None
  memory: int = 0
  history: Any = dataclasses.field(default=None, compare=False, repr=False)  # [memory] int32

  tree_kinds = (Static,)

  def check(self):
    object.__setattr__(self, "n", check_int("NGram n", self.n, 1, 16))
    object.__setattr__(self, "memory", check_int("NGram memory", self.memory, 0, MAX_MEMORY))
    if self.history is not None:
      h = np.asarray(self.history)
      if h.shape != (self.memory,) or not np.issubdtype(h.dtype, np.integer):
        raise ValueError(f"NGram history must be {self.memory} token ids (NGram.remember "
                         f"builds it), got an array of shape {h.shape} and dtype {h.dtype}")

  def bind(self, target: Model):
    memory = None
    if self.memory:
      h = (np.full((self.memory,), -1, np.int32) if self.history is None
           else np.asarray(self.history, np.int32))
      if h.max(initial=-1) >= target.config.vocab_size:
        raise ValueError(f"NGram history holds token id {int(h.max())}, outside the model's "
                         f"vocabulary ({target.config.vocab_size}): it remembers another model")
      memory = jnp.asarray(h)
    return NGramSpec(k=self.k, target=target.config, n=self.n, tree=self.tree), memory

  @property
  def remembers(self) -> bool:
    return self.memory > 0

  def remember(self, result) -> "NGram":
    """This drafter with `result`'s outputs added to its memory: a `generate` result (every
    row, in row order), a `generate_many` completion, or a list of completions."""
    if not self.memory:
      raise ValueError("NGram(memory=0) keeps no history: give it memory=N tokens, e.g. "
                       "NGram(memory=8192)")
    old = (np.full((self.memory,), -1, np.int32) if self.history is None
           else np.asarray(self.history, np.int32))
    new = [np.asarray(t, np.int32) for t in _outputs(result) if len(t)]
    joined = np.concatenate([old] + [np.append(t, -1).astype(np.int32) for t in new])
    return dataclasses.replace(self, history=joined[-self.memory:])

  @classmethod
  def from_cli(cls, arg: str, k: int, tree: int | None) -> "NGram":
    n = registry.int_arg("ngram:N", arg, "ngram:3") if arg else 3
    return cls(n=n, k=k, tree=registry.static_tree(tree, k))

  @classmethod
  def bench_defaults(cls, config) -> list[str]:
    return ["ngram"]

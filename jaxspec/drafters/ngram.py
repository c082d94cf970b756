"""`NGram`: model-free prompt lookup on device (PLD / "prompt lookup decoding").

Match the row's last `n` committed tokens against everything earlier in the same row (prompt and
output); propose the k tokens that followed the most recent match. With no match of length n,
fall back to n - 1, ..., 1. With no match at all, propose repeats of the last token (cheap to
reject). Proposals are deterministic, so their draft distribution is one-hot.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.models import Model
from jaxspec.trees import Static

from . import registry
from .base import Drafter, DrafterSpec, Proposal, Round, check_int, last_tokens


def _match_scores(seq, n, max_ngram: int):
  """[B, L] score per candidate continuation start (-1: no match). Longer n-grams outrank
  shorter ones, then later (more recent) matches outrank earlier ones."""
  b, length = seq.shape
  pos = jnp.arange(length)
  score = jnp.full((b, length), -1, jnp.int32)
  for g in range(1, max_ngram + 1):
    suffix = last_tokens(seq, n, g)  # [B, g]
    match = jnp.ones((b, length), bool)
    for i in range(g):
      match &= jnp.roll(seq, -i, axis=1) == suffix[:, i:i + 1]  # seq[j + i] == suffix[i]
    match &= (pos[None, :] + g) < n[:, None]  # a committed continuation, not the suffix itself
    start = pos[None, :] + g
    score = jnp.maximum(score, jnp.where(match, g * length + start, -1))
  return score


def lookup_many(seq, n, max_ngram: int, width: int):
  """Continuation starts [B, width] of the best `width` matches (-1 where there are fewer)."""
  length = seq.shape[1]
  best, _ = jax.lax.top_k(_match_scores(seq, n, max_ngram), width)
  return jnp.where(best >= 0, best % length, -1)


def lookup(seq, n, max_ngram: int, k: int):
  """seq [B, L], n [B] -> proposals [B, k] int32 and found [B] bool."""
  start = lookup_many(seq, n, max_ngram, 1)[:, 0]
  found = start >= 0
  idx = start[:, None] + jnp.arange(k)[None, :]
  # Past the committed end there is nothing to copy: repeat the last token instead.
  last = last_tokens(seq, n, 1)
  prop = jnp.take_along_axis(seq, jnp.clip(idx, 0, seq.shape[1] - 1), axis=1)
  prop = jnp.where(found[:, None] & (idx < n[:, None]), prop, last)
  return prop.astype(jnp.int32), found


@dataclasses.dataclass(frozen=True)
class NGramSpec(DrafterSpec):
  n: int = 3

  def propose(self, params, dstate, r: Round):
    if self.tree is None:
      tokens, _ = lookup(r.seq, r.n, self.n, self.k)
      return dstate, Proposal.chain(tokens)
    return dstate, Proposal.from_tree(self.tree, self._tree(r))

  def _tree(self, r: Round):
    """Each root child starts a branch following one match (best first); a node at depth d
    of branch i proposes the d-th token after match i. Extra siblings deeper down repeat
    their branch (duplicates cost nothing: they are never accepted twice)."""
    tree = self.tree
    width = tree.levels[1][1] - tree.levels[1][0]
    starts = lookup_many(r.seq, r.n, self.n, width)  # [B, width]
    branch = np.asarray(tree.branch)
    depth = np.asarray(tree.depths)
    st = starts[:, branch]  # [B, N]
    idx = st + jnp.asarray(depth - 1)[None, :]
    last = last_tokens(r.seq, r.n, 1)
    ok = (st >= 0) & (idx < r.n[:, None])
    toks = jnp.where(ok, jnp.take_along_axis(r.seq, jnp.clip(idx, 0, r.seq.shape[1] - 1), 1),
                     last)
    toks = toks.at[:, 0].set(last[:, 0])
    return tree.arrays(toks)


@registry.register("ngram", usage="ngram[:N]",
                   help="prompt lookup: what followed the last N tokens earlier in the row")
@dataclasses.dataclass(frozen=True)
class NGram(Drafter):
  """Prompt lookup: propose what followed the last `n` tokens earlier in the row. A tree
  (`trees.Static`, e.g. `Static.chains(width, length)`) follows a different match per branch."""

  n: int = 3
  k: int = 4
  tree: object = None

  tree_kinds = (Static,)

  def check(self):
    object.__setattr__(self, "n", check_int("NGram n", self.n, 1, 16))

  def bind(self, target: Model):
    return NGramSpec(k=self.k, target=target.config, n=self.n, tree=self.tree), None

  @classmethod
  def from_cli(cls, arg: str, k: int, tree: int | None) -> "NGram":
    n = registry.int_arg("ngram:N", arg, "ngram:3") if arg else 3
    return cls(n=n, k=k, tree=registry.static_tree(tree, k))

  @classmethod
  def bench_defaults(cls, config) -> list[str]:
    return ["ngram"]

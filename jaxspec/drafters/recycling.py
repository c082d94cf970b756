"""`Recycling`: Token Recycling (Luo et al., 2024), a training-free tree drafter.

Every target forward already computes a distribution at each position it scores; instead of
throwing those away, keep each token's top-M next-token candidates in an on-device adjacency
table [V, M] (one per row), refreshed from every verify pass. A round expands a static tree
from the pending token by table lookups: the child of rank r of a node holding token t is
`table[t, r]`. Proposals are deterministic, so tree verification stays lossless.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.models import Model, head
from jaxspec.trees import Static

from . import registry
from .base import Accepted, Drafter, DrafterSpec, Prefill, Proposal, Round, check_int, last_tokens

DEFAULT_TREE = Static.from_branching((4, 2, 2, 1))


def _refresh(table, tokens, logits, m, valid=None):
  """table [B, V, M]; tokens [B, T]; logits [B, T, V]: table[tokens] <- top-M(logits)."""
  b, t = tokens.shape
  _, cand = jax.lax.top_k(logits, m)
  idx = tokens if valid is None else jnp.where(valid, tokens, table.shape[1])  # drop invalid
  return table.at[jnp.arange(b)[:, None], idx].set(cand.astype(table.dtype), mode="drop")


@dataclasses.dataclass(frozen=True)
class RecyclingSpec(DrafterSpec):
  m: int = 8

  def init(self, params, p: Prefill):
    b, length = p.prompt.shape
    table = jnp.zeros((b, self.target.vocab_size, self.m), jnp.int32)
    logits = head(p.tparams, self.target, p.hidden)  # [B, P, V]: the prefill's own predictions
    valid = jnp.arange(length)[None, :] < p.prompt_lens[:, None]
    return _refresh(table, p.prompt, logits, self.m, valid)

  def propose(self, params, table, r: Round):
    tree = self.tree
    rows = jnp.arange(table.shape[0])[:, None]
    parents, ranks = np.asarray(tree.parents), np.asarray(tree.ranks)
    cols = [last_tokens(r.seq, r.n, 1)]
    for d in range(1, tree.max_depth + 1):
      s, e = tree.levels[d]
      known = jnp.concatenate(cols, axis=1)  # tokens of every node before level d
      par_tok = known[:, parents[s:e]]  # [B, e - s]
      cols.append(table[rows, par_tok, jnp.asarray(ranks[s:e])[None, :]])
    return table, Proposal.from_tree(tree, tree.arrays(jnp.concatenate(cols, axis=1)))

  def commit(self, params, table, r: Round, a: Accepted):
    return _refresh(table, a.tokens, a.logits, self.m)  # learn from every verified position


@registry.register("recycling", help="Token Recycling: a static tree from each token's likely "
                   "successors, learned from every verify pass")
@dataclasses.dataclass(frozen=True)
class Recycling(Drafter):
  """Token Recycling. `tree`: a Static template (default 1+4+8+16+16 nodes); `m`: candidates
  kept per token (must cover the tree's widest branching)."""

  tree: object = None
  m: int = 8

  tree_kinds = (Static,)
  drafts_chains = False  # always a tree
  uses_k = False  # the tree's depth is the draft length

  def check(self):
    tree = self.tree if self.tree is not None else DEFAULT_TREE
    m = check_int("Recycling m", self.m, 1)
    if m < tree.max_children:
      raise ValueError(f"Recycling m={m} must be an int >= the tree's widest branching "
                       f"({tree.max_children})")
    object.__setattr__(self, "tree", tree)
    object.__setattr__(self, "m", m)

  def bind(self, target: Model):
    return RecyclingSpec(k=self.tree.max_depth, target=target.config, tree=self.tree,
                         m=self.m), None

  @classmethod
  def from_cli(cls, arg: str, k: int, tree: int | None) -> "Recycling":
    return cls(tree=registry.static_tree(tree, k, acceptance=True))

  @classmethod
  def bench_defaults(cls, config) -> list[str]:
    return ["recycling"]

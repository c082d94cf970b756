"""The drafter protocol.

A user-facing drafter (`DraftModel`, `EarlyExit`, `NGram`, ...) is bound to a target model with
`bind(target) -> (spec, params)`. The spec is a frozen, hashable dataclass (a jit static
argument: k, configs, choices); the params are a pytree of arrays (traced). Inside the compiled
loop the engine calls, once per round:

    dstate, tcache, tokens, probs = spec.propose(params, dstate, round)
    dstate = spec.commit(params, dstate, round, n_new, n_acc, hidden)

`round` (a `Round`) carries the target params and cache, the token buffer `seq` and the number
of committed tokens `n` per row: `seq[b, n[b] - 1]` is the last committed token, not yet in the
target cache (`tcache.lengths == n - 1`). `tokens` are k proposed tokens [B, k]; `probs` their
draft distributions [B, k, V] for lossless sampling, or None for a deterministic proposal.

Feature drafters (EAGLE, Medusa) read the target's hidden states: `init` gets the prefill's
`hidden` [B, P, D] (row b's prompt ends at prompt_lens[b] - 1) and `commit` gets the verify
pass's `hidden` [B, k+1, D] (position 0 = the pending token, i = draft i) with `n_acc` [B], the
number of drafts accepted. `hidden[b, n_acc[b]]` is the feature whose next token is the new
pending token `seq[b, n_new[b] - 1]`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxspec.models import KVCache, ModelConfig
from jaxspec.sampling import SamplingMode, SamplingParams


@struct.dataclass
class Round:
  tparams: Any
  tcache: KVCache
  seq: jax.Array  # [B, L] int32: prompt then committed output
  n: jax.Array  # [B] int32: committed tokens per row
  key: jax.Array
  sp: SamplingParams


@dataclasses.dataclass(frozen=True)
class DrafterSpec:
  """Static half of a bound drafter. Subclasses override `propose` (and `init`/`commit`)."""

  k: int
  target: ModelConfig
  mode: SamplingMode = SamplingMode()
  tree: Any = None  # None (chains) | trees.Static | trees.Dynamic

  @property
  def draft_forwards(self) -> int:
    """Draft forward passes per round (for stats)."""
    return 0

  @property
  def footprint(self) -> int:
    """Cache slots past the committed length that one round may write."""
    return self.k + 1 if self.tree is None else self.tree.footprint

  @property
  def depth(self) -> int:
    """Most drafts one round can accept (k for chains, the tree depth for trees)."""
    return self.k if self.tree is None else self.tree.max_depth

  def with_mode(self, mode: SamplingMode) -> "DrafterSpec":
    return dataclasses.replace(self, mode=mode)

  def init(self, params, tparams, prompt: jax.Array, prompt_lens: jax.Array, cache_size: int,
           hidden: jax.Array):
    return ()

  def propose(self, params, dstate, r: Round):
    raise NotImplementedError

  def commit(self, params, dstate, r: Round, n_new: jax.Array, n_acc: jax.Array,
             hidden: jax.Array):
    return dstate

  # Token trees (see jaxspec.trees). `propose_tree` returns (dstate, tcache, TreeArrays) whose
  # node 0 is the pending token; `commit_tree` gets the accepted `path` [B, D+1] of node
  # indices and the target's hidden states gathered along it.
  def propose_tree(self, params, dstate, r: Round):
    raise NotImplementedError(f"{type(self).__name__} does not draft token trees")

  def commit_tree(self, params, dstate, r: Round, n_new, n_acc, hidden, path):
    return self.commit(params, dstate, r, n_new, n_acc, hidden)


@dataclasses.dataclass(frozen=True)
class NoDraft(DrafterSpec):
  """Plain decoding: k = 0, every round is one target forward of one token."""

  def propose(self, params, dstate, r: Round):
    b = r.seq.shape[0]
    return dstate, r.tcache, jnp.zeros((b, 0), jnp.int32), None


def last_tokens(seq: jax.Array, n: jax.Array, count: int) -> jax.Array:
  """[B, count]: the last `count` committed tokens of each row (seq[n - count .. n - 1])."""
  idx = n[:, None] - count + jnp.arange(count)[None, :]
  return jnp.take_along_axis(seq, jnp.clip(idx, 0, seq.shape[1] - 1), axis=1)


def check_tree(tree):
  from jaxspec.trees import check_tree as _check
  return _check(tree)


def check_k(k) -> int:
  if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 64:
    raise ValueError(f"draft length k must be an integer in [1, 64], got {k!r}")
  return k

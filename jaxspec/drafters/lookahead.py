"""`Lookahead`: lookahead decoding (Fu et al., 2024): Jacobi iterations feed an n-gram pool, with
no draft model, in the target's own verify pass.

Per row, on device (`LookaheadState`):
  window [B, W]        the current Jacobi guesses for the W tokens after the pending one
  hist   [B, N-2, W]   the windows of the N-2 iterations before, aligned to today's positions
                       (-1: unknown), so a guess and the guesses it was conditioned on line up
  pool   keys [B, P], conts [B, P, N-1], stamps [B, P] (insertion order, -1: empty slot)

A round is one `trees.Static.branches` tree verified in one target forward (its ancestor mask is
the fixed-shape mask of both branches): the root is the pending token x; the lookahead branch is
the window (W nodes, each seeing the window before it); the verification branch is the k most
recent pool n-grams whose first token is x (N - 1 nodes each). Every node is an ordinary
deterministic proposal, so greedy and sampled verification stay exact (one-hot drafts); the
window branch can be accepted too (that is Jacobi decoding's own acceptance).

After the pass (`commit`) the target's argmax at the root and at each window node are the next
guesses g [B, W + 1] (g[i + 1] is conditioned on window[i]). The window moves forward by the
tokens committed; each start i gives the n-gram (hist[N-3][i], ..., hist[0][i+N-3],
window[i+N-2], g[i+N-1]), a trajectory in which every token was predicted from the one before
it, and the new ones go into the pool (ring order, duplicates skipped). The pool starts with
the prompt's own n-grams, so the first rounds draft like prompt lookup.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxspec.models import Model
from jaxspec.trees import Static

from . import registry
from .base import (Accepted, Drafter, DrafterSpec, Prefill, Proposal, Round, check_int,
                   last_tokens, top_indices)


@struct.dataclass
class LookaheadState:
  window: jax.Array  # [B, W] int32
  hist: jax.Array  # [B, N-2, W] int32, -1 unknown
  keys: jax.Array  # [B, P] int32
  conts: jax.Array  # [B, P, N-1] int32
  stamps: jax.Array  # [B, P] int32: insertion order, -1 empty
  clock: jax.Array  # [B] int32: the next stamp


def _shift(x: jax.Array, s: jax.Array, fill) -> jax.Array:
  """x [B, ..., W] moved left by s [B] along the last axis (x[..., j] <- x[..., j + s])."""
  w = x.shape[-1]
  idx = jnp.arange(w)[None, :] + s[:, None]  # [B, W]
  idx = idx.reshape(idx.shape[:1] + (1,) * (x.ndim - 2) + idx.shape[1:])
  got = jnp.take_along_axis(x, jnp.clip(idx, 0, w - 1), axis=-1)
  return jnp.where(idx < w, got, fill)


@dataclasses.dataclass(frozen=True)
class LookaheadSpec(DrafterSpec):
  window: int = 5
  ngram: int = 3
  pool: int = 64

  def _insert(self, st: LookaheadState, keys, conts, ok) -> LookaheadState:
    """Adds n-grams keys [B, K], conts [B, K, N-1] where ok [B, K], skipping those the pool (or
    an earlier one of this batch) already holds; the oldest entries make room."""
    b, k = keys.shape
    same_pool = ((st.keys[:, None, :] == keys[:, :, None]) &
                 jnp.all(st.conts[:, None] == conts[:, :, None], -1) & (st.stamps[:, None] >= 0))
    same_new = ((keys[:, :, None] == keys[:, None, :]) &
                jnp.all(conts[:, :, None] == conts[:, None], -1) &
                (jnp.arange(k)[None, None, :] < jnp.arange(k)[None, :, None]) & ok[:, None, :])
    ok = ok & ~jnp.any(same_pool, -1) & ~jnp.any(same_new, -1)
    order = jnp.cumsum(ok, axis=1) - 1  # [B, K]
    stamp = st.clock[:, None] + order
    slot = jnp.where(ok, stamp % self.pool, self.pool)  # out of range: dropped
    rows = jnp.arange(b)[:, None]
    return st.replace(keys=st.keys.at[rows, slot].set(keys, mode="drop"),
                      conts=st.conts.at[rows, slot].set(conts, mode="drop"),
                      stamps=st.stamps.at[rows, slot].set(stamp, mode="drop"),
                      clock=st.clock + jnp.sum(ok, axis=1).astype(jnp.int32))

  def init(self, params, p: Prefill) -> LookaheadState:
    b, length = p.prompt.shape
    w, n, m = self.window, self.ngram, self.pool
    lens = p.prompt_lens
    window = last_tokens(p.prompt, lens, w)  # the prompt's last W tokens: a first guess
    st = LookaheadState(
        window=window.astype(jnp.int32), hist=jnp.full((b, n - 2, w), -1, jnp.int32),
        keys=jnp.full((b, m), -1, jnp.int32), conts=jnp.full((b, m, n - 1), -1, jnp.int32),
        stamps=jnp.full((b, m), -1, jnp.int32), clock=jnp.zeros((b,), jnp.int32))
    # The prompt's last `pool` n-grams, oldest first.
    start = lens[:, None] - n - (m - 1) + jnp.arange(m)[None, :]  # [B, P]
    grams = jnp.take_along_axis(
        p.prompt, jnp.clip(start[:, :, None] + jnp.arange(n), 0, length - 1).reshape(b, -1),
        axis=1).reshape(b, m, n)
    return self._insert(st, grams[:, :, 0], grams[:, :, 1:], start >= 0)

  def propose(self, params, st: LookaheadState, r: Round):
    tree, b = self.tree, st.window.shape[0]
    x = last_tokens(r.seq, r.n, 1)  # [B, 1] the pending token
    score = jnp.where((st.keys == x) & (st.stamps >= 0), st.stamps, -1)
    stamp, pick = top_indices(score, self.k)  # [B, k] most recent n-grams that start with x
    found = stamp >= 0
    conts = jnp.take_along_axis(st.conts, pick[:, :, None], axis=1)  # [B, k, N-1]
    conts = jnp.where(found[:, :, None], conts, x[:, :, None])
    nodes = tree.branch_nodes()  # [window chain, k n-gram chains]
    toks = jnp.zeros((b, tree.n_nodes), jnp.int32).at[:, 0].set(x[:, 0])
    toks = toks.at[:, np.asarray(nodes[0])].set(st.window)
    valid = jnp.ones((b, tree.n_nodes), bool)
    for j, chain in enumerate(nodes[1:]):
      toks = toks.at[:, np.asarray(chain)].set(conts[:, j])
      valid = valid.at[:, np.asarray(chain)].set(found[:, j:j + 1])
    return st, Proposal.from_tree(tree, tree.arrays(toks).replace(valid=valid))

  def commit(self, params, st: LookaheadState, r: Round, a: Accepted) -> LookaheadState:
    w, n = self.window, self.ngram
    win_nodes = np.asarray([0] + self.tree.branch_nodes()[0])  # the root, then the window
    g = jnp.argmax(a.logits[:, win_nodes], axis=-1).astype(jnp.int32)  # [B, W + 1]
    # n-grams of this iteration: levels hist[N-3] .. hist[0], window, g, one position apart.
    levels = [st.hist[:, i] for i in range(n - 3, -1, -1)] + [st.window, g[:, :w]]
    starts = w - n + 2  # i + N - 1 <= W
    grams = jnp.stack([lv[:, j:j + starts] for j, lv in enumerate(levels[:n - 1])] +
                      [g[:, n - 1:n - 1 + starts]], axis=-1)  # [B, starts, N]
    st = self._insert(st, grams[..., 0], grams[..., 1:], jnp.all(grams >= 0, -1))
    return self._advance(st, g, a.n_new - r.n)

  def commit_plain(self, params, st: LookaheadState, r: Round, a: Accepted):
    # One token committed and no pass over the window: everything moves forward by one, and
    # no level is added (the window was not refined).
    one = jnp.ones_like(r.n)
    return st.replace(window=_shift(st.window, one, st.window[:, -1:]),
                      hist=_shift(st.hist, one, -1))

  def _advance(self, st: LookaheadState, g, s) -> LookaheadState:
    """The window and its history after s [B] committed tokens: window[j] <- g[s + j] (past
    the guesses, the last one repeated); the window used this round becomes the newest
    history level, and every level shifts by s."""
    idx = jnp.clip(s[:, None] + jnp.arange(self.window)[None, :], 0, self.window)
    hist = jnp.concatenate([st.window[:, None], st.hist[:, :-1]], axis=1)[:, :self.ngram - 2]
    return st.replace(window=jnp.take_along_axis(g, idx, axis=1), hist=_shift(hist, s, -1))


@registry.register("lookahead", usage="lookahead[:W[,N]]",
                   help="lookahead decoding: Jacobi guesses over a W-token window feed an "
                        "N-gram pool; k pool n-grams verified per round (no draft model)")
@dataclasses.dataclass(frozen=True)
class Lookahead(Drafter):
  """Lookahead decoding (Jacobi iterations and an n-gram pool, no draft model).

  window: W, the Jacobi window (guesses for the next W tokens, refined every round).
  ngram: N, the n-gram size: each pool entry is a first token and N - 1 tokens to propose.
  k: pool n-grams verified per round (the verification branch; LADE's guess set size G).
  pool: n-grams kept per row (a ring; the prompt's n-grams seed it).
  One round verifies a tree of 1 + W + k (N - 1) nodes.
  """

  window: int = 5
  ngram: int = 3
  k: int = 2
  pool: int = 64

  drafts_chains = False  # always a tree, built from the options above

  def check(self):
    object.__setattr__(self, "window", check_int("Lookahead window", self.window, 1, 32))
    object.__setattr__(self, "ngram", check_int("Lookahead ngram", self.ngram, 2, 8))
    object.__setattr__(self, "pool", check_int("Lookahead pool", self.pool, 1, 1 << 16))
    if self.window < self.ngram - 1:
      raise ValueError(f"Lookahead window={self.window} must be at least ngram - 1 "
                       f"({self.ngram - 1}): the window's guesses make the n-grams")
    if 1 + self.window + self.k * (self.ngram - 1) > 256:
      raise ValueError(f"Lookahead verifies 1 + window + k * (ngram - 1) = "
                       f"{1 + self.window + self.k * (self.ngram - 1)} nodes; at most 256")

  @property
  def tree(self) -> Static:
    return Static.branches([self.window] + [self.ngram - 1] * self.k)

  def bind(self, target: Model):
    return LookaheadSpec(k=self.k, target=target.config, tree=self.tree, window=self.window,
                         ngram=self.ngram, pool=self.pool), None

  @classmethod
  def from_cli(cls, arg: str, k: int, tree: int | None) -> "Lookahead":
    if tree is not None:
      raise ValueError("--tree does not apply to lookahead (its tree is the window and k "
                       "n-grams); use lookahead:W,N and --k")
    parts = arg.split(",") if arg else []
    if len(parts) > 2:
      raise ValueError(f"--drafter lookahead:W[,N] takes a window and an n-gram size, got "
                       f"{arg!r}")
    w = registry.int_arg("lookahead:W", parts[0], "lookahead:5,3") if parts else 5
    n = registry.int_arg("lookahead:W,N", parts[1], "lookahead:5,3") if len(parts) > 1 else 3
    return cls(window=w, ngram=n, k=k)

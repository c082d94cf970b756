"""Acceptance of drafted chains: greedy prefix match and lossless rejection sampling.

Both return `(n_accepted [B], tokens [B, k+1])`: the first `n_accepted` tokens are the accepted
drafts and token `n_accepted` is the target's correction (on rejection) or bonus (all accepted).

Sampling follows Leviathan et al. / Chen et al.: accept draft d_i ~ q with probability
min(1, p(d_i) / q(d_i)); on the first rejection draw from normalise(max(p - q, 0)); when all
k drafts pass, draw a bonus token from p at position k. The output is then distributed exactly
as the target's own sampling. Deterministic drafters (n-gram lookup) pass `draft_probs=None`,
meaning q is one-hot on the proposed token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import struct

from . import sampling
from .sampling import SamplingMode, SamplingParams

if TYPE_CHECKING:
  from jaxspec.drafters.base import Proposal


@struct.dataclass
class Verdict:
  """What verification decided for one round."""

  n_acc: jax.Array  # [B] drafts accepted
  tokens: jax.Array  # [B, depth + 1] the accepted drafts, then the correction / bonus token
  path: jax.Array  # [B, depth + 1] accepted node indices from the root (chains: 0 .. depth)


def _count_leading(accept: jax.Array) -> jax.Array:
  """Number of leading True values per row of [B, k]."""
  return jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=-1), axis=-1)


def _place(drafts: jax.Array, n_acc: jax.Array, last: jax.Array) -> jax.Array:
  """[B, k+1]: drafts in front, `last` [B] at index n_acc."""
  b, k = drafts.shape
  out = jnp.concatenate([drafts, jnp.zeros((b, 1), drafts.dtype)], axis=1)
  return out.at[jnp.arange(b), n_acc].set(last)


def greedy(drafts: jax.Array, target_logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """drafts [B, k]; target_logits [B, k+1, V] (position i predicts the token after draft i)."""
  g = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [B, k+1]
  n_acc = _count_leading(drafts == g[:, :-1])
  last = jnp.take_along_axis(g, n_acc[:, None], axis=1)[:, 0]
  return n_acc, _place(drafts, n_acc, last)


def rejection(key: jax.Array, drafts: jax.Array, draft_probs: jax.Array | None,
              target_logits: jax.Array, mode: SamplingMode,
              sp: SamplingParams) -> tuple[jax.Array, jax.Array]:
  """Lossless rejection sampling. draft_probs: [B, k, V] (already warped) or None (one-hot).
  A negative draft id marks an empty slot: it is rejected and the token there comes from p."""
  b, k = drafts.shape
  p = sampling.probs(target_logits, mode, sp)  # [B, k+1, V]
  v = p.shape[-1]
  valid = drafts >= 0  # negative ids: empty slots (no draft): rejected, q = 0, residual = p
  safe = jnp.maximum(drafts, 0)
  p_d = jnp.take_along_axis(p[:, :k], safe[..., None], axis=-1)[..., 0]  # [B, k]
  if draft_probs is None:
    q = jax.nn.one_hot(drafts, v, dtype=p.dtype)
    q_d = jnp.ones_like(p_d)
  else:
    q = draft_probs * valid[..., None]
    q_d = jnp.take_along_axis(q, safe[..., None], axis=-1)[..., 0]
  k_u, k_r = sampling.split(key, 2)
  u = sampling.uniform(k_u, (b, k))
  n_acc = _count_leading((u * q_d < p_d) & valid)
  # Residual at the first rejected position, or p itself at position k (bonus token).
  q_pad = jnp.concatenate([q, jnp.zeros((b, 1, v), q.dtype)], axis=1)  # [B, k+1, V]
  resid = jnp.maximum(p - q_pad, 0.0)
  resid = jnp.take_along_axis(resid, n_acc[:, None, None], axis=1)[:, 0]  # [B, V]
  p_at = jnp.take_along_axis(p, n_acc[:, None, None], axis=1)[:, 0]
  # p == q exactly makes the residual empty, but then nothing is ever rejected; guard anyway.
  resid = jnp.where(jnp.sum(resid, -1, keepdims=True) > 0, resid, p_at)
  last = sampling.categorical_from_probs(k_r, resid)
  return n_acc, _place(drafts, n_acc, last)


def chain(key: jax.Array, drafts: jax.Array, draft_probs: jax.Array | None,
          target_logits: jax.Array, mode: SamplingMode,
          sp: SamplingParams) -> tuple[jax.Array, jax.Array]:
  if mode.greedy:
    return greedy(drafts, target_logits)
  return rejection(key, drafts, draft_probs, target_logits, mode, sp)


# Token trees -----------------------------------------------------------------------------
# Both return (n_acc [B], tokens [B, D+1], path [B, D+1]): `path` lists the accepted nodes from
# the root (path[:, 0] == 0) and `tokens` the accepted tokens then the correction/bonus token.


def _tree_emit(tree, path, n_acc, last):
  toks = jnp.take_along_axis(tree.tokens, path, axis=1)[:, 1:]  # [B, D] tokens along the path
  return _place(toks, n_acc, last)


def tree_greedy(tree, target_logits: jax.Array, max_depth: int):
  """Accept the deepest node whose whole root path matches the target's argmax."""
  from jaxspec import trees

  g = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [B, N]
  ok = (tree.tokens == jnp.take_along_axis(g, tree.parents, axis=1)) & tree.valid
  ok = ok.at[:, 0].set(True)
  for _ in range(max_depth):  # ok[i] &= ok[parent[i]], D times: every ancestor matched
    ok = ok & jnp.take_along_axis(ok, tree.parents, axis=1)
  n = tree.tokens.shape[1]
  score = jnp.where(ok, tree.depth * n + (n - 1 - jnp.arange(n)), -1)  # deepest, then first
  best = jnp.argmax(score, axis=1).astype(jnp.int32)
  n_acc = jnp.take_along_axis(tree.depth, best[:, None], axis=1)[:, 0]
  path = trees.path_to(tree.parents, tree.depth, best, max_depth)
  last = jnp.take_along_axis(g, best[:, None], axis=1)[:, 0]
  return n_acc, _tree_emit(tree, path, n_acc, last), path


def _normalise(x: jax.Array) -> jax.Array:
  total = jnp.sum(x, axis=-1, keepdims=True)
  return x / jnp.where(total > 0, total, 1.0)


def _residual(r: jax.Array, q: jax.Array) -> jax.Array:
  """What the target still needs after a draw from q was rejected: normalise(max(r - q, 0))."""
  return _normalise(jnp.maximum(r - q, 0.0))


def _walk(key, tree, target_logits, max_depth: int, max_children: int, mode, sp, children,
          start, try_child):
  """The walk both tree samplers share. From the root, the current node's children are tried
  in order against a residual r (the target's p at the node to begin with) and a sampler
  state s: `start(p_node [B, V], node [B]) -> (r, s)`, `try_child(r, s, x [B], has [B],
  u [B]) -> (r, s, accepted [B])`. An accepted child becomes the current node; when every
  child is rejected (or there are none) the token emitted is drawn from r.
  Returns (n_acc [B], tokens [B, D+1], path [B, D+1])."""
  from jaxspec import trees

  b, n = tree.tokens.shape
  p = sampling.probs(target_logits, mode, sp)  # [B, N, V]
  if children is None:  # [B, N, M]; static topologies pass their table precomputed
    children = trees.children_table(tree.parents, tree.valid, max_children)
  else:
    children = jnp.broadcast_to(children, (b, n, max_children))
  rows = jnp.arange(b)

  def level(d, carry):  # one depth: try the current node's children in order
    cur, active, n_acc, last = carry
    kd = sampling.fold_in(key, d)

    def sibling(m, c):
      r, s, accepted, nxt = c
      child = children[rows, cur, m]
      has = (child >= 0) & active & ~accepted
      x = tree.tokens[rows, jnp.maximum(child, 0)]
      r, s, acc = try_child(r, s, x, has, sampling.uniform(sampling.fold_in(kd, m), (b,)))
      return r, s, accepted | acc, jnp.where(acc, child, nxt)

    r, s = start(p[rows, cur], cur)
    r, _, accepted, nxt = jax.lax.fori_loop(
        0, max_children, sibling, (r, s, jnp.zeros((b,), bool), cur))
    stop = active & ~accepted
    r = jnp.where(jnp.sum(r, -1, keepdims=True) > 0, r, p[rows, cur])  # float-rounding guard
    drawn = sampling.categorical_from_probs(sampling.fold_in(kd, max_children), r)
    return (nxt, active & accepted, n_acc + (active & accepted).astype(jnp.int32),
            jnp.where(stop, drawn, last))

  init = (jnp.zeros((b,), jnp.int32), jnp.ones((b,), bool), jnp.zeros((b,), jnp.int32),
          jnp.zeros((b,), jnp.int32))
  cur, _, n_acc, last = jax.lax.fori_loop(0, max_depth + 1, level, init)
  path = trees.path_to(tree.parents, tree.depth, cur, max_depth)
  return n_acc, _tree_emit(tree, path, n_acc, last), path


def tree_rejection(key: jax.Array, tree, target_logits: jax.Array, max_depth: int,
                   max_children: int, mode: SamplingMode, sp: SamplingParams,
                   children: jax.Array | None = None):
  """Lossless multi-draft sampling over a tree whose siblings are chosen deterministically
  (top-k of a draft, table lookups, n-gram matches).

  Walking down from the root, the children of the current node are tried in order, each as a
  one-hot proposal against the current residual r (initially the target's p at that node):
  accept child x with probability r(x); on rejection r <- normalise(r with r(x) = 0). If a
  child is accepted, descend; if all are rejected (or there are none), emit a token drawn from
  r. Each step is exact rejection sampling with a one-hot draft, so the emitted sequence has
  the target's distribution whatever the siblings are: duplicates are rejected for free
  (r(x) is already 0) and a fully rejected sibling set leaves the exact residual.
  """
  rows = jnp.arange(tree.tokens.shape[0])

  def try_child(r, s, x, has, u):  # r unnormalised: its total carries the normalisation
    total = jnp.sum(r, axis=-1)
    acc = has & (u < r[rows, x] / jnp.where(total > 0, total, 1.0))
    r = jnp.where((has & ~acc)[:, None], r.at[rows, x].set(0.0), r)
    return r, s, acc

  return _walk(key, tree, target_logits, max_depth, max_children, mode, sp, children,
               lambda p, cur: (p, ()), try_child)


def tree_rejection_q(key: jax.Array, tree, target_logits: jax.Array, max_depth: int,
                     max_children: int, mode: SamplingMode, sp: SamplingParams,
                     children: jax.Array | None = None):
  """Lossless multi-draft sampling over a tree whose siblings were drawn from the draft's
  distribution without replacement (`tree.probs` [B, N, V]: q at each node, its children in
  draw order; recursive rejection sampling, Jeon et al. 2024, SpecInfer's multi-step
  speculative sampling without replacement).

  At the current node, r = the target's p there and q = the node's draft distribution. The
  j-th child x_j was drawn from q_j = normalise(q with x_1 .. x_{j-1} removed): accept it with
  probability min(1, r(x_j) / q_j(x_j)); on rejection r <- normalise(max(r - q_j, 0)) and the
  next child is tried. Each step is exact rejection sampling of r with proposal q_j, so the
  token finally taken (an accepted child, or a draw from r when all are rejected) has the
  target's distribution. A child q gives no mass (drawn past its support) is skipped.
  """
  rows = jnp.arange(tree.tokens.shape[0])

  def try_child(r, q, x, has, u):  # r normalised; q: the draft mass not drawn yet
    qj = _normalise(q)
    qx = qj[rows, x]
    has = has & (qx > 0)
    acc = has & (u * qx < r[rows, x])
    rejected = (has & ~acc)[:, None]
    return (jnp.where(rejected, _residual(r, qj), r),
            jnp.where(rejected, q.at[rows, x].set(0.0), q), acc)

  return _walk(key, tree, target_logits, max_depth, max_children, mode, sp, children,
               lambda p, cur: (p, tree.probs[rows, cur].astype(p.dtype)), try_child)


def tree(key, tree_arrays, target_logits, max_depth: int, max_children: int,
         mode: SamplingMode, sp: SamplingParams, children=None):
  if mode.greedy:
    return tree_greedy(tree_arrays, target_logits, max_depth)
  sampler = tree_rejection if tree_arrays.probs is None else tree_rejection_q
  return sampler(key, tree_arrays, target_logits, max_depth, max_children, mode, sp, children)


def proposal(key: jax.Array, prop: "Proposal", target_logits: jax.Array, mode: SamplingMode,
             sp: SamplingParams) -> Verdict:
  """Verifies one round's `Proposal` (a chain or a tree) against the target's logits at the
  positions `Proposal.target_inputs` laid out."""
  if prop.tree is None:
    n_acc, emit = chain(key, prop.tokens, prop.probs, target_logits, mode, sp)
    b, k = prop.tokens.shape
    path = jnp.broadcast_to(jnp.arange(k + 1, dtype=jnp.int32), (b, k + 1))
    return Verdict(n_acc=n_acc, tokens=emit, path=path)
  n_acc, emit, path = tree(key, prop.tree, target_logits, prop.depth, prop.max_children, mode,
                           sp, prop.children)
  return Verdict(n_acc=n_acc, tokens=emit, path=path)

"""Growing a token tree with a draft model (shared by DraftModel and EarlyExit).

`feed(cache, tokens [B, T], positions [B, T], mask_base [B], tree_mask [B?, T, W], parent)`
runs the drafter's model over T tree nodes written at slots `cache.lengths ..`, each seeing the
live prefix below `mask_base` and the tree slots its `tree_mask` row allows; it returns
(cache, logits [B, T, V], feat). The root (the pending token) sits at slot/position `base` and
its draft logits are given.

Feature drafters (EAGLE) carry a per-node state: `feat` [B, T, F] is what each fed node hands to
its children, and `parent` [B, T, F] is the parent's (the root's is `root_feat` [B, F]).
Drafters without one return feat=None and ignore `parent`; drafters without a cache (Medusa)
pass cache=None.

Siblings are the top candidates of their parent's draft distribution, so the proposal is
deterministic given the context, and tree verification treats each sibling as a one-hot draft.
Under sampling, a `Static` tree (with `sampled=True`, its default) instead draws each node's
children from the parent's warped draft distribution q without replacement (`sample`: the
round's draft key, mode and sampling values) and records q per node (`TreeArrays.probs`), so
verification can check every sibling against q (`verify.tree_rejection`). Either way sampling
stays lossless. Dynamic trees keep the top candidates: which children they keep depends on the
scores of other nodes, so a kept child would not be a plain draw from q.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec import sampling, trees
from jaxspec.trees import Dynamic, Static, TreeArrays


def _at(cache, slot):
  return None if cache is None else cache.rewind(slot)


def static_tree(feed: Callable, cache, root_logits: jax.Array, pending: jax.Array,
                base: jax.Array, tree: Static, root_feat=None, sample=None):
  """Level by level: one forward per depth (the deepest level is never fed).

  sample: None (top candidates) or (key, mode, sp): children drawn from q without replacement.
  Returns (cache, TreeArrays, node_slot [B, N]: each fed node's slot offset from base, or -1)."""
  b = pending.shape[0]
  m = tree.max_children
  anc = tree.ancestor_mask()
  parents, ranks, levels = np.asarray(tree.parents), np.asarray(tree.ranks), tree.levels
  cols = [pending[:, None].astype(jnp.int32)]
  qs = []  # sampling: q of every fed node, level by level ([B, width, V] each)

  def candidates(logits, d):  # [B, T, V] -> [B, T, M]
    if sample is None:
      return trees.top_candidates(logits, m)[0]
    key, mode, sp = sample
    toks, q = trees.sampled_candidates(sampling.fold_in(key, d), logits, m, mode, sp)
    qs.append(q)
    return toks

  cand = candidates(root_logits[:, None], 0)  # [B, 1, M]: candidates of level 0
  prev_start = 0
  feat = None if root_feat is None else root_feat[:, None]  # [B, level width, F]
  for d in range(1, tree.max_depth + 1):
    s, e = levels[d]
    toks = cand[:, parents[s:e] - prev_start, ranks[s:e]]  # [B, e - s]
    cols.append(toks)
    if d < tree.max_depth:
      parent = None if feat is None else feat[:, parents[s:e] - prev_start]
      pos = jnp.broadcast_to((base + d)[:, None], (b, e - s))
      cache, logits, feat = feed(_at(cache, base + s), toks, pos, base, jnp.asarray(anc[s:e]),
                                 parent)
      cand = candidates(logits, d)
      prev_start = s
  tokens = jnp.concatenate(cols, axis=1)
  fed = np.where(np.asarray(tree.depths) < tree.max_depth, np.arange(tree.n_nodes), -1)
  node_slot = jnp.broadcast_to(jnp.asarray(fed, jnp.int32), (b, tree.n_nodes))
  arrays = tree.arrays(tokens)
  if sample is None:
    return cache, arrays, node_slot
  # q per node (the deepest level has no children: zeros); a child q gives no mass (drawn past
  # q's support) is invalid, and so is everything below it.
  n_fed = sum(q.shape[1] for q in qs)
  q = jnp.concatenate(qs + [jnp.zeros((b, tree.n_nodes - n_fed) + qs[0].shape[2:],
                                      qs[0].dtype)], axis=1)  # [B, N, V]
  par = np.maximum(parents, 0)
  q_tok = q[jnp.arange(b)[:, None], par[None, :], tokens]  # [B, N]: q of each node's token
  valid = (q_tok > 0).at[:, 0].set(True)
  for _ in range(tree.max_depth - 1):
    valid = valid & valid[:, par]
  return cache, arrays.replace(valid=valid, probs=q), node_slot


def dynamic_tree(feed: Callable, cache, root_logits: jax.Array, pending: jax.Array,
                 base: jax.Array, tree: Dynamic, root_feat=None):
  """EAGLE-2 expansion: a beam of topk nodes fed per step, candidates scored by cumulative
  draft log-probability, the best nodes - 1 kept (ancestor-closed: a child never outscores its
  parent, and ties go to the earlier, parent, candidate).

  Returns (cache, TreeArrays, node_slot [B, N])."""
  b = pending.shape[0]
  k, depth, n = tree.topk, tree.depth, tree.nodes
  f_total = tree.n_fed
  rows = jnp.arange(b)[:, None]
  tok0, lp0 = trees.top_candidates(root_logits, k)  # [B, K]
  c_tok, c_score = [tok0], [lp0]
  c_parent = [jnp.zeros((b, k), jnp.int32)]  # fed index of each candidate's parent
  c_depth = [jnp.ones((b, k), jnp.int32)]
  fed_anc = jnp.zeros((b, f_total, f_total), bool).at[:, 0, 0].set(True)
  front_idx = jnp.broadcast_to(jnp.arange(k), (b, k))  # candidate indices of the beam
  front_tok, front_score = tok0, lp0
  cand_of_fed = jnp.zeros((b, f_total), jnp.int32)  # fed index -> candidate index (root: 0)
  all_parent = c_parent[0]
  fed_feat = (None if root_feat is None else  # [B, F_total, F]: what each fed node hands down
              jnp.zeros((b, f_total) + root_feat.shape[1:], root_feat.dtype).at[:, 0].set(root_feat))
  for step in range(1, depth):
    f0 = 1 + (step - 1) * k
    fed_ids = f0 + jnp.arange(k)
    par_f = jnp.take_along_axis(all_parent, front_idx, axis=1)  # [B, K]
    anc_rows = fed_anc[rows, par_f] | jax.nn.one_hot(fed_ids, f_total, dtype=bool)[None]
    fed_anc = fed_anc.at[:, f0:f0 + k].set(anc_rows)
    cand_of_fed = cand_of_fed.at[:, f0:f0 + k].set(front_idx)
    pos = jnp.broadcast_to((base + step)[:, None], (b, k))
    parent = None if fed_feat is None else fed_feat[rows, par_f]  # [B, K, F]
    cache, logits, feat = feed(_at(cache, base + f0), front_tok, pos, base, anc_rows, parent)
    if fed_feat is not None:
      fed_feat = fed_feat.at[:, f0:f0 + k].set(feat)
    ct, clp = trees.top_candidates(logits, k)  # [B, K, K]
    score = (front_score[:, :, None] + clp).reshape(b, k * k)
    offset = sum(x.shape[1] for x in c_tok)
    c_tok.append(ct.reshape(b, k * k))
    c_score.append(score)
    par = jnp.broadcast_to(jnp.repeat(fed_ids, k), (b, k * k)).astype(jnp.int32)
    c_parent.append(par)
    c_depth.append(jnp.full((b, k * k), step + 1, jnp.int32))
    all_parent = jnp.concatenate(c_parent, axis=1)
    front_score, best = jax.lax.top_k(score, k)
    front_idx = (offset + best).astype(jnp.int32)
    front_tok = jnp.take_along_axis(ct.reshape(b, k * k), best, axis=1)
  tok = jnp.concatenate(c_tok, axis=1)  # [B, C]
  score = jnp.concatenate(c_score, axis=1)
  parent_fed = jnp.concatenate(c_parent, axis=1)
  dep = jnp.concatenate(c_depth, axis=1)
  n_cand = tok.shape[1]
  _, sel = jax.lax.top_k(score, n - 1)
  sel = jnp.sort(sel, axis=1).astype(jnp.int32)  # parents precede children
  node_of_cand = jnp.zeros((b, n_cand), jnp.int32).at[rows, sel].set(jnp.arange(1, n))
  selected = jnp.zeros((b, n_cand), bool).at[rows, sel].set(True)
  pf = jnp.take_along_axis(parent_fed, sel, axis=1)  # [B, N-1]
  parent_cand = jnp.take_along_axis(cand_of_fed, pf, axis=1)
  parent_node = jnp.where(pf == 0, 0, jnp.take_along_axis(node_of_cand, parent_cand, axis=1))
  parent_ok = (pf == 0) | jnp.take_along_axis(selected, parent_cand, axis=1)
  fed_of_cand = jnp.full((b, n_cand), -1, jnp.int32).at[rows, cand_of_fed[:, 1:]].set(
      jnp.arange(1, f_total, dtype=jnp.int32))
  z = jnp.zeros((b, 1), jnp.int32)
  arrays = TreeArrays(
      tokens=jnp.concatenate([pending[:, None].astype(jnp.int32),
                              jnp.take_along_axis(tok, sel, axis=1)], axis=1),
      parents=jnp.concatenate([z, parent_node], axis=1),
      depth=jnp.concatenate([z, jnp.take_along_axis(dep, sel, axis=1)], axis=1),
      valid=jnp.concatenate([jnp.ones((b, 1), bool), parent_ok], axis=1))
  node_slot = jnp.concatenate([z, jnp.take_along_axis(fed_of_cand, sel, axis=1)], axis=1)
  return cache, arrays, node_slot


def grow(feed, cache, root_logits, pending, base, tree, root_feat=None, sample=None):
  """sample: `DrafterSpec.sibling_sampling(r)` (used by `Static` trees only)."""
  if isinstance(tree, Static):
    return static_tree(feed, cache, root_logits, pending, base, tree, root_feat, sample)
  return dynamic_tree(feed, cache, root_logits, pending, base, tree, root_feat)

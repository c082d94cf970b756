"""Token trees as fixed-size padded arrays.

A tree of N nodes is `parents` [B, N] (node 0 is the root, the row's pending token; every other
node's parent has a smaller index), `tokens` [B, N], `depth` [B, N] and a validity mask. Its
attention mask is the ancestor-or-self relation, and node i sits at RoPE position
`row length + depth[i]`. The target verifies all N nodes in one forward; the accepted
root-to-node path is then moved into contiguous cache slots with one gather per row.

Two kinds of topology, both hashable (jit static arguments):
  - `Static`: a fixed template (Medusa / Sequoia style), e.g. `Static.from_branching((4, 2, 1))`
    or `Static.from_acceptance(rates, nodes=32)` built from measured per-rank acceptance rates.
  - `Dynamic(nodes=16, topk=4, depth=4)`: EAGLE-2 style: a beam of `topk` nodes expanded `depth`
    times by cumulative draft log-probability, then the best `nodes - 1` candidates kept.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


# Size bounds. The compiled program grows with a tree's depth (one verification level, and for
# a Dynamic tree one draft forward, per level, unrolled) and its node count (the verify forward,
# the [N, N] ancestor mask, the cache slots a round touches), so both are capped up front like
# the draft length of a chain (k <= 64): a depth-200 tree took minutes to compile and
# depth=10000 never finished tracing.
MAX_DEPTH = 64
MAX_NODES = 256


def _count(name: str, v) -> int:
  if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)) or v < 1:
    raise ValueError(f"{name} must be a positive integer, got {v!r}")
  return int(v)


def _depth_error(depth: int, what: str = "tree") -> ValueError:
  return ValueError(f"{what} is {depth} levels deep; at most {MAX_DEPTH} are supported (like "
                    f"draft length k: the compiled program grows with every level)")


def _nodes_error(nodes: int, what: str = "tree") -> ValueError:
  return ValueError(f"{what} has {nodes} nodes; at most {MAX_NODES} are supported")


@struct.dataclass
class TreeArrays:
  tokens: jax.Array  # [B, N] int32; tokens[:, 0] is the pending token
  parents: jax.Array  # [B, N] int32; parents[:, 0] == 0 (the root is its own parent here)
  depth: jax.Array  # [B, N] int32
  valid: jax.Array  # [B, N] bool; invalid nodes are never accepted
  # [B, N, V] or None: the draft distribution each node's children were sampled from (without
  # replacement, in child order); None: the children are deterministic proposals.
  probs: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class Static:
  """A fixed tree topology. `parents[0] == -1`; nodes are numbered level by level.

  sampled: under temperature > 0, a drafter with a distribution draws each node's children
  from it without replacement and verification checks them against it (recursive rejection
  sampling, SpecInfer / RSD): a draft close to the target is accepted almost always, where
  deterministic top candidates are accepted with the target's mass on them only. False keeps
  the top candidates (one-hot drafts) under sampling too. Greedy decoding always uses the top
  candidates.
  """

  parents: tuple[int, ...]
  sampled: bool = True

  def __post_init__(self):
    if not isinstance(self.sampled, (bool, np.bool_)):
      raise ValueError(f"sampled must be True or False, got {self.sampled!r}")
    object.__setattr__(self, "sampled", bool(self.sampled))
    ps = self.parents
    if isinstance(ps, (str, bytes)) or not hasattr(ps, "__len__"):
      raise ValueError(f"parents must be a sequence of ints, got {ps!r}")
    if len(ps) > MAX_NODES:
      raise _nodes_error(len(ps))
    for i, x in enumerate(ps):
      if not isinstance(x, (int, np.integer)) or isinstance(x, (bool, np.bool_)):
        raise ValueError(f"tree node {i} has parent {x!r}; parents must be ints")
    p = tuple(int(x) for x in ps)
    object.__setattr__(self, "parents", p)
    if len(p) < 2 or p[0] != -1:
      raise ValueError(f"a tree needs a root (parents[0] == -1) and at least one more node, "
                       f"got parents={p}")
    depth = [0]
    for i, q in enumerate(p[1:], 1):
      if not 0 <= q < i:
        raise ValueError(f"tree node {i} has parent {q}; parents must precede their children")
      depth.append(depth[q] + 1)
    if any(b < a for a, b in zip(depth, depth[1:])):
      raise ValueError("tree nodes must be numbered level by level (depths non-decreasing)")
    if depth[-1] > MAX_DEPTH:
      raise _depth_error(depth[-1])

  # Constructors --------------------------------------------------------------------------
  @classmethod
  def from_branching(cls, branching: Sequence[int]) -> "Static":
    """Every node at depth d gets branching[d] children: (3, 2) is 1 + 3 + 6 nodes."""
    if (isinstance(branching, (str, bytes)) or not hasattr(branching, "__len__") or not branching
        or any(not isinstance(b, (int, np.integer)) or isinstance(b, (bool, np.bool_)) or b < 1
               for b in branching)):
      raise ValueError(f"branching must be a non-empty list of positive ints, got {branching!r}")
    if len(branching) > MAX_DEPTH:
      raise _depth_error(len(branching), f"branching {tuple(branching)!r}")
    total, width = 1, 1
    for b in branching:  # count before building: (1000, 1000) must not allocate a million nodes
      width *= int(b)
      total += width
      if total > MAX_NODES:
        raise ValueError(f"branching {tuple(int(x) for x in branching)!r} makes more than "
                         f"{MAX_NODES} nodes; at most {MAX_NODES} are supported")
    parents, level = [-1], [0]
    for b in branching:
      nxt = []
      for u in level:
        for _ in range(int(b)):
          parents.append(u)
          nxt.append(len(parents) - 1)
      level = nxt
    return cls(tuple(parents))

  @classmethod
  def chains(cls, width: int, length: int) -> "Static":
    """`width` independent chains of `length` tokens from the root."""
    for v in (width, length):
      if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)) or v < 1:
        raise ValueError(f"chains needs width >= 1 and length >= 1, got {width!r}, {length!r}")
    width, length = int(width), int(length)
    what = f"Static.chains({width}, {length})"
    if length > MAX_DEPTH:  # before building anything: chains(10**9, 2) must not list 10**9
      raise _depth_error(length, what)
    if 1 + width * length > MAX_NODES:
      raise _nodes_error(1 + width * length, what)
    return cls.branches([length] * width, what)

  @classmethod
  def branches(cls, lengths: Sequence[int], what: str | None = None) -> "Static":
    """Independent chains from the root, chain b `lengths[b]` tokens long (level order: at
    each depth, the chains still going, in chain order). `branch_nodes` maps them back."""
    if (isinstance(lengths, (str, bytes)) or not hasattr(lengths, "__len__") or not lengths
        or any(not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)) or v < 1
               for v in lengths)):
      raise ValueError(f"branches needs a non-empty list of lengths >= 1, got {lengths!r}")
    what = what or f"Static.branches({list(lengths)})"
    lengths = [int(v) for v in lengths]
    if max(lengths) > MAX_DEPTH:
      raise _depth_error(max(lengths), what)
    if 1 + sum(lengths) > MAX_NODES:
      raise _nodes_error(1 + sum(lengths), what)
    parents, last = [-1], [0] * len(lengths)
    for d in range(max(lengths)):
      for b, n in enumerate(lengths):
        if d < n:
          parents.append(last[b])
          last[b] = len(parents) - 1
    return cls(tuple(parents))

  def branch_nodes(self) -> list[list[int]]:
    """For each depth-1 child of the root (in order), the nodes of its chain, top down."""
    out: list[list[int]] = []
    where: dict[int, int] = {}
    for i, q in enumerate(self.parents[1:], 1):
      if q == 0:
        where[i] = len(out)
        out.append([i])
      else:
        where[i] = where[q]
        out[where[q]].append(i)
    return out

  @classmethod
  def from_acceptance(cls, rates, nodes: int, max_depth: int = 16) -> "Static":
    """The tree of `nodes` nodes maximising the expected number of accepted tokens when the
    child of rank r (at depth d) is accepted with probability rates[d][r] (or rates[r] at every
    depth), independently along a path: best-first growth, optimal for this model (a path's
    probability only falls as it grows), as in Sequoia's construction.
    """
    r = np.asarray(rates, np.float64)
    if r.ndim == 1:
      r = np.tile(r, (max_depth, 1))
    if r.ndim != 2 or r.size == 0 or np.any(r < 0) or np.any(r > 1):
      raise ValueError("rates must be probabilities: a list per rank, or per depth and rank")
    if (not isinstance(nodes, (int, np.integer)) or isinstance(nodes, (bool, np.bool_))
        or not 2 <= nodes <= MAX_NODES):
      raise ValueError(f"nodes must be an integer in [2, {MAX_NODES}], got {nodes!r}")
    max_depth = _count("max_depth", max_depth)
    if max_depth > MAX_DEPTH:
      raise _depth_error(max_depth, f"from_acceptance(max_depth={max_depth})")
    # Candidates on a heap: (-path probability, tie, parent, depth, rank, parent's probability).
    parents, depth, tie = [-1], [0], 0
    heap = [(-r[0][0], 0, 0, 1, 0, 1.0)]
    while heap and len(parents) < nodes:
      negp, _, par, d, rank, par_p = heapq.heappop(heap)
      parents.append(par)
      depth.append(d)
      me = len(parents) - 1
      if rank + 1 < r.shape[1]:  # the next sibling
        tie += 1
        heapq.heappush(heap, (-par_p * r[d - 1][rank + 1], tie, par, d, rank + 1, par_p))
      if d < min(max_depth, r.shape[0]):  # the first child
        tie += 1
        heapq.heappush(heap, (negp * r[d][0], tie, me, d + 1, 0, -negp))
    # Renumber level by level (stable), remapping parents.
    order = sorted(range(len(parents)), key=lambda i: (depth[i], i))
    new = {old: i for i, old in enumerate(order)}
    return cls(tuple(-1 if i == 0 else new[parents[old]] for i, old in enumerate(order)))

  # Derived (static) facts ----------------------------------------------------------------
  @property
  def n_nodes(self) -> int:
    return len(self.parents)

  @property
  def depths(self) -> tuple[int, ...]:
    d = [0]
    for q in self.parents[1:]:
      d.append(d[q] + 1)
    return tuple(d)

  @property
  def max_depth(self) -> int:
    return max(self.depths)

  @property
  def max_children(self) -> int:
    return max(self.parents[1:].count(u) for u in range(self.n_nodes))

  @property
  def ranks(self) -> tuple[int, ...]:
    """Each node's index among its siblings."""
    seen: dict[int, int] = {}
    out = [0]
    for q in self.parents[1:]:
      out.append(seen.get(q, 0))
      seen[q] = seen.get(q, 0) + 1
    return tuple(out)

  @property
  def levels(self) -> tuple[tuple[int, int], ...]:
    """(start, end) node ranges of each depth."""
    d = self.depths
    return tuple((d.index(x), len(d) - d[::-1].index(x)) for x in range(self.max_depth + 1))

  @property
  def branch(self) -> tuple[int, ...]:
    """For each node, the rank of its depth-1 ancestor (0 for the root)."""
    out = [0]
    for i, q in enumerate(self.parents[1:], 1):
      out.append(self.ranks[i] if q == 0 else out[q])
    return tuple(out)

  def children(self) -> np.ndarray:
    """[N, M] children of each node in index order, -1 padded."""
    out = np.full((self.n_nodes, self.max_children), -1, np.int32)
    for i, (q, r) in enumerate(zip(self.parents, self.ranks)):
      if i:
        out[q, r] = i
    return out

  def ancestor_mask(self) -> np.ndarray:
    n = self.n_nodes
    m = np.eye(n, dtype=bool)
    for i in range(1, n):
      m[i] |= m[self.parents[i]]
    return m

  @property
  def footprint(self) -> int:
    """Cache slots one round touches past the committed length."""
    return self.n_nodes

  def arrays(self, tokens: jax.Array) -> TreeArrays:
    b = tokens.shape[0]
    par = jnp.asarray(np.maximum(np.asarray(self.parents), 0), jnp.int32)
    dep = jnp.asarray(self.depths, jnp.int32)
    return TreeArrays(tokens=tokens.astype(jnp.int32),
                      parents=jnp.broadcast_to(par, (b, self.n_nodes)),
                      depth=jnp.broadcast_to(dep, (b, self.n_nodes)),
                      valid=jnp.ones((b, self.n_nodes), bool))


@dataclasses.dataclass(frozen=True)
class Dynamic:
  """EAGLE-2 style tree: expand the `topk` best frontier nodes `depth` times, keep the
  `nodes - 1` best candidates by cumulative draft log-probability (the root makes `nodes`)."""

  nodes: int = 16
  topk: int = 4
  depth: int = 4

  def __post_init__(self):
    for name in ("nodes", "topk", "depth"):
      object.__setattr__(self, name, _count(f"Dynamic tree {name}", getattr(self, name)))
    if self.nodes < 2 or self.nodes > MAX_NODES:
      raise ValueError(f"Dynamic tree nodes must be in [2, {MAX_NODES}], got {self.nodes}")
    if self.depth > MAX_DEPTH:
      raise _depth_error(self.depth, f"Dynamic(depth={self.depth})")
    if self.topk >= MAX_NODES:
      raise ValueError(f"Dynamic tree topk must be below {MAX_NODES}, got {self.topk}")
    if self.n_fed > MAX_NODES:
      raise ValueError(f"Dynamic(nodes={self.nodes}, topk={self.topk}, depth={self.depth}) runs "
                       f"{self.n_fed} nodes (1 + (depth-1)*topk) through the drafter per round; "
                       f"at most {MAX_NODES} are supported: lower topk or depth")
    if self.nodes - 1 > self.n_candidates:
      raise ValueError(f"Dynamic(nodes={self.nodes}, topk={self.topk}, depth={self.depth}) "
                       f"can only produce {self.n_candidates + 1} nodes; raise topk or depth")

  @property
  def n_candidates(self) -> int:
    return self.topk + (self.depth - 1) * self.topk * self.topk

  @property
  def n_nodes(self) -> int:
    return self.nodes

  @property
  def max_depth(self) -> int:
    return self.depth

  @property
  def max_children(self) -> int:
    return self.topk

  @property
  def n_fed(self) -> int:
    """Nodes the drafter runs through its model: the root and depth - 1 beams of topk."""
    return 1 + (self.depth - 1) * self.topk

  @property
  def footprint(self) -> int:
    return max(self.nodes, self.n_fed)


Tree = Static | Dynamic


def check_tree(tree) -> Tree | None:
  if tree is None or isinstance(tree, (Static, Dynamic)):
    return tree
  if isinstance(tree, (int, np.integer)) and not isinstance(tree, (bool, np.bool_)):
    return Dynamic(nodes=int(tree))
  raise ValueError(f"tree must be None, a node budget (int), jaxspec.trees.Static or "
                   f"jaxspec.trees.Dynamic, got {tree!r}")


# Array helpers shared by drafters and the verifier ---------------------------------------

def ancestor_mask(parents: jax.Array, max_depth: int) -> jax.Array:
  """parents [B, N] (root's parent = 0) -> [B, N, N]: mask[b, i, j] = j is i or an ancestor."""
  b, n = parents.shape
  mask = jnp.broadcast_to(jnp.eye(n, dtype=bool), (b, n, n))
  cur = jnp.broadcast_to(jnp.arange(n), (b, n))
  for _ in range(max_depth):
    cur = jnp.take_along_axis(parents, cur, axis=1)
    mask = mask | jax.nn.one_hot(cur, n, dtype=bool)
  return mask


def children_table(parents: jax.Array, valid: jax.Array, max_children: int) -> jax.Array:
  """[B, N, M]: the valid children of each node in index order, -1 padded."""
  b, n = parents.shape
  idx = jnp.arange(n)
  is_child = (parents[:, None, :] == idx[None, :, None]) & (idx[None, None, :] > 0) & valid[:, None, :]
  rank = jnp.cumsum(is_child, axis=2) - 1  # [B, parent, child]
  slot = jnp.where(is_child, rank, max_children)  # out-of-range slots are dropped
  table = jnp.full((b, n, max_children + 1), -1, jnp.int32)
  bb = jnp.arange(b)[:, None, None]
  pp = idx[None, :, None]
  cc = jnp.broadcast_to(idx[None, None, :], (b, n, n))
  table = table.at[bb, pp, slot].max(jnp.where(is_child, cc, -1))
  return table[:, :, :max_children]


def path_to(parents: jax.Array, depth: jax.Array, node: jax.Array, max_depth: int) -> jax.Array:
  """[B, D+1]: path[b, d] = the depth-d ancestor of `node[b]`; entries past its depth repeat
  their index (harmless identity moves when committing)."""
  b = parents.shape[0]
  out = jnp.broadcast_to(jnp.arange(max_depth + 1), (b, max_depth + 1))
  cur = node
  rows = jnp.arange(b)
  for _ in range(max_depth + 1):
    d = jnp.take_along_axis(depth, cur[:, None], axis=1)[:, 0]
    out = out.at[rows, d].set(cur)
    cur = jnp.take_along_axis(parents, cur[:, None], axis=1)[:, 0]
  return out


def sampled_candidates(key: jax.Array, logits: jax.Array, m: int, mode, sp
                       ) -> tuple[jax.Array, jax.Array]:
  """m tokens [B, T, m] drawn without replacement from the warped draft distribution q of
  `logits` [B, T, V] (Gumbel top-m: the order is the order of sequential draws), and q
  [B, T, V]. Past q's support (top-k / top-p leave fewer than m tokens) the draws are tokens
  with q = 0, which verification skips."""
  from jaxspec import sampling
  logq = jax.nn.log_softmax(sampling.warp_logits(logits, mode, sp), axis=-1)
  g = sampling.gumbel(key, logq.shape)
  _, toks = jax.lax.top_k(jnp.where(jnp.isfinite(logq), logq + g, -jnp.inf), m)
  return toks.astype(jnp.int32), jnp.exp(logq)


def top_candidates(logits: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
  """Top-m tokens [..., m] and their log-probabilities under softmax(logits)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  vals, toks = jax.lax.top_k(logp, m)
  return toks.astype(jnp.int32), vals

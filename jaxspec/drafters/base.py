"""The drafter protocol: one user-facing type, one traced half, one struct each way.

A drafter has two halves:

  * `Drafter` (user-facing): a frozen dataclass of options (`NGram(n=3, k=4)`), validated on
    construction. `bind(target) -> (spec, params)` turns it into
  * `DrafterSpec` (static): a frozen, hashable dataclass (a jit static argument: k, configs,
    the tree topology) plus `params`, a pytree of arrays (traced).

Inside the compiled loop the engine calls, for every drafter alike:

    dstate = spec.init(params, Prefill(...))                     # once, after the prefill
    dstate, proposal = spec.propose(params, dstate, Round(...))  # every round
    dstate = spec.commit(params, dstate, Round(...), Accepted(...))
    dstate = spec.commit_plain(...)   # rounds the speculation switch decoded plainly

Every hook is declared here with a default, so the engine never asks a drafter what it is.

`Round` carries the target params and cache, the token buffer `seq` and the number of committed
tokens `n` per row: `seq[b, n[b] - 1]` is the last committed (pending) token, not yet in the
target cache (`tcache.lengths == n - 1`).

`Proposal` is what verification gets: a chain of k drafts (`tokens` [B, k], their draft
distributions `probs` [B, k, V] or None for a deterministic proposal) or a token tree
(`tree`, a `trees.TreeArrays` whose node 0 is the pending token), and the target cache if the
drafter wrote to it (EarlyExit shares the target's cache; everyone else leaves it None).

`Accepted` is what the drafter learns back: the committed length `n_new`, the number of drafts
accepted `n_acc`, the accepted path of node indices (0 .. k for a chain), the target's hidden
states along that path (`hidden[b, n_acc[b]]` is the feature whose next token is the new
pending token), and the verify pass's own tokens and logits (Token Recycling learns from them).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxspec import trees
from jaxspec.models import KVCache, ModelConfig
from jaxspec.sampling import SamplingMode, SamplingParams

MAX_K = 64  # longest chain a round may draft (program size grows with it)


# ------------------------------------------------------------------------------ loop structs


@struct.dataclass
class Round:
  tparams: Any
  tcache: KVCache
  seq: jax.Array  # [B, L] int32: prompt then committed output
  n: jax.Array  # [B] int32: committed tokens per row
  key: jax.Array
  sp: SamplingParams


@struct.dataclass
class Prefill:
  """What `init` sees once the prompt has run through the target."""

  tparams: Any
  prompt: jax.Array  # [B, P] int32 (padded past each row's length)
  prompt_lens: jax.Array  # [B]
  hidden: jax.Array  # [B, P, D] the target's features (`DrafterSpec.feature_layers`)
  cache_size: int = struct.field(pytree_node=False)  # slots of every per-row cache


@struct.dataclass
class Proposal:
  """One round's drafts: a chain (tree=None) or a padded token tree."""

  tokens: jax.Array  # chain: [B, k] drafts (< 0: empty slot); tree: [B, N] = tree.tokens
  probs: jax.Array | None  # chain: [B, k, V] draft distributions; None: deterministic
  tree: trees.TreeArrays | None
  tcache: KVCache | None  # the target cache, when the drafter wrote to it
  children: jax.Array | None  # static trees: [N, M] children table, precomputed
  depth: int = struct.field(pytree_node=False)  # most drafts this round can accept
  max_children: int = struct.field(pytree_node=False)

  @classmethod
  def chain(cls, tokens: jax.Array, probs: jax.Array | None = None,
            tcache: KVCache | None = None) -> "Proposal":
    return cls(tokens=tokens, probs=probs, tree=None, tcache=tcache, children=None,
               depth=tokens.shape[1], max_children=1)

  @classmethod
  def from_tree(cls, topology, arrays: trees.TreeArrays,
                tcache: KVCache | None = None) -> "Proposal":
    """`topology`: the drafter's `trees.Static` / `trees.Dynamic`."""
    children = (jnp.asarray(topology.children()) if isinstance(topology, trees.Static)
                else None)
    return cls(tokens=arrays.tokens, probs=None, tree=arrays, tcache=tcache, children=children,
               depth=topology.max_depth, max_children=topology.max_children)

  def target_inputs(self, seq: jax.Array, n: jax.Array):
    """(tokens [B, T], positions [B, T] | None, tree_mask | None) of the verify forward: the
    pending token then the drafts at consecutive positions, or the tree's nodes at
    `n - 1 + depth` seeing their ancestors."""
    if self.tree is None:
      pending = jnp.take_along_axis(seq, (n - 1)[:, None], axis=1)  # [B, 1]
      return jnp.concatenate([pending, self.tokens], axis=1), None, None
    t = self.tree
    return (t.tokens, (n - 1)[:, None] + t.depth, trees.ancestor_mask(t.parents, self.depth))

  def keep_path(self, cache: KVCache, base: jax.Array, path: jax.Array) -> KVCache:
    """The verified cache with the accepted path in contiguous slots from `base`."""
    return cache if self.tree is None else cache.gather_slots(base, path)

  def along_path(self, x: jax.Array, path: jax.Array) -> jax.Array:
    """[B, T, ...] per verified position -> [B, depth + 1, ...] along the accepted path."""
    if self.tree is None:
      return x
    idx = path.reshape(path.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)

  def drafted(self) -> jax.Array:
    """[B] drafts handed to verification (empty slots and invalid nodes excluded)."""
    if self.tree is None:
      return jnp.sum(self.tokens >= 0, axis=1)
    return jnp.sum(self.tree.valid[:, 1:], axis=1)


@struct.dataclass
class Accepted:
  """What one verify pass decided, handed back to the drafter."""

  n_new: jax.Array  # [B] committed tokens after this round
  n_acc: jax.Array  # [B] drafts accepted
  path: jax.Array  # [B, depth + 1] accepted node indices from the root (chains: 0 .. depth)
  hidden: jax.Array  # [B, depth + 1, D] the target's features along the path (as Prefill's)
  tokens: jax.Array  # [B, T] what the target verified (pending + drafts, or tree nodes)
  logits: jax.Array  # [B, T, V] the verify pass's logits at those positions


# ---------------------------------------------------------------------------- the traced half


@dataclasses.dataclass(frozen=True)
class DrafterSpec:
  """Static half of a bound drafter. Subclasses override `propose`, and `init` / `commit`
  when they keep state across rounds."""

  k: int
  target: ModelConfig
  mode: SamplingMode = SamplingMode()
  tree: Any = None  # None (chains) | trees.Static | trees.Dynamic

  @property
  def draft_forwards(self) -> int:
    """Draft forward passes per round (for stats)."""
    return 0

  @property
  def feature_layers(self) -> tuple[int, ...]:
    """Target layers whose outputs this drafter reads as its features (`Prefill.hidden`,
    `Accepted.hidden`: their residual streams concatenated, [.., len * D]; EAGLE-3). () (the
    default): the residual stream after the last layer, before the final norm."""
    return ()

  @property
  def footprint(self) -> int:
    """Cache slots past the committed length that one round may write."""
    return self.k + 1 if self.tree is None else self.tree.footprint

  @property
  def cache_footprint(self) -> int:
    """Slots one round writes into a draft model's own cache past where it rewinds (the
    root's two re-fed tokens, then the chain or tree; `DraftModel`, cross-vocabulary drafts):
    a sliding-window draft keeps rings of window + this - 1 slots there (`models.cache`)."""
    return self.footprint + 2

  @property
  def depth(self) -> int:
    """Most drafts one round can accept (k for chains, the tree depth for trees)."""
    return self.k if self.tree is None else self.tree.max_depth

  @property
  def slots(self) -> int:
    """Draft slots per round: k for chains, the tree's nodes below the root."""
    return self.k if self.tree is None else self.tree.n_nodes - 1

  def sibling_sampling(self, r: Round):
    """(draft key, mode, sampling values) when this round's tree draws its siblings from the
    draft distribution (sampling, a `trees.Static` tree with `sampled=True`); else None."""
    if self.mode.greedy or not isinstance(self.tree, trees.Static) or not self.tree.sampled:
      return None
    return r.key, self.mode, r.sp

  def with_mode(self, mode: SamplingMode) -> "DrafterSpec":
    return dataclasses.replace(self, mode=mode)

  def init(self, params, p: Prefill):
    return ()

  def propose(self, params, dstate, r: Round) -> tuple[Any, Proposal]:
    raise NotImplementedError(f"{type(self).__name__} must implement propose")

  def commit(self, params, dstate, r: Round, a: Accepted):
    return dstate

  def commit_plain(self, params, dstate, r: Round, a: Accepted):
    """A round that verified no drafts (the speculation switch chose plain decoding; see
    `jaxspec.policy`): one token committed, `a` has depth 0 (path [B, 1], hidden [B, 1, D]).
    Drafters whose state follows the committed tokens keep it in step here; the default
    treats it as any other commit."""
    return self.commit(params, dstate, r, a)


@dataclasses.dataclass(frozen=True)
class NoDraft(DrafterSpec):
  """Plain decoding: k = 0, every round is one target forward of one token."""

  def propose(self, params, dstate, r: Round):
    return dstate, Proposal.chain(jnp.zeros((r.seq.shape[0], 0), jnp.int32))


# ----------------------------------------------------------------------- the user-facing half


class Drafter:
  """Base of every user-facing drafter (a frozen dataclass of options).

  Subclasses declare their options as dataclass fields. The common ones are validated here
  when declared: `k` (draft length, 1..64), `tree` (None, a `trees.Static` or `trees.Dynamic`,
  restricted to `tree_kinds`), `stop_below` (a confidence in [0, 1), chains only); `check()`
  validates the rest. `bind(target)` returns (DrafterSpec, params).
  """

  tree_kinds: ClassVar[tuple[type, ...]] = (trees.Static, trees.Dynamic)  # () = chains only
  drafts_chains: ClassVar[bool] = True  # False: always a tree (never tree=None)
  uses_k: ClassVar[bool] = True  # False: the draft length comes from elsewhere (a tree), so
  # the command line's --k has no effect and is refused

  @classmethod
  def bench_defaults(cls, config) -> list[str]:
    """The `--drafter` specs `jaxspec bench` runs for this family when `--drafters` is not
    given (registered families only; none by default)."""
    return []

  def __post_init__(self):
    names = {f.name for f in dataclasses.fields(self)}
    if "k" in names:
      object.__setattr__(self, "k", check_k(self.k))
    if "tree" in names:
      object.__setattr__(self, "tree", self._check_tree(self.tree))
    if "stop_below" in names:
      object.__setattr__(self, "stop_below",
                         check_stop_below(self.stop_below, getattr(self, "tree", None)))
    self.check()

  def _check_tree(self, tree):
    tree = check_tree(tree)
    if tree is not None and not isinstance(tree, self.tree_kinds):
      kinds = " or ".join(f"trees.{k.__name__}" for k in self.tree_kinds)
      if not kinds:
        raise ValueError(f"{type(self).__name__} drafts chains only (tree=None), got "
                         f"tree={tree!r}")
      raise ValueError(f"{type(self).__name__} drafts a {kinds} tree, got "
                       f"{type(tree).__name__}")
    return tree

  def check(self) -> None:
    """Validates drafter-specific options (raise ValueError / TypeError)."""

  def bind(self, target) -> tuple[DrafterSpec, Any]:
    raise NotImplementedError(f"{type(self).__name__} must implement bind")

  def draft_forward(self, target):
    """(params, config, n_layers) of one draft forward (1 token per row), for cost models;
    None for drafters that run no model."""
    return None

  @property
  def remembers(self) -> bool:
    """Whether `remember` carries anything into later calls (`generate_many` then feeds it the
    rows that finish while a job runs)."""
    return False

  def remember(self, result) -> "Drafter":
    """This drafter, carrying what a `generate` result can teach it into later calls (an
    `NGram` with a memory adds the outputs to it). Drafters that keep nothing across calls
    return themselves."""
    return self

  def with_k(self, k: int) -> "Drafter":
    """The same drafter drafting k tokens per round."""
    return dataclasses.replace(self, k=k)


# ----------------------------------------------------------------------------------- helpers


def last_tokens(seq: jax.Array, n: jax.Array, count: int) -> jax.Array:
  """[B, count]: the last `count` committed tokens of each row (seq[n - count .. n - 1])."""
  idx = n[:, None] - count + jnp.arange(count)[None, :]
  return jnp.take_along_axis(seq, jnp.clip(idx, 0, seq.shape[1] - 1), axis=1)


def top_indices(scores: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
  """(values, indices) [B, width] of the `width` largest scores per row [B, H], best first,
  by repeated argmax: XLA:CPU runs each as one pass, where lax.top_k sorts the row (60 ms for
  [32, 8832] against 0.5 ms per argmax). Taken entries are set to the minimum."""
  rows = jnp.arange(scores.shape[0])
  low = jnp.iinfo(scores.dtype).min if jnp.issubdtype(scores.dtype, jnp.integer) else -jnp.inf
  vals, idxs = [], []
  for _ in range(width):
    i = jnp.argmax(scores, axis=1)
    vals.append(scores[rows, i])
    idxs.append(i.astype(jnp.int32))
    scores = scores.at[rows, i].set(low)
  return jnp.stack(vals, axis=1), jnp.stack(idxs, axis=1)


def pick(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x [B, T, D], idx [B] -> [B, D]."""
  return jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]


def check_int(name: str, value, low: int, high: int | None = None) -> int:
  """A Python or numpy integer (not a bool) in [low, high] -> int; TypeError for other types,
  ValueError out of range."""
  if high is not None:
    want = f"an integer in [{low}, {high}]"
  else:
    want = "a positive integer" if low == 1 else f"an integer >= {low}"
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be {want}, got {value!r}")
  if value < low or (high is not None and value > high):
    raise ValueError(f"{name} must be {want}, got {int(value)}")
  return int(value)


def check_k(k) -> int:
  if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or \
      not 1 <= int(k) <= MAX_K:
    raise ValueError(f"draft length k must be an integer in [1, {MAX_K}], got {k!r}")
  return int(k)


def check_tree(tree):
  return trees.check_tree(tree)


def check_stop_below(stop_below, tree=None) -> float | None:
  if stop_below is None:
    return None
  if isinstance(stop_below, (bool, np.bool_)) or not isinstance(
      stop_below, (int, float, np.integer, np.floating)) or not 0.0 <= float(stop_below) < 1.0:
    raise ValueError(f"stop_below must be a probability in [0, 1), got {stop_below!r}")
  if tree is not None:
    raise ValueError("stop_below applies to chains; token trees size themselves (tree=None)")
  return float(stop_below)

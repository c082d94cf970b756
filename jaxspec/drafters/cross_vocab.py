"""A draft model with its own tokenizer: token-level intersection drafting inside the loop.

`DraftModel(draft)` binds to this when the draft's tokenizer is not the target's. The draft
keeps its own sequence of draft ids beside the target's, fed by translating the committed
target tokens through `translate.Tables` (each target token re-spelled in draft ids); it drafts
only tokens of the vocabulary intersection, so every draft is one target token with a proper
distribution over target ids, and verification stays exactly the target's. Tables are plain
arrays in the params: translation is a gather and a scatter per round, with no host round trip.

Rounds: translate the target tokens committed since the last round onto the draft sequence,
feed the draft what its cache lacks (`chain.catch_up`), re-feed the last two draft tokens
for the root logits, then draft a chain (`draft_chain`) or grow a tree (`tree_draft.grow`) over
target ids, each drafted id fed back as its one draft id.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from jaxspec.models import KVCache, ModelConfig, forward

from . import vocab
from .base import Accepted, DrafterSpec, Prefill, Proposal, Round, last_tokens, pick
from .chain import CATCH_UP, catch_up, draft_chain
from .tree_draft import grow

WINDOW = 16  # target tokens translated per step of the translation loop


@struct.dataclass
class CrossState:
  cache: KVCache  # the draft's cache (`seq`'s slots plus room for catch-up chunks and drafts)
  seq: jax.Array  # [B, C] int32: the committed text in draft ids
  n: jax.Array  # [B] int32: draft ids in `seq`
  read: jax.Array  # [B] int32: target tokens translated into `seq`
  valid: jax.Array  # [B] int32: seq[:valid] has its entries in `cache`
  node_slot: jax.Array | None  # trees: [B, N] each node's slot offset from the root, -1


@dataclasses.dataclass(frozen=True)
class CrossVocabSpec(DrafterSpec):
  """params: {"model": the draft's params, "head": the draft's head rows of the intersection
  (`vocab.params`, with "ids" the target ids they are), "tables": `translate.Tables` arrays}."""

  draft: ModelConfig | None = None
  stop_below: float | None = None
  expansion: float = 1.0  # draft tokens per target token (`Tables.expansion`)
  prepend: int | None = None  # a draft BOS before every prompt
  target_bos: int | None = None  # where a prompt starts with it, its text starts after it
  lead: bool = False  # the draft's texts start with a word boundary (`Tables.lead`)

  @property
  def draft_forwards(self) -> int:
    return self.k

  def capacity(self, cache_size: int) -> int:
    """Draft-sequence slots for `cache_size` target tokens at this pair's expansion, with a
    margin, within the draft's context (a row that outgrows it drafts from a context cut
    there, which costs acceptance only)."""
    c = int(-(-cache_size * max(1.0, self.expansion) * 1.25 // 1)) + 8
    return max(4, min(c, self.draft.max_seq_len))

  def _logits(self, params, h: jax.Array) -> jax.Array:
    """Draft features [B, T, D] -> logits [B, T, Vt] over target ids, -inf off the intersection."""
    return vocab.scatter(params["head"], self.target, vocab.sub_logits(params["head"], self.draft, h))

  def _draft_ids(self, params, tokens: jax.Array) -> jax.Array:
    """Target ids of the intersection (or empty slots, < 0) -> their draft ids."""
    return params["tables"]["to_draft"][jnp.maximum(tokens, 0)]

  def _translate(self, params, seq_d, n_d, read, seq, n, lead_at):
    """Appends the draft spelling of seq[read:n] to seq_d at n_d (WINDOW target tokens a step).
    Spellings past the draft sequence's end are dropped (that row's context stops there)."""
    tb = params["tables"]
    cap, m = seq_d.shape[1], tb["spell"].shape[1]
    rows = jnp.arange(seq.shape[0])[:, None, None]

    def body(c):
      seq_d, n_d, read = c
      idx = read[:, None] + jnp.arange(WINDOW)  # [B, W]
      toks = jnp.take_along_axis(seq, jnp.clip(idx, 0, seq.shape[1] - 1), axis=1)
      first = (idx == lead_at[:, None])[..., None]  # [B, W, 1]
      spell = jnp.where(first, tb["lead"][toks], tb["spell"][toks])  # [B, W, M]
      lens = jnp.where(first[..., 0], tb["lead_len"][toks], tb["spell_len"][toks])
      lens = jnp.where(idx < n[:, None], lens, 0)  # [B, W]
      start = n_d[:, None] + jnp.cumsum(lens, axis=1) - lens  # [B, W]
      j = jnp.arange(m)
      dest = jnp.where(j < lens[..., None], start[..., None] + j, cap)  # [B, W, M]; cap: dropped
      seq_d = seq_d.at[rows, dest].set(spell, mode="drop")
      return seq_d, jnp.minimum(n_d + lens.sum(axis=1), cap), jnp.minimum(read + WINDOW, n)

    return jax.lax.while_loop(lambda c: jnp.any(c[2] < n), body, (seq_d, n_d, read))

  def _feed(self, params, toks, cache, real):
    return forward(params["model"], self.draft, toks, cache, logits=False, valid=real).cache

  def init(self, params, p: Prefill):
    b = p.prompt.shape[0]
    cap = self.capacity(p.cache_size)
    seq_d = jnp.zeros((b, cap), jnp.int32)
    n_d = jnp.zeros((b,), jnp.int32)
    if self.prepend is not None:
      seq_d, n_d = seq_d.at[:, 0].set(self.prepend), n_d + 1
    lead_at = jnp.full((b,), -1, jnp.int32)
    if self.lead:
      starts = (p.prompt[:, 0] == self.target_bos) if self.target_bos is not None else False
      lead_at = jnp.where(starts, 1, 0).astype(jnp.int32)
    zero = jnp.zeros((b,), jnp.int32)
    seq_d, n_d, read = self._translate(params, seq_d, n_d, zero, p.prompt,
                                       p.prompt_lens.astype(jnp.int32), lead_at)
    slack = max(CATCH_UP) + self.cache_footprint
    cache = KVCache.like(params["model"], self.draft, b, cap + slack,
                         footprint=self.cache_footprint)
    feed = lambda t, c, real: self._feed(params, t, c, real)
    valid = jnp.maximum(n_d - 2, 0)
    cache = catch_up(feed, cache, seq_d, zero, valid)
    node_slot = None if self.tree is None else jnp.zeros((b, self.tree.n_nodes), jnp.int32)
    return CrossState(cache=cache, seq=seq_d, n=n_d, read=read, valid=valid, node_slot=node_slot)

  def propose(self, params, st: CrossState, r: Round):
    b = r.seq.shape[0]
    seq_d, n_d, read = self._translate(params, st.seq, st.n, st.read, r.seq, r.n,
                                       jnp.full((b,), -1, jnp.int32))
    cache = catch_up(lambda t, c, real: self._feed(params, t, c, real), st.cache, seq_d,
                     st.valid, n_d - 2)
    # The root: re-feed the last two draft ids (one where the row has a single one) and read
    # the logits at the last of them.
    s = jnp.maximum(n_d - 2, 0)
    toks = jnp.take_along_axis(seq_d, jnp.minimum(s[:, None] + jnp.arange(2), seq_d.shape[1] - 1),
                               axis=1)
    out = forward(params["model"], self.draft, toks, cache.rewind(s), logits=False)
    h = pick(out.hidden, jnp.clip(n_d - 1 - s, 0, 1))  # [B, D]
    root = self._logits(params, h[:, None])[:, 0]  # [B, Vt]
    cache = out.cache.rewind(jnp.maximum(n_d, 1))
    st = st.replace(seq=seq_d, n=n_d, read=read)
    if self.tree is None:
      def step(cache, tok):
        o = forward(params["model"], self.draft, self._draft_ids(params, tok)[:, None], cache,
                    logits=False)
        return o.cache, self._logits(params, o.hidden)[:, 0]

      cache, tokens, probs = draft_chain(step, cache, root, self.k, r.key, self.mode, r.sp,
                                         self.stop_below)
      return st.replace(cache=cache), Proposal.chain(tokens, probs)

    def feed(cache, toks, pos, base, tree_mask, parent):
      o = forward(params["model"], self.draft, self._draft_ids(params, toks), cache,
                  positions=pos, mask_base=base, tree_mask=tree_mask, logits=False)
      return o.cache, self._logits(params, o.hidden), None

    pending = last_tokens(r.seq, r.n, 1)[:, 0]
    cache, arrays, node_slot = grow(feed, cache, root, pending, jnp.maximum(n_d - 1, 0),
                                    self.tree, sample=self.sibling_sampling(r))
    return st.replace(cache=cache, node_slot=node_slot), Proposal.from_tree(self.tree, arrays)

  def commit_plain(self, params, st: CrossState, r: Round, a: Accepted):
    return st  # the draft catches up at the next speculative round

  def commit(self, params, st: CrossState, r: Round, a: Accepted):
    # Each accepted draft is one draft id fed right after the root; all but possibly the last
    # were fed (a chain never feeds its final draft, a tree its deepest level), so the cache
    # holds seq[:n + n_acc - 1] once the next round translates the same tokens there.
    valid = jnp.minimum(st.n + jnp.maximum(a.n_acc - 1, 0), st.seq.shape[1]).astype(jnp.int32)
    st = st.replace(valid=valid)
    if self.tree is None:
      return st
    src = jnp.take_along_axis(st.node_slot, a.path, axis=1)
    src = jnp.where(src >= 0, src, jnp.arange(a.path.shape[1])[None, :])
    return st.replace(cache=st.cache.gather_slots(jnp.maximum(st.n - 1, 0), src))

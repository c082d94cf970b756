"""`DraftModel`: an independent smaller model with the same tokenizer and its own KV cache."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from jaxspec.models import KVCache, Model, ModelConfig, forward

from . import registry
from .base import Accepted, Drafter, DrafterSpec, Prefill, Proposal, Round, last_tokens
from .chain import draft_chain
from .tree_draft import grow


@struct.dataclass
class DraftState:
  cache: KVCache  # the draft model's cache; holds every committed token but possibly the last 2
  node_slot: jax.Array | None  # trees: [B, N] each node's slot offset from the round base, -1


@dataclasses.dataclass(frozen=True)
class DraftModelSpec(DrafterSpec):
  draft: ModelConfig | None = None
  stop_below: float | None = None

  @property
  def draft_forwards(self) -> int:
    return self.k

  def init(self, params, p: Prefill):
    b = p.prompt.shape[0]
    cache = KVCache.like(params, self.draft, b, p.cache_size)
    cache = forward(params, self.draft, p.prompt, cache, logits=False).cache.rewind(p.prompt_lens)
    node_slot = None if self.tree is None else jnp.zeros((b, self.tree.n_nodes), jnp.int32)
    return DraftState(cache=cache, node_slot=node_slot)

  def _root(self, params, cache: KVCache, r: Round):
    # The draft cache holds every committed token but possibly the last two (after a fully
    # accepted round the final draft token was never fed). Re-feed both: rewriting an entry
    # with the same token is idempotent, and it keeps every shape static.
    return forward(params, self.draft, last_tokens(r.seq, r.n, 2), cache.rewind(r.n - 2))

  def propose(self, params, st: DraftState, r: Round):
    out = self._root(params, st.cache, r)
    if self.tree is None:
      def step(cache, tok):
        o = forward(params, self.draft, tok[:, None], cache)
        return o.cache, o.logits[:, 0]

      cache, tokens, probs = draft_chain(step, out.cache, out.logits[:, 1], self.k, r.key,
                                         self.mode, r.sp, self.stop_below)
      return st.replace(cache=cache), Proposal.chain(tokens, probs)

    def feed(cache, toks, pos, base, tree_mask, parent):
      o = forward(params, self.draft, toks, cache, positions=pos, mask_base=base,
                  tree_mask=tree_mask)
      return o.cache, o.logits, None

    pending = last_tokens(r.seq, r.n, 1)[:, 0]
    cache, arrays, node_slot = grow(feed, out.cache, out.logits[:, 1], pending, r.n - 1,
                                    self.tree)
    return DraftState(cache=cache, node_slot=node_slot), Proposal.from_tree(self.tree, arrays)

  def commit_plain(self, params, st: DraftState, r: Round, a: Accepted):
    # One token committed: feed seq[n-2] so the cache again lacks at most the last two.
    cache = forward(params, self.draft, last_tokens(r.seq, r.n, 2)[:, :1],
                    st.cache.rewind(r.n - 2), logits=False).cache
    return st.replace(cache=cache)

  def commit(self, params, st: DraftState, r: Round, a: Accepted):
    if self.tree is None:
      return st  # chain drafts sit in their own slots already; propose rewinds
    # Move the draft's entries of the accepted path (fed at tree slots) to contiguous slots.
    src = jnp.take_along_axis(st.node_slot, a.path, axis=1)
    src = jnp.where(src >= 0, src, jnp.arange(a.path.shape[1])[None, :])
    return st.replace(cache=st.cache.gather_slots(r.n - 1, src))


@registry.register("draft", usage="draft:SRC",
                   help="an independent smaller model with the target's tokenizer")
@dataclasses.dataclass(frozen=True, eq=False)
class DraftModel(Drafter):
  """Drafts with a separate (smaller) model that shares the target's tokenizer.

  Args:
    draft_model: a `jaxspec.Model` (e.g. from `jaxspec.load_model`).
    k: tokens proposed per round.
    tree: token-tree spec (see `jaxspec.trees`); None drafts a chain.
    stop_below: confidence-based draft length (chains): a row stops drafting after the first
      position whose draft top-1 probability is below this; its remaining slots are left empty
      (never accepted; lossless) and draft forwards are skipped once every row has stopped.
  """

  draft_model: Model
  k: int = 4
  tree: object = None
  stop_below: float | None = None

  def check(self):
    if not isinstance(self.draft_model, Model):
      raise TypeError(f"DraftModel expects a jaxspec Model, got {type(self.draft_model).__name__}")

  def bind(self, target: Model):
    d, t = self.draft_model.config, target.config
    if d.vocab_size != t.vocab_size:
      raise ValueError(f"draft and target vocabularies differ: draft {self.draft_model.name!r} "
                       f"has {d.vocab_size} tokens, target {target.name!r} has {t.vocab_size}; "
                       f"a draft model must share the target's tokenizer")
    dt, tt = self.draft_model.tokenizer, target.tokenizer
    if dt is not None and tt is not None:
      probe = "Hello world 123, ça va? 你好"
      if dt.encode(probe) != tt.encode(probe) or tuple(dt.eos_ids) != tuple(tt.eos_ids):
        raise ValueError(f"draft {self.draft_model.name!r} and target {target.name!r} have the "
                         f"same vocabulary size but different tokenizers")
    spec = DraftModelSpec(k=self.k, target=t, draft=d, tree=self.tree,
                          stop_below=self.stop_below)
    return spec, self.draft_model.params

  def draft_forward(self, target):
    return self.draft_model.params, self.draft_model.config, None

  @classmethod
  def from_cli(cls, arg: str, k: int, tree: int | None) -> "DraftModel":
    from jaxspec.models.load import load

    if not arg:
      raise ValueError("--drafter draft needs a model, e.g. draft:stories260K")
    return cls(load(arg), k=k, tree=registry.dynamic_tree(tree, k))

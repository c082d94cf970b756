"""`DraftModel`: an independent smaller model with the same tokenizer and its own KV cache."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxspec.models import KVCache, Model, ModelConfig, forward

from .base import DrafterSpec, Round, check_k, check_tree, last_tokens
from .chain import check_stop_below, draft_chain
from .tree_draft import grow


@dataclasses.dataclass(frozen=True)
class DraftModelSpec(DrafterSpec):
  draft: ModelConfig | None = None
  stop_below: float | None = None

  @property
  def draft_forwards(self) -> int:
    return self.k

  def init(self, params, tparams, prompt, prompt_lens, cache_size, hidden):
    cache = KVCache.init(self.draft, prompt.shape[0], cache_size, params["embed"].dtype)
    cache = forward(params, self.draft, prompt, cache, logits=False).cache.rewind(prompt_lens)
    if self.tree is None:
      return cache
    return cache, jnp.zeros((prompt.shape[0], self.tree.n_nodes), jnp.int32)

  def _root(self, params, cache: KVCache, r: Round):
    # The draft cache holds every committed token but possibly the last two (after a fully
    # accepted round the final draft token was never fed). Re-feed both: rewriting an entry
    # with the same token is idempotent, and it keeps every shape static.
    return forward(params, self.draft, last_tokens(r.seq, r.n, 2), cache.rewind(r.n - 2))

  def propose_tree(self, params, dstate, r: Round):
    out = self._root(params, dstate[0], r)

    def feed(cache, toks, pos, base, tree_mask, parent):
      o = forward(params, self.draft, toks, cache, positions=pos, mask_base=base,
                  tree_mask=tree_mask)
      return o.cache, o.logits, None

    pending = last_tokens(r.seq, r.n, 1)[:, 0]
    cache, arrays, node_slot = grow(feed, out.cache, out.logits[:, 1], pending, r.n - 1,
                                    self.tree)
    return (cache, node_slot), r.tcache, arrays

  def commit_tree(self, params, dstate, r: Round, n_new, n_acc, hidden, path):
    # Move the draft's entries of the accepted path (fed at tree slots) to contiguous slots.
    cache, node_slot = dstate
    src = jnp.take_along_axis(node_slot, path, axis=1)
    src = jnp.where(src >= 0, src, jnp.arange(path.shape[1])[None, :])
    return cache.gather_slots(r.n - 1, src), node_slot

  def propose(self, params, cache: KVCache, r: Round):
    out = self._root(params, cache, r)

    def step(cache, tok):
      o = forward(params, self.draft, tok[:, None], cache)
      return o.cache, o.logits[:, 0]

    cache, tokens, probs = draft_chain(step, out.cache, out.logits[:, 1], self.k, r.key,
                                       self.mode, r.sp, self.stop_below)
    return cache, r.tcache, tokens, probs


@dataclasses.dataclass(frozen=True, eq=False)
class DraftModel:
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

  def __post_init__(self):
    check_k(self.k)
    object.__setattr__(self, "tree", check_tree(self.tree))
    object.__setattr__(self, "stop_below", check_stop_below(self.stop_below, self.tree))
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

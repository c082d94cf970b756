"""`EarlyExit`: self-speculative drafting from the target's first layers (LayerSkip / Kangaroo /
SWIFT family), sharing the target's weights, head and KV cache.

The draft's K/V for layers < `layers` are exactly the target's (same weights, same inputs), so
the draft reads the target cache directly. Draft entries it writes past the committed length are
overwritten by the verification pass, which rewrites every layer at those slots.
"""

from __future__ import annotations

import dataclasses

from jaxspec.models import Model, forward

from .base import DrafterSpec, Round, check_k, check_tree, last_tokens
from .chain import check_stop_below, draft_chain
from .tree_draft import grow


@dataclasses.dataclass(frozen=True)
class EarlyExitSpec(DrafterSpec):
  layers: int = 1
  stop_below: float | None = None

  @property
  def draft_forwards(self) -> int:
    return self.k

  def propose(self, params, dstate, r: Round):
    tp = r.tparams

    def step(cache, tok):
      o = forward(tp, self.target, tok[:, None], cache, n_layers=self.layers)
      return o.cache, o.logits[:, 0]

    cache, first = step(r.tcache, last_tokens(r.seq, r.n, 1)[:, 0])
    cache, tokens, probs = draft_chain(step, cache, first, self.k, r.key, self.mode, r.sp,
                                       self.stop_below)
    return dstate, cache.rewind(r.n - 1), tokens, probs

  def propose_tree(self, params, dstate, r: Round):
    tp = r.tparams

    def feed(cache, toks, pos, base, tree_mask, parent):
      o = forward(tp, self.target, toks, cache, positions=pos, mask_base=base,
                  tree_mask=tree_mask, n_layers=self.layers)
      return o.cache, o.logits, None

    pending = last_tokens(r.seq, r.n, 1)[:, 0]
    root = forward(tp, self.target, pending[:, None], r.tcache, n_layers=self.layers)
    cache, arrays, _ = grow(feed, root.cache, root.logits[:, 0], pending, r.n - 1, self.tree)
    return dstate, cache.rewind(r.n - 1), arrays


@dataclasses.dataclass(frozen=True)
class EarlyExit:
  """Drafts with the target's first `layers` layers, then its final norm and head.
  stop_below: confidence-based draft length, as for `DraftModel`."""

  layers: int = 2
  k: int = 4
  tree: object = None
  stop_below: float | None = None

  def __post_init__(self):
    check_k(self.k)
    object.__setattr__(self, "tree", check_tree(self.tree))
    object.__setattr__(self, "stop_below", check_stop_below(self.stop_below, self.tree))
    if not isinstance(self.layers, int) or self.layers < 1:
      raise ValueError(f"EarlyExit layers must be a positive integer, got {self.layers!r}")

  def bind(self, target: Model):
    if self.layers >= target.config.n_layers:
      raise ValueError(f"EarlyExit(layers={self.layers}) must use fewer layers than the target "
                       f"has ({target.config.n_layers})")
    return EarlyExitSpec(k=self.k, target=target.config, layers=self.layers, tree=self.tree,
                         stop_below=self.stop_below), None

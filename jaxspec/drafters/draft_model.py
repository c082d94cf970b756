"""`DraftModel`: an independent smaller model with its own KV cache (its own tokenizer: `cross_vocab`)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxspec.models import KVCache, Model, ModelConfig, forward, head

from . import cross_vocab, registry, translate, vocab
from .base import Accepted, Drafter, DrafterSpec, Prefill, Proposal, Round, last_tokens
from .chain import catch_up, draft_chain
from .tree_draft import grow


@struct.dataclass
class DraftState:
  cache: KVCache  # the draft model's cache
  valid: jax.Array  # [B] int32: seq[:valid] has its entries in `cache`
  node_slot: jax.Array | None  # trees: [B, N] each node's slot offset from the round base, -1


@dataclasses.dataclass(frozen=True)
class DraftModelSpec(DrafterSpec):
  """params: {"model": the draft's params, "vocab": `vocab.params` or None (full head)}."""

  draft: ModelConfig | None = None
  stop_below: float | None = None

  @property
  def draft_forwards(self) -> int:
    return self.k

  def _forward(self, params, tokens, cache, *, last_only: bool = False, **kw):
    """The draft's forward; with a reduced vocabulary its head covers only those ids.
    last_only: logits of the last position only ([B, 1, V]; the head is a GEMM per
    position on CPU: T=2 with both positions' logits cost 1.45x T=1 on Qwen2.5-0.5B)."""
    vp = params["vocab"]
    out = forward(params["model"], self.draft, tokens, cache, logits=False, **kw)
    x = out.hidden[:, -1:] if last_only else out.hidden
    if vp is None:
      return out.replace(logits=head(params["model"], self.draft, x))
    return out.replace(logits=vocab.logits(vp, self.draft, x))

  def init(self, params, p: Prefill):
    b = p.prompt.shape[0]
    model = params["model"]
    cache = KVCache.like(model, self.draft, b, p.cache_size, footprint=self.cache_footprint)
    cache = forward(model, self.draft, p.prompt, cache, logits=False,
                    valid=p.prompt_lens).cache.rewind(p.prompt_lens)
    node_slot = None if self.tree is None else jnp.zeros((b, self.tree.n_nodes), jnp.int32)
    return DraftState(cache=cache, valid=p.prompt_lens.astype(jnp.int32), node_slot=node_slot)

  def _catch_up(self, params, st: DraftState, r: Round) -> KVCache:
    """Feeds the committed tokens the draft missed (plain rounds do not run it) until every
    row's cache holds seq[:n - 2] (`_root` re-feeds the last two)."""
    def feed(toks, cache, real):
      return forward(params["model"], self.draft, toks, cache, logits=False, valid=real).cache
    return catch_up(feed, st.cache, r.seq, st.valid, r.n - 2)

  def _root(self, params, cache: KVCache, r: Round):
    # The draft cache holds seq[:n - 2] (after a fully accepted round the final draft token was
    # never fed). Re-feed the last two: rewriting an entry with the same token is idempotent,
    # and it keeps every shape static.
    return self._forward(params, last_tokens(r.seq, r.n, 2), cache.rewind(r.n - 2),
                         last_only=True)

  def propose(self, params, st: DraftState, r: Round):
    out = self._root(params, self._catch_up(params, st, r), r)
    if self.tree is None:
      def step(cache, tok):
        o = self._forward(params, tok[:, None], cache)
        return o.cache, o.logits[:, 0]

      cache, tokens, probs = draft_chain(step, out.cache, out.logits[:, 0], self.k, r.key,
                                         self.mode, r.sp, self.stop_below)
      return st.replace(cache=cache), Proposal.chain(tokens, probs)

    def feed(cache, toks, pos, base, tree_mask, parent):
      o = self._forward(params, toks, cache, positions=pos, mask_base=base,
                        tree_mask=tree_mask)
      return o.cache, o.logits, None

    pending = last_tokens(r.seq, r.n, 1)[:, 0]
    cache, arrays, node_slot = grow(feed, out.cache, out.logits[:, 0], pending, r.n - 1,
                                    self.tree, sample=self.sibling_sampling(r))
    return st.replace(cache=cache, node_slot=node_slot), Proposal.from_tree(self.tree, arrays)

  def commit_plain(self, params, st: DraftState, r: Round, a: Accepted):
    # The draft falls behind and catches up at the next speculative round (`_catch_up`), so a
    # plain round costs one target step and no draft step.
    return st

  def commit(self, params, st: DraftState, r: Round, a: Accepted):
    # Every accepted draft but possibly the last was fed (a fully accepted chain never feeds
    # its final draft), so the cache holds at least seq[:n_new - 2].
    st = st.replace(valid=jnp.maximum(a.n_new - 2, 0).astype(jnp.int32))
    if self.tree is None:
      return st  # chain drafts sit in their own slots already; propose rewinds
    # Move the draft's entries of the accepted path (fed at tree slots) to contiguous slots.
    src = jnp.take_along_axis(st.node_slot, a.path, axis=1)
    src = jnp.where(src >= 0, src, jnp.arange(a.path.shape[1])[None, :])
    return st.replace(cache=st.cache.gather_slots(r.n - 1, src))


@registry.register("draft", usage="draft:SRC[@N]",
                   help="an independent smaller model (another tokenizer is translated) "
                        "(@N: draft over N token ids, see drafters.vocab)")
@dataclasses.dataclass(frozen=True, eq=False)
class DraftModel(Drafter):
  """Drafts with a separate (smaller) model.

  With the target's tokenizer the draft reads and proposes the target's own ids. With another
  tokenizer (any vocabulary, e.g. SmolLM2 drafting for Qwen2.5) it reads the committed text
  re-spelled in its own ids and proposes only tokens that are one token in both vocabularies
  (`cross_vocab`, tables from `translate`); still lossless, chains and trees, in the loop.

  Args:
    draft_model: a `jaxspec.Model` (e.g. from `jaxspec.load_model`).
    k: tokens proposed per round.
    tree: token-tree spec (see `jaxspec.trees`); None drafts a chain.
    stop_below: confidence-based draft length (chains): a row stops drafting after the first
      position whose draft top-1 probability is below this; its remaining slots are left empty
      (never accepted; lossless) and draft forwards are skipped once every row has stopped.
    vocab: a reduced draft vocabulary (`jaxspec.drafters.vocab`): None drafts over every token;
      an integer n over the end-of-sequence ids and the ids most frequent in jaxspec's built-in
      prompt set, n in all (`vocab.builtin`); a sequence of token ids over exactly those (e.g.
      `vocab.frequent(tokenizer, texts, n)` over text like yours). The draft's head then
      multiplies by n rows instead of V; lossless.
  """

  draft_model: Model
  k: int = 4
  tree: object = None
  stop_below: float | None = None
  vocab: object = None

  def check(self):
    if not isinstance(self.draft_model, Model):
      raise TypeError(f"DraftModel expects a jaxspec Model, got {type(self.draft_model).__name__}")
    # validated here so a bad vocab fails when the drafter is built, not at generate
    object.__setattr__(self, "_ids", vocab.resolve(self.vocab, self.draft_model.config,
                                                   self.draft_model.tokenizer))

  def bind(self, target: Model):
    d, t = self.draft_model.config, target.config
    dt, tt = self.draft_model.tokenizer, target.tokenizer
    if d.vocab_size != t.vocab_size or (dt is not None and tt is not None and not _same(dt, tt)):
      return self._bind_cross(target)
    spec = DraftModelSpec(k=self.k, target=t, draft=d, tree=self.tree,
                          stop_below=self.stop_below)
    model = self.draft_model.params
    vp = None if self._ids is None else vocab.params(model, d, self._ids)
    return spec, {"model": model, "vocab": vp}

  def _bind_cross(self, target: Model):
    """A draft with another tokenizer: `cross_vocab` (tables built once per target tokenizer)."""

    dm = self.draft_model
    if dm.tokenizer is None or target.tokenizer is None:
      which = "draft" if dm.tokenizer is None else "target"
      raise ValueError(f"draft {dm.name!r} and target {target.name!r} have different "
                       f"vocabularies ({dm.config.vocab_size} and {target.config.vocab_size} "
                       f"tokens) and the {which} has no tokenizer to translate between them")
    memo = self.__dict__.setdefault("_tables", {})
    key = id(target.tokenizer)
    if key not in memo:
      try:
        memo[key] = (target.tokenizer, translate.build(target.tokenizer, dm.tokenizer,
                                                       target.config.vocab_size,
                                                       dm.config.vocab_size))
      except TypeError as e:
        raise ValueError(f"cannot translate between draft {dm.name!r} and target "
                         f"{target.name!r}: {e}") from e
    tabs = memo[key][1]
    pd, pt = tabs.pair_draft, tabs.pair_target
    if self._ids is not None:  # a reduced draft vocabulary: its ids within the intersection
      keep = np.isin(pd, self._ids)
      pd, pt = pd[keep], pt[keep]
    tt = target.tokenizer
    if not np.isin(pt, [tt.bos_id, *tt.eos_ids], invert=True).any():
      raise ValueError(f"draft {dm.name!r} and target {target.name!r} share no token (no draft "
                       f"token is one target token with the same text), so the draft cannot "
                       f"propose anything")
    spec = cross_vocab.CrossVocabSpec(
        k=self.k, target=target.config, draft=dm.config, tree=self.tree,
        stop_below=self.stop_below, expansion=round(tabs.expansion, 3), prepend=tabs.prepend,
        target_bos=tt.bos_id, lead=bool((tabs.lead != tabs.spell).any()))
    to_draft = np.zeros(target.config.vocab_size, np.int32)
    to_draft[pt] = pd
    head = vocab.params(dm.params, dm.config, pd)
    head["ids"] = jnp.asarray(pt)
    tables = {"spell": tabs.spell, "spell_len": tabs.spell_len, "lead": tabs.lead,
              "lead_len": tabs.lead_len, "to_draft": to_draft}
    return spec, {"model": dm.params, "head": head,
                  "tables": jax.tree.map(jnp.asarray, tables)}

  def draft_forward(self, target):
    return self.draft_model.params, self.draft_model.config, None

  @classmethod
  def from_cli(cls, arg: str, k: int, tree: int | None) -> "DraftModel":
    import jaxspec

    if not arg:
      raise ValueError("--drafter draft needs a model, e.g. draft:stories260K")
    src, at, size = arg.rpartition("@")
    if not at or not size.isdigit():
      src, size = arg, None
    model = jaxspec.load_model(src)
    return cls(model, k=k, tree=registry.dynamic_tree(tree, k),
               vocab=None if size is None else int(size))


def _same(a, b) -> bool:
  """Whether two tokenizers give the same ids (a probe text and the end-of-sequence ids)."""
  if a is b:
    return True
  probe = "Hello world 123, ça va? 你好\n\tdef f(x): return x**2  # done."
  return (a.encode(probe) == b.encode(probe) and tuple(a.eos_ids) == tuple(b.eos_ids)
          and a.vocab_size == b.vocab_size)

"""`DraftModel`: an independent smaller model with the same tokenizer and its own KV cache."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxspec.models import KVCache, Model, ModelConfig, forward

from .base import DrafterSpec, Round, check_k, last_tokens
from .chain import draft_chain


@dataclasses.dataclass(frozen=True)
class DraftModelSpec(DrafterSpec):
  draft: ModelConfig | None = None

  @property
  def draft_forwards(self) -> int:
    return self.k

  def init(self, params, tparams, prompt, prompt_lens, cache_size, hidden):
    cache = KVCache.init(self.draft, prompt.shape[0], cache_size, params["embed"].dtype)
    out = forward(params, self.draft, prompt, cache, logits=False)
    return out.cache.rewind(prompt_lens)

  def propose(self, params, cache: KVCache, r: Round):
    # The draft cache holds every committed token but possibly the last two (after a fully
    # accepted round the final draft token was never fed). Re-feed both: rewriting an entry
    # with the same token is idempotent, and it keeps every shape static.
    cache = cache.rewind(r.n - 2)
    out = forward(params, self.draft, last_tokens(r.seq, r.n, 2), cache)

    def step(cache, tok):
      o = forward(params, self.draft, tok[:, None], cache)
      return o.cache, o.logits[:, 0]

    cache, tokens, probs = draft_chain(step, out.cache, out.logits[:, 1], self.k, r.key,
                                       self.mode, r.sp)
    return cache, r.tcache, tokens, probs


@dataclasses.dataclass(frozen=True, eq=False)
class DraftModel:
  """Drafts with a separate (smaller) model that shares the target's tokenizer.

  Args:
    draft_model: a `jaxspec.Model` (e.g. from `jaxspec.load_model`).
    k: tokens proposed per round.
    tree: token-tree spec (see `jaxspec.trees`); None drafts a chain.
  """

  draft_model: Model
  k: int = 4
  tree: object = None

  def __post_init__(self):
    check_k(self.k)
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
    spec = DraftModelSpec(k=self.k, target=t, draft=d)
    return spec, self.draft_model.params

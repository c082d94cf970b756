"""Autoregressive chain drafting with `lax.scan`, shared by model-based drafters."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxspec import sampling
from jaxspec.models import KVCache
from jaxspec.sampling import SamplingMode, SamplingParams

from .base import last_tokens

INVALID = -1  # a draft slot left empty: never accepted, verification stops there


def _confidence(logits: jax.Array, q: jax.Array | None) -> jax.Array:
  """[B] top-1 probability of the distribution a draft was taken from."""
  return jnp.max(jax.nn.softmax(logits, axis=-1) if q is None else q, axis=-1)


def draft_chain(step: Callable, carry, first_logits: jax.Array, k: int, key: jax.Array,
                mode: SamplingMode, sp: SamplingParams, stop_below: float | None = None):
  """Samples k tokens: the first from `first_logits` [B, V], then `step(carry, tok) -> (carry,
  logits)` feeds each drafted token back. Returns (carry, tokens [B, k], probs [B, k, V] | None).

  Exactly k - 1 calls of `step` (the logits of the last drafted token are never needed).

  stop_below: confidence-based draft length inside the fixed shape. After the first position
  whose draft top-1 probability is below it, a row's remaining drafts are `INVALID` (never
  accepted, so verification stops there and the target's own token at that position keeps the
  round exact), and `step` is skipped once every row has stopped.
  """
  keys = sampling.split(key, k)  # [k] or [k, B] (one key per row)
  tok, q = sampling.sample(keys[0], first_logits, mode, sp)
  go = None if stop_below is None else _confidence(first_logits, q) >= stop_below

  def body(c, key_j):
    carry, tok, go = c
    if go is None:
      carry, logits = step(carry, tok)
    else:  # every row stopped: skip the draft forward
      carry, logits = jax.lax.cond(jnp.any(go), step,
                                   lambda cr, _: (cr, jnp.zeros_like(first_logits)), carry, tok)
    t, q = sampling.sample(key_j, logits, mode, sp)
    if go is None:
      return (carry, t, go), (t, q)
    return (carry, t, go & (_confidence(logits, q) >= stop_below)), (jnp.where(go, t, INVALID), q)

  (carry, _, _), (toks, qs) = jax.lax.scan(body, (carry, tok, go), keys[1:])
  tokens = jnp.concatenate([tok[:, None], toks.T], axis=1)  # [B, k]
  probs = None if q is None else jnp.concatenate([q[:, None], jnp.swapaxes(qs, 0, 1)], axis=1)
  return carry, tokens, probs


CATCH_UP = (64, 8)  # tokens per draft forward when the draft catches up after plain rounds:
# 64 at a time while a row is that far behind (a wide forward costs far less per token on CPU),
# then 8


def catch_up(feed, cache: KVCache, seq: jax.Array, valid: jax.Array, goal: jax.Array) -> KVCache:
  """Feeds seq[valid:goal] ([B, L] tokens, [B] bounds) into a draft cache in chunks
  (`CATCH_UP`); `feed(tokens [B, c], cache rewound to the chunk's start, real [B]) -> cache`,
  where each row's first `real` tokens are below its goal (pass it to `forward(valid=...)`: a
  draft cache with ring layers writes only those). The rest of a chunk runs past `goal` into
  slots that are rewritten before anything attends to them."""
  carry = (cache, jnp.minimum(valid, goal))
  for i, c in enumerate(CATCH_UP):
    last = i == len(CATCH_UP) - 1

    def cond(x, c=c, last=last):  # the last size runs until every row is done
      return jnp.any(x[1] < goal) if last else jnp.any(x[1] + c <= goal)

    def body(x, c=c):
      cache, start = x
      toks = last_tokens(seq, start + c, c)  # [B, c] = seq[start : start + c]
      real = jnp.clip(goal - start, 0, c)
      return feed(toks, cache.rewind(start), real), jnp.minimum(start + c, goal)

    carry = jax.lax.while_loop(cond, body, carry)
  return carry[0]

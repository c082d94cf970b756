"""Autoregressive chain drafting with `lax.scan`, shared by model-based drafters."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxspec import sampling
from jaxspec.sampling import SamplingMode, SamplingParams


def draft_chain(step: Callable, carry, first_logits: jax.Array, k: int, key: jax.Array,
                mode: SamplingMode, sp: SamplingParams):
  """Samples k tokens: the first from `first_logits` [B, V], then `step(carry, tok) -> (carry,
  logits)` feeds each drafted token back. Returns (carry, tokens [B, k], probs [B, k, V] | None).

  Exactly k - 1 calls of `step` (the logits of the last drafted token are never needed).
  """
  keys = jax.random.split(key, k)
  tok, q = sampling.sample(keys[0], first_logits, mode, sp)

  def body(c, key_j):
    carry, tok = c
    carry, logits = step(carry, tok)
    t, q = sampling.sample(key_j, logits, mode, sp)
    return (carry, t), (t, q)

  (carry, _), (toks, qs) = jax.lax.scan(body, (carry, tok), keys[1:])
  tokens = jnp.concatenate([tok[:, None], toks.T], axis=1)  # [B, k]
  probs = None if q is None else jnp.concatenate([q[:, None], jnp.swapaxes(qs, 0, 1)], axis=1)
  return carry, tokens, probs

"""Acceptance of drafted chains: greedy prefix match and lossless rejection sampling.

Both return `(n_accepted [B], tokens [B, k+1])`: the first `n_accepted` tokens are the accepted
drafts and token `n_accepted` is the target's correction (on rejection) or bonus (all accepted).

Sampling follows Leviathan et al. / Chen et al.: accept draft d_i ~ q with probability
min(1, p(d_i) / q(d_i)); on the first rejection draw from normalise(max(p - q, 0)); when all
k drafts pass, draw a bonus token from p at position k. The output is then distributed exactly
as the target's own sampling. Deterministic drafters (n-gram lookup) pass `draft_probs=None`,
meaning q is one-hot on the proposed token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import sampling
from .sampling import SamplingMode, SamplingParams


def _count_leading(accept: jax.Array) -> jax.Array:
  """Number of leading True values per row of [B, k]."""
  return jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=-1), axis=-1)


def _place(drafts: jax.Array, n_acc: jax.Array, last: jax.Array) -> jax.Array:
  """[B, k+1]: drafts in front, `last` [B] at index n_acc."""
  b, k = drafts.shape
  out = jnp.concatenate([drafts, jnp.zeros((b, 1), drafts.dtype)], axis=1)
  return out.at[jnp.arange(b), n_acc].set(last)


def greedy(drafts: jax.Array, target_logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """drafts [B, k]; target_logits [B, k+1, V] (position i predicts the token after draft i)."""
  g = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [B, k+1]
  n_acc = _count_leading(drafts == g[:, :-1])
  last = jnp.take_along_axis(g, n_acc[:, None], axis=1)[:, 0]
  return n_acc, _place(drafts, n_acc, last)


def rejection(key: jax.Array, drafts: jax.Array, draft_probs: jax.Array | None,
              target_logits: jax.Array, mode: SamplingMode,
              sp: SamplingParams) -> tuple[jax.Array, jax.Array]:
  """Lossless rejection sampling. draft_probs: [B, k, V] (already warped) or None (one-hot)."""
  b, k = drafts.shape
  p = sampling.probs(target_logits, mode, sp)  # [B, k+1, V]
  v = p.shape[-1]
  p_d = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]  # [B, k]
  if draft_probs is None:
    q = jax.nn.one_hot(drafts, v, dtype=p.dtype)
    q_d = jnp.ones_like(p_d)
  else:
    q = draft_probs
    q_d = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
  k_u, k_r = jax.random.split(key)
  u = jax.random.uniform(k_u, (b, k))
  n_acc = _count_leading(u * q_d < p_d)
  # Residual at the first rejected position, or p itself at position k (bonus token).
  q_pad = jnp.concatenate([q, jnp.zeros((b, 1, v), q.dtype)], axis=1)  # [B, k+1, V]
  resid = jnp.maximum(p - q_pad, 0.0)
  resid = jnp.take_along_axis(resid, n_acc[:, None, None], axis=1)[:, 0]  # [B, V]
  p_at = jnp.take_along_axis(p, n_acc[:, None, None], axis=1)[:, 0]
  # p == q exactly makes the residual empty, but then nothing is ever rejected; guard anyway.
  resid = jnp.where(jnp.sum(resid, -1, keepdims=True) > 0, resid, p_at)
  last = sampling.categorical_from_probs(k_r, resid)
  return n_acc, _place(drafts, n_acc, last)


def chain(key: jax.Array, drafts: jax.Array, draft_probs: jax.Array | None,
          target_logits: jax.Array, mode: SamplingMode,
          sp: SamplingParams) -> tuple[jax.Array, jax.Array]:
  if mode.greedy:
    return greedy(drafts, target_logits)
  return rejection(key, drafts, draft_probs, target_logits, mode, sp)

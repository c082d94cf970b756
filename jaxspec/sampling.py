"""One warp for draft, target and verifier: temperature, then top-k, then top-p (HF's order).

The choice of *which* warps are active is static (`SamplingMode`, a jit static argument); their
values are traced (`SamplingParams`), so changing temperature or top-p never recompiles.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from jaxspec import validate


@dataclasses.dataclass(frozen=True)
class SamplingMode:
  greedy: bool = True
  top_k: bool = False
  top_p: bool = False


@struct.dataclass
class SamplingParams:
  temperature: jax.Array  # [] float32, > 0 when sampling
  top_k: jax.Array  # [] int32, >= 1
  top_p: jax.Array  # [] float32, in (0, 1]


# Below this, temperature is greedy decoding: a distribution that sharp is the argmax to
# float32 precision (it only differs on logits closer than their rounding error), and dividing
# by smaller values underflows (1e-38 and below are zero or subnormal in float32, flushed to
# zero on accelerators) or overflows the scaled logits into inf/NaN.
MIN_TEMPERATURE = 1e-6


def make(temperature: float = 0.0, top_k: int | None = None,
         top_p: float | None = None) -> tuple[SamplingMode, SamplingParams]:
  """Validates user settings and splits them into the static mode and the traced values."""
  temperature = validate.temperature(temperature)
  top_k = validate.top_k(top_k)
  top_p = validate.top_p(top_p)
  greedy = temperature < MIN_TEMPERATURE
  mode = SamplingMode(greedy=greedy, top_k=(top_k is not None) and not greedy,
                      top_p=(top_p is not None and top_p < 1.0) and not greedy)
  params = SamplingParams(
      temperature=jnp.asarray(temperature if not greedy else 1.0, jnp.float32),
      top_k=jnp.asarray(top_k or 1, jnp.int32),
      top_p=jnp.asarray(1.0 if top_p is None else top_p, jnp.float32))
  return mode, params


def warp_logits(logits: jax.Array, mode: SamplingMode, sp: SamplingParams) -> jax.Array:
  """Temperature, top-k and top-p applied to float32 logits [..., V]; removed tokens get -inf."""
  x = logits.astype(jnp.float32)
  # Shift by the max first: the top logit is exactly 0 after scaling, however small the
  # temperature, so exp never overflows (dividing first made 1e-10 draw token 0 from NaNs).
  x = (x - jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))) / sp.temperature
  if not (mode.top_k or mode.top_p):
    return x
  v = x.shape[-1]
  desc = -jnp.sort(-x, axis=-1)  # [..., V] descending
  keep = jnp.ones(desc.shape, bool)
  if mode.top_k:
    keep &= jnp.arange(v) < sp.top_k
  if mode.top_p:
    masked = jnp.where(keep, desc, -jnp.inf)
    p = jax.nn.softmax(masked, axis=-1)
    before = jnp.cumsum(p, axis=-1) - p  # probability mass ranked strictly above each token
    keep &= (before < sp.top_p) | (jnp.arange(v) == 0)
  # Smallest kept logit; everything below it goes.
  thresh = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(x >= thresh, x, -jnp.inf)


def probs(logits: jax.Array, mode: SamplingMode, sp: SamplingParams) -> jax.Array:
  """The sampling distribution [..., V] (one-hot argmax when greedy)."""
  if mode.greedy:
    return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
  return jax.nn.softmax(warp_logits(logits, mode, sp), axis=-1)


def sample(key: jax.Array, logits: jax.Array, mode: SamplingMode,
           sp: SamplingParams) -> tuple[jax.Array, jax.Array | None]:
  """Draws tokens [...] from logits [..., V]; returns (tokens, probs or None when greedy)."""
  if mode.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), None
  p = probs(logits, mode, sp)
  tok = jax.random.categorical(key, jnp.log(p), axis=-1).astype(jnp.int32)
  return tok, p


def categorical_from_probs(key: jax.Array, p: jax.Array) -> jax.Array:
  """Draws from an unnormalised non-negative distribution [..., V]."""
  return jax.random.categorical(key, jnp.log(p), axis=-1).astype(jnp.int32)

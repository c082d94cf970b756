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
  return categorical(key, jnp.log(p)), p


def categorical_from_probs(key: jax.Array, p: jax.Array) -> jax.Array:
  """Draws from an unnormalised non-negative distribution [..., V]."""
  return categorical(key, jnp.log(p))


# Random draws with one key, or one key per row --------------------------------------------
# The engine keeps a key per row ([B] keys, folded from the seed and the row's id), so what a
# row draws depends on its own key alone, never on the batch size, its slot or the other rows.
# Every helper takes either one key (draws for the whole array, as jax.random does) or [B] keys
# (row b's draws from keys[b]; arrays then have the batch as their leading axis).


def per_row(key: jax.Array) -> bool:
  """True for a [B] array of keys (typed keys [B] or raw uint32 keys [B, 2])."""
  typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
  return key.ndim >= (1 if typed else 2)


def split(key: jax.Array, num: int) -> jax.Array:
  """[num, *key.shape]: `num` new keys (per row when `key` is per row)."""
  if not per_row(key):
    return jax.random.split(key, num)
  return jnp.swapaxes(jax.vmap(lambda k: jax.random.split(k, num))(key), 0, 1)


def fold_in(key: jax.Array, data) -> jax.Array:
  if not per_row(key):
    return jax.random.fold_in(key, data)
  return jax.vmap(lambda k: jax.random.fold_in(k, data))(key)


def uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Uniform [0, 1) float32 of `shape` (per row: shape[0] == B, row b from key b)."""
  if not per_row(key):
    return jax.random.uniform(key, shape)
  return jax.vmap(lambda k: jax.random.uniform(k, shape[1:]))(key)


def gumbel(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Standard Gumbel float32 of `shape` (per row: shape[0] == B, row b from key b)."""
  if not per_row(key):
    return jax.random.gumbel(key, shape)
  return jax.vmap(lambda k: jax.random.gumbel(k, shape[1:]))(key)


def categorical(key: jax.Array, logp: jax.Array) -> jax.Array:
  """Tokens [...] drawn from log-probabilities [..., V] (per row: leading axis B)."""
  if not per_row(key):
    return jax.random.categorical(key, logp, axis=-1).astype(jnp.int32)
  return jax.vmap(lambda k, x: jax.random.categorical(k, x, axis=-1))(key, logp).astype(jnp.int32)

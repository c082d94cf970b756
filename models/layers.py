"""Building blocks of a Llama-family decoder: RMSNorm, RoPE, attention, SwiGLU.

Dimension letters: B batch, T new tokens, S cache slots, D model dim, N query heads,
K kv heads, G query heads per kv head, H head dim, F MLP hidden dim, V vocabulary.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from .config import ModelConfig, RopeScaling


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * w.astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(config: ModelConfig) -> jax.Array:
  """Inverse frequencies [H/2], with Llama 3 scaling when configured."""
  h = config.head_dim
  inv = 1.0 / (config.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  s: RopeScaling | None = config.rope_scaling
  if s is None:
    return inv
  low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  wavelen = 2 * math.pi / inv
  smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
      s.high_freq_factor - s.low_freq_factor)
  scaled = jnp.where(wavelen > low_wavelen, inv / s.factor, inv)
  mid = (1 - smooth) * inv / s.factor + smooth * inv
  is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(is_mid, mid, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array, layout: str) -> jax.Array:
  """Rotates x [B, T, N, H] by positions [B, T]."""
  ang = positions[:, :, None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
  cos = jnp.cos(ang)[:, :, None, :]
  sin = jnp.sin(ang)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  if layout == "interleaved":
    x1, x2 = x32[..., 0::2], x32[..., 1::2]
    y = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).reshape(x.shape)
  else:
    half = x.shape[-1] // 2
    x1, x2 = x32[..., :half], x32[..., half:]
    y = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return y.astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Grouped-query attention.

  q: [B, T, N, H]; k, v: [B, S, K, H]; mask: [B, T, S] (True = may attend). Returns [B, T, N, H].
  Scores and softmax are computed in float32.
  """
  b, t, n, h = q.shape
  kh = k.shape[2]
  q = q.reshape(b, t, kh, n // kh, h)
  s = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
  s = s * (1.0 / math.sqrt(h))
  s = jnp.where(mask[:, None, None, :, :], s, jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  o = jnp.einsum("BKGTS,BSKH->BTKGH", p, v, preferred_element_type=jnp.float32)
  return o.reshape(b, t, n, h).astype(q.dtype)


def attention_live(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                   limit: jax.Array, chunk: int) -> jax.Array:
  """Grouped-query attention over a cache buffer, reading only the slots in use.

  q: [B, T, N, H]; k, v: [B, S, K, H]; mask: [B, T, S]; limit: [] int32, no query sees a slot
  >= limit (the longest row's live length after this write). The
  slots are visited in chunks of `chunk` (<= S) with an online softmax, and only the first
  ceil(limit / chunk) chunks are read, so a step costs the live length, not the buffer. (When
  chunk does not divide S the last chunk is shifted back to end at S; its slots that the
  previous chunk already covered are masked out.)
  Equal to `attention(q, k, v, mask)` up to float32 rounding.
  """
  b, t, n, h = q.shape
  size, kh = k.shape[1], k.shape[2]
  qg = q.reshape(b, t, kh, n // kh, h)
  scale = 1.0 / math.sqrt(h)
  neg = jnp.finfo(jnp.float32).min

  def body(c, carry):
    m, l, acc = carry  # m, l: [B, K, G, T] running max and sum; acc: [B, K, G, T, H]
    start = jnp.minimum(c * chunk, size - chunk)
    kc = jax.lax.dynamic_slice_in_dim(k, start, chunk, axis=1)  # [B, C, K, H]
    vc = jax.lax.dynamic_slice_in_dim(v, start, chunk, axis=1)
    fresh = start + jnp.arange(chunk) >= c * chunk  # [C]: not seen by an earlier chunk
    mk = (jax.lax.dynamic_slice_in_dim(mask, start, chunk, axis=2) & fresh)[:, None, None]
    s = jnp.einsum("BTKGH,BSKH->BKGTS", qg, kc, preferred_element_type=jnp.float32) * scale
    s = jnp.where(mk, s, neg)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    p = jnp.where(mk, jnp.exp(s - m_new[..., None]), 0.0)
    corr = jnp.exp(m - m_new)
    l = l * corr + jnp.sum(p, axis=-1)
    acc = acc * corr[..., None] + jnp.einsum("BKGTS,BSKH->BKGTH", p.astype(vc.dtype), vc,
                                              preferred_element_type=jnp.float32)
    return m_new, l, acc

  shape = (b, kh, n // kh, t)
  init = (jnp.full(shape, neg, jnp.float32), jnp.zeros(shape, jnp.float32),
          jnp.zeros(shape + (h,), jnp.float32))
  n_live = jnp.clip((limit + chunk - 1) // chunk, 1, -(-size // chunk))
  _, l, acc = jax.lax.fori_loop(0, n_live, body, init)
  o = acc / jnp.maximum(l, 1e-30)[..., None]  # [B, K, G, T, H]
  return jnp.einsum("BKGTH->BTKGH", o).reshape(b, t, n, h).astype(q.dtype)


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
  g = jnp.einsum("BTD,DF->BTF", x, w_gate)
  u = jnp.einsum("BTD,DF->BTF", x, w_up)
  return jnp.einsum("BTF,FD->BTD", jax.nn.silu(g) * u, w_down)

"""Building blocks of a Llama / Gemma decoder: RMSNorm, RoPE, attention, SwiGLU / GeGLU.

Dimension letters: B batch, T new tokens, S cache slots, D model dim, N query heads,
K kv heads, G query heads per kv head, H head dim, F MLP hidden dim, V vocabulary.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from .config import ModelConfig, RopeScaling


def rms_norm(x: jax.Array, w: jax.Array, eps: float, plus_one: bool = False) -> jax.Array:
  """RMSNorm in float32; `plus_one` applies (1 + w) (Gemma stores the weight minus one)."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  w32 = w.astype(jnp.float32)
  return (y * (1.0 + w32 if plus_one else w32)).astype(x.dtype)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
  """cap * tanh(x / cap) (Gemma 2 attention and final logit soft-capping); identity for None."""
  return x if cap is None else cap * jnp.tanh(x / cap)


def rope_inv_freq(config: ModelConfig, local: bool = False) -> jax.Array:
  """Inverse frequencies [H/2], with Llama 3 or linear scaling when configured.

  local: for sliding-window layers of a model with its own local base (`rope_local_theta`,
  Gemma 3), which use that base and no scaling."""
  h = config.head_dim
  if local and config.rope_local_theta is not None:
    return 1.0 / (config.rope_local_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  inv = 1.0 / (config.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  s: RopeScaling | None = config.rope_scaling
  if s is None:
    return inv
  if s.rope_type == "linear":
    return inv / s.factor
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


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
              scale: float | None = None, cap: float | None = None) -> jax.Array:
  """Grouped-query attention.

  q: [B, T, N, H]; k, v: [B, S, K, H]; mask: [B, T, S] (True = may attend). Returns [B, T, N, H].
  Scores (times `scale`, default H ** -0.5, then soft-capped at `cap`) and softmax are computed
  in float32.
  """
  b, t, n, h = q.shape
  kh = k.shape[2]
  q = q.reshape(b, t, kh, n // kh, h)
  s = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
  s = softcap(s * (1.0 / math.sqrt(h) if scale is None else scale), cap)
  s = jnp.where(mask[:, None, None, :, :], s, jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  o = jnp.einsum("BKGTS,BSKH->BTKGH", p, v, preferred_element_type=jnp.float32)
  return o.reshape(b, t, n, h).astype(q.dtype)


def attention_live(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                   limit: jax.Array, chunk: int, *, lo: jax.Array | None = None,
                   scale: float | None = None, cap: float | None = None) -> jax.Array:
  """Grouped-query attention over a cache buffer, reading only the slots in use.

  q: [B, T, N, H]; k, v: [B, S, K, H]; mask: [B, T, S]; limit: [] int32, no query sees a slot
  >= limit (the longest row's live length after this write). The
  slots are visited in chunks of `chunk` (<= S) with an online softmax, and only the first
  ceil(limit / chunk) chunks are read, so a step costs the live length, not the buffer. (When
  chunk does not divide S the last chunk is shifted back to end at S; its slots that the
  previous chunk already covered are masked out.)
  lo: [B] (sliding-window layers) no query of row b sees a slot below lo[b], and limit is then
  per row ([B]): row b reads only the chunks from lo[b] up to limit[b], so a step costs the
  window, not the context.
  Equal to `attention(q, k, v, mask, scale=scale, cap=cap)` up to float32 rounding.
  """
  b, t, n, h = q.shape
  size, kh = k.shape[1], k.shape[2]
  qg = q.reshape(b, t, kh, n // kh, h)
  scale = 1.0 / math.sqrt(h) if scale is None else scale
  neg = jnp.finfo(jnp.float32).min
  rows = jnp.zeros((b,), jnp.int32) if lo is None else lo.astype(jnp.int32)  # [B] first slot
  take = jax.vmap(lambda x, s: jax.lax.dynamic_slice_in_dim(x, s, chunk, axis=0))

  def body(c, carry):
    m, l, acc = carry  # m, l: [B, K, G, T] running max and sum; acc: [B, K, G, T, H]
    first = rows + c * chunk  # [B]
    if lo is None:  # one shared window of slots: plain slices
      start = jnp.minimum(c * chunk, size - chunk)
      kc = jax.lax.dynamic_slice_in_dim(k, start, chunk, axis=1)  # [B, C, K, H]
      vc = jax.lax.dynamic_slice_in_dim(v, start, chunk, axis=1)
      mk = jax.lax.dynamic_slice_in_dim(mask, start, chunk, axis=2)  # [B, T, C]
      fresh = (start + jnp.arange(chunk) >= first[:, None])[:, None, :]  # [B, 1, C]
    else:  # each row its own window of slots
      start = jnp.minimum(first, size - chunk)  # [B]
      kc, vc = take(k, start), take(v, start)
      mk = jax.vmap(lambda x, s: jax.lax.dynamic_slice_in_dim(x, s, chunk, axis=1))(mask, start)
      fresh = (start[:, None] + jnp.arange(chunk) >= first[:, None])[:, None, :]
    mk = (mk & fresh)[:, None, None]  # [B, 1, 1, T, C]; fresh: not seen by an earlier chunk
    s = jnp.einsum("BTKGH,BSKH->BKGTS", qg, kc, preferred_element_type=jnp.float32) * scale
    s = jnp.where(mk, softcap(s, cap), neg)
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
  span = limit - rows if lo is not None else limit
  n_live = jnp.clip(jnp.max((span + chunk - 1) // chunk), 1, -(-size // chunk))
  _, l, acc = jax.lax.fori_loop(0, n_live, body, init)
  o = acc / jnp.maximum(l, 1e-30)[..., None]  # [B, K, G, T, H]
  return jnp.einsum("BKGTH->BTKGH", o).reshape(b, t, n, h).astype(q.dtype)


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
           act: str = "silu") -> jax.Array:
  """Gated MLP: SwiGLU (act="silu") or Gemma's GeGLU with tanh-approximated GELU."""
  g = jnp.einsum("BTD,DF->BTF", x, w_gate)
  u = jnp.einsum("BTD,DF->BTF", x, w_up)
  g = jax.nn.silu(g) if act == "silu" else jax.nn.gelu(g, approximate=True)
  return jnp.einsum("BTF,FD->BTD", g * u, w_down)

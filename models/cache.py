"""The KV cache: a pytree with one length per row.

Rows of a batch advance independently (speculative rounds accept different counts), so the
cache keeps `lengths: int32[B]`. Rejected draft tokens are rolled back by rewinding `lengths`;
their stale entries stay in memory but are masked out and overwritten by the next write.

Sliding-window layers (Mistral, Gemma 2 / 3 local layers) use the same buffer: `forward` masks
slots outside each query's window and, on chunked buffers, reads only each row's window chunks,
so a decode step on a local layer costs the window, not the context. Memory is NOT reduced: every
layer keeps `size` slots. A ring buffer of window + speculative footprint slots would need the
engine's padded prefill to tell the cache each row's true prompt length (padding written past it
would otherwise wrap onto live window entries before `rewind` runs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from .config import ModelConfig


@struct.dataclass
class KVCache:
  k: jax.Array  # [L, B, S, K, H], or a tuple of L [B, S, K, H] (per-layer, see models.layout)
  v: jax.Array  # same as k
  lengths: jax.Array  # [B] int32: live entries per row (slots 0 .. lengths-1)

  @classmethod
  def init(cls, config: ModelConfig, batch: int, size: int, dtype=jnp.float32, *,
           per_layer: bool = False) -> "KVCache":
    """An empty cache; `per_layer` keeps one buffer per layer (to go with per-layer weights)."""
    row = (batch, size, config.n_kv_heads, config.head_dim)
    if per_layer:
      k = tuple(jnp.zeros(row, dtype) for _ in range(config.n_layers))
      v = tuple(jnp.zeros(row, dtype) for _ in range(config.n_layers))
    else:
      k, v = jnp.zeros((config.n_layers,) + row, dtype), jnp.zeros((config.n_layers,) + row, dtype)
    return cls(k=k, v=v, lengths=jnp.zeros((batch,), jnp.int32))

  @classmethod
  def like(cls, params, config: ModelConfig, batch: int, size: int, dtype=None) -> "KVCache":
    """An empty cache laid out like `params`' layers (per-layer weights get per-layer buffers)."""
    from . import layout
    dtype = params["embed"].dtype if dtype is None else dtype
    return cls.init(config, batch, size, dtype, per_layer=layout.is_per_layer(params))

  @property
  def per_layer(self) -> bool:
    return isinstance(self.k, tuple)

  @property
  def lead(self) -> tuple:
    """Index slices before the batch axis of each buffer (`(slice(None),)` for a stacked
    [L, B, ...] buffer, `()` for a per-layer [B, ...] one): `buf.at[self.lead + (rows,)]`
    addresses the same rows either way."""
    return () if self.per_layer else (slice(None),)

  def map_rows(self, fn, other: "KVCache | None" = None) -> "KVCache":
    """Applies `fn(buf, lead)` (or `fn(buf, lead, other_buf)`, buffers of `other` paired with
    this cache's) to every K and V buffer (see `lead`)."""
    if other is None:
      f = lambda x: fn(x, self.lead)
      return self.replace(k=jax.tree.map(f, self.k), v=jax.tree.map(f, self.v))
    f = lambda x, y: fn(x, self.lead, y)
    return self.replace(k=jax.tree.map(f, self.k, other.k), v=jax.tree.map(f, self.v, other.v))

  @property
  def size(self) -> int:
    return self.k[0].shape[1] if self.per_layer else self.k.shape[2]

  @property
  def batch(self) -> int:
    return self.lengths.shape[0]

  def rewind(self, lengths: jax.Array) -> "KVCache":
    """Sets the live length of each row; entries past it are dead (rollback costs nothing)."""
    return self.replace(lengths=lengths.astype(jnp.int32))

  def gather_slots(self, start: jax.Array, src: jax.Array) -> "KVCache":
    """Moves entries at slots `start + src[b, j]` to the contiguous slots `start + j` (every layer).

    Used to commit an accepted tree path: `src[b, j]` is the tree-node index (relative to the
    row's pre-round length `start[b]`) that becomes the j-th committed token.
    start: [B]; src: [B, J].
    """
    j = jnp.arange(src.shape[1])
    dst_slots = start[:, None] + j[None, :]  # [B, J]
    src_slots = start[:, None] + src  # [B, J]
    b = jnp.arange(self.batch)[:, None]

    def move(buf, lead):  # [L, B, S, K, H] or [B, S, K, H]
      picked = buf[lead + (b, src_slots)]  # [(L,) B, J, K, H]
      return buf.at[lead + (b, dst_slots)].set(picked, mode="drop")

    return self.map_rows(move)


def write_rows(buf: jax.Array, slots: jax.Array, new: jax.Array) -> jax.Array:
  """Scatters `new` [B, T, K, H] into one layer's `buf` [B, S, K, H] at slots [B, T] (slots
  past the end are dropped, as in `write_layer`)."""
  b = jnp.arange(buf.shape[0])[:, None]
  return buf.at[b, slots].set(new.astype(buf.dtype), mode="drop")


def write_layer(buf: jax.Array, layer: jax.Array, slots: jax.Array, new: jax.Array) -> jax.Array:
  """Scatters `new` [B, T, K, H] into `buf` [L, B, S, K, H] at layer `layer`, slots [B, T].

  Slots past the end are dropped rather than clamped, so an overflowing write can never
  corrupt live entries.
  """
  b = jnp.arange(buf.shape[1])[:, None]
  return buf.at[layer, b, slots].set(new.astype(buf.dtype), mode="drop")

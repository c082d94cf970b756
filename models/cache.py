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
  k: jax.Array  # [L, B, S, K, H]
  v: jax.Array  # [L, B, S, K, H]
  lengths: jax.Array  # [B] int32: live entries per row (slots 0 .. lengths-1)

  @classmethod
  def init(cls, config: ModelConfig, batch: int, size: int, dtype=jnp.float32) -> "KVCache":
    shape = (config.n_layers, batch, size, config.n_kv_heads, config.head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
               lengths=jnp.zeros((batch,), jnp.int32))

  @property
  def size(self) -> int:
    return self.k.shape[2]

  @property
  def batch(self) -> int:
    return self.k.shape[1]

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

    def move(buf):  # [L, B, S, K, H]
      picked = buf[:, b, src_slots]  # [L, B, J, K, H]
      return buf.at[:, b, dst_slots].set(picked, mode="drop")

    return self.replace(k=move(self.k), v=move(self.v))


def write_layer(buf: jax.Array, layer: jax.Array, slots: jax.Array, new: jax.Array) -> jax.Array:
  """Scatters `new` [B, T, K, H] into `buf` [L, B, S, K, H] at layer `layer`, slots [B, T].

  Slots past the end are dropped rather than clamped, so an overflowing write can never
  corrupt live entries.
  """
  b = jnp.arange(buf.shape[1])[:, None]
  return buf.at[layer, b, slots].set(new.astype(buf.dtype), mode="drop")

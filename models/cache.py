"""The KV cache: a pytree with one length per row.

Rows of a batch advance independently (speculative rounds accept different counts), so the
cache keeps `lengths: int32[B]`. Rejected draft tokens are rolled back by rewinding `lengths`;
their stale entries stay in memory but are masked out and overwritten by the next write.

Sliding-window layers (Mistral, Gemma 2 / 3 local layers) keep only what the window needs when
the cache is made with a `footprint` (the most slots one speculative forward writes past the
committed length): each local layer then has a ring of `R = window + footprint - 1` slots, slot
s living at ring index s mod R, and global layers keep the whole buffer (such a cache is always
per-layer, since the layers' buffers differ in size). Why R suffices: a query at position p
reads the window's committed slots p - W + 1 .. p - 1 and this forward's own slots; every write
so far reached at most `lengths + footprint - 1`, so no stale (rejected) draft can have wrapped
onto a slot the window still needs, and slots older than the window that were overwritten are
masked by the window anyway. A forward of more than `footprint` tokens (a prefill) attends over
the ring as it was plus its own new keys, and writes only the last R real tokens of each row
(`forward(valid=...)`: padding is never written, so it cannot wrap onto live entries).
Without a footprint (or when R would not be smaller than the buffer) every layer keeps `size`
slots and `forward` masks slots outside each query's window.
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
  ring: int = struct.field(pytree_node=False, default=0)  # slots of each local layer's ring (0: none)
  footprint: int = struct.field(pytree_node=False, default=0)  # most slots a ring forward writes

  @classmethod
  def init(cls, config: ModelConfig, batch: int, size: int, dtype=jnp.float32, *,
           per_layer: bool = False, footprint: int | None = None) -> "KVCache":
    """An empty cache; `per_layer` keeps one buffer per layer (to go with per-layer weights).

    footprint: the most slots past the committed length that one forward writes before the
    cache is rewound (a speculative round's verify pass, `DrafterSpec.footprint`). With it,
    the local layers of a sliding-window model get ring buffers of `ring_slots` slots (see the
    module doc) and the cache is per-layer; None keeps `size` slots in every layer.
    """
    ring = ring_slots(config, size, footprint)
    sizes = [ring if ring and local else size for local in config.layer_is_local]
    if per_layer or ring:
      k = tuple(jnp.zeros((batch, n, config.n_kv_heads, config.head_dim), dtype) for n in sizes)
      v = tuple(jnp.zeros_like(x) for x in k)
    else:
      shape = (config.n_layers, batch, size, config.n_kv_heads, config.head_dim)
      k, v = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
    return cls(k=k, v=v, lengths=jnp.zeros((batch,), jnp.int32), ring=ring,
               footprint=int(footprint) if ring else 0)

  @classmethod
  def like(cls, params, config: ModelConfig, batch: int, size: int, dtype=None, *,
           footprint: int | None = None) -> "KVCache":
    """An empty cache laid out like `params`' layers (per-layer weights get per-layer buffers;
    see `init` for `footprint`)."""
    from . import layout
    dtype = params["embed"].dtype if dtype is None else dtype
    return cls.init(config, batch, size, dtype, per_layer=layout.is_per_layer(params),
                    footprint=footprint)

  def is_ring(self, buf: jax.Array) -> bool:
    """Is this K or V buffer (one layer's [B, S, K, H]) a local layer's ring?"""
    return bool(self.ring) and buf.shape[-3] == self.ring

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
    """Slots of the largest buffer: the global layers' full buffer (the ring's R when every
    layer is local)."""
    return max(x.shape[1] for x in self.k) if self.per_layer else self.k.shape[2]

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
      dst, src = dst_slots, src_slots
      if self.is_ring(buf):  # the path's nodes were written by the last forward: all in the ring
        dst, src = dst % self.ring, src % self.ring
      picked = buf[lead + (b, src)]  # [(L,) B, J, K, H]
      return buf.at[lead + (b, dst)].set(picked, mode="drop")

    return self.map_rows(move)


def ring_slots(config: ModelConfig, size: int, footprint: int | None) -> int:
  """Slots of a local layer's ring buffer (window + footprint - 1), or 0 when the model has no
  sliding window, no footprint is given, or the ring would not be smaller than `size`."""
  if footprint is None or not config.windowed:
    return 0
  if footprint < 1:
    raise ValueError(f"footprint must be at least 1 slot, got {footprint}")
  ring = config.sliding_window + int(footprint) - 1
  return ring if ring < size else 0


def ring_labels(ends: jax.Array, ring: int) -> jax.Array:
  """[B, R] the slot each ring index holds once slots below `ends` [B] were written: the
  latest s < end with s = r (mod R); negative where nothing was written there yet."""
  r = jnp.arange(ring, dtype=jnp.int32)[None, :]
  return r + ring * jnp.floor_divide(ends[:, None] - 1 - r, ring)


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

"""One pure forward pass for every Llama / Gemma-family model and every use.

`forward(params, config, tokens, cache)` serves prefill (T = prompt), decode (T = 1),
chain verification (T = k + 1) and token-tree verification (T = tree nodes, with `tree_mask`
and per-node `positions`). With `cache=None` it is a plain causal forward (training, parity).

Params are a plain pytree. Layer weights are either stacked along a leading layer axis (the
depth loop is one `lax.scan`, compile time independent of depth) or kept one pytree per layer
(a Python loop over static layer ids; faster on CPU for large layers): see `models.layout`.
Self-speculative drafting runs only the first `n_layers` layers (early exit) or any subset
`layer_ids` (layer skipping) against the same weights and cache.

Sliding-window (local) layers (Mistral, Gemma 2 / 3) mask every slot more than
`sliding_window - 1` positions behind the query. With a cache made with a footprint they keep
a ring of window + footprint - 1 slots (`models.cache`): a step reads and stores the window,
not the context. Without one, they read the full buffer's chunks from each row's window start
(`layers.attention_live(lo=...)`), which bounds the reads but not the memory.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from . import layers as nn
from .cache import KVCache, ring_labels, write_layer, write_rows
from . import layout as lay
from .config import ModelConfig

Params = dict[str, Any]
ATTN_CHUNK = 512  # cache slots per attention chunk (see `forward`'s attn_chunk)


def live_attention_chunk(cache_size: int, attn_chunk: int | None = None) -> int | None:
  """The chunk `forward` attends a `cache_size`-slot buffer in, or None when it reads the whole
  buffer (shorter than two chunks: dense is faster there)."""
  chunk = ATTN_CHUNK if attn_chunk is None else attn_chunk
  return chunk if cache_size >= 2 * chunk else None


@struct.dataclass
class Output:
  logits: jax.Array  # [B, T, V] float32
  cache: KVCache | None  # new entries written at slots lengths .. lengths + T - 1; lengths += T
  hidden: jax.Array  # [B, T, D] residual stream after the last layer run (before the final norm)
  taps: jax.Array | None = None  # [B, T, n * D]: the residual stream after each `taps` layer


def _window(mask: jax.Array, key_pos: jax.Array, positions: jax.Array, window: int) -> jax.Array:
  """Restricts mask [B, T, S] to keys at positions > query position - window.

  key_pos: [1 or B, S]: a cache slot's position is its index (tree nodes sit at slots at or
  past their position, so a tree shallower than the window is never cut); positions: [B, T]."""
  return mask & (key_pos[:, None, :] > positions[:, :, None] - window)


def _mask(t: int, slots: jax.Array, base: jax.Array | None,
          tree_mask: jax.Array | None) -> jax.Array:
  """[B, T, S] attention mask over keys at cache slots `slots` [1 or B, S] (or over the T new
  tokens when base is None).

  Every query sees the slots below its row's `base` (the live prefix). Slots from `base` on
  hold draft/tree tokens: `tree_mask` [B?, T, W] says which of the W slots base .. base + W - 1
  each query sees (causal over the T new tokens when tree_mask is None).
  """
  tq = jnp.arange(t)[:, None]  # [T, 1]
  s = slots.shape[-1]
  rel = slots[:, None, :]  # [1 or B, 1, S]: slot relative to the row's base
  if base is not None:
    rel = rel - base[:, None, None]  # [B, 1, S]
  if tree_mask is None:
    return jnp.broadcast_to(rel <= tq[None], (rel.shape[0], t, s))
  w = tree_mask.shape[-1]
  tm = tree_mask if tree_mask.ndim == 3 else tree_mask[None]
  bsz = max(tm.shape[0], rel.shape[0])
  tm = jnp.broadcast_to(tm, (bsz, t, w))
  idx = jnp.broadcast_to(jnp.clip(rel, 0, w - 1), (bsz, t, s))
  visible = jnp.take_along_axis(tm, idx, axis=2)
  return (rel < 0) | ((rel < w) & visible)


def _run_ids(total: int, n_layers: int | None, layer_ids) -> tuple[int, ...] | jax.Array:
  """The layer indices `forward` runs: static ints, or a traced int32 [n] (a skip-set search)."""
  if layer_ids is None:
    return tuple(range(total if n_layers is None else n_layers))
  if n_layers is not None:
    raise ValueError(f"forward takes n_layers or layer_ids, not both (got n_layers={n_layers}, "
                     f"layer_ids={layer_ids!r})")
  if isinstance(layer_ids, jax.Array):  # traced ids (a search over skip sets): unchecked
    return layer_ids.astype(jnp.int32)
  ids = tuple(int(i) for i in layer_ids)
  if not ids or any(not 0 <= i < total for i in ids) or \
      any(a >= b for a, b in zip(ids, ids[1:])):
    raise ValueError(f"layer_ids must be increasing layer indices in [0, {total}), got "
                     f"{layer_ids!r}")
  return ids


def forward(
    params: Params,
    config: ModelConfig,
    tokens: jax.Array,
    cache: KVCache | None = None,
    *,
    positions: jax.Array | None = None,
    tree_mask: jax.Array | None = None,
    mask_base: jax.Array | None = None,
    n_layers: int | None = None,
    layer_ids: tuple[int, ...] | None = None,
    logits: bool = True,
    embeds: jax.Array | None = None,
    attn_chunk: int | None = None,
    taps: tuple[int, ...] = (),
    attn_mask: jax.Array | None = None,
    valid: jax.Array | None = None,
) -> Output:
  """Runs the decoder over `tokens` [B, T].

  Args:
    cache: when given, the new K/V go to slots `cache.lengths + arange(T)` and every query
      also attends to the row's live prefix; the returned cache has `lengths += T`.
    positions: RoPE positions [B, T]; default `lengths + arange(T)` (tree nodes pass
      `lengths + depth`).
    tree_mask: [T, W] or [B, T, W] visibility of the slots `mask_base .. mask_base + W - 1`
      (default: causal among the T new tokens, W = T).
    mask_base: [B] first slot governed by `tree_mask` (default `cache.lengths`). Drafting a
      tree level by level writes each level after the earlier ones and sets mask_base to the
      tree's root slot, so each node sees exactly its ancestors.
    n_layers: run only the first n layers (self-speculative early exit), then the final norm
      and head. The cache keeps all layers; only the first n are written.
    layer_ids: run only these layers (a static, increasing tuple of layer indices, a subset of
      range(n_layers); self-speculative layer skipping), then the final norm and head. Each
      runs with its own weights and writes only its own cache layer; skipped layers' slots
      are left as they were. `n_layers=n` is `layer_ids=range(n)`; give at most one of them.
      An int32 array [n] (traced, unchecked) also works: one compiled program scores many
      skip sets of the same size (`drafters.layer_skip.search`).
    logits: compute the [B, T, V] head (skip it when only hidden states are needed).
    embeds: input vectors [B, T, D] used instead of embedding `tokens` (feature drafters such
      as EAGLE feed fused target features through the same decoder layers).
    attn_chunk: with a cache buffer of at least two such chunks (default `ATTN_CHUNK` slots),
      attention reads only the chunks below the longest row's live length
      (`layers.attention_live`), so a decode step over a long buffer costs about the context
      in use, not the buffer size. (Measured on CPU, SmolLM2 shape, 512 live of 2,560 slots:
      445 / 395 ms vs 453 / 471 ms per step in two runs; shorter buffers stay dense.)
    taps: layer ids (increasing, among those run) whose output residual streams come back
      concatenated in `Output.taps` [B, T, n * D] (EAGLE-3 reads low, middle and high layers).
      The layer scan is split at them, so they cost no more than the copies they return.
    attn_mask: [B or 1, T, S] bool, which cache slots each new token sees, replacing the mask
      built from the cache lengths / `tree_mask` (needs a cache; EAGLE-3's training-time test
      attends across several drafting steps written side by side in one buffer).
    valid: [B] how many of each row's T tokens are real (right padding follows them: a padded
      prefill). A cache with ring layers (`KVCache.init(footprint=...)`) writes only real
      tokens there, and needs `valid` when T exceeds its footprint: all of them are then taken
      as committed, and padding written into a ring would wrap onto live window entries.
  """
  c = config
  b, t = tokens.shape
  run_ids = _run_ids(c.n_layers, n_layers, layer_ids)
  lengths = None if cache is None else cache.lengths
  if positions is None:
    base = jnp.zeros((b,), jnp.int32) if lengths is None else lengths
    positions = base[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  inv_global = nn.rope_inv_freq(c)
  inv_local = nn.rope_inv_freq(c, local=True)
  is_local = jnp.asarray(c.layer_is_local)  # [L]
  dtype = params["embed"].dtype

  if embeds is None:
    x = params["embed"][tokens].astype(dtype)  # [B, T, D]
    if c.embed_scale:  # sqrt(dim) rounded to the compute dtype, as transformers does
      x = x * jnp.asarray(math.sqrt(c.dim), dtype)
  else:
    x = embeds.astype(dtype)
  if attn_mask is not None and cache is None:
    raise ValueError("attn_mask needs a cache (it says which cache slots each token sees)")
  if attn_mask is not None and cache.ring:
    raise ValueError("attn_mask needs a cache without ring layers (KVCache.init without "
                     "footprint)")
  if cache is None:
    mask = _mask(t, jnp.arange(t)[None], None, tree_mask)
    slots = None
    key_pos = positions
  else:
    base = lengths if mask_base is None else mask_base
    mask = _mask(t, jnp.arange(cache.size)[None], base, tree_mask)
    slots = lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
    limit = jnp.max(lengths) + t  # no query sees a slot past the last one written
    key_pos = jnp.arange(cache.size, dtype=jnp.int32)[None, :]
    if attn_mask is not None:
      mask = jnp.broadcast_to(attn_mask, (b, t, cache.size))
  local_mask = mask if not c.windowed else _window(mask, key_pos, positions, c.sliding_window)
  ring = 0 if cache is None else cache.ring
  if ring:  # local layers' ring buffers (models.cache): their slots, labels and mask
    stream = t > cache.footprint  # attend over the ring as it was plus the new keys
    if stream and valid is None:
      raise ValueError(f"a forward of {t} tokens on a cache whose ring layers hold "
                       f"{cache.footprint} speculative slots: pass valid= (the real tokens of "
                       "each row, all committed), as a padded prefill does")
    real = jnp.full((b,), t, jnp.int32) if valid is None else valid.astype(jnp.int32)
    j = jnp.arange(t, dtype=jnp.int32)[None, :]
    kept = (j < real[:, None]) & (j >= real[:, None] - ring)  # [B, T]: the last R real tokens
    ring_slots = jnp.where(kept, slots % ring, ring)  # index R: dropped
    labels = ring_labels(lengths if stream else lengths + t, ring)  # [B, R]
    if stream:
      labels = jnp.concatenate([labels, slots], axis=1)  # [B, R + T]
    ring_mask = _mask(t, labels, base, tree_mask) & (labels >= 0)[:, None, :]
    ring_mask = _window(ring_mask, labels, positions, c.sliding_window)
  chunk = None if cache is None else live_attention_chunk(cache.size, attn_chunk)
  if chunk is not None and c.windowed:  # per-row spans: local rows start at their window
    row_limit = lengths + t  # [B]
    row_lo = jnp.maximum(jnp.min(positions, axis=1) - c.sliding_window + 1, 0)  # [B]
  norm = lambda x, w: nn.rms_norm(x, w, c.norm_eps, c.norm_plus_one)

  def layer(carry, i):
    x, kbuf, vbuf = carry
    w = lay.layer(params, i)
    local = c.layer_is_local[i] if isinstance(i, int) else is_local[i]
    inv_freq = jnp.where(local, inv_local, inv_global)
    m = jnp.where(local, local_mask, mask) if c.windowed else mask
    h = norm(x, w["attn_norm"])
    q = jnp.einsum("BTD,DNH->BTNH", h, w["wq"])
    k = jnp.einsum("BTD,DKH->BTKH", h, w["wk"])
    v = jnp.einsum("BTD,DKH->BTKH", h, w["wv"])
    if c.qkv_bias:
      q, k, v = q + w["bq"], k + w["bk"], v + w["bv"]
    if c.qk_norm:
      q = norm(q, w["q_norm"])
      k = norm(k, w["k_norm"])
    q = nn.apply_rope(q, positions, inv_freq, c.rope_layout)
    k = nn.apply_rope(k, positions, inv_freq, c.rope_layout)
    attn = dict(scale=c.query_scale, cap=c.attn_softcap)
    if kbuf is None:
      o = nn.attention(q, k, v, m, **attn)
    elif ring and c.layer_is_local[i]:  # a ring cache is per-layer: i is static
      keys, values = write_rows(kbuf[i], ring_slots, k), write_rows(vbuf[i], ring_slots, v)
      if stream:
        o = nn.attention(q, jnp.concatenate([kbuf[i], k.astype(keys.dtype)], axis=1),
                         jnp.concatenate([vbuf[i], v.astype(values.dtype)], axis=1), ring_mask,
                         **attn)
      else:
        o = nn.attention(q, keys, values, ring_mask, **attn)
      kbuf = kbuf[:i] + (keys,) + kbuf[i + 1:]
      vbuf = vbuf[:i] + (values,) + vbuf[i + 1:]
    else:
      if isinstance(kbuf, tuple):  # per-layer cache: layer i's [B, S, K, H] buffer
        keys, values = write_rows(kbuf[i], slots, k), write_rows(vbuf[i], slots, v)
        kbuf = kbuf[:i] + (keys,) + kbuf[i + 1:]
        vbuf = vbuf[:i] + (values,) + vbuf[i + 1:]
      else:
        kbuf = write_layer(kbuf, i, slots, k)
        vbuf = write_layer(vbuf, i, slots, v)
        keys, values = kbuf[i], vbuf[i]  # [B, S, K, H]
      if chunk is None:
        o = nn.attention(q, keys, values, m, **attn)
      elif c.windowed:
        lo = jnp.where(local, row_lo, 0)
        o = nn.attention_live(q, keys, values, m, row_limit, chunk, lo=lo, **attn)
      else:
        o = nn.attention_live(q, keys, values, m, limit, chunk, **attn)
    a = jnp.einsum("BTNH,NHD->BTD", o, w["wo"])
    x = x + (norm(a, w["post_attn_norm"]) if c.post_norms else a)
    h = norm(x, w["mlp_norm"])
    f = nn.swiglu(h, w["w_gate"], w["w_up"], w["w_down"], c.act)
    x = x + (norm(f, w["post_mlp_norm"]) if c.post_norms else f)
    return (x, kbuf, vbuf), None

  carry = (x, None, None) if cache is None else (x, cache.k, cache.v)
  per_layer = lay.is_per_layer(params) or (cache is not None and isinstance(cache.k, tuple))
  segments = _segments(run_ids, taps)
  if not isinstance(run_ids, tuple) and per_layer:
    raise ValueError("traced layer_ids need stacked layer weights and a stacked cache "
                     "(models.layout.stacked, KVCache.init(per_layer=False))")
  tapped = []
  for ids, tap in segments:  # the layers up to each tap, then the tap's copy of the stream
    if per_layer:  # unrolled over static ids: each dot reads its own buffers
      for i in ids:
        carry, _ = layer(carry, i)
    elif len(ids):
      carry, _ = jax.lax.scan(layer, carry, jnp.asarray(ids, jnp.int32))
    if tap:
      tapped.append(carry[0])
  x, kbuf, vbuf = carry

  new_cache = None
  if cache is not None:
    new_cache = cache.replace(k=kbuf, v=vbuf, lengths=cache.lengths + t)
  out_logits = head(params, config, x) if logits else jnp.zeros((b, t, 0), jnp.float32)
  return Output(logits=out_logits, cache=new_cache, hidden=x,
                taps=jnp.concatenate(tapped, axis=-1) if tapped else None)


def _segments(run_ids, taps: tuple[int, ...]):
  """[(layer ids, ends at a tap)]: `run_ids` cut after each tap layer (one segment, no tap,
  without taps; traced ids take no taps)."""
  if not taps:
    return [(run_ids, False)]
  taps = tuple(int(i) for i in taps)
  if not isinstance(run_ids, tuple):
    raise ValueError("taps need static layer ids")
  if any(a >= b for a, b in zip(taps, taps[1:])) or any(i not in run_ids for i in taps):
    raise ValueError(f"taps must be increasing ids of layers that run ({run_ids[0]} .. "
                     f"{run_ids[-1]}), got {taps!r}")
  out, start = [], 0
  for tap in taps:
    end = run_ids.index(tap) + 1
    out.append((run_ids[start:end], True))
    start = end
  if start < len(run_ids):
    out.append((run_ids[start:], False))
  return out


def head(params: Params, config: ModelConfig, x: jax.Array) -> jax.Array:
  """Final norm and LM head (soft-capped when configured): [B, T, D] -> float32 logits [B, T, V]."""
  h = nn.rms_norm(x, params["final_norm"], config.norm_eps, config.norm_plus_one)
  if config.tied_embeddings:
    out = jnp.einsum("BTD,VD->BTV", h, params["embed"], preferred_element_type=jnp.float32)
  else:
    out = jnp.einsum("BTD,DV->BTV", h, params["lm_head"], preferred_element_type=jnp.float32)
  return nn.softcap(out, config.final_softcap)


def param_shapes(config: ModelConfig) -> dict[str, Any]:
  """Shapes of every parameter (the template loaders fill and checks compare against)."""
  c = config
  L, D, N, K, H, F, V = (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.hidden_dim,
                         c.vocab_size)
  lay = {
      "attn_norm": (L, D), "wq": (L, D, N, H), "wk": (L, D, K, H), "wv": (L, D, K, H),
      "wo": (L, N, H, D), "mlp_norm": (L, D), "w_gate": (L, D, F), "w_up": (L, D, F),
      "w_down": (L, F, D),
  }
  if c.qkv_bias:
    lay.update(bq=(L, N, H), bk=(L, K, H), bv=(L, K, H))
  if c.qk_norm:
    lay.update(q_norm=(L, H), k_norm=(L, H))
  if c.post_norms:
    lay.update(post_attn_norm=(L, D), post_mlp_norm=(L, D))
  shapes = {"embed": (V, D), "layers": lay, "final_norm": (D,)}
  if not c.tied_embeddings:
    shapes["lm_head"] = (D, V)
  return shapes


def init_params(config: ModelConfig, key: jax.Array | int, dtype=jnp.float32,
                scale: float = 0.02, *, on_device: bool = False) -> Params:
  """Random parameters (tests, benchmarks of model shapes with no checkpoint).

  Drawn with numpy on the host (no per-shape compilation), or with `on_device=True` by one
  jitted program on the default device (an 8B model's weights are drawn where they live, with
  no host copy); norms start at one (stored as zero for `norm_plus_one` models).
  """
  seed = key if isinstance(key, int) else int(jax.random.randint(key, (), 0, 2**31 - 1))
  shapes = param_shapes(config)
  flat, treedef = jax.tree_util.tree_flatten_with_path(
      shapes, is_leaf=lambda s: isinstance(s, tuple))
  norm = 0.0 if config.norm_plus_one else 1.0
  if on_device:
    def make(k):  # one program for every leaf
      keys = jax.random.split(k, len(flat))
      return [jnp.full(shape, norm, dtype) if "norm" in jax.tree_util.keystr(path) else
              (jax.random.normal(kk, shape, jnp.float32) * scale).astype(dtype)
              for (path, shape), kk in zip(flat, keys)]
    out = jax.jit(make)(jax.random.key(seed))
    return jax.block_until_ready(jax.tree.unflatten(treedef, out))
  rng = np.random.default_rng(seed)
  out = []
  for path, shape in flat:
    if "norm" in jax.tree_util.keystr(path):
      w = np.full(shape, 0.0 if config.norm_plus_one else 1.0, np.float32)
    else:
      w = rng.standard_normal(shape, dtype=np.float32) * scale
    out.append(jnp.asarray(w, dtype))
  return jax.tree.unflatten(treedef, out)


def check_params(params: Params, config: ModelConfig) -> None:
  """Raises ValueError naming every parameter whose shape disagrees with the config."""
  want = param_shapes(config)
  flat_want = dict(jax.tree_util.tree_flatten_with_path(want, is_leaf=lambda s: isinstance(s, tuple))[0])
  flat_have = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  problems = []
  for path, shape in flat_want.items():
    if path not in flat_have:
      problems.append(f"missing {jax.tree_util.keystr(path)} (expected {shape})")
    elif tuple(flat_have[path].shape) != tuple(shape):
      problems.append(f"{jax.tree_util.keystr(path)} has shape {tuple(flat_have[path].shape)}, "
                      f"config expects {tuple(shape)}")
  if problems:
    raise ValueError("parameters do not match the model config: " + "; ".join(problems))

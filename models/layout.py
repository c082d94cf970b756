"""How a model's layer weights are stored: stacked `[L, ...]` arrays or one pytree per layer.

`params["layers"]` is either

- **stacked**: a dict of arrays with a leading layer axis (`{"wq": [L, D, N, H], ...}`). The
  depth loop is one `lax.scan` (compile time independent of depth), and a traced set of layer
  ids can index it (`drafters.layer_skip.search` scores many skip sets with one program).
- **per-layer**: a tuple of L dicts (`({"wq": [D, N, H], ...}, ...)`). The depth loop is a
  Python loop over static layer ids, so each dot reads its weights where they lie. On XLA:CPU a
  scan materializes every `w[i]` (a dynamic-slice copy of the layer's matrices) before the dot
  reads it, and that copy is most of a decode step at the Qwen2.5 0.5B / 1.5B shapes
  (docs/performance.md: 1.9x faster decode at the 1.5B shape). It costs compile time (the loop
  unrolls L layers). The KV cache follows the weights (`KVCache.init(..., per_layer=True)`):
  a stacked cache read by static slices is copied per layer too.

`choose` picks the layout a loader applies (`load_model(layers=...)`); the rest of jaxspec reads
layers only through this module, `models.llama.forward` and `KVCache`, so either works
everywhere (checkpoints and exports write the stacked form).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

LAYOUTS = ("auto", "stacked", "per_layer")
# "auto" keeps layers per-layer on CPU when one layer's weights are at least this large: below
# it they stay in cache either way and the scan's shorter compile wins (SmolLM2-135M, 14 MB a
# layer in fp32: per-layer 1.08x at T=1 but 0.92x at T=5; Qwen2.5-0.5B, 59 MB: 1.1-1.2x).
AUTO_MIN_LAYER_BYTES = 32 << 20


def is_per_layer(params) -> bool:
  return isinstance(params["layers"], (list, tuple))


def n_layers(params) -> int:
  layers = params["layers"]
  if isinstance(layers, (list, tuple)):
    return len(layers)
  return int(jax.tree.leaves(layers)[0].shape[0])


def layer(params, i: int):
  """Layer i's weights (a dict of arrays without the layer axis)."""
  layers = params["layers"]
  if isinstance(layers, (list, tuple)):
    return layers[i]
  return jax.tree.map(lambda w: w[i], layers)


def layer_bytes(params, dtype=None) -> int:
  """Bytes of one layer's weights (in `dtype` when given, else as stored)."""
  leaves = jax.tree.leaves(layer_shapes(params))
  size = lambda x: np.dtype(dtype if dtype is not None else x.dtype).itemsize
  return sum(int(np.prod(x.shape)) * size(x) for x in leaves)


def layer_shapes(params):
  """ShapeDtypeStructs of one layer's weights."""
  layers = params["layers"]
  if isinstance(layers, (list, tuple)):
    return jax.tree.map(lambda w: jax.ShapeDtypeStruct(w.shape, w.dtype), layers[0])
  return jax.tree.map(lambda w: jax.ShapeDtypeStruct(w.shape[1:], w.dtype), layers)


def choose(layout: str, params, dtype=None, backend: str | None = None) -> str:
  """Resolves "auto" to "stacked" or "per_layer" (see AUTO_MIN_LAYER_BYTES)."""
  if layout not in LAYOUTS:
    raise ValueError(f"layers must be one of {LAYOUTS}, got {layout!r}")
  if layout != "auto":
    return layout
  backend = jax.default_backend() if backend is None else backend
  big = layer_bytes(params, dtype) >= AUTO_MIN_LAYER_BYTES
  return "per_layer" if backend == "cpu" and big else "stacked"


def per_layer(params, convert=None, *, consume: bool = False):
  """The per-layer form of `params` (unchanged when already per-layer).

  Works one weight name at a time, dropping each stacked array once its L slices are made, so
  with `consume=True` (a loader's own dict: its `layers` entries are popped) the peak is the
  model plus one stacked weight, not twice the model. `convert` maps each slice (default
  `jnp.asarray`; host loaders pass `np.array` to copy out of the stack).
  """
  if is_per_layer(params):
    return params
  convert = jnp.asarray if convert is None else convert
  stacked = params["layers"] if consume else dict(params["layers"])
  count = n_layers(params)
  out = [{} for _ in range(count)]
  for name in list(stacked):
    w = stacked.pop(name)
    host = np.asarray(w) if not isinstance(w, jax.Array) or w.is_fully_addressable else None
    for i in range(count):
      out[i][name] = convert(host[i] if host is not None else w[i])
    del w, host
  if consume:
    params["layers"] = tuple(out)
    return params
  return dict(params, layers=tuple(out))


def stacked(params):
  """The stacked form of `params` (unchanged when already stacked)."""
  if not is_per_layer(params):
    return params
  layers = params["layers"]
  return dict(params, layers={k: jnp.stack([l[k] for l in layers]) for k in layers[0]})


def apply(params, layout: str):
  """`params` in `layout` ("stacked" or "per_layer"; resolve "auto" with `choose` first)."""
  if layout == "per_layer":
    return per_layer(params)
  if layout == "stacked":
    return stacked(params)
  raise ValueError(f"layout must be 'stacked' or 'per_layer', got {layout!r}")


def first_layers(params, n: int):
  """`params` with only the first n layers (a shallower model over the same weights)."""
  if is_per_layer(params):
    return dict(params, layers=tuple(params["layers"][:n]))
  return dict(params, layers=jax.tree.map(lambda w: w[:n], params["layers"]))

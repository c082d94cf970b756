"""Logical axis names, the one rules table that maps them onto mesh axes, and their use.

Arrays are described by *logical* axes (what a dimension means: heads, vocabulary, batch...).
One small table, `RULES`, says which mesh axis each logical axis is split over, as in flax's
lm1b example and maxtext. The model code never names a mesh axis.

Mesh axes:
  "data":   rows of the batch (and of the KV cache) are split over it.
  "tensor": Megatron-style tensor parallelism: query/kv heads, MLP hidden units and the
            vocabulary are split over it, so each weight matrix lives in pieces and no step
            of the forward pass needs a whole one.

A mesh axis is dropped from a dimension it does not divide (e.g. 3 kv heads on tensor=2 are
replicated instead of failing), and never used twice in one array. Query heads are the
exception that `check_divisible` enforces: replicating them would run attention in full on
every tensor shard.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Logical axes.
BATCH = "batch"  # rows of a batch
LENGTH = "length"  # new tokens of one step (activations)
EMBED = "embed"  # model width D
HEADS = "heads"  # query heads N
KV_HEADS = "kv_heads"  # key/value heads K
HEAD_DIM = "head_dim"  # H
MLP = "mlp"  # SwiGLU hidden units F
VOCAB = "vocab"  # V
LAYERS = "layers"  # the stacked layer axis L
CACHE_SEQ = "cache_seq"  # KV cache slots S

# Mesh axes.
DATA = "data"
TENSOR = "tensor"
MESH_AXES = (DATA, TENSOR)

Rules = Sequence[tuple[str, "str | tuple[str, ...] | None"]]

# The rules table: logical axis -> mesh axis (None = replicated).
RULES: Rules = (
    (BATCH, DATA),
    (HEADS, TENSOR),
    (KV_HEADS, TENSOR),
    (MLP, TENSOR),
    (VOCAB, TENSOR),
    (EMBED, None),
    (HEAD_DIM, None),
    (LAYERS, None),
    (CACHE_SEQ, None),
    (LENGTH, None),
)

# Logical axes of every parameter in `jaxspec.models.llama.param_shapes`.
PARAM_AXES: Mapping[str, tuple[str, ...]] = {
    "embed": (VOCAB, EMBED),
    "lm_head": (EMBED, VOCAB),
    "final_norm": (EMBED,),
    "attn_norm": (LAYERS, EMBED),
    "mlp_norm": (LAYERS, EMBED),
    "post_attn_norm": (LAYERS, EMBED),
    "post_mlp_norm": (LAYERS, EMBED),
    "wq": (LAYERS, EMBED, HEADS, HEAD_DIM),
    "wk": (LAYERS, EMBED, KV_HEADS, HEAD_DIM),
    "wv": (LAYERS, EMBED, KV_HEADS, HEAD_DIM),
    "wo": (LAYERS, HEADS, HEAD_DIM, EMBED),
    "bq": (LAYERS, HEADS, HEAD_DIM),
    "bk": (LAYERS, KV_HEADS, HEAD_DIM),
    "bv": (LAYERS, KV_HEADS, HEAD_DIM),
    "q_norm": (LAYERS, HEAD_DIM),
    "k_norm": (LAYERS, HEAD_DIM),
    "w_gate": (LAYERS, EMBED, MLP),
    "w_up": (LAYERS, EMBED, MLP),
    "w_down": (LAYERS, MLP, EMBED),
}

# Logical axes of the `KVCache` fields.
CACHE_AXES: Mapping[str, tuple[str, ...]] = {
    "k": (LAYERS, BATCH, CACHE_SEQ, KV_HEADS, HEAD_DIM),
    "v": (LAYERS, BATCH, CACHE_SEQ, KV_HEADS, HEAD_DIM),
    "lengths": (BATCH,),
}


def logical_to_spec(axes: Sequence[str | None], mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None, rules: Rules = RULES) -> PartitionSpec:
  """Logical axes -> PartitionSpec.

  With `mesh`, mesh axes it lacks are dropped; with `shape` too, a mesh axis that does not
  divide its dimension is dropped (that dimension is replicated over it). A mesh axis is used
  at most once per array (the first dimension that claims it wins).
  """
  table = dict(rules)
  if shape is not None and len(shape) != len(axes):
    raise ValueError(f"logical axes {tuple(axes)} do not match an array of shape {tuple(shape)}")
  used: set[str] = set()
  out = []
  for d, name in enumerate(axes):
    if name is not None and name not in table:
      raise ValueError(f"unknown logical axis {name!r}; the rules table has {sorted(table)}")
    target = table.get(name) if name is not None else None
    targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    kept, size = [], 1
    for ax in targets:
      if ax in used or (mesh is not None and ax not in mesh.shape):
        continue
      n = mesh.shape[ax] if mesh is not None else 1
      if shape is not None and shape[d] % (size * n):
        continue
      kept.append(ax)
      size *= n
    used.update(kept)
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  while out and out[-1] is None:
    out.pop()
  return PartitionSpec(*out)


def logical_to_sharding(axes: Sequence[str | None], mesh: Mesh,
                        shape: Sequence[int] | None = None, rules: Rules = RULES) -> NamedSharding:
  """Logical axes -> NamedSharding on `mesh` (see `logical_to_spec` for the dropping rules)."""
  return NamedSharding(mesh, logical_to_spec(axes, mesh, shape, rules))


def check_divisible(config, mesh: Mesh) -> None:
  """Raises ValueError when the tensor axis cannot split the query heads evenly.

  Kv heads, the vocabulary and MLP units that do not divide are simply replicated; query
  heads are not, since every tensor shard would then compute all of attention.
  """
  t = mesh.shape.get(TENSOR, 1)
  if config.n_heads % t:
    ok = [d for d in range(1, config.n_heads + 1) if config.n_heads % d == 0]
    raise ValueError(f"the model's {config.n_heads} query heads are not divisible by the mesh's "
                     f"tensor axis ({t}); use a tensor size in {ok}")


# --------------------------------------------------------------------------------------------
# Pytrees


def _is_shape(x) -> bool:
  """A plain tuple of ints (not a namedtuple: optax's EmptyState() is an empty one)."""
  return type(x) is tuple and all(isinstance(d, (int, np.integer)) for d in x)


def _shape(x) -> tuple[int, ...]:
  return tuple(int(d) for d in x) if _is_shape(x) else tuple(x.shape)


def _leaf_name(path) -> str | None:
  """The last named key on the path (DictKey / GetAttrKey): `wq` for `["layers"]["wq"]` and for
  per-layer `["layers"][3]["wq"]`, `k` for a per-layer cache's `.k[3]`."""
  for entry in reversed(path):
    for attr in ("key", "name"):
      if hasattr(entry, attr):
        return str(getattr(entry, attr))
  return None


def _axes(path, x, table: Mapping[str, tuple[str, ...]]) -> tuple[str | None, ...]:
  """A leaf's logical axes, by its name; a leaf one rank short of a `layers`-led entry is one
  layer's slice of it (per-layer weights and caches, `models.layout`); unknown names or ranks
  get replicated axes."""
  ndim = len(_shape(x))
  axes = table.get(_leaf_name(path))
  if axes is not None and axes[:1] == (LAYERS,) and len(axes) == ndim + 1:
    axes = axes[1:]
  return axes if axes is not None and len(axes) == ndim else (None,) * ndim


def _tree_axes(tree, table):
  return jax.tree_util.tree_map_with_path(lambda p, x: _axes(p, x, table), tree,
                                          is_leaf=_is_shape)


def _tree_shardings(tree, mesh: Mesh, table, rules: Rules):
  return jax.tree_util.tree_map_with_path(
      lambda p, x: logical_to_sharding(_axes(p, x, table), mesh, _shape(x), rules), tree,
      is_leaf=_is_shape)


def param_axes(params_or_shape_tree):
  """Logical axes of each parameter (a tree like the input whose leaves are tuples)."""
  return _tree_axes(params_or_shape_tree, PARAM_AXES)


def param_shardings(params_or_shape_tree, mesh: Mesh, rules: Rules = RULES):
  """NamedShardings for a params tree of arrays, ShapeDtypeStructs or shape tuples.

  Leaves are matched by name against `PARAM_AXES`; leaves with other names (drafter heads)
  or ranks are replicated.
  """
  return _tree_shardings(params_or_shape_tree, mesh, PARAM_AXES, rules)


def cache_shardings(cache, mesh: Mesh, rules: Rules = RULES):
  """NamedShardings for a `KVCache` (of arrays or ShapeDtypeStructs), as a KVCache pytree."""
  return _tree_shardings(cache, mesh, CACHE_AXES, rules)


def _put(x, sharding: NamedSharding):
  if isinstance(x, jax.Array):
    if x.sharding == sharding:
      return x
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # typed keys: place the raw data
      data = _put(jax.random.key_data(x), NamedSharding(sharding.mesh, PartitionSpec()))
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    if x.is_fully_addressable and not sharding.is_fully_addressable:
      x = np.asarray(x)  # a process-local array headed for a multi-process mesh
    else:
      return jax.device_put(x, sharding)
  x = np.asarray(x)  # host data: every process builds only its own shards (multi-host safe)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def shard_params(params, mesh: Mesh, config=None, rules: Rules = RULES):
  """Places `params` (host or device arrays) on `mesh` with `param_shardings`.

  With `config`, first checks that the query heads divide the tensor axis.
  """
  if config is not None:
    check_divisible(config, mesh)
  return jax.tree.map(_put, params, param_shardings(params, mesh, rules))


def place(tree, shardings):
  """Places a pytree of host or device arrays with matching `shardings` (multi-host safe:
  from host data each process builds only its own shards)."""
  return jax.tree.map(_put, tree, shardings)


def batch_sharding(x, mesh: Mesh, rules: Rules = RULES) -> NamedSharding:
  """Rows (axis 0) over the data axis when it divides them, everything else replicated."""
  shape = _shape(x)
  axes = (BATCH,) + (None,) * (len(shape) - 1) if shape else ()
  return logical_to_sharding(axes, mesh, shape, rules)


def shard_cache(cache, mesh: Mesh, rules: Rules = RULES):
  """Places a `KVCache` on `mesh` with `cache_shardings`."""
  return jax.tree.map(_put, cache, cache_shardings(cache, mesh, rules))


def with_logical_constraint(x: jax.Array, axes: Sequence[str | None], mesh: Mesh | None,
                            rules: Rules = RULES) -> jax.Array:
  """`with_sharding_constraint` by logical axes; the identity when `mesh` is None."""
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_sharding(axes, mesh, x.shape, rules))


"""Sharding by logical axis names (installed as `jaxspec.sharding`).

    mesh = jaxspec.sharding.make_mesh(data=2, tensor=4)
    params = jaxspec.sharding.shard_params(model.params, mesh, model.config)

`rules.py` holds the logical axis names and the one rules table; `mesh.py` builds meshes and
starts multi-host jobs.
"""

from .mesh import initialize, make_mesh
from .rules import (BATCH, CACHE_AXES, CACHE_SEQ, DATA, EMBED, HEAD_DIM, HEADS, KV_HEADS, LAYERS,
                    LENGTH, MLP, PARAM_AXES, RULES, TENSOR, VOCAB, batch_sharding, cache_shardings,
                    check_divisible, logical_to_sharding, logical_to_spec, param_axes,
                    param_shardings, place, shard_cache, shard_params, with_logical_constraint)

__all__ = [
    "BATCH", "CACHE_AXES", "CACHE_SEQ", "DATA", "EMBED", "HEAD_DIM", "HEADS", "KV_HEADS",
    "LAYERS", "LENGTH", "MLP", "PARAM_AXES", "RULES", "TENSOR", "VOCAB", "batch_sharding",
    "cache_shardings",
    "check_divisible", "initialize", "logical_to_sharding", "logical_to_spec", "make_mesh",
    "param_axes", "param_shardings", "place", "shard_cache", "shard_params",
    "with_logical_constraint",
]

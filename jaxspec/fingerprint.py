"""Stable keys for caches of measurements (costs, acceptance): what a model or drafter IS
(config, dtypes, shapes, placement, a digest of its weights), never where it lives in memory
(an `id()` is reused once an object is freed, so a new model could inherit an old one's
numbers)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@jax.jit
def _digest(leaves):
  """One float per leaf: a position-weighted sum of its first elements (cheap, replicated)."""
  out = []
  for x in leaves:
    v = x.reshape(-1)[:4096].astype(jnp.float32)
    out.append(jnp.sum(v * (1.0 + jnp.arange(v.shape[0], dtype=jnp.float32) / 4096.0)))
  return jnp.stack(out)


def of_params(params) -> tuple:
  """Structure, shapes, dtypes, placements and a content digest of a params pytree."""
  leaves, treedef = jax.tree.flatten(params)
  if not leaves:
    return (str(treedef),)
  layout = tuple((tuple(x.shape), str(x.dtype), str(getattr(x, "sharding", None)))
                 for x in leaves)
  digest = tuple(np.round(np.asarray(jax.device_get(_digest(leaves)), np.float64), 6).tolist())
  return (str(treedef), layout, digest)


def of_model(model) -> tuple:
  return ("model", model.config, of_params(model.params))


def of_value(v):
  """A hashable stand-in for a drafter option."""
  from jaxspec.models import Model

  if isinstance(v, Model):
    return of_model(v)
  if hasattr(v, "params") and hasattr(v, "config"):  # a trained head
    return ("head", getattr(v, "kind", None), repr(v.config), of_params(v.params))
  if isinstance(v, (jax.Array, np.ndarray)):
    return ("array", of_params(v))
  if isinstance(v, (list, tuple)):
    return tuple(of_value(x) for x in v)
  try:
    hash(v)
    return v
  except TypeError:
    return ("repr", repr(v))


def of_drafter(drafter, skip: tuple[str, ...] = ()) -> tuple:
  """The drafter's type and options (models and heads by their fingerprints). Fields declared
  with compare=False are data the program reads as traced inputs (an `NGram` memory's
  contents), not options: two drafters that differ only there run the same program at the
  same cost."""
  if not dataclasses.is_dataclass(drafter):
    return (type(drafter).__qualname__, repr(drafter))
  return (type(drafter).__qualname__,
          tuple((f.name, of_value(getattr(drafter, f.name))) for f in dataclasses.fields(drafter)
                if f.name not in skip and f.compare))

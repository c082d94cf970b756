"""`check_finite(name, array, where)`: every loader's check that a tensor holds no NaN or inf.

Run on every tensor at load time (GGUF, Hugging Face safetensors, llama2.c, Orbax), so a corrupt
checkpoint is refused with the tensor's name instead of loading and failing at generate time
with a message about float16 overflow. One reduction per tensor: a float64 sum for host arrays
(NaN and inf propagate through it; finite float32/16/bf16 weights cannot overflow float64), one
fused `all(isfinite)` for device arrays; the element-wise scan only runs to word the error.
"""

from __future__ import annotations

import numpy as np


def _bad_host(a: np.ndarray) -> bool:
  if a.dtype.kind in "biu":
    return False
  if a.dtype == np.float64 or a.dtype.kind == "c":
    return not bool(np.isfinite(a).all())
  return not np.isfinite(np.add.reduce(a, axis=None, dtype=np.float64))


def _error(name: str, a: np.ndarray, where: str) -> ValueError:
  bad = ~np.isfinite(np.asarray(a, np.float64) if a.dtype.kind not in "fc" else a)
  first = np.unravel_index(int(np.flatnonzero(bad)[0]), a.shape) if a.ndim else ()
  return ValueError(f"{where + ': ' if where else ''}tensor {name!r} holds NaN or infinite weights "
                    f"({int(bad.sum())} of {a.size} values, the first at index "
                    f"{tuple(int(i) for i in first)}); the checkpoint is corrupt")


def check_finite(name: str, x, where: str = "") -> None:
  """Raises ValueError naming tensor `name` (in file `where`) if `x` holds NaN or inf. `x`: a
  numpy array (or memmap) or a jax array (reduced on its devices)."""
  if isinstance(x, np.ndarray) or np.isscalar(x):
    a = np.asarray(x)
    if _bad_host(a):
      raise _error(name, a, where)
    return
  import jax.numpy as jnp  # a jax array: reduce where it lives, copy one bool
  if jnp.issubdtype(x.dtype, jnp.inexact) and not bool(jnp.isfinite(x).all()):
    raise _error(name, np.asarray(x), where)


def check_tree(params, where: str = "") -> None:
  """check_finite on every leaf of a params pytree, named by its path ('layers/wq')."""
  import jax
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    check_finite(name, x, where)

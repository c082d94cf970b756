"""Trained drafter weights: one `Head` type for every trained family (EAGLE, Medusa, ...).

A head is its params pytree, the config it was built from (which names the target shape it was
trained for), a `kind` and free-form `meta`. Families subclass it only to name their kind
(`EagleHead`, `MedusaHeads`), so saving, loading and checking are written once.
"""

from __future__ import annotations

import dataclasses
import os
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.models import ModelConfig, param_shapes


@dataclasses.dataclass(eq=False)
class Head:
  """Trained drafter weights (`jaxspec.train.train_drafter`)."""

  params: dict
  config: object
  kind: str = ""
  name: str = ""
  meta: dict = dataclasses.field(default_factory=dict)

  KIND: ClassVar[str] = ""

  def __post_init__(self):
    self.kind = self.kind or self.KIND
    self.name = self.name or self.kind

  @classmethod
  def load(cls, path: str | os.PathLike, *, dtype=None) -> "Head":
    """Loads a head saved by `save` / `jaxspec.save_checkpoint` (or a training `out_dir`)."""
    ckpt = load_checkpoint(path, cls.KIND, dtype=dtype)
    return cls(params=ckpt.params, config=ckpt.config, name=ckpt.name or cls.KIND,
               meta=ckpt.meta)

  def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> str:
    from jaxspec import checkpoint
    return checkpoint.save(self, path, meta=self.meta, overwrite=overwrite)

  def check_shapes(self, want: dict) -> None:
    """A clear error when the params do not have the shapes their config implies."""
    have = jax.tree.map(lambda x: tuple(x.shape), self.params)
    is_shape = lambda s: isinstance(s, tuple)
    if (jax.tree.structure(have, is_leaf=is_shape) != jax.tree.structure(want, is_leaf=is_shape)
        or jax.tree.leaves(have, is_leaf=is_shape) != jax.tree.leaves(want, is_leaf=is_shape)):
      raise ValueError(f"{self.kind} head parameters do not match its config (a damaged or "
                       f"foreign checkpoint?)")

  def check_target(self, label: str, target) -> None:
    """A clear error when the head was trained for a model of another shape."""
    t, h = target.config, self.config.target
    if (t.dim, t.vocab_size) != (h.dim, h.vocab_size):
      raise ValueError(f"this {label} head was trained for a model with dim {h.dim} and "
                       f"vocabulary {h.vocab_size}; the target {target.name!r} has dim {t.dim} "
                       f"and vocabulary {t.vocab_size}. Train a head for this target with "
                       f"jaxspec.train.train_drafter(model, kind={self.kind!r}, ...)")

  @classmethod
  def resolve(cls, obj) -> "Head":
    """A head of this kind from a head, a `checkpoint.Checkpoint` or a path."""
    from jaxspec.checkpoint import Checkpoint
    if isinstance(obj, (str, os.PathLike)):
      return cls.load(obj)
    if isinstance(obj, cls):
      return obj
    if isinstance(obj, Checkpoint):
      if obj.kind != cls.KIND:
        raise ValueError(f"expected a {cls.KIND!r} head, got a {obj.kind!r} checkpoint")
      return cls(params=obj.params, config=obj.config, name=obj.name or cls.KIND, meta=obj.meta)
    other = getattr(obj, "kind", None)
    if isinstance(other, str) and other != cls.KIND:
      raise ValueError(f"expected a {cls.KIND!r} head, got a {other!r} head")
    raise TypeError(f"expected a {cls.__name__} (or its checkpoint path), got "
                    f"{type(obj).__name__}")


def load_checkpoint(path: str | os.PathLike, kind: str, *, dtype=None):
  """`checkpoint.load_head` of a `kind` head; `path` may also be a training out_dir (whose
  trained drafter lives in `out_dir/drafter`)."""
  from jaxspec import checkpoint
  path = os.fspath(path)
  if (not os.path.exists(os.path.join(path, checkpoint.META_FILE))
      and os.path.exists(os.path.join(path, "drafter", checkpoint.META_FILE))):
    path = os.path.join(path, "drafter")
  ckpt = checkpoint.load_head(path, dtype=dtype)
  if ckpt.kind != kind:
    raise ValueError(f"{path} holds a {ckpt.kind!r} checkpoint, not a {kind!r} head")
  return ckpt


def decoder_config(target: ModelConfig, n_layers: int, arch: str) -> ModelConfig:
  """A head's own decoder layers (EAGLE's decoder, Kangaroo's adapter): the target's layer
  shape and RoPE, `n_layers` deep."""
  t = target
  return ModelConfig(dim=t.dim, n_layers=n_layers, n_heads=t.n_heads, n_kv_heads=t.n_kv_heads,
                     hidden_dim=t.hidden_dim, vocab_size=t.vocab_size, head_dim=t.head_dim,
                     max_seq_len=t.max_seq_len, norm_eps=t.norm_eps, rope_theta=t.rope_theta,
                     rope_layout=t.rope_layout, rope_scaling=t.rope_scaling,
                     tied_embeddings=True, arch=arch)


def init_layers(config: ModelConfig, rng: np.random.Generator, scale: float,
                zero: tuple[str, ...] = ()) -> dict:
  """Stacked layer weights of `config`: norms one, the weights named in `zero` zero, the rest
  small random (drawn from `rng` in tree order)."""
  def draw(path, shape):
    if "norm" in jax.tree_util.keystr(path):
      return jnp.ones(shape, jnp.float32)
    if path[-1].key in zero:
      return jnp.zeros(shape, jnp.float32)
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * scale)

  return jax.tree_util.tree_map_with_path(draw, param_shapes(config)["layers"],
                                          is_leaf=lambda s: isinstance(s, tuple))

"""`EarlyExit`: self-speculative drafting from the target's first layers (LayerSkip / Kangaroo /
SWIFT family), sharing the target's weights, head and KV cache.

The draft's K/V for layers < `layers` are exactly the target's (same weights, same inputs), so
the draft reads the target cache directly. Draft entries it writes past the committed length are
overwritten by the verification pass, which rewrites every layer at those slots. It runs as
`layer_skip.LayerSkipSpec` with the prefix `0 .. layers - 1` as its skip set.
"""

from __future__ import annotations

import dataclasses

from jaxspec.models import Model

from . import registry
from .base import Drafter, check_int
from .layer_skip import LayerSkipSpec


@registry.register("early-exit", usage="early-exit:L", aliases=("early_exit", "earlyexit"),
                   help="the target's first L layers and its head (shares weights and cache)")
@dataclasses.dataclass(frozen=True)
class EarlyExit(Drafter):
  """Drafts with the target's first `layers` layers, then its final norm and head.
  stop_below: confidence-based draft length, as for `DraftModel`."""

  layers: int = 2
  k: int = 4
  tree: object = None
  stop_below: float | None = None

  def check(self):
    object.__setattr__(self, "layers", check_int("EarlyExit layers", self.layers, 1))

  def bind(self, target: Model):
    if self.layers >= target.config.n_layers:
      raise ValueError(f"EarlyExit(layers={self.layers}) must use fewer layers than the target "
                       f"has ({target.config.n_layers})")
    # The first `layers` layers: a prefix is the layer-skip drafter's simplest skip set.
    return LayerSkipSpec(k=self.k, target=target.config, layers=tuple(range(self.layers)),
                         tree=self.tree, stop_below=self.stop_below), None

  def draft_forward(self, target):
    return target.params, target.config, self.layers

  @classmethod
  def from_cli(cls, arg: str, k: int, tree: int | None) -> "EarlyExit":
    if not arg:
      raise ValueError("--drafter early-exit needs a layer count, e.g. early-exit:4")
    return cls(layers=registry.int_arg("early-exit:L", arg, "early-exit:4"), k=k,
               tree=registry.dynamic_tree(tree, k))

  @classmethod
  def bench_defaults(cls, config) -> list[str]:
    n = config.n_layers
    return [f"early-exit:{l}" for l in sorted({max(1, (3 * n) // 4), n - 1}) if 1 <= l < n]

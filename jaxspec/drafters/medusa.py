"""`Medusa`: k residual heads over the target's last feature (Cai et al., 2024), trained by
`jaxspec.train`.

Head i (i = 0 .. k-1) maps the target feature f_t (its residual stream before the final norm,
`Output.hidden`), whose own next token x_{t+1} the target predicts, to the token x_{t+2+i}:
`layers` residual blocks h <- h + SiLU(W h + b), then the target's own head (final norm + LM
head), so a head costs D*D parameters, not D*V.

In the compiled loop the state is one feature per row: `hidden[b, prompt_lens[b] - 1]` after
prefill, `hidden[b, n_acc[b]]` after each verify pass (the feature whose next token is the new
pending token). All k proposals come from one evaluation of the heads: argmax when greedy, a
sample (with its distribution, for lossless rejection sampling) otherwise. The proposals of
head i do not depend on the other drafts, so the marginal of head i is a valid draft
distribution.

Token trees: the children of every node at depth d are the top candidates of head d (head 0 for
the root's children), so a `trees.Static` tree is Medusa's cartesian top-k-per-head tree and a
`trees.Dynamic` one keeps the nodes with the best products of head probabilities. The tree needs
`max_depth <= n_heads`; commit reads the true feature at the last accepted node of the path.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar

import jax
import jax.numpy as jnp

from jaxspec import sampling
from jaxspec.models import Model, ModelConfig

from . import registry, vocab
from .base import Accepted, Drafter, DrafterSpec, Prefill, Proposal, Round, last_tokens, pick
from .head import Head
from .tree_draft import grow

KIND = "medusa"


@dataclasses.dataclass(frozen=True)
class MedusaConfig:
  """Shape of a set of Medusa heads: the target config they were trained for."""

  target: ModelConfig
  n_heads: int = 4
  layers: int = 1  # residual blocks per head
  draft_vocab: int = 0  # > 0: the heads read out over this many target ids (`drafters.vocab`)


def param_shapes_medusa(config: MedusaConfig) -> dict:
  h, l, d = config.n_heads, config.layers, config.target.dim
  out = {"w": (h, l, d, d), "b": (h, l, d)}
  if config.draft_vocab:
    out["vocab_ids"] = (config.draft_vocab,)
  return out


def init_params(config: MedusaConfig, seed: int = 0) -> dict:
  """Zero blocks (Medusa's init): every head starts as the target's own next-token head."""
  del seed
  shapes = param_shapes_medusa(dataclasses.replace(config, draft_vocab=0))
  return jax.tree.map(lambda s: jnp.zeros(s, jnp.float32), shapes,
                      is_leaf=lambda s: isinstance(s, tuple))


def blocks(w: jax.Array, b: jax.Array, x: jax.Array) -> jax.Array:
  """Each head's residual blocks: x [..., H, D] (one input per head), w [H, L, D, D],
  b [H, L, D] -> [..., H, D]."""
  x = x.astype(w.dtype)
  for l in range(w.shape[1]):
    x = x + jax.nn.silu(jnp.einsum("...HD,HDE->...HE", x, w[:, l]) + b[:, l])
  return x


def features(params, h: jax.Array) -> jax.Array:
  """h [..., D] -> per-head features [..., H, D] (every head reads the same feature)."""
  w = params["w"]
  return blocks(w, params["b"], jnp.broadcast_to(h[..., None, :],
                                                 h.shape[:-1] + (w.shape[0], h.shape[-1])))


def logits(params, tparams, target: ModelConfig, h: jax.Array) -> jax.Array:
  """h [B, D] -> float32 logits [B, H, V] of tokens +2 .. +H+1 beyond h's position (over the
  heads' reduced vocabulary when they have one, -inf elsewhere)."""
  return vocab.read_out(params.get("vocab"), tparams, target, features(params, h))


def _first(params, n: int) -> dict:
  """The first n heads' blocks (the readout is shared)."""
  return dict(params, w=params["w"][:n], b=params["b"][:n])


# ------------------------------------------------------------------------------- loop spec


@dataclasses.dataclass(frozen=True)
class MedusaSpec(DrafterSpec):
  head: MedusaConfig | None = None

  @property
  def draft_forwards(self) -> int:
    return 1  # one evaluation of the heads per round

  def init(self, params, p: Prefill):
    return pick(p.hidden, p.prompt_lens - 1)  # [B, D]

  def propose(self, params, feat, r: Round):
    if self.tree is None:
      sub = _first(params, self.k)
      lg = logits(sub, r.tparams, self.target, feat)  # [B, k, V]
      tokens, probs = sampling.sample(r.key, lg, self.mode, r.sp)
      return feat, Proposal.chain(tokens, probs)
    depth = self.tree.max_depth
    sub = _first(params, depth)
    lg = logits(sub, r.tparams, self.target, feat)  # [B, depth, V]: head d = depth d+1 tokens

    def feed(cache, toks, pos, mask_base, tree_mask, parent):
      d = jnp.minimum(pos - mask_base[:, None], depth - 1)  # [B, T] node depths (>= 1)
      return cache, jnp.take_along_axis(lg, d[:, :, None], axis=1), None

    pending = last_tokens(r.seq, r.n, 1)[:, 0]
    _, arrays, _ = grow(feed, None, lg[:, 0], pending, r.n - 1, self.tree,
                        sample=self.sibling_sampling(r))
    return feat, Proposal.from_tree(self.tree, arrays)

  def commit(self, params, feat, r: Round, a: Accepted):
    return pick(a.hidden, a.n_acc)


# ------------------------------------------------------------------------------ user objects


@dataclasses.dataclass(eq=False)
class MedusaHeads(Head):
  """Trained Medusa heads (`jaxspec.train.train_drafter(kind="medusa")`)."""

  KIND = KIND


@registry.register("medusa", usage="medusa:CKPT",
                   help="trained Medusa heads (jaxspec train-drafter --kind medusa)")
@dataclasses.dataclass(frozen=True, eq=False)
class Medusa(Drafter):
  """Drafts k tokens at once with trained Medusa heads (k <= the number of heads).

  Args:
    heads: a `MedusaHeads` (from `jaxspec.train.train_drafter(kind="medusa")` or
      `MedusaHeads.load(path)`), a `jaxspec.checkpoint.load_head` result, or a checkpoint path.
    k: tokens proposed per round (the first k heads; chains).
    tree: token-tree spec (`trees.Static`, e.g. `Static.from_branching((4, 2, 2))` for Medusa's
      top-4 x top-2 x top-2 tree, or `trees.Dynamic`); its depth is at most the number of heads.
  """

  heads: object
  k: int = 4
  tree: object = None

  # What a family of k heads over the target's feature is made of (Hydra overrides these).
  LABEL: ClassVar[str] = "Medusa"
  HEADS: ClassVar[type] = None  # set below: MedusaHeads
  CONFIG: ClassVar[type] = MedusaConfig
  SPEC: ClassVar[type] = MedusaSpec
  SHAPES: ClassVar[Callable] = staticmethod(param_shapes_medusa)

  def check(self):
    h = self.HEADS.resolve(self.heads)
    object.__setattr__(self, "heads", h)
    if isinstance(h.config, self.CONFIG):
      if self.tree is None and self.k > h.config.n_heads:
        raise ValueError(f"{self.LABEL} k={self.k} needs at least k heads; these have "
                         f"{h.config.n_heads} (train with k={self.k} or use a smaller k)")
      if self.tree is not None and self.tree.max_depth > h.config.n_heads:
        raise ValueError(f"a {self.LABEL} tree of depth {self.tree.max_depth} needs as many "
                         f"heads; these have {h.config.n_heads}")

  def bind(self, target: Model):
    h = self.heads
    if not isinstance(h.config, self.CONFIG):
      raise ValueError(f"{self.LABEL} heads {h.name!r} have no usable config ({h.config!r})")
    h.check_target(self.LABEL, target)
    h.check_shapes(self.SHAPES(h.config))
    params = vocab.bind_head(h.params, target)
    return self.SPEC(k=self.k, target=target.config, head=h.config, tree=self.tree), params

  @classmethod
  def from_cli(cls, arg: str, k: int, tree: int | None) -> "Medusa":
    name = cls.HEADS.KIND
    if not arg:
      raise ValueError(f"--drafter {name} needs a checkpoint, e.g. {name}:runs/{name} (made by "
                       f"jaxspec train-drafter --kind {name})")
    return cls(arg, k=k, tree=registry.dynamic_tree(tree, k))


Medusa.HEADS = MedusaHeads

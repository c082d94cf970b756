"""`Hydra`: sequentially dependent draft heads (Ankner et al., 2024), trained by `jaxspec.train`.

Medusa's heads all read the target's last feature f_t and guess x_{t+2+i} blind to what the
heads before them drafted. A Hydra head also reads the token drafted just before its own:

    head i:  z = W_in_i [f_t ; embed(x_{t+1+i})] + c_i,  then Medusa's residual blocks,
             then the target's head (or a reduced draft vocabulary)  ->  x_{t+2+i}

where x_{t+1} is the pending token (the target's own next token) and x_{t+1+i}, i >= 1, the
token head i-1 drafted. Drafting is therefore autoregressive over the heads (k small MLPs and k
readouts, no extra target or decoder forward), and each draft's distribution is conditioned on
the drafts before it, so a sampled chain's q is a proper autoregressive draft distribution.
`W_in` starts as [I ; 0] (every head starts as a Medusa head).

Trees: a node at depth d with token x gets its children from head d reading [f_t ; embed(x)]
(the root's from head 0 reading the pending token), so siblings have different continuations;
`trees.Static` and `trees.Dynamic` work as for the other drafters.

In the compiled loop the state is one feature per row, as for Medusa: `hidden[b, n_acc[b]]`
after each verify pass.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar

import jax
import jax.numpy as jnp

from jaxspec.models import ModelConfig

from . import registry, vocab
from .base import Accepted, DrafterSpec, Prefill, Proposal, Round, last_tokens, pick
from .chain import draft_chain
from .head import Head
from .medusa import Medusa, blocks
from .tree_draft import grow

KIND = "hydra"


@dataclasses.dataclass(frozen=True)
class HydraConfig:
  """Shape of a set of Hydra heads: the target config they were trained for."""

  target: ModelConfig
  n_heads: int = 4
  layers: int = 1  # residual blocks per head
  draft_vocab: int = 0  # > 0: the heads read out over this many target ids (`drafters.vocab`)


def param_shapes_hydra(config: HydraConfig) -> dict:
  h, l, d = config.n_heads, config.layers, config.target.dim
  out = {"w_in": (h, 2 * d, d), "b_in": (h, d), "w": (h, l, d, d), "b": (h, l, d)}
  if config.draft_vocab:
    out["vocab_ids"] = (config.draft_vocab,)
  return out


def init_params(config: HydraConfig, seed: int = 0) -> dict:
  """W_in = [I ; 0] and zero blocks: every head starts as the target's own next-token head
  on f_t (a Medusa head at init); training teaches it to use the previous token."""
  del seed
  h, d = config.n_heads, config.target.dim
  shapes = param_shapes_hydra(dataclasses.replace(config, draft_vocab=0))
  p = jax.tree.map(lambda s: jnp.zeros(s, jnp.float32), shapes,
                   is_leaf=lambda s: isinstance(s, tuple))
  eye = jnp.concatenate([jnp.eye(d, dtype=jnp.float32), jnp.zeros((d, d), jnp.float32)])
  p["w_in"] = jnp.broadcast_to(eye, (h, 2 * d, d))
  return p


def features(params, tparams, f: jax.Array, tokens: jax.Array, heads) -> jax.Array:
  """Head `heads` (an int, or an int array shaped like `tokens`) on the feature f [..., D] and
  the token before its own, tokens [...] -> its output feature [..., D]."""
  e = tparams["embed"][tokens]  # [..., D]
  dtype = params["w"].dtype
  x = jnp.concatenate([f.astype(dtype), e.astype(dtype)], axis=-1)  # [..., 2D]
  w_in, b_in = params["w_in"][heads], params["b_in"][heads]  # [..., 2D, D], [..., D]
  w, b = params["w"][heads], params["b"][heads]  # [..., L, D, D], [..., L, D]
  z = jnp.einsum("...E,...ED->...D", x, w_in) + b_in
  for l in range(w.shape[-3]):
    z = z + jax.nn.silu(jnp.einsum("...D,...DE->...E", z, w[..., l, :, :]) + b[..., l, :])
  return z


def training_features(params, tparams, feats: jax.Array, tokens: jax.Array) -> jax.Array:
  """Teacher-forced: every head at every position, feats [B, T, D] and the true tokens
  [B, T] -> [B, T, H, D] (head i at t reads f_t and x_{t+1+i})."""
  n = params["w"].shape[0]
  prev = jnp.stack([jnp.roll(tokens, -(i + 1), axis=1) for i in range(n)], axis=2)  # [B,T,H]
  e = tparams["embed"][prev]  # [B, T, H, D]
  dtype = params["w"].dtype
  f = jnp.broadcast_to(feats[:, :, None, :], e.shape).astype(dtype)
  x = jnp.concatenate([f, e.astype(dtype)], axis=-1)  # [B, T, H, 2D]
  z = jnp.einsum("BTHE,HED->BTHD", x, params["w_in"]) + params["b_in"]
  return blocks(params["w"], params["b"], z)


# ------------------------------------------------------------------------------- loop spec


@dataclasses.dataclass(frozen=True)
class HydraSpec(DrafterSpec):
  head: HydraConfig | None = None

  @property
  def draft_forwards(self) -> int:
    return 1  # k small MLPs and readouts, no decoder forward

  def init(self, params, p: Prefill):
    return pick(p.hidden, p.prompt_lens - 1)  # [B, D]

  def _logits(self, params, tparams, z):
    return vocab.read_out(params.get("vocab"), tparams, self.target, z)

  def propose(self, params, feat, r: Round):
    tp = r.tparams
    pending = last_tokens(r.seq, r.n, 1)[:, 0]  # [B]
    first = self._logits(params, tp, features(params, tp, feat, pending, 0)[:, None])[:, 0]
    if self.tree is None:
      def step(i, tok):
        z = features(params, tp, feat, tok, i)
        return i + 1, self._logits(params, tp, z[:, None])[:, 0]

      _, tokens, probs = draft_chain(step, jnp.int32(1), first, self.k, r.key, self.mode,
                                     r.sp)
      return feat, Proposal.chain(tokens, probs)
    depth = self.tree.max_depth

    def feed(cache, toks, pos, mask_base, tree_mask, parent):
      d = jnp.minimum(pos - mask_base[:, None], depth - 1)  # [B, T] node depths (>= 1)
      f = jnp.broadcast_to(feat[:, None, :], toks.shape + feat.shape[-1:])
      return cache, self._logits(params, tp, features(params, tp, f, toks, d)), None

    _, arrays, _ = grow(feed, None, first, pending, r.n - 1, self.tree,
                        sample=self.sibling_sampling(r))
    return feat, Proposal.from_tree(self.tree, arrays)

  def commit(self, params, feat, r: Round, a: Accepted):
    return pick(a.hidden, a.n_acc)


# ------------------------------------------------------------------------------ user objects


@dataclasses.dataclass(eq=False)
class HydraHeads(Head):
  """Trained Hydra heads (`jaxspec.train.train_drafter(kind="hydra")`)."""

  KIND = KIND


@registry.register("hydra", usage="hydra:CKPT",
                   help="trained Hydra heads (jaxspec train-drafter --kind hydra)")
@dataclasses.dataclass(frozen=True, eq=False)
class Hydra(Medusa):
  """Drafts k tokens with trained Hydra heads, each reading the token drafted before it.

  Args:
    heads: a `HydraHeads` (from `jaxspec.train.train_drafter(kind="hydra")` or
      `HydraHeads.load(path)`), a `jaxspec.checkpoint.load_head` result, or a checkpoint path.
    k: tokens proposed per round (the first k heads; chains).
    tree: token-tree spec (`trees.Static` / `trees.Dynamic`); its depth is at most the number
      of heads.
  """

  LABEL: ClassVar[str] = "Hydra"
  HEADS: ClassVar[type] = HydraHeads
  CONFIG: ClassVar[type] = HydraConfig
  SPEC: ClassVar[type] = HydraSpec
  SHAPES: ClassVar[Callable] = staticmethod(param_shapes_hydra)

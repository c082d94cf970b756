"""`Eagle`: an EAGLE-style feature drafter (Li et al., 2024), trained by `jaxspec.train`.

A small decoder (one Llama layer by default, run through `models.llama.forward` with
`embeds=`) reads, at position t, the fused input `fc([f_t ; embed(x_{t+1})])` (2D -> D), where
f_t is the target's feature (its residual stream before the final norm, `Output.hidden`) and
x_{t+1} the next token. Its output g_t predicts the next feature f_{t+1}; the target's own head
(final norm + LM head) reads g_t out as the distribution of x_{t+2}. Drafting is autoregressive
in feature space: each drafted token is fed back with the predicted feature.

In the compiled loop the drafter keeps its own small KV cache, one row length per row:

  * invariant at the start of a round: the drafter cache holds positions 0 .. n-3 built from TRUE
    target features, and `feat` is the true feature f_{n-2} (whose next token is the pending
    token seq[n-1]);
  * propose: feed position n-2 = (feat, seq[n-1]) then k-1 positions of (predicted feature,
    drafted token): k proposals;
  * commit: rewind to n-1 and re-feed the k verified positions n-1 .. n+k-2 with the TRUE
    features of the verify pass and the drafted tokens (a fixed shape), then rewind the row to
    n_new - 2: only the accepted positions stay. `feat` becomes hidden[b, n_acc[b]].

Token trees (`tree=` a `trees.Static` or `trees.Dynamic`): the root feed is the same; the tree
then grows level by level (`tree_draft.grow`), each node fed at position n-2+depth with its
PARENT's predicted feature and its own token, seeing exactly its ancestors (tree mask). Commit
re-feeds the accepted path the same way as a chain, with the verify pass's true features
gathered along the path.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxspec.models import KVCache, Model, ModelConfig, forward, head, param_shapes

from .base import DrafterSpec, Round, check_k, check_tree, last_tokens
from .chain import draft_chain
from .tree_draft import grow

KIND = "eagle"


@dataclasses.dataclass(frozen=True)
class EagleConfig:
  """Shape of an EAGLE head: the target config it was trained for and its decoder depth."""

  target: ModelConfig
  layers: int = 1

  @property
  def decoder(self) -> ModelConfig:
    """The drafter's own decoder: the target's layer shape, `layers` deep."""
    t = self.target
    return ModelConfig(dim=t.dim, n_layers=self.layers, n_heads=t.n_heads,
                       n_kv_heads=t.n_kv_heads, hidden_dim=t.hidden_dim,
                       vocab_size=t.vocab_size, head_dim=t.head_dim, max_seq_len=t.max_seq_len,
                       norm_eps=t.norm_eps, rope_theta=t.rope_theta,
                       rope_layout=t.rope_layout, rope_scaling=t.rope_scaling,
                       tied_embeddings=True, arch="eagle")


def param_shapes_eagle(config: EagleConfig) -> dict:
  d = config.target.dim
  return {"fc": (2 * d, d), "fc_b": (d,), "layers": param_shapes(config.decoder)["layers"]}


def init_params(config: EagleConfig, seed: int = 0, scale: float = 0.02) -> dict:
  """fc starts as [I ; small noise] (g_0 ~ f_t), the layer as small random weights, norms one."""
  rng = np.random.default_rng(seed)
  d = config.target.dim
  shapes = param_shapes_eagle(config)

  def draw(path, shape):
    if "norm" in jax.tree_util.keystr(path):
      return jnp.ones(shape, jnp.float32)
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * scale)

  layers = jax.tree_util.tree_map_with_path(draw, shapes["layers"],
                                            is_leaf=lambda s: isinstance(s, tuple))
  fc = np.concatenate([np.eye(d, dtype=np.float32),
                       rng.standard_normal((d, d), dtype=np.float32) * scale], axis=0)
  return {"fc": jnp.asarray(fc), "fc_b": jnp.zeros((d,), jnp.float32), "layers": layers}


def step(params, tparams, config: EagleConfig, feats: jax.Array, next_tokens: jax.Array,
         cache: KVCache | None = None, *, positions=None, tree_mask=None, mask_base=None):
  """The drafter decoder over T new positions.

  feats [B, T, D]: the feature at each position (true or predicted); next_tokens [B, T]: the
  token that follows each position. Returns (g [B, T, D] predicted next features, new cache).
  Training calls it with cache=None over whole sequences; the loop with its KV cache.
  """
  dtype = tparams["embed"].dtype
  e = tparams["embed"][next_tokens]  # [B, T, D]
  x = jnp.concatenate([feats.astype(dtype), e.astype(dtype)], axis=-1)
  x = jnp.einsum("BTE,ED->BTD", x, params["fc"].astype(dtype)) + params["fc_b"].astype(dtype)
  p = {"embed": tparams["embed"], "layers": params["layers"],
       "final_norm": tparams["final_norm"]}
  out = forward(p, config.decoder, next_tokens, cache, embeds=x, logits=False,
                positions=positions, tree_mask=tree_mask, mask_base=mask_base)
  return out.hidden, out.cache


# ------------------------------------------------------------------------------- loop spec


@struct.dataclass
class EagleState:
  cache: KVCache  # the drafter's own cache; lengths == n - 2 between rounds
  feat: jax.Array  # [B, D]: true target feature f_{n-2}
  drafts: jax.Array  # [B, k] (chain) or [B, N] (tree tokens): this round's proposals


def _pick(hidden: jax.Array, idx: jax.Array) -> jax.Array:
  """hidden [B, T, D], idx [B] -> [B, D]."""
  return jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]


@dataclasses.dataclass(frozen=True)
class EagleSpec(DrafterSpec):
  head: EagleConfig | None = None

  @property
  def draft_forwards(self) -> int:
    # k drafting steps (or one per tree level) and one re-feed of the verified positions
    return (self.k if self.tree is None else self.tree.max_depth) + 1

  def init(self, params, tparams, prompt, prompt_lens, cache_size, hidden):
    b = prompt.shape[0]
    cache = KVCache.init(self.head.decoder, b, cache_size, tparams["embed"].dtype)
    # Position t reads (f_t, x_{t+1}); the last prompt position waits for the first sampled
    # token, so it is fed in the first propose. (Garbage past each row's prompt is rewound.)
    nxt = jnp.concatenate([prompt[:, 1:], prompt[:, -1:]], axis=1)
    _, cache = step(params, tparams, self.head, hidden, nxt, cache)
    width = self.k if self.tree is None else self.tree.n_nodes
    return EagleState(cache=cache.rewind(prompt_lens - 1), feat=_pick(hidden, prompt_lens - 1),
                      drafts=jnp.zeros((b, width), jnp.int32))

  def propose(self, params, st: EagleState, r: Round):
    tp = r.tparams
    cache = st.cache.rewind(r.n - 2)
    g, cache = step(params, tp, self.head, st.feat[:, None], last_tokens(r.seq, r.n, 1), cache)

    def one(carry, tok):
      cache, g = carry
      g, cache = step(params, tp, self.head, g, tok[:, None], cache)
      return (cache, g), head(tp, self.target, g)[:, 0]

    first = head(tp, self.target, g)[:, 0]
    (cache, _), tokens, probs = draft_chain(one, (cache, g), first, self.k, r.key, self.mode,
                                            r.sp)
    return st.replace(cache=cache, drafts=tokens), r.tcache, tokens, probs

  def propose_tree(self, params, st: EagleState, r: Round):
    tp = r.tparams
    base = r.n - 2  # the root feed's slot and position
    pending = last_tokens(r.seq, r.n, 1)[:, 0]
    g, cache = step(params, tp, self.head, st.feat[:, None], pending[:, None],
                    st.cache.rewind(base))

    def feed(cache, toks, pos, mask_base, tree_mask, parent):
      g, cache = step(params, tp, self.head, parent, toks, cache, positions=pos,
                      tree_mask=tree_mask, mask_base=mask_base)
      return cache, head(tp, self.target, g), g

    cache, arrays, _ = grow(feed, cache, head(tp, self.target, g)[:, 0], pending, base,
                            self.tree, root_feat=g[:, 0])
    return st.replace(cache=cache, drafts=arrays.tokens), r.tcache, arrays

  def _refeed(self, params, st: EagleState, r: Round, n_new, n_acc, hidden, tokens):
    # Re-feed positions n-1 .. n+D-2 with the verify pass's true features of the verified
    # positions (hidden [B, D+1, Dm], fixed shape) and the drafted tokens that follow them
    # (tokens [B, D]), then keep only the accepted ones.
    _, cache = step(params, r.tparams, self.head, hidden[:, :-1], tokens,
                    st.cache.rewind(r.n - 1))
    return st.replace(cache=cache.rewind(n_new - 2), feat=_pick(hidden, n_acc))

  def commit_tree(self, params, st: EagleState, r: Round, n_new, n_acc, hidden, path):
    # hidden is gathered along the accepted path; its tokens are those of nodes 1 .. D.
    tokens = jnp.take_along_axis(st.drafts, path[:, 1:], axis=1)  # [B, D]
    return self._refeed(params, st, r, n_new, n_acc, hidden, tokens)

  def commit(self, params, st: EagleState, r: Round, n_new, n_acc, hidden):
    return self._refeed(params, st, r, n_new, n_acc, hidden, st.drafts)


# ------------------------------------------------------------------------------ user objects


@dataclasses.dataclass(eq=False)
class EagleHead:
  """Trained EAGLE drafter weights (`jaxspec.train.train_drafter(kind="eagle")`)."""

  params: dict
  config: EagleConfig
  kind: str = KIND
  name: str = "eagle"
  meta: dict = dataclasses.field(default_factory=dict)

  @classmethod
  def load(cls, path: str | os.PathLike, *, dtype=None) -> "EagleHead":
    """Loads a head saved by `save` / `jaxspec.save_checkpoint` (or a training `out_dir`)."""
    ckpt = load_checkpoint(path, KIND, dtype=dtype)
    return cls(params=ckpt.params, config=ckpt.config, name=ckpt.name or "eagle",
               meta=ckpt.meta)

  def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> str:
    from jaxspec import checkpoint
    return checkpoint.save(self, path, meta=self.meta, overwrite=overwrite)


def check_target(kind: str, config, target: Model) -> None:
  """A clear error when a head was trained for a model of another shape."""
  t, h = target.config, config.target
  if (t.dim, t.vocab_size) != (h.dim, h.vocab_size):
    raise ValueError(f"this {kind} head was trained for a model with dim {h.dim} and vocabulary "
                     f"{h.vocab_size}; the target {target.name!r} has dim {t.dim} and "
                     f"vocabulary {t.vocab_size}. Train a head for this target with "
                     f"jaxspec.train.train_drafter(model, kind={kind.lower()!r}, ...)")


def _check_shapes(kind: str, params, want) -> None:
  have = jax.tree.map(lambda x: tuple(x.shape), params)
  is_shape = lambda s: isinstance(s, tuple)
  if (jax.tree.structure(have, is_leaf=is_shape) != jax.tree.structure(want, is_leaf=is_shape)
      or jax.tree.leaves(have, is_leaf=is_shape) != jax.tree.leaves(want, is_leaf=is_shape)):
    raise ValueError(f"{kind} head parameters do not match its config (a damaged or foreign "
                     f"checkpoint?)")


def resolve_head(obj, cls, kind: str):
  """A head object from a head, a `checkpoint.Checkpoint` or a path."""
  from jaxspec.checkpoint import Checkpoint
  if isinstance(obj, (str, os.PathLike)):
    return cls.load(obj)
  if isinstance(obj, cls):
    return obj
  if isinstance(obj, Checkpoint):
    if obj.kind != kind:
      raise ValueError(f"expected a {kind!r} head, got a {obj.kind!r} checkpoint")
    return cls(params=obj.params, config=obj.config, name=obj.name or kind, meta=obj.meta)
  other = getattr(obj, "kind", None)
  if isinstance(other, str) and other != kind:
    raise ValueError(f"expected a {kind!r} head, got a {other!r} head")
  raise TypeError(f"expected a {cls.__name__} (or its checkpoint path), got {type(obj).__name__}")


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


@dataclasses.dataclass(frozen=True, eq=False)
class Eagle:
  """Drafts with a trained EAGLE head: k autoregressive steps in the target's feature space.

  Args:
    head: an `EagleHead` (from `jaxspec.train.train_drafter(kind="eagle")` or
      `EagleHead.load(path)`), a `jaxspec.checkpoint.load_head` result, or a checkpoint path.
    k: tokens proposed per round (chains).
    tree: token-tree spec (`trees.Static` / `trees.Dynamic`, EAGLE-2's dynamic tree being the
      usual choice); None drafts a chain of k.
  """

  head: object
  k: int = 4
  tree: object = None

  def __post_init__(self):
    check_k(self.k)
    object.__setattr__(self, "tree", check_tree(self.tree))
    object.__setattr__(self, "head", resolve_head(self.head, EagleHead, KIND))

  def bind(self, target: Model):
    h = self.head
    if not isinstance(h.config, EagleConfig):
      raise ValueError(f"EAGLE head {h.name!r} has no usable config ({h.config!r})")
    check_target("EAGLE", h.config, target)
    _check_shapes("EAGLE", h.params, param_shapes_eagle(h.config))
    params = jax.tree.map(lambda x: jnp.asarray(x, target.dtype), h.params)
    return EagleSpec(k=self.k, target=target.config, head=h.config, tree=self.tree), params

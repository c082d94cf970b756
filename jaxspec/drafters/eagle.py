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

EAGLE-3 (Li et al., 2025; `EagleConfig.feature_layers`): f_t is instead a learned fusion
`fuse [f^low_t ; f^mid_t ; f^high_t]` (nD -> D) of several target layers' outputs, which the
verify pass hands over with its logits (`DrafterSpec.feature_layers`: the layer scan is split
at those layers, no second target pass). g is no longer regressed onto a target feature; the
head is trained on tokens only, fed its own g for several steps (training-time test,
`jaxspec.train.objectives.Eagle3Objective`), and reads out through the target's final norm and
head rows like EAGLE-1 (usually a reduced draft vocabulary). The loop below is the same for
both generations, with the fused feature in place of f.

Token trees (`tree=` a `trees.Static` or `trees.Dynamic`): the root feed is the same; the tree
then grows level by level (`tree_draft.grow`), each node fed at position n-2+depth with its
PARENT's predicted feature and its own token, seeing exactly its ancestors (tree mask). Commit
re-feeds the accepted path the same way as a chain, with the verify pass's true features
gathered along the path.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxspec.models import KVCache, Model, ModelConfig, forward, param_shapes

from . import registry, vocab
from .base import Accepted, Drafter, DrafterSpec, Prefill, Proposal, Round, last_tokens, pick
from .chain import draft_chain
from .head import Head, decoder_config, init_layers
from .tree_draft import grow

KIND = "eagle"


@dataclasses.dataclass(frozen=True)
class EagleConfig:
  """Shape of an EAGLE head: the target config it was trained for and its decoder depth."""

  target: ModelConfig
  layers: int = 1
  draft_vocab: int = 0  # > 0: the head reads out over this many target ids (`drafters.vocab`)
  # EAGLE-3: the target layers whose outputs are fused (concatenated, then `fuse` [n*D, D])
  # into the head's feature; () is EAGLE-1/2, which reads the last layer's residual stream.
  feature_layers: tuple[int, ...] = ()

  @property
  def generation(self) -> int:
    return 3 if self.feature_layers else 1

  @property
  def decoder(self) -> ModelConfig:
    """The drafter's own decoder: the target's layer shape, `layers` deep."""
    return decoder_config(self.target, self.layers, "eagle")


def eagle3_layers(n_layers: int) -> tuple[int, ...]:
  """EAGLE-3's low, middle and high layers: the outputs of layers 1, L/2 - 1 and L - 4 (as
  the EAGLE-3 release taps a Llama), or three evenly spaced ones in a model too shallow for
  those to be distinct."""
  ids = (1, n_layers // 2 - 1, n_layers - 4)
  if not 0 <= ids[0] < ids[1] < ids[2] < n_layers:
    ids = tuple(sorted({round(x) for x in np.linspace(0, n_layers - 1, 3)}))
  return ids


def check_feature_layers(layers, n_layers: int) -> tuple[int, ...]:
  try:
    ids = tuple(int(i) for i in layers)
  except (TypeError, ValueError):
    ids = None
  if (ids is None or not ids or any(not 0 <= i < n_layers for i in ids)
      or any(a >= b for a, b in zip(ids, ids[1:]))
      or any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) for i in layers)):
    raise ValueError(f"feature_layers must be increasing layer ids in [0, {n_layers}), got "
                     f"{layers!r}")
  return ids


def param_shapes_eagle(config: EagleConfig) -> dict:
  d = config.target.dim
  out = {"fc": (2 * d, d), "fc_b": (d,), "layers": param_shapes(config.decoder)["layers"]}
  if config.feature_layers:
    out["fuse"] = (len(config.feature_layers) * d, d)
  if config.draft_vocab:
    out["vocab_ids"] = (config.draft_vocab,)
  return out


def init_params(config: EagleConfig, seed: int = 0, scale: float = 0.02) -> dict:
  """fc starts as [I ; small noise] (g_0 ~ f_t), the layer as small random weights, norms one."""
  rng = np.random.default_rng(seed)
  d = config.target.dim
  layers = init_layers(config.decoder, rng, scale)
  fc = np.concatenate([np.eye(d, dtype=np.float32),
                       rng.standard_normal((d, d), dtype=np.float32) * scale], axis=0)
  out = {"fc": jnp.asarray(fc), "fc_b": jnp.zeros((d,), jnp.float32), "layers": layers}
  if config.feature_layers:  # starts as the highest tapped layer's stream, plus small noise
    n = len(config.feature_layers)
    fuse = rng.standard_normal((n * d, d), dtype=np.float32) * scale
    fuse[(n - 1) * d:] += np.eye(d, dtype=np.float32)
    out["fuse"] = jnp.asarray(fuse)
  return out


def fuse(params, config: EagleConfig, feats: jax.Array) -> jax.Array:
  """The target's features as the head reads them: [.., n * D] tapped layers -> [.., D]
  (EAGLE-3), or the last layer's [.., D] as they are (EAGLE-1/2)."""
  if not config.feature_layers:
    return feats
  return jnp.einsum("...E,ED->...D", feats, params["fuse"].astype(feats.dtype))


def step(params, tparams, config: EagleConfig, feats: jax.Array, next_tokens: jax.Array,
         cache: KVCache | None = None, *, positions=None, tree_mask=None, mask_base=None,
         attn_mask=None, attn_chunk=None):
  """The drafter decoder over T new positions.

  feats [B, T, D]: the (fused) feature at each position (true or predicted); next_tokens
  [B, T]: the token that follows each position. Returns (g [B, T, D] predicted next features,
  new cache). EAGLE-1 training calls it with cache=None over whole sequences, EAGLE-3's
  training-time test with a cache and `attn_mask`; the loop with its KV cache.
  """
  dtype = tparams["embed"].dtype
  e = tparams["embed"][next_tokens]  # [B, T, D]
  x = jnp.concatenate([feats.astype(dtype), e.astype(dtype)], axis=-1)
  x = jnp.einsum("BTE,ED->BTD", x, params["fc"].astype(dtype)) + params["fc_b"].astype(dtype)
  p = {"embed": tparams["embed"], "layers": params["layers"],
       "final_norm": tparams["final_norm"]}
  out = forward(p, config.decoder, next_tokens, cache, embeds=x, logits=False,
                positions=positions, tree_mask=tree_mask, mask_base=mask_base,
                attn_mask=attn_mask, attn_chunk=attn_chunk)
  return out.hidden, out.cache


# ------------------------------------------------------------------------------- loop spec


@struct.dataclass
class EagleState:
  cache: KVCache  # the drafter's own cache; lengths == n - 2 between rounds
  feat: jax.Array  # [B, D]: true target feature f_{n-2}
  drafts: jax.Array  # [B, k] (chain) or [B, N] (tree tokens): this round's proposals


@dataclasses.dataclass(frozen=True)
class EagleSpec(DrafterSpec):
  head: EagleConfig | None = None

  @property
  def feature_layers(self) -> tuple[int, ...]:
    return self.head.feature_layers

  @property
  def draft_forwards(self) -> int:
    # k drafting steps (or one per tree level) and one re-feed of the verified positions
    return (self.k if self.tree is None else self.tree.max_depth) + 1

  def init(self, params, p: Prefill):
    b = p.prompt.shape[0]
    cache = KVCache.init(self.head.decoder, b, p.cache_size, p.tparams["embed"].dtype)
    # Position t reads (f_t, x_{t+1}); the last prompt position waits for the first sampled
    # token, so it is fed in the first propose. (Garbage past each row's prompt is rewound.)
    nxt = jnp.concatenate([p.prompt[:, 1:], p.prompt[:, -1:]], axis=1)
    feats = fuse(params, self.head, p.hidden)
    _, cache = step(params, p.tparams, self.head, feats, nxt, cache)
    width = self.k if self.tree is None else self.tree.n_nodes
    return EagleState(cache=cache.rewind(p.prompt_lens - 1),
                      feat=pick(feats, p.prompt_lens - 1),
                      drafts=jnp.zeros((b, width), jnp.int32))

  def propose(self, params, st: EagleState, r: Round):
    tp = r.tparams
    base = r.n - 2  # the root feed's slot and position
    pending = last_tokens(r.seq, r.n, 1)[:, 0]
    g, cache = step(params, tp, self.head, st.feat[:, None], pending[:, None],
                    st.cache.rewind(base))
    first = vocab.read_out(params["vocab"], tp, self.target, g)[:, 0]
    if self.tree is None:
      def one(carry, tok):
        cache, g = carry
        g, cache = step(params, tp, self.head, g, tok[:, None], cache)
        return (cache, g), vocab.read_out(params["vocab"], tp, self.target, g)[:, 0]

      (cache, _), tokens, probs = draft_chain(one, (cache, g), first, self.k, r.key, self.mode,
                                              r.sp)
      return st.replace(cache=cache, drafts=tokens), Proposal.chain(tokens, probs)

    def feed(cache, toks, pos, mask_base, tree_mask, parent):
      g, cache = step(params, tp, self.head, parent, toks, cache, positions=pos,
                      tree_mask=tree_mask, mask_base=mask_base)
      return cache, vocab.read_out(params["vocab"], tp, self.target, g), g

    cache, arrays, _ = grow(feed, cache, first, pending, base, self.tree, root_feat=g[:, 0],
                            sample=self.sibling_sampling(r))
    return st.replace(cache=cache, drafts=arrays.tokens), Proposal.from_tree(self.tree, arrays)

  def commit_plain(self, params, st: EagleState, r: Round, a: Accepted):
    # One token committed: feed position n-2 = (true f_{n-2}, pending token), as a round's
    # root feed does; the new feat is the verify pass's true feature at the pending token.
    _, cache = step(params, r.tparams, self.head, st.feat[:, None], last_tokens(r.seq, r.n, 1),
                    st.cache.rewind(r.n - 2))
    return st.replace(cache=cache, feat=fuse(params, self.head, a.hidden[:, 0]))

  def commit(self, params, st: EagleState, r: Round, a: Accepted):
    # Re-feed positions n-1 .. n+D-2 with the verify pass's true features of the verified
    # positions along the accepted path (a.hidden [B, D+1, Dm], fixed shape) and the drafted
    # tokens that follow them ([B, D]: the chain, or the tree's nodes 1 .. D of the path),
    # then keep only the accepted ones.
    tokens = (st.drafts if self.tree is None else
              jnp.take_along_axis(st.drafts, a.path[:, 1:], axis=1))
    feats = fuse(params, self.head, a.hidden)
    _, cache = step(params, r.tparams, self.head, feats[:, :-1], tokens, st.cache.rewind(r.n - 1))
    return st.replace(cache=cache.rewind(a.n_new - 2), feat=pick(feats, a.n_acc))


# ------------------------------------------------------------------------------ user objects


@dataclasses.dataclass(eq=False)
class EagleHead(Head):
  """Trained EAGLE drafter weights (`jaxspec.train.train_drafter(kind="eagle")` or
  `kind="eagle3"`; `config.generation` tells them apart)."""

  KIND = KIND


@registry.register("eagle", usage="eagle:CKPT",
                   help="a trained EAGLE head (jaxspec train-drafter --kind eagle)")
@dataclasses.dataclass(frozen=True, eq=False)
class Eagle(Drafter):
  """Drafts with a trained EAGLE head: k autoregressive steps in the target's feature space.

  Args:
    head: an EAGLE-1/2 or EAGLE-3 `EagleHead` (from `jaxspec.train.train_drafter(kind=
      "eagle" | "eagle3")` or
      `EagleHead.load(path)`), a `jaxspec.checkpoint.load_head` result, or a checkpoint path.
    k: tokens proposed per round (chains).
    tree: token-tree spec (`trees.Static` / `trees.Dynamic`, EAGLE-2's dynamic tree being the
      usual choice); None drafts a chain of k.
  """

  head: object
  k: int = 4
  tree: object = None

  def check(self):
    object.__setattr__(self, "head", EagleHead.resolve(self.head))

  def bind(self, target: Model):
    h = self.head
    if not isinstance(h.config, EagleConfig):
      raise ValueError(f"EAGLE head {h.name!r} has no usable config ({h.config!r})")
    h.check_target("EAGLE", target)
    if h.config.feature_layers and max(h.config.feature_layers) >= target.config.n_layers:
      raise ValueError(f"this EAGLE-3 head reads target layers {h.config.feature_layers}; "
                       f"{target.name!r} has {target.config.n_layers} layers")
    h.check_shapes(param_shapes_eagle(h.config))
    params = vocab.bind_head(h.params, target)
    return EagleSpec(k=self.k, target=target.config, head=h.config, tree=self.tree), params

  @classmethod
  def from_cli(cls, arg: str, k: int, tree: int | None) -> "Eagle":
    if not arg:
      raise ValueError("--drafter eagle needs a checkpoint, e.g. eagle:runs/eagle (made by "
                       "jaxspec train-drafter --kind eagle)")
    return cls(arg, k=k, tree=registry.dynamic_tree(tree, k))

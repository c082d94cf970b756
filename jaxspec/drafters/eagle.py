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

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxspec.models import KVCache, Model, ModelConfig, forward, param_shapes

from . import registry, vocab
from .base import Accepted, Drafter, DrafterSpec, Prefill, Proposal, Round, last_tokens, pick
from .chain import draft_chain
from .head import Head
from .tree_draft import grow

KIND = "eagle"


@dataclasses.dataclass(frozen=True)
class EagleConfig:
  """Shape of an EAGLE head: the target config it was trained for and its decoder depth."""

  target: ModelConfig
  layers: int = 1
  draft_vocab: int = 0  # > 0: the head reads out over this many target ids (`drafters.vocab`)

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
  out = {"fc": (2 * d, d), "fc_b": (d,), "layers": param_shapes(config.decoder)["layers"]}
  if config.draft_vocab:
    out["vocab_ids"] = (config.draft_vocab,)
  return out


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


@dataclasses.dataclass(frozen=True)
class EagleSpec(DrafterSpec):
  head: EagleConfig | None = None

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
    _, cache = step(params, p.tparams, self.head, p.hidden, nxt, cache)
    width = self.k if self.tree is None else self.tree.n_nodes
    return EagleState(cache=cache.rewind(p.prompt_lens - 1),
                      feat=pick(p.hidden, p.prompt_lens - 1),
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
    return st.replace(cache=cache, feat=a.hidden[:, 0])

  def commit(self, params, st: EagleState, r: Round, a: Accepted):
    # Re-feed positions n-1 .. n+D-2 with the verify pass's true features of the verified
    # positions along the accepted path (a.hidden [B, D+1, Dm], fixed shape) and the drafted
    # tokens that follow them ([B, D]: the chain, or the tree's nodes 1 .. D of the path),
    # then keep only the accepted ones.
    tokens = (st.drafts if self.tree is None else
              jnp.take_along_axis(st.drafts, a.path[:, 1:], axis=1))
    _, cache = step(params, r.tparams, self.head, a.hidden[:, :-1], tokens,
                    st.cache.rewind(r.n - 1))
    return st.replace(cache=cache.rewind(a.n_new - 2), feat=pick(a.hidden, a.n_acc))


# ------------------------------------------------------------------------------ user objects


@dataclasses.dataclass(eq=False)
class EagleHead(Head):
  """Trained EAGLE drafter weights (`jaxspec.train.train_drafter(kind="eagle")`)."""

  KIND = KIND


@registry.register("eagle", usage="eagle:CKPT",
                   help="a trained EAGLE head (jaxspec train-drafter --kind eagle)")
@dataclasses.dataclass(frozen=True, eq=False)
class Eagle(Drafter):
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

  def check(self):
    object.__setattr__(self, "head", EagleHead.resolve(self.head))

  def bind(self, target: Model):
    h = self.head
    if not isinstance(h.config, EagleConfig):
      raise ValueError(f"EAGLE head {h.name!r} has no usable config ({h.config!r})")
    h.check_target("EAGLE", target)
    h.check_shapes(param_shapes_eagle(h.config))
    params = vocab.bind_head(h.params, target)
    return EagleSpec(k=self.k, target=target.config, head=h.config, tree=self.tree), params

  @classmethod
  def from_cli(cls, arg: str, k: int, tree: int | None) -> "Eagle":
    if not arg:
      raise ValueError("--drafter eagle needs a checkpoint, e.g. eagle:runs/eagle (made by "
                       "jaxspec train-drafter --kind eagle)")
    return cls(arg, k=k, tree=registry.dynamic_tree(tree, k))

"""`Kangaroo`: the target's first layers plus a small trained adapter (Liu et al., 2024).

A self-speculative drafter: the draft of a token runs the target's first `exit_layer` layers
(sharing the target's weights and KV cache, as `EarlyExit` does), then an adapter (one decoder
layer of the target's shape, with its own KV cache) that turns that shallow residual stream into
something the target's own final norm and head read out as the next token. The adapter is what
`jaxspec train-drafter --kind adapter` trains (`train.objectives.AdapterObjective`): the target's
distribution of x_{t+1} from the shallow stream at t. Kangaroo's second early exit (stop
drafting once the draft's top-1 probability drops below a threshold; 0.6 in the paper) is
`stop_below`.

Caches. The prefix's K/V are the target's exactly (same weights, same inputs), so drafting
writes the target cache past the committed length and the verify pass rewrites those slots. The
adapter's cache must hold, for every committed position, the adapter's K/V of the TRUE shallow
stream there: the verify pass hands that stream over (`feature_layers = (exit_layer - 1,)`: the
layer scan is split there, no second target pass), and `commit` re-feeds the verified positions
along the accepted path (one adapter layer over depth + 1 positions) before rewinding to the
committed length. Between rounds the adapter cache has the target cache's length, n - 1.

An untrained adapter is the identity (its output projections start at zero: the residual passes
the stream through), so before training Kangaroo drafts exactly as `EarlyExit(exit_layer)`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxspec.models import KVCache, Model, ModelConfig, forward, head, param_shapes

from . import registry
from .base import Accepted, Drafter, DrafterSpec, Prefill, Proposal, Round, check_int, last_tokens
from .chain import draft_chain
from .head import Head, decoder_config, init_layers
from .tree_draft import grow

KIND = "adapter"


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """Shape of a Kangaroo adapter: the target it was trained for and the exit layer it reads
  (the residual stream after the target's first `exit_layer` layers)."""

  target: ModelConfig
  exit_layer: int = 2

  @property
  def decoder(self) -> ModelConfig:
    """The adapter: one decoder layer of the target's layer shape."""
    return decoder_config(self.target, 1, "adapter")

  @property
  def prefix(self) -> tuple[int, ...]:
    """The target layers a draft step runs before the adapter."""
    return tuple(range(self.exit_layer))


def default_exit_layer(n_layers: int) -> int:
  """Kangaroo exits after 2 of Vicuna-7B's 32 layers; about an eighth here (SmolLM2: 3 of 30,
  Qwen2.5 0.5B: 3 of 24), at least 1 and fewer than all."""
  return min(max(1, n_layers // 8), n_layers - 1)


def check_exit_layer(exit_layer, n_layers: int) -> int:
  return check_int(f"the adapter's exit layer (a target with {n_layers} layers)", exit_layer, 1,
                   n_layers - 1)


def param_shapes_adapter(config: AdapterConfig) -> dict:
  return {"layers": param_shapes(config.decoder)["layers"]}


def init_params(config: AdapterConfig, seed: int = 0, scale: float = 0.02) -> dict:
  """Small random weights, norms one, and the two output projections (wo, w_down) zero: the
  untrained adapter passes the shallow stream through unchanged (EarlyExit's draft)."""
  layers = init_layers(config.decoder, np.random.default_rng(seed), scale,
                       zero=("wo", "w_down"))
  return {"layers": layers}


def adapt(params, tparams, config: AdapterConfig, shallow: jax.Array,
          cache: KVCache | None = None, *, positions=None, tree_mask=None, mask_base=None):
  """The adapter over T positions: shallow [B, T, D] (the target's stream after `exit_layer`
  layers) -> (g [B, T, D], which the target's `head` reads out; the new adapter cache). Training
  calls it with cache=None over whole sequences, the loop with the adapter's KV cache."""
  p = {"embed": tparams["embed"], "layers": params["layers"]}
  out = forward(p, config.decoder, jnp.zeros(shallow.shape[:2], jnp.int32), cache,
                embeds=shallow, logits=False, positions=positions, tree_mask=tree_mask,
                mask_base=mask_base)
  return out.hidden, out.cache


# ------------------------------------------------------------------------------- loop spec


@struct.dataclass
class Caches:
  """The two caches a draft step writes: the target's (prefix layers) and the adapter's; both
  hold one slot per position, so they rewind together."""

  target: KVCache
  adapter: KVCache

  def rewind(self, lengths: jax.Array) -> "Caches":
    return Caches(self.target.rewind(lengths), self.adapter.rewind(lengths))


@struct.dataclass
class KangarooState:
  cache: KVCache  # the adapter's cache; lengths == n - 1 between rounds (as the target's)


@dataclasses.dataclass(frozen=True)
class KangarooSpec(DrafterSpec):
  adapter: AdapterConfig | None = None
  stop_below: float | None = None

  @property
  def feature_layers(self) -> tuple[int, ...]:
    return (self.adapter.exit_layer - 1,)

  @property
  def draft_forwards(self) -> int:
    return self.k

  def _draft(self, params, tp, c: Caches, toks, **where):
    """Prefix layers then adapter over toks [B, T] -> (caches, logits [B, T, V])."""
    o = forward(tp, self.target, toks, c.target, layer_ids=self.adapter.prefix, logits=False,
                **where)
    g, acache = adapt(params, tp, self.adapter, o.hidden, c.adapter, **where)
    return Caches(o.cache, acache), head(tp, self.target, g)

  def init(self, params, p: Prefill):
    b = p.prompt.shape[0]
    cache = KVCache.init(self.adapter.decoder, b, p.cache_size, p.tparams["embed"].dtype)
    _, cache = adapt(params, p.tparams, self.adapter, p.hidden, cache)
    # Every prompt position is committed and in the target cache (the first sampled token is
    # pending); padding past a row's prompt is rewound away.
    return KangarooState(cache=cache.rewind(p.prompt_lens))

  def propose(self, params, st: KangarooState, r: Round):
    tp = r.tparams
    base = r.n - 1  # the pending token's slot and position
    pending = last_tokens(r.seq, r.n, 1)[:, 0]

    def step(c, tok):
      c, logits = self._draft(params, tp, c, tok[:, None])
      return c, logits[:, 0]

    c, first = step(Caches(r.tcache, st.cache.rewind(base)), pending)
    if self.tree is None:
      c, tokens, probs = draft_chain(step, c, first, self.k, r.key, self.mode, r.sp,
                                     self.stop_below)
      proposal = Proposal.chain(tokens, probs, tcache=c.target.rewind(base))
    else:
      def feed(c, toks, pos, mask_base, tree_mask, parent):
        c, logits = self._draft(params, tp, c, toks, positions=pos, mask_base=mask_base,
                                tree_mask=tree_mask)
        return c, logits, None

      c, arrays, _ = grow(feed, c, first, pending, base, self.tree,
                          sample=self.sibling_sampling(r))
      proposal = Proposal.from_tree(self.tree, arrays, tcache=c.target.rewind(base))
    return KangarooState(cache=c.adapter.rewind(base)), proposal

  def commit(self, params, st: KangarooState, r: Round, a: Accepted):
    # The verify pass's shallow stream along the accepted path (a.hidden [B, D+1, Dm]: the
    # pending token, then the drafts) re-fed at positions n-1 .. n-1+D; only the committed
    # ones (up to n_new - 2; the new pending token's waits for the next round) are kept.
    _, cache = adapt(params, r.tparams, self.adapter, a.hidden, st.cache.rewind(r.n - 1))
    return KangarooState(cache=cache.rewind(a.n_new - 1))


# ------------------------------------------------------------------------------ user objects


@dataclasses.dataclass(eq=False)
class AdapterHead(Head):
  """Trained Kangaroo adapter weights (`jaxspec.train.train_drafter(kind="adapter")`)."""

  KIND = KIND


@registry.register("kangaroo", usage="kangaroo:CKPT",
                   help="the target's first layers and a trained adapter (jaxspec train-drafter "
                        "--kind adapter); shares weights and cache")
@dataclasses.dataclass(frozen=True, eq=False)
class Kangaroo(Drafter):
  """Drafts with the target's first `adapter.config.exit_layer` layers, a trained adapter and
  the target's head (Kangaroo).

  Args:
    adapter: an `AdapterHead` (`jaxspec.train.train_drafter(model, kind="adapter")` or
      `AdapterHead.load(path)`), a `jaxspec.checkpoint.load_head` result, or a checkpoint path.
    k: tokens proposed per round (chains).
    tree: a token tree (`trees.Static` / `trees.Dynamic`); None drafts a chain of k.
    stop_below: Kangaroo's second early exit: a chain stops drafting once the draft's top-1
      probability drops below it (the paper uses 0.6); None drafts all k.
  """

  adapter: object
  k: int = 4
  tree: object = None
  stop_below: float | None = None

  def check(self):
    object.__setattr__(self, "adapter", AdapterHead.resolve(self.adapter))

  def _config(self) -> AdapterConfig:
    h = self.adapter
    if not isinstance(h.config, AdapterConfig):
      raise ValueError(f"Kangaroo adapter {h.name!r} has no usable config ({h.config!r})")
    return h.config

  def bind(self, target: Model):
    h, cfg = self.adapter, self._config()
    h.check_target("Kangaroo adapter", target)
    n = target.config.n_layers
    if not 1 <= cfg.exit_layer < n:
      raise ValueError(f"this Kangaroo adapter exits after layer {cfg.exit_layer}; "
                       f"{target.name!r} has {n} layers")
    h.check_shapes(param_shapes_adapter(cfg))
    return KangarooSpec(k=self.k, target=target.config, adapter=cfg, tree=self.tree,
                        stop_below=self.stop_below), h.params

  def draft_forward(self, target):
    """A draft step: the prefix and one adapter layer of the target's shape."""
    return target.params, target.config, self._config().exit_layer + 1

  @classmethod
  def from_cli(cls, arg: str, k: int, tree: int | None) -> "Kangaroo":
    if not arg:
      raise ValueError("--drafter kangaroo needs a checkpoint, e.g. kangaroo:runs/adapter (made "
                       "by jaxspec train-drafter --kind adapter)")
    return cls(arg, k=k, tree=registry.dynamic_tree(tree, k))

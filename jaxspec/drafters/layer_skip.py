"""`LayerSkip`: self-speculative drafting from any subset of the target's layers (SWIFT, DEL,
Kangaroo, "unified layer skipping"), sharing the target's weights, head and KV cache.

The draft runs the chosen layers in order (`forward(layer_ids=...)`), then the target's final
norm and head. A kept layer sees the cache entries the target wrote for that layer at committed
positions, but its input is the draft's residual stream, not the target's, so unlike a prefix
(`EarlyExit`) the draft's own K/V differ from the target's past the first skipped layer. That
never matters for exactness: the draft only writes slots past the committed length, and the
verify pass rewrites every layer at those slots before anything is committed (as for EarlyExit).

`layers=None` searches a skip set for the model on the fly, at bind time (a simplified SWIFT):
a calibration sequence (a fixed English text and the target's own greedy continuation of it),
one full forward for the target's greedy predictions and cache along it, then a greedy descent
from all layers that drops, one layer at a time, the layer whose removal keeps the most
predictions equal to the full model's (ties: the higher mean log-probability of the full
model's token), until `keep` of the layers are left; last, that set against the prefix of the
same size (EarlyExit's choice), keeping the better. A candidate is scored as drafting runs it:
one draft step per position against the target's cache of the context before it. Every step
scores all its candidates in one compiled program (`lax.map` over skip sets of one size). The
result is cached per model fingerprint (`search_cache`), so later binds of the same weights do
not search again. This is a simplification of SWIFT (no Bayesian optimisation, no online
adaptation during generation, first-draft agreement rather than measured acceptance).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec import fingerprint
from jaxspec.models import KVCache, Model, forward, layout

from . import registry
from .base import Drafter, DrafterSpec, Proposal, Round, last_tokens
from .chain import draft_chain
from .tree_draft import grow

CALIBRATION_TEXT = ("Once upon a time, there was a little girl named Lily. She liked to play "
                    "in the park with her friends. One day,")
CALIBRATION_NEW = 48  # tokens of the target's own greedy continuation scored by the search
DEFAULT_KEEP = 0.5  # fraction of the layers a searched skip set keeps

# (model fingerprint, layers kept, calibration) -> the searched layer ids
search_cache: dict[tuple, tuple[int, ...]] = {}


@dataclasses.dataclass(frozen=True)
class LayerSkipSpec(DrafterSpec):
  layers: tuple[int, ...] = (0,)
  stop_below: float | None = None

  @property
  def draft_forwards(self) -> int:
    return self.k

  def propose(self, params, dstate, r: Round):
    tp = r.tparams
    pending = last_tokens(r.seq, r.n, 1)[:, 0]
    if self.tree is None:
      def step(cache, tok):
        o = forward(tp, self.target, tok[:, None], cache, layer_ids=self.layers)
        return o.cache, o.logits[:, 0]

      cache, first = step(r.tcache, pending)
      cache, tokens, probs = draft_chain(step, cache, first, self.k, r.key, self.mode, r.sp,
                                         self.stop_below)
      return dstate, Proposal.chain(tokens, probs, tcache=cache.rewind(r.n - 1))

    def feed(cache, toks, pos, base, tree_mask, parent):
      o = forward(tp, self.target, toks, cache, positions=pos, mask_base=base,
                  tree_mask=tree_mask, layer_ids=self.layers)
      return o.cache, o.logits, None

    root = forward(tp, self.target, pending[:, None], r.tcache, layer_ids=self.layers)
    cache, arrays, _ = grow(feed, root.cache, root.logits[:, 0], pending, r.n - 1, self.tree,
                            sample=self.sibling_sampling(r))
    return dstate, Proposal.from_tree(self.tree, arrays, tcache=cache.rewind(r.n - 1))


def _check_layers(layers) -> tuple[int, ...] | None:
  """None, or a sequence of distinct non-negative layer ids -> their sorted tuple."""
  if layers is None:
    return None
  if isinstance(layers, (str, bytes)) or not isinstance(layers, (Sequence, np.ndarray, range)):
    raise TypeError(f"LayerSkip layers must be None or a sequence of layer ids, got {layers!r}")
  ids = []
  for i in list(layers):
    if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
      raise TypeError(f"LayerSkip layers must be integer layer ids, got {i!r} in {layers!r}")
    if i < 0:
      raise ValueError(f"LayerSkip layer ids must be >= 0, got {int(i)} in {list(layers)}")
    ids.append(int(i))
  if not ids:
    raise ValueError("LayerSkip needs at least one layer (layers=None searches a skip set)")
  dup = sorted({i for i in ids if ids.count(i) > 1})
  if dup:
    raise ValueError(f"LayerSkip layer ids must be distinct, got {ids} ({dup[0]} repeats)")
  return tuple(sorted(ids))


def _kept(n_layers: int, keep: float) -> int:
  """Layers a searched skip set keeps: ceil(keep * n), at least 1, fewer than n."""
  return min(max(1, math.ceil(keep * n_layers - 1e-9)), n_layers - 1)


@registry.register("layer-skip", usage="layer-skip[:L1,L2,...]", aliases=("layer_skip",
                                                                          "layerskip"),
                   help="a subset of the target's layers and its head (shares weights and "
                        "cache); ids 0,2,4 or 0+2+4; none: search a skip set for the model")
@dataclasses.dataclass(frozen=True)
class LayerSkip(Drafter):
  """Drafts with the target's layers `layers` (ids in increasing order; any subset, not only a
  prefix), then its final norm and head. layers=None: search a set keeping `keep` of the layers
  at bind time (see the module docstring). stop_below: stop a chain when the draft's top-1
  probability drops below it (DEL / Kangaroo's early stop of drafting)."""

  layers: Sequence[int] | None = None
  k: int = 4
  tree: object = None
  stop_below: float | None = None
  keep: float = DEFAULT_KEEP

  def check(self):
    object.__setattr__(self, "layers", _check_layers(self.layers))
    keep = self.keep
    if isinstance(keep, (bool, np.bool_)) or not isinstance(
        keep, (int, float, np.integer, np.floating)) or not 0.0 < float(keep) < 1.0:
      raise ValueError(f"LayerSkip keep must be a fraction of the layers in (0, 1), got "
                       f"{keep!r}")
    object.__setattr__(self, "keep", float(keep))

  def resolve(self, target: Model) -> tuple[int, ...]:
    """The layer ids this drafter runs on `target` (searching them when layers=None)."""
    n = target.config.n_layers
    if n < 2:
      raise ValueError(f"LayerSkip needs a target with at least 2 layers to skip one, got "
                       f"{n}")
    if self.layers is None:
      return search(target, _kept(n, self.keep))
    bad = [i for i in self.layers if i >= n]
    if bad:
      raise ValueError(f"LayerSkip layer id {bad[0]} is out of range: the target has {n} "
                       f"layers (ids 0..{n - 1})")
    if len(self.layers) >= n:
      raise ValueError(f"LayerSkip(layers={list(self.layers)}) must skip at least one of the "
                       f"target's {n} layers")
    return self.layers

  def bind(self, target: Model):
    return LayerSkipSpec(k=self.k, target=target.config, layers=self.resolve(target),
                         tree=self.tree, stop_below=self.stop_below), None

  def draft_forward(self, target):
    """One draft step costs as many layers as it runs (no search needed to know how many)."""
    n = target.config.n_layers
    count = len(self.layers) if self.layers is not None else _kept(n, self.keep)
    return target.params, target.config, count

  @classmethod
  def from_cli(cls, arg: str, k: int, tree: int | None) -> "LayerSkip":
    """`0,2,4` (or `0+2+4`, which survives `jaxspec bench --drafters`' comma list); empty:
    search a skip set."""
    layers = None
    if arg.strip():
      try:
        layers = [int(x) for x in arg.replace("+", ",").split(",")]
      except ValueError:
        raise ValueError(f"--drafter layer-skip needs comma-separated layer ids, got {arg!r} "
                         f"(e.g. layer-skip:0,2,4 or layer-skip:0+2+4, or layer-skip to "
                         f"search)") from None
    return cls(layers=layers, k=k, tree=registry.dynamic_tree(tree, k))


# ------------------------------------------------------------------------------ the search


def calibration_tokens(target: Model, text: str = CALIBRATION_TEXT,
                       new_tokens: int = CALIBRATION_NEW) -> np.ndarray:
  """[1, T] int32: `text` (tokenized) and the target's own greedy continuation of it."""
  tok = target.tokenizer
  ids = tok.encode(text) if tok is not None else []
  if not ids:
    ids = [0]
  cfg = target.config
  ids = ids[:max(1, cfg.max_seq_len - new_tokens)]
  new_tokens = min(new_tokens, cfg.max_seq_len - len(ids))
  prompt = jnp.asarray([ids], jnp.int32)
  cont = _rollout(target.params, cfg, prompt, new_tokens)
  return np.concatenate([np.asarray(prompt), np.asarray(cont)], axis=1)


@functools.partial(jax.jit, static_argnums=(1, 3))
def _rollout(params, cfg, prompt, new_tokens):
  cache = KVCache.like(params, cfg, 1, prompt.shape[1] + new_tokens)
  o = forward(params, cfg, prompt, cache)
  tok = jnp.argmax(o.logits[:, -1], axis=-1).astype(jnp.int32)

  def step(c, _):
    cache, tok = c
    o = forward(params, cfg, tok[:, None], cache)
    return (o.cache, jnp.argmax(o.logits[:, 0], axis=-1).astype(jnp.int32)), tok

  _, toks = jax.lax.scan(step, (o.cache, tok), None, length=new_tokens)
  return toks.T  # [1, new_tokens]


@functools.partial(jax.jit, static_argnums=(1,))
def _reference(params, cfg, tokens):
  """The full model over the calibration sequence: its cache (every layer, every slot) and its
  greedy predictions [1, T]."""
  cache = KVCache.init(cfg, 1, tokens.shape[1], params["embed"].dtype)
  o = forward(params, cfg, tokens, cache)
  return o.cache, jnp.argmax(o.logits, axis=-1)


@functools.partial(jax.jit, static_argnums=(1,))
def _scores(params, cfg, tokens, cache, ref, candidates):
  """candidates [C, n] layer ids -> (agreement [C], mean log p(ref) [C]) over the sequence.

  Scored as drafting sees it: position t is one draft step of the candidate against the
  target's own cache of positions < t (row t of a batch of T rows, cache length t), so a kept
  layer attends to the full model's K/V of the context, not to a skip-set forward's. Traced
  skip sets index stacked weights: per-layer ones are stacked inside the program (a transient
  copy of the layers for the search only)."""
  params = layout.stacked(params)
  t = tokens.shape[1]
  rows = cache.replace(k=jnp.broadcast_to(cache.k, (cache.k.shape[0], t) + cache.k.shape[2:]),
                       v=jnp.broadcast_to(cache.v, (cache.v.shape[0], t) + cache.v.shape[2:]),
                       lengths=jnp.arange(t, dtype=jnp.int32))
  ref = ref[0]  # [T]

  def one(ids):
    logits = forward(params, cfg, tokens[0][:, None], rows, layer_ids=ids).logits[:, 0]
    logp = jax.nn.log_softmax(logits, axis=-1)
    agree = jnp.mean((jnp.argmax(logits, axis=-1) == ref).astype(jnp.float32))
    return agree, jnp.mean(jnp.take_along_axis(logp, ref[:, None], axis=-1))

  return jax.lax.map(one, candidates)


def _best(target, tokens, cache, ref, cands: np.ndarray) -> tuple[tuple[int, ...], float]:
  agree, logp = (np.asarray(x) for x in _scores(target.params, target.config, tokens, cache,
                                                ref, jnp.asarray(cands, jnp.int32)))
  i = int(np.lexsort((-logp, -agree))[0])  # most agreement, then most likely
  return tuple(int(x) for x in cands[i]), float(agree[i])


def search(target: Model, keep: int, *, text: str = CALIBRATION_TEXT,
           new_tokens: int = CALIBRATION_NEW) -> tuple[int, ...]:
  """A skip set keeping `keep` of the target's layers, by greedy descent from all layers
  (see the module docstring); cached per model fingerprint in `search_cache`."""
  n = target.config.n_layers
  if not 1 <= keep < n:
    raise ValueError(f"a searched skip set keeps 1 to {n - 1} of {n} layers, got {keep}")
  key = (fingerprint.of_model(target), keep, text, new_tokens)
  hit = search_cache.get(key)
  if hit is not None:
    return hit
  tokens = jnp.asarray(calibration_tokens(target, text, new_tokens))
  cache, ref = _reference(target.params, target.config, tokens)
  kept = list(range(n))
  while len(kept) > keep:
    cands = np.asarray([[i for i in kept if i != drop] for drop in kept], np.int32)
    kept = list(_best(target, tokens, cache, ref, cands)[0])
  # the greedy descent against the prefix of the same cost (EarlyExit): never worse than it
  out, _ = _best(target, tokens, cache, ref, np.asarray([kept, list(range(keep))], np.int32))
  search_cache[key] = out
  return out

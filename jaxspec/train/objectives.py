"""What each drafter kind trains and how it turns into a drafter.

Every objective is a frozen dataclass (a jit static argument) with
  init(model, seed) -> params                     trainable parameters
  loss(params, tparams, tokens, lens, feats, key) -> (loss, metrics)
  result(model, params, meta) -> head object      what train_drafter returns and saves
  drafter(model, params, k) -> a jaxspec drafter  for the held-out tau during training

Data: tokens [B, T], lens [B] (positions t < lens are valid), feats [B, T, D] (the target's
features f_t); the target's distribution of x_{t+1} is softmax(head(f_t)). An objective that
reads several layers (`feature_layers`, EAGLE-3) gets feats [B, T, (n + 1) D]: those layers'
outputs, then f_t.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.drafters import eagle, hydra, kangaroo, medusa, vocab
from jaxspec.models import KVCache, Model, ModelConfig, forward, head, layout


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  m = mask.astype(jnp.float32)
  return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


def _soft_ce(target_logits: jax.Array, logits: jax.Array, ids=None) -> jax.Array:
  """Cross-entropy of softmax(logits) against the target's distribution: [...]. With a draft
  vocabulary (`ids` [N]; logits [..., N]) only the target's mass on those ids counts (FR-Spec:
  the softmax runs over N tokens, not V)."""
  p = jax.nn.softmax(target_logits, axis=-1)
  if ids is not None:
    p = p[..., ids]
  return -jnp.sum(p * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def _agree(target_logits: jax.Array, logits: jax.Array, ids=None) -> jax.Array:
  top = jnp.argmax(logits, -1)
  if ids is not None:
    top = ids[top]
  return (jnp.argmax(target_logits, -1) == top).astype(jnp.float32)


class Objective:
  """Declares what every objective may override."""

  @property
  def feature_layers(self) -> tuple[int, ...]:
    """Target layers whose outputs the training data must hold besides the last one's."""
    return ()


class _Readout(Objective):
  """The draft side's readout: the target's head, or a reduced draft vocabulary `ids` (a
  static tuple of target ids, `drafters.vocab`; counted over the training data)."""

  ids: tuple[int, ...] | None

  def _ids(self):
    return None if self.ids is None else jnp.asarray(np.asarray(self.ids, np.int32))

  def _draft_readout(self, tparams):
    """(readout: features [B, T, D] -> draft logits [B, T, V] or [B, T, N], ids [N] or None);
    the reduced head's rows are gathered once per loss, not once per head."""
    if self.ids is None:
      return (lambda x: head(tparams, self.target, x)), None
    ids = self._ids()
    vp = vocab.params(tparams, self.target, ids)
    return (lambda x: vocab.sub_logits(vp, self.target, x)), ids

  def _with_ids(self, params) -> dict:
    """Trained params as saved: the draft vocabulary's ids go along (`vocab_ids`)."""
    return params if self.ids is None else dict(params, vocab_ids=self._ids())


def _smooth_l1(x: jax.Array) -> jax.Array:
  a = jnp.abs(x)
  return jnp.where(a < 1.0, 0.5 * x * x, a - 0.5)


@dataclasses.dataclass(frozen=True)
class EagleObjective(_Readout):
  """Feature regression (smooth L1, f_{t+1}) + token cross-entropy against the target's
  distribution of x_{t+2}, read out through the target's head (EAGLE's loss, with the
  regression in units of the feature RMS by default)."""

  target: ModelConfig
  head: eagle.EagleConfig
  reg_weight: float = 1.0
  ce_weight: float = 0.1
  noise: float = 0.0  # uniform input-feature noise, relative to each feature's RMS
  # Regress features in units of the batch's feature RMS (scale-free across models: SmolLM2's
  # residual stream is far larger than stories260K's, and raw smooth L1 swamps the CE there).
  # Measured: SmolLM2 top-1 draft agreement 0.32 vs 0.27 after 60 steps on the same batches;
  # stories260K held-out tau 2.96 vs 2.88 after 1000 steps. False = EAGLE's raw regression.
  feature_norm: bool = True
  ids: tuple[int, ...] | None = None

  def init(self, model: Model, seed: int):
    return eagle.init_params(self.head, seed)

  def loss(self, params, tparams, tokens, lens, feats, key):
    t = tokens.shape[1]
    f_in, f_out = feats[:, :-1], feats[:, 1:]
    if self.noise:
      rms = jnp.sqrt(jnp.mean(f_in * f_in, axis=-1, keepdims=True))
      f_in = f_in + self.noise * rms * jax.random.uniform(key, f_in.shape, minval=-1, maxval=1)
    g, _ = eagle.step(params, tparams, self.head, f_in, tokens[:, 1:])
    g = g.astype(jnp.float32)
    mask = (jnp.arange(t - 1)[None, :] + 1) < lens[:, None]  # f_{t+1} exists
    tl = jax.lax.stop_gradient(head(tparams, self.target, f_out))
    readout, ids = self._draft_readout(tparams)
    dl = readout(g)
    err = g - f_out
    if self.feature_norm:
      ms = _masked_mean(jnp.mean(f_out * f_out, axis=-1), mask)
      err = err / jax.lax.stop_gradient(jnp.sqrt(ms) + 1e-6)
    reg = _masked_mean(jnp.mean(_smooth_l1(err), axis=-1), mask)
    ce = _masked_mean(_soft_ce(tl, dl, ids), mask)
    loss = self.reg_weight * reg + self.ce_weight * ce
    return loss, {"loss": loss, "reg": reg, "ce": ce,
                  "acc": _masked_mean(_agree(tl, dl, ids), mask)}

  def result(self, model: Model, params, meta):
    return eagle.EagleHead(params=self._with_ids(params), config=self.head,
                           name=f"{model.name}-eagle", meta=meta)

  def drafter(self, model: Model, params, k: int):
    return eagle.Eagle(eagle.EagleHead(params=self._with_ids(params), config=self.head), k=k)


def ttt_mask(t: int, step: int, steps: int) -> jax.Array:
  """[1, t, steps * t] bool: which cache slots position q of training-time-test step `step`
  (0-based) sees, when step i's keys sit at slots i * t .. i * t + t - 1. As in the loop at
  inference: the true-feature positions up to q - step (step 0's keys), then the one key of
  each later step on the way to q (step i at position q - (step - i))."""
  q = np.arange(t)[:, None]
  slot = np.arange(steps * t)[None, :]
  i, pos = slot // t, slot % t
  see = ((i == 0) & (pos <= q - step)) | ((i >= 1) & (i <= step) & (pos == q - (step - i)))
  return jnp.asarray(see[None])


@dataclasses.dataclass(frozen=True)
class Eagle3Objective(_Readout):
  """EAGLE-3: the head reads a fusion of several target layers and learns tokens only (no
  feature regression), by training-time test: step 0 reads the true features at every
  position; step j reads, at position t, the head's own output of step j-1 at t-1 (what it
  will feed itself when drafting), attending to true features up to t - j and to its own
  earlier steps exactly as it will in the loop (`ttt_mask`). Each step's soft cross-entropy
  against the target's distribution of x_{t+2} is weighted decay**j."""

  target: ModelConfig
  head: eagle.EagleConfig
  ttt: int = 3  # training-time-test steps (drafting steps trained on the head's own output)
  decay: float = 0.8
  ids: tuple[int, ...] | None = None

  @property
  def feature_layers(self) -> tuple[int, ...]:
    return self.head.feature_layers

  def init(self, model: Model, seed: int):
    return eagle.init_params(self.head, seed)

  def unroll(self, params, tparams, taps, tokens) -> list[jax.Array]:
    """The head's outputs [g_0 .. g_{ttt-1}], each [B, S-1, D]: g_j at position t is what the
    loop computes at the j-th drafting step of a round whose root sits at t - j (true
    features below it, its own outputs after), when the drafted tokens are x_{t-j+1} ..."""
    b, s = tokens.shape
    t = s - 1  # positions 0 .. s-2 read (f_t, x_{t+1})
    nxt = tokens[:, 1:]
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
    cache = KVCache.init(self.head.decoder, b, self.ttt * t, jnp.float32)
    f = eagle.fuse(params, self.head, taps[:, :-1])  # [B, t, D]
    out = []
    for j in range(self.ttt):
      g, cache = eagle.step(params, tparams, self.head, f, nxt, cache, positions=pos,
                            attn_mask=ttt_mask(t, j, self.ttt), attn_chunk=cache.size)
      out.append(g)
      f = jnp.concatenate([jnp.zeros_like(g[:, :1]), g[:, :-1]], axis=1)  # g_{t-1} at t
    return out

  def loss(self, params, tparams, tokens, lens, feats, key):
    d = self.target.dim
    taps, last = feats[..., :-d], feats[..., -d:]
    tl = jax.lax.stop_gradient(head(tparams, self.target, last[:, 1:]))  # x_{t+2} [B, S-1, V]
    readout, ids = self._draft_readout(tparams)
    pos = jnp.arange(tokens.shape[1] - 1)[None, :]
    valid = pos + 1 < lens[:, None]
    total, weights, metrics = 0.0, 0.0, {}
    for j, g in enumerate(self.unroll(params, tparams, taps, tokens)):
      dl = readout(g.astype(jnp.float32))
      mask = valid & (pos >= j)  # a whole chain of j steps behind position t
      total += self.decay ** j * _masked_mean(_soft_ce(tl, dl, ids), mask)
      weights += self.decay ** j
      metrics[f"acc{j}"] = _masked_mean(_agree(tl, dl, ids), mask)
    loss = total / weights
    metrics.update(loss=loss, acc=metrics["acc0"])
    return loss, metrics

  def result(self, model: Model, params, meta):
    return eagle.EagleHead(params=self._with_ids(params), config=self.head,
                           name=f"{model.name}-eagle3", meta=meta)

  def drafter(self, model: Model, params, k: int):
    return eagle.Eagle(eagle.EagleHead(params=self._with_ids(params), config=self.head), k=k)


@dataclasses.dataclass(frozen=True)
class MedusaObjective(_Readout):
  """Head i: cross-entropy against the target's distribution of x_{t+2+i}, weighted decay**i."""

  target: ModelConfig
  head: medusa.MedusaConfig
  decay: float = 0.8
  ids: tuple[int, ...] | None = None

  def init(self, model: Model, seed: int):
    return medusa.init_params(self.head, seed)

  def loss(self, params, tparams, tokens, lens, feats, key):
    b, t = tokens.shape
    tl = jax.lax.stop_gradient(head(tparams, self.target, feats))  # [B, T, V]
    x = self._features(params, tparams, feats, tokens)  # [B, T, H, D]
    pos = jnp.arange(t)[None, :]
    total, weights, metrics = 0.0, 0.0, {}
    readout, ids = self._draft_readout(tparams)
    for i in range(self.head.n_heads):
      # Head i at position t predicts x_{t+2+i}, whose target distribution sits at t+1+i.
      tgt = jnp.roll(tl, -(i + 1), axis=1)
      mask = pos + 1 + i < lens[:, None]
      dl = readout(x[:, :, i])
      ce = _masked_mean(_soft_ce(tgt, dl, ids), mask)
      total += self.decay ** i * ce
      weights += self.decay ** i
      metrics[f"acc{i}"] = _masked_mean(_agree(tgt, dl, ids), mask)
    loss = total / weights
    metrics.update(loss=loss, acc=metrics["acc0"])
    return loss, metrics

  def _features(self, params, tparams, feats, tokens):
    return medusa.features(params, feats)

  def result(self, model: Model, params, meta):
    return medusa.MedusaHeads(params=self._with_ids(params), config=self.head,
                              name=f"{model.name}-medusa", meta=meta)

  def drafter(self, model: Model, params, k: int):
    return medusa.Medusa(medusa.MedusaHeads(params=self._with_ids(params), config=self.head),
                         k=k)


@dataclasses.dataclass(frozen=True)
class HydraObjective(MedusaObjective):
  """Medusa's loss, each head teacher-forced with the true token before its own."""

  head: hydra.HydraConfig

  def init(self, model: Model, seed: int):
    return hydra.init_params(self.head, seed)

  def _features(self, params, tparams, feats, tokens):
    return hydra.training_features(params, tparams, feats, tokens)

  def result(self, model: Model, params, meta):
    return hydra.HydraHeads(params=self._with_ids(params), config=self.head,
                            name=f"{model.name}-hydra", meta=meta)

  def drafter(self, model: Model, params, k: int):
    return hydra.Hydra(hydra.HydraHeads(params=self._with_ids(params), config=self.head), k=k)


@dataclasses.dataclass(frozen=True)
class AdapterObjective(Objective):
  """Kangaroo: the adapter over the target's stream after its first `exit_layer` layers, read
  out through the target's final norm and head, learns the target's distribution of x_{t+1}
  at every position t (soft cross-entropy; the prefix and the head stay frozen)."""

  target: ModelConfig
  adapter: kangaroo.AdapterConfig

  @property
  def feature_layers(self) -> tuple[int, ...]:
    return (self.adapter.exit_layer - 1,)

  def init(self, model: Model, seed: int):
    return kangaroo.init_params(self.adapter, seed)

  def loss(self, params, tparams, tokens, lens, feats, key):
    d = self.target.dim
    shallow, last = feats[..., :d], feats[..., d:]  # [B, T, D] each
    tl = jax.lax.stop_gradient(head(tparams, self.target, last))  # x_{t+1} [B, T, V]
    g, _ = kangaroo.adapt(params, tparams, self.adapter, shallow)
    dl = head(tparams, self.target, g.astype(jnp.float32))
    mask = jnp.arange(tokens.shape[1])[None, :] < lens[:, None]
    loss = _masked_mean(_soft_ce(tl, dl), mask)
    return loss, {"loss": loss, "acc": _masked_mean(_agree(tl, dl), mask)}

  def result(self, model: Model, params, meta):
    return kangaroo.AdapterHead(params=params, config=self.adapter,
                                name=f"{model.name}-kangaroo", meta=meta)

  def drafter(self, model: Model, params, k: int):
    return kangaroo.Kangaroo(kangaroo.AdapterHead(params=params, config=self.adapter), k=k)


@dataclasses.dataclass(frozen=True)
class DistillObjective(Objective):
  """DistillSpec: token-level KL(target || draft) on the target's own generations."""

  target: ModelConfig
  draft: ModelConfig

  def init(self, model: Model, seed: int):
    """The target's first layers, embeddings, final norm and head (copies)."""
    n = self.draft.n_layers
    p = model.params
    out = {"embed": p["embed"], "layers": layout.stacked(layout.first_layers(p, n))["layers"],
           "final_norm": p["final_norm"]}
    if "lm_head" in p:
      out["lm_head"] = p["lm_head"]
    return jax.tree.map(lambda w: jnp.array(w, jnp.float32, copy=True), out)

  def loss(self, params, tparams, tokens, lens, feats, key):
    t = tokens.shape[1]
    tl = jax.lax.stop_gradient(head(tparams, self.target, feats))  # [B, T, V]
    dl = forward(params, self.draft, tokens).logits
    mask = jnp.arange(t)[None, :] < lens[:, None]
    logp = jax.nn.log_softmax(tl, axis=-1)
    kl = jnp.sum(jnp.exp(logp) * (logp - jax.nn.log_softmax(dl, axis=-1)), axis=-1)
    loss = _masked_mean(kl, mask)
    return loss, {"loss": loss, "acc": _masked_mean(_agree(tl, dl), mask)}

  def result(self, model: Model, params, meta):
    return Model(self.draft, params, model.tokenizer,
                 name=f"{model.name}-distill{self.draft.n_layers}")

  def drafter(self, model: Model, params, k: int):
    from jaxspec.drafters import DraftModel
    return DraftModel(Model(self.draft, params, model.tokenizer, name="distill"), k=k)


def make(kind: str, model: Model, *, k: int, layers: int | None = None, ids=None, **opts):
  """ids: a reduced draft vocabulary (sorted target ids; eagle and medusa), or None."""
  c = model.config
  n = 0 if ids is None else len(ids)
  ids = None if ids is None else tuple(int(t) for t in ids)
  if kind == "eagle":
    return EagleObjective(c, eagle.EagleConfig(c, layers=layers or 1, draft_vocab=n), ids=ids,
                          **opts)
  if kind == "eagle3":
    taps = opts.pop("feature_layers", None)
    taps = (eagle.eagle3_layers(c.n_layers) if taps is None
            else eagle.check_feature_layers(taps, c.n_layers))
    ttt = opts.get("ttt", 3)
    if isinstance(ttt, bool) or not isinstance(ttt, int) or not 1 <= ttt <= 16:
      raise ValueError(f"ttt (training-time-test steps) must be an integer in [1, 16], got "
                       f"{ttt!r}")
    return Eagle3Objective(c, eagle.EagleConfig(c, layers=layers or 1, draft_vocab=n,
                                                feature_layers=taps), ids=ids, **opts)
  if kind == "medusa":
    return MedusaObjective(c, medusa.MedusaConfig(c, n_heads=k, layers=layers or 1,
                                                  draft_vocab=n), ids=ids, **opts)
  if kind == "hydra":
    return HydraObjective(c, hydra.HydraConfig(c, n_heads=k, layers=layers or 1,
                                               draft_vocab=n), ids=ids, **opts)
  if ids is not None:
    hint = {"distill": " (a distilled model drafts with DraftModel(model, vocab=N))",
            "adapter": " (a Kangaroo adapter reads out through the target's own head)"}
    raise ValueError(f"draft_vocab applies to kinds 'eagle', 'eagle3', 'medusa' and 'hydra', "
                     f"not {kind!r}{hint.get(kind, '')}")
  if kind == "adapter":
    exit_layer = (kangaroo.default_exit_layer(c.n_layers) if layers is None
                  else kangaroo.check_exit_layer(layers, c.n_layers))
    return AdapterObjective(c, kangaroo.AdapterConfig(c, exit_layer=exit_layer), **opts)
  if kind == "distill":
    n = layers or min(c.n_layers - 1, max(1, c.n_layers // 4))
    if not 1 <= n < c.n_layers:
      raise ValueError(f"distill needs 1 <= layers < {c.n_layers} (the target's depth), got {n}")
    return DistillObjective(c, dataclasses.replace(c, n_layers=n), **opts)
  raise ValueError(f"unknown drafter kind {kind!r}: expected 'eagle', 'eagle3', 'medusa', 'hydra', "
                   f"'adapter' or 'distill'")

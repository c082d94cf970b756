"""Batch-aware adaptive speculation: the draft length k (or plain decoding) that maximises
expected tokens/s for a model, a batch bucket and a drafter.

Speculation trades extra work per round for fewer rounds. Whether that pays depends on the
batch: at batch 1 a verify pass of k + 1 tokens per row costs about one decode step (both read
the weights once: memory bound), at large batch it costs up to k + 1 times as much (compute
bound), and the drafter's own forwards and the engine's per-round work come on top. The policy
measures those costs once per (model, batch bucket, cache size) and the drafter's acceptance
once per (model, drafter, batch bucket), caches them, and predicts, in units of one plain
decode step at the same batch bucket (Leviathan et al. 2023, section 3.3):

    tokens per round  E(k)    = (1 - alpha^(k+1)) / (1 - alpha)     (i.i.d. acceptance alpha)
    cost of a round   cost(k) = verify(k + 1) + k * draft_step + overhead
    speed(k)          = E(k) / cost(k)       against plain: 1 / plain

`verify(T)` is a target forward of T tokens per row relative to T = 1, `draft_step` one draft
forward relative to the target's decode step (0 for model-free drafters), `overhead` the
engine's per-round work beyond the forwards (drafting bookkeeping, acceptance, commits) and
`plain` a plain round (>= 1: the loop's own work). `overhead` and `plain` come from two short
calibration runs of the real engine on the caller's prompts, which also measure alpha.

Speculation is chosen only when it beats plain by `margin` (default 5%), so the policy never
knowingly makes a batch slower than plain decoding. Token-tree drafters keep their tree: the
choice is between the drafter as given and plain decoding, from the measured round costs.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec import fingerprint, session

KS = (1, 2, 3, 4, 6, 8)
VERIFY_TS = (1, 2, 3, 4, 5, 7, 9)  # tokens per row measured for verify(T) (k + 1 for KS)
MARGIN = 0.05
CALIBRATION_TOKENS = 32


@dataclasses.dataclass(frozen=True)
class Costs:
  """Costs in units of one target decode step (1 token per row) at one batch bucket."""

  verify: dict  # {tokens per row T: target forward time / decode step time}; verify[1] == 1
  draft_step: float = 0.0  # one draft forward (1 token per row) / target decode step
  overhead: float = 0.0  # engine work per speculative round beyond the forwards
  plain: float = 1.0  # a plain-decoding round (the decode step plus the loop's own work)
  decode_s: float | None = None  # seconds of one target decode step (for reports)

  def verify_cost(self, t: int) -> float:
    ts = sorted(self.verify)
    if t in self.verify:
      return float(self.verify[t])
    if t > ts[-1]:  # extrapolate linearly from the last two points
      if len(ts) == 1:
        return float(self.verify[ts[-1]]) * t / ts[-1]
      a, b = ts[-2], ts[-1]
      slope = (self.verify[b] - self.verify[a]) / (b - a)
      return float(self.verify[b] + slope * (t - b))
    return float(np.interp(t, ts, [self.verify[x] for x in ts]))

  def round_cost(self, k: int) -> float:
    if k == 0:
      return self.plain
    return self.verify_cost(k + 1) + k * self.draft_step + self.overhead


@dataclasses.dataclass
class Choice:
  k: int  # 0 = plain decoding
  alpha: float
  speedup: float  # predicted speed of the choice over plain
  table: dict  # {k: predicted tokens per decode-step time}; 0 = plain
  costs: Costs
  drafter: object = None  # the drafter to run (None = plain)
  calibration_s: float = 0.0

  def summary(self) -> str:
    what = "plain" if self.k == 0 else f"k={self.k}"
    return (f"adaptive: {what} (alpha {self.alpha:.2f}, predicted {self.speedup:.2f}x over "
            f"plain; verify(k+1)/decode: " + ", ".join(
                f"{t}:{v:.2f}" for t, v in sorted(self.costs.verify.items())) + ")")


def expected_tokens(k: int, alpha: float) -> float:
  """E[accepted + 1] for k drafts with i.i.d. per-token acceptance alpha."""
  if k == 0:
    return 1.0
  alpha = min(max(alpha, 0.0), 1.0)
  if alpha >= 1.0 - 1e-12:
    return float(k + 1)
  return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def best_k(costs: Costs, alpha: float, ks: Sequence[int] = KS, margin: float = MARGIN) -> Choice:
  """The k in `ks` (or 0, plain) that maximises predicted tokens per unit time."""
  table = {0: 1.0 / costs.plain}
  for k in ks:
    table[k] = expected_tokens(k, alpha) / costs.round_cost(k)
  best = max(ks, key=lambda k: table[k]) if ks else 0
  k = best if ks and table[best] > table[0] * (1.0 + margin) else 0
  return Choice(k=k, alpha=alpha, speedup=table[k] / table[0], table=table, costs=costs)


def alpha_from_histogram(hist, depth: int) -> float:
  """Per-token acceptance (geometric MLE) from accepted-drafts-per-round counts (0..depth)."""
  hist = np.asarray(hist, np.float64).reshape(-1, depth + 1).sum(axis=0)
  accepted = float(np.dot(np.arange(depth + 1), hist))
  failed = float(hist[:depth].sum())  # rounds that stopped at a rejection
  if accepted + failed == 0:
    return 0.0
  return accepted / (accepted + failed)


# --------------------------------------------------------------------------------- measuring

_FORWARD_S: dict = {}  # (config, params fingerprint, batch, T, buf, layers, ...) -> seconds
_CALIBRATION: dict = {}  # (model and drafter fingerprints, buckets, sampling) -> dict
_LOOP = {}


def clear_cache() -> None:
  _FORWARD_S.clear()
  _CALIBRATION.clear()


def _loop_fn(cfg, n_layers, attn_chunk=None):
  """jit: `reps` (traced) forwards of [B, T] tokens against a cache whose length stays fixed
  (each pass rewinds it), the next tokens depending on the logits so nothing is optimised
  away."""
  key = (cfg, n_layers, attn_chunk)
  if key not in _LOOP:
    from jaxspec.models import forward

    def run(params, tokens, cache, reps):
      start = cache.lengths

      def body(_, c):
        toks, cache = c
        out = forward(params, cfg, toks, cache, n_layers=n_layers, attn_chunk=attn_chunk)
        nxt = jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32)
        return toks.at[:, 0].set(nxt), out.cache.rewind(start)

      return jax.lax.fori_loop(0, reps, body, (tokens, cache))

    _LOOP[key] = jax.jit(run, donate_argnums=(2,))
  return _LOOP[key]


def forward_seconds(params, cfg, batch: int, t: int, buf: int, *, n_layers: int | None = None,
                    fill: int | None = None, min_time: float = 0.05, repeats: int = 5) -> float:
  """Seconds of one forward of `t` tokens per row at `batch` rows against a cache of `buf`
  slots holding `fill` live entries (default: half), inside one compiled loop (no dispatch
  overhead, as in the engine). Each timing runs enough forwards to last `min_time`; the best
  of `repeats` is kept (a shared machine only ever adds time). Cached."""
  return forward_seconds_many(params, cfg, batch, [t], buf, n_layers=n_layers, fill=fill,
                              min_time=min_time, repeats=repeats)[t]


def forward_seconds_many(params, cfg, batch: int, ts: Sequence[int], buf: int, *,
                         n_layers: int | None = None, fill: int | None = None,
                         min_time: float = 0.05, repeats: int = 5,
                         attn_chunk: int | None = None) -> dict:
  """`forward_seconds` for several T at once, timed round-robin (T1, T2, ..., T1, T2, ...) so
  that a change in machine load hits every T alike."""
  from jaxspec.models import KVCache

  dtype = params["embed"].dtype
  fill = buf // 2 if fill is None else fill
  fp = fingerprint.of_params(params)
  keys = {t: (cfg, fp, batch, t, buf, n_layers, fill, attn_chunk) for t in ts}
  todo = [t for t in dict.fromkeys(ts) if keys[t] not in _FORWARD_S]
  fn = _loop_fn(cfg, n_layers, attn_chunk)

  def once(t, reps):
    f = max(0, min(fill, buf - t))
    cache = KVCache.like(params, cfg, batch, buf, dtype).rewind(jnp.full((batch,), f, jnp.int32))
    toks = jnp.ones((batch, t), jnp.int32)
    jax.block_until_ready((cache, toks))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(params, toks, cache, jnp.asarray(reps, jnp.int32)))
    return time.perf_counter() - t0

  reps = {}
  for t in todo:
    once(t, 1)  # compile + warm
    per = once(t, 2) / 2
    reps[t] = int(min(10_000, max(2, math.ceil(min_time / max(per, 1e-7)))))
  best = {t: math.inf for t in todo}
  for _ in range(repeats):
    for t in todo:
      best[t] = min(best[t], once(t, reps[t]) / reps[t])
  for t in todo:
    _FORWARD_S[keys[t]] = best[t]
  return {t: _FORWARD_S[keys[t]] for t in ts}


def measure_costs(model, drafter, batch: int, buf: int, *, verify_ts: Sequence[int] = VERIFY_TS,
                  fill: int | None = None) -> Costs:
  """verify(T) and draft_step at a batch bucket from compiled forward loops (no engine)."""
  bb = session.batch_bucket(batch)
  secs = forward_seconds_many(model.params, model.config, bb, sorted({1, *verify_ts}), buf,
                              fill=fill)
  dec = secs[1]
  verify = {1: 1.0}
  for t in sorted(secs):
    if t > 1:  # a longer pass never costs less: keep the curve monotone against timing noise
      verify[t] = max(max(verify.values()), secs[t] / dec)
  d = drafter.draft_forward(model) if drafter is not None else None
  draft_step = 0.0
  if d is not None:
    params, cfg, layers = d
    draft_step = forward_seconds(params, cfg, bb, 1, buf, n_layers=layers, fill=fill) / dec
  return Costs(verify=verify, draft_step=draft_step, decode_s=dec)


def _with_k(drafter, k: int):
  if k == 0:
    return None
  if getattr(drafter, "k", None) == k:
    return drafter
  return drafter.with_k(k)


def calibrate(model, drafter, prompts, *, max_new_tokens: int = CALIBRATION_TOKENS,
              repeats: int = 3, **kw) -> dict:
  """Short runs of the real engine loop (plain, then the drafter as given) on `prompts`:
  seconds per round of each (the prefill is not timed), the drafter's per-token acceptance
  and tau. Programs are compiled first; the fastest of `repeats` runs is kept."""
  def timed(d):
    pr = session.prepare(model, prompts, drafter=d, max_new_tokens=max_new_tokens,
                         speculate="always", **kw)
    best = None
    for i in range(repeats + 1):  # run 0 compiles and warms up
      state, _ = session.start(model, pr)
      jax.block_until_ready(state.seq)
      t0 = time.perf_counter()
      state, c = session.run_rounds(model, pr, state, 1 << 30)
      rounds, hist, calls, n, lens = session.fetch((state.stats.rounds, state.stats.accept_hist,
                                                 state.stats.target_calls, state.n,
                                                 state.prompt_lens))
      dt = time.perf_counter() - t0 - c
      if i == 0:
        continue
      b = pr.batch
      run = {"round_s": dt / max(1, int(rounds)), "k": pr.spec.depth,
             "tau": float((n[:b] - lens[:b]).sum()) / max(1, int(calls[:b].sum())),
             "hist": hist[:b]}
      if best is None or run["round_s"] < best["round_s"]:
        best = run
    return best

  plain = timed(None)
  spec = timed(drafter)
  return {"plain_round_s": plain["round_s"], "round_s": spec["round_s"], "k": spec["k"],
          "tau": spec["tau"], "alpha": alpha_from_histogram(spec["hist"], spec["k"])}


def choose_k(model=None, drafter=None, batch: int | None = None, *, prompts=None,
             ks: Sequence[int] = KS, costs: Costs | None = None, alpha: float | None = None,
             margin: float = MARGIN, max_new_tokens: int = 128, temperature: float = 0.0,
             top_k=None, top_p=None, seed: int = 0, stop_tokens=None, mesh=None) -> Choice:
  """Picks k for `drafter` (or plain decoding) at this batch.

  Everything not given is measured once and cached: `costs` (verify and draft forwards at the
  batch bucket, the engine's per-round overhead) and `alpha` (the drafter's per-token
  acceptance on `prompts`). With `costs` and `alpha` given, nothing runs: the choice is
  `best_k(costs, alpha, ks, margin)` (tests and what-if analysis).
  """
  if costs is not None and alpha is not None:
    choice = best_k(costs, alpha, ks, margin)
    choice.drafter = _with_k(drafter, choice.k) if drafter is not None else None
    return choice
  if model is None or drafter is None or prompts is None:
    raise ValueError("choose_k needs model, drafter and prompts unless costs and alpha are "
                     "given")
  t0 = time.perf_counter()
  ids = session.encode_prompts(model, prompts)
  batch = len(ids) if batch is None else batch
  gen_kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                stop_tokens=stop_tokens, mesh=mesh)
  calib_new = max(1, min(max_new_tokens, CALIBRATION_TOKENS))
  key = (fingerprint.of_model(model), fingerprint.of_drafter(drafter),
         session.batch_bucket(batch), session.bucket(max(len(x) for x in ids)), temperature,
         top_k, top_p)
  if key not in _CALIBRATION:
    _CALIBRATION[key] = calibrate(model, drafter, ids, max_new_tokens=calib_new, **gen_kw)
  cal = _CALIBRATION[key]
  tree = getattr(drafter, "tree", None) is not None
  if costs is None:
    longest = max(len(x) for x in ids)
    buf = -(-(session.bucket(longest) + max_new_tokens + 2 * max(ks) + 2) //
            session.BUF_ALIGN) * session.BUF_ALIGN
    costs = measure_costs(model, None if tree else drafter, batch, buf,
                          verify_ts=sorted({k + 1 for k in (*ks, cal["k"])}),
                          fill=session.bucket(longest) + max_new_tokens // 2)
    dec = costs.decode_s
    k0 = cal["k"]
    overhead = 0.0 if tree else max(0.0, cal["round_s"] / dec - costs.verify_cost(k0 + 1)
                                    - k0 * costs.draft_step)
    costs = dataclasses.replace(costs, overhead=overhead,
                                plain=max(1.0, cal["plain_round_s"] / dec))
  if alpha is None:
    alpha = cal["alpha"]
  if tree:  # a tree keeps its shape: the drafter as given, or plain, from measured rounds
    plain_speed = 1.0 / costs.plain
    spec_speed = cal["tau"] / (cal["round_s"] / costs.decode_s) if costs.decode_s else 0.0
    use = spec_speed > plain_speed * (1.0 + margin)
    choice = Choice(k=cal["k"] if use else 0, alpha=alpha,
                    speedup=spec_speed / plain_speed if use else 1.0,
                    table={0: plain_speed, cal["k"]: spec_speed}, costs=costs,
                    drafter=drafter if use else None)
  else:
    choice = best_k(costs, alpha, ks, margin)
    choice.drafter = _with_k(drafter, choice.k)
  choice.calibration_s = time.perf_counter() - t0
  return choice

"""The compiled programs: `prefill` (prompt -> loop state) and `run` (the speculative loop).

`run` is ONE jit-compiled program: a `lax.while_loop` over rounds. Each round the drafter
proposes k tokens (`lax.scan` inside the drafter), the target verifies them in one forward of
k + 1 positions, the accepted prefix plus the correction/bonus token is committed to the token
buffer, and rejected entries are rolled back by rewinding the per-row cache lengths. Plain
decoding is the same loop with `NoDraft` (k = 0).

Every shape is fixed by `EngineSpec` (batch, prompt bucket, buffer length, k), so new prompts
in the same bucket, a different `max_new_tokens` within the buffer, new sampling values or a
new seed never recompile. Compiled executables are cached per spec and counted
(`compile_count`), so tests can prove it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxspec import inplace, sampling, verify
from jaxspec.drafters.base import Accepted, DrafterSpec, Prefill, Round
from jaxspec.models import KVCache, ModelConfig, forward, head
from jaxspec.sampling import SamplingParams

MAX_STOP = 8  # stop-token slots per row (padded with -1)

# Inputs.mode: what the speculation switch does this call (a traced value: no recompiles).
MODE_AUTO, MODE_PLAIN, MODE_SPECULATE = 0, 1, 2
TAU_DECAY = 0.2  # weight of the newest round in each row's running tau. 0.5 let two short
# rounds of a good drafter (k=4 at 80% per-token acceptance, tau 3.4, ratio 2.6) send it to
# plain rounds for dozens of tokens: simulated (scripts/switch_sim.py) 1.06x plain over 256
# tokens where always speculating gives 1.29x; 0.2 gives 1.15x and costs a useless drafter
# 1-2% more than 0.5 (docs/performance.md, "The switch's running tau")
PROBE_GAP, MAX_PROBE_GAP = 8, 64  # plain rounds between probes of speculation (doubling)
PROBE_BUDGET = 0.05  # failed probes may cost at most this share of the plain rounds between them


def probe_gaps(ratio: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(first, longest) gap between probes. A failed probe costs ratio - 1 plain rounds more than
  a plain round, so an expensive drafter probes less often: the first gap is at least
  (ratio - 1) / PROBE_BUDGET (8 for a table drafter at ratio 1.4, 60 for a draft model at
  ratio 4), capped at MAX_PROBE_GAP so a drafter that starts to pay is found within 64 plain
  rounds; the gap doubles while probes fail, up to 4x the first (at least 64)."""
  lo = jnp.clip(jnp.ceil((ratio - 1.0) / PROBE_BUDGET), PROBE_GAP, MAX_PROBE_GAP)
  lo = lo.astype(jnp.int32)
  return lo, jnp.maximum(MAX_PROBE_GAP, 4 * lo)


@dataclasses.dataclass(frozen=True)
class EngineSpec:
  """Everything static about one compiled generation program."""

  target: ModelConfig
  drafter: DrafterSpec
  batch: int
  prompt_len: int  # prompt bucket
  buf_len: int  # token buffer = KV cache slots
  switch: bool = False  # compile the plain-round branch and pick per round (jaxspec.policy)

  @property
  def k(self) -> int:
    return self.drafter.k

  @property
  def depth(self) -> int:
    """Most drafts a round can accept: k for chains, the tree's depth for trees."""
    return self.drafter.depth


@struct.dataclass
class Stats:
  target_calls: jax.Array  # [B] target forwards while the row was live (prefill included)
  accept_hist: jax.Array  # [B, depth + 1] rounds by number of accepted drafts
  rounds: jax.Array  # [] loop iterations
  nonfinite: jax.Array  # [B] bool: the target produced a NaN/inf logit for this live row
  drafted: jax.Array  # [B] drafts handed to verification while live (empty slots excluded)
  spec_rounds: jax.Array  # [] rounds that verified drafts (the others decoded one token)


@struct.dataclass
class Control:
  """What the speculation switch has seen (`EngineSpec.switch`)."""

  tau: jax.Array  # [B] float32: running mean of tokens per speculative round (accepted + 1)
  streak: jax.Array  # [] plain rounds since the last speculative one
  gap: jax.Array  # [] plain rounds before the next probe of speculation


@struct.dataclass
class State:
  seq: jax.Array  # [B, buf] int32: prompt, then committed output
  n: jax.Array  # [B] committed tokens (prompt included)
  prompt_lens: jax.Array  # [B]
  done: jax.Array  # [B] bool
  cache: KVCache  # target cache; lengths == n - 1
  dstate: Any  # drafter state
  key: jax.Array  # [B] one key per row (folded from the seed and the row's id)
  stats: Stats
  ctl: Control | None = None  # with EngineSpec.switch


@struct.dataclass
class Inputs:
  """Per-call traced values: changing any of them never recompiles."""

  sp: SamplingParams
  max_new: jax.Array  # [] int32
  stop: jax.Array  # [B, MAX_STOP] int32, -1 padded
  mode: jax.Array | None = None  # [] int32 MODE_*: the switch's mode (EngineSpec.switch)
  ratio: jax.Array | None = None  # [] float32: seconds of a speculative / a plain round
  margin: jax.Array | None = None  # [] float32: speculate when predicted this much faster


def _is_stop(tokens: jax.Array, stop: jax.Array) -> jax.Array:
  """tokens [B, T], stop [B, S] -> [B, T] bool."""
  return jnp.any(tokens[:, :, None] == stop[:, None, :], axis=-1)


def row_keys(key: jax.Array, ids: jax.Array) -> jax.Array:
  """[B] per-row keys: fold_in(key, id) for each row's integer id."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)


def _prefill(spec: EngineSpec, tparams, dparams, prompt, prompt_lens, live, inp: Inputs, key):
  b, p = prompt.shape
  # sliding-window layers keep a ring of window + footprint - 1 slots (models.cache)
  cache = KVCache.like(tparams, spec.target, b, spec.buf_len, footprint=spec.drafter.footprint)
  out = forward(tparams, spec.target, prompt, cache, logits=False,
                taps=spec.drafter.feature_layers, valid=prompt_lens)
  last_h = jnp.take_along_axis(out.hidden, (prompt_lens - 1)[:, None, None], axis=1)  # [B,1,D]
  logits = head(tparams, spec.target, last_h)[:, 0]
  if not sampling.per_row(key):  # one seed: row b's key is fold_in(seed key, b)
    key = row_keys(key, jnp.arange(b))
  key, k0 = sampling.split(key, 2)
  first, _ = sampling.sample(k0, logits, spec.drafter.mode, inp.sp)
  seq = jnp.zeros((b, spec.buf_len), jnp.int32).at[:, :p].set(prompt)
  seq = seq.at[jnp.arange(b), prompt_lens].set(first)
  done = ~live | _is_stop(first[:, None], inp.stop)[:, 0] | (inp.max_new <= 1)
  dstate = spec.drafter.init(dparams, Prefill(tparams=tparams, prompt=prompt,
                                              prompt_lens=prompt_lens, hidden=_features(out),
                                              cache_size=spec.buf_len))
  stats = Stats(target_calls=live.astype(jnp.int32),
                accept_hist=jnp.zeros((b, spec.depth + 1), jnp.int32),
                rounds=jnp.zeros((), jnp.int32),
                nonfinite=live & ~jnp.isfinite(logits).all(axis=-1),
                drafted=jnp.zeros((b,), jnp.int32), spec_rounds=jnp.zeros((), jnp.int32))
  return State(seq=seq, n=prompt_lens + 1, prompt_lens=prompt_lens, done=done,
               cache=out.cache.rewind(prompt_lens), dstate=dstate, key=key, stats=stats,
               ctl=_control(spec, inp, b))


def _features(out) -> jax.Array:
  """What the drafter reads of a target forward: its `feature_layers` taps, or the last
  layer's residual stream."""
  return out.hidden if out.taps is None else out.taps


def _control(spec: EngineSpec, inp: Inputs, b: int) -> Control | None:
  """The switch's starting point: optimistic, but not so far up that a useless drafter
  lingers; the first probe gap from the measured ratio."""
  if not spec.switch:
    return None
  tau0 = jnp.minimum(spec.depth + 1.0, 2.0 * inp.ratio * (1.0 + inp.margin))
  return Control(tau=jnp.full((b,), tau0, jnp.float32), streak=jnp.zeros((), jnp.int32),
                 gap=probe_gaps(inp.ratio)[0])


def _round(spec: EngineSpec, tparams, dparams, inp: Inputs, s: State) -> State:
  """One round: speculative, or (with the switch) plain when speculation does not pay."""
  key, k_draft, k_verify = sampling.split(s.key, 3)

  def branch(fn):  # the round is built from the branch's own operand, not captured: a
    # drafter that reads the target cache from the round (EarlyExit, LayerSkip) would
    # otherwise hold a second reference to it, and XLA would copy K and V on every round
    def go(s):
      r = Round(tparams=tparams, tcache=s.cache, seq=s.seq, n=s.n, key=k_draft, sp=inp.sp)
      return fn(spec, tparams, dparams, inp, s, r, k_verify)
    return go

  if not spec.switch:
    return branch(_speculate)(s).replace(key=key)
  go = _speculate_now(inp, s)
  s = inplace.when(go, branch(_speculate), s)  # not lax.cond: see jaxspec.inplace
  s = inplace.when(~go, branch(_plain), s)
  return s.replace(key=key)


def _mean_tau(s: State) -> jax.Array:
  live = ~s.done
  return jnp.sum(jnp.where(live, s.ctl.tau, 0.0)) / jnp.maximum(1, jnp.sum(live))


def _speculate_now(inp: Inputs, s: State) -> jax.Array:
  """[] bool: speculation is predicted to beat plain decoding, or a probe is due."""
  auto = (_mean_tau(s) > inp.ratio * (1.0 + inp.margin)) | (s.ctl.streak >= s.ctl.gap)
  return jnp.where(inp.mode == MODE_PLAIN, False, jnp.where(inp.mode == MODE_SPECULATE, True,
                                                            auto))


def _commit(spec: EngineSpec, inp: Inputs, s: State, emit: jax.Array, n_acc: jax.Array):
  """Writes up to n_acc + 1 tokens of emit [B, T] per live row, cut at max_new_tokens and at
  the first stop token. Returns (seq, n, done)."""
  b = s.seq.shape[0]
  live = ~s.done
  count = jnp.minimum(n_acc + 1, inp.max_new - (s.n - s.prompt_lens))
  j = jnp.arange(emit.shape[1])[None, :]
  stop_hit = _is_stop(emit, inp.stop) & (j < count[:, None])
  has_stop = jnp.any(stop_hit, axis=1)
  count = jnp.where(has_stop, jnp.argmax(stop_hit, axis=1) + 1, count)
  count = jnp.where(live, count, 0)
  idx = s.n[:, None] + j  # [B, T] buffer positions of the emitted tokens
  old = jnp.take_along_axis(s.seq, jnp.clip(idx, 0, spec.buf_len - 1), axis=1)
  rows = jnp.arange(b)[:, None]
  seq = s.seq.at[rows, idx].set(jnp.where(j < count[:, None], emit, old), mode="drop")
  n = s.n + count
  done = s.done | has_stop | (n - s.prompt_lens >= inp.max_new)
  return seq, n, done


def _speculate(spec: EngineSpec, tparams, dparams, inp: Inputs, s: State, r: Round,
               k_verify) -> State:
  """Propose, verify in one target forward, commit the accepted prefix, rewind the rest."""
  d = spec.drafter
  live = ~s.done
  dstate, prop = d.propose(dparams, s.dstate, r)
  tokens, positions, tree_mask = prop.target_inputs(s.seq, s.n)  # [B, T]
  out = forward(tparams, spec.target, tokens, s.cache if prop.tcache is None else prop.tcache,
                positions=positions, tree_mask=tree_mask, taps=d.feature_layers)
  v = verify.proposal(k_verify, prop, out.logits, d.mode, r.sp)
  seq, n, done = _commit(spec, inp, s, v.tokens, v.n_acc)
  cache = prop.keep_path(out.cache, s.n - 1, v.path).rewind(n - 1)
  dstate = d.commit(dparams, dstate, r, Accepted(
      n_new=n, n_acc=v.n_acc, path=v.path, hidden=prop.along_path(_features(out), v.path),
      tokens=tokens, logits=out.logits))

  hist = s.stats.accept_hist + (jax.nn.one_hot(v.n_acc, spec.depth + 1, dtype=jnp.int32) *
                                live[:, None].astype(jnp.int32))
  bad = ~jnp.isfinite(out.logits).all(axis=(1, 2))  # [B] NaN / inf in this verify pass
  stats = s.stats.replace(
      target_calls=s.stats.target_calls + live.astype(jnp.int32), accept_hist=hist,
      rounds=s.stats.rounds + 1, nonfinite=s.stats.nonfinite | (live & bad),
      drafted=s.stats.drafted + jnp.where(live, prop.drafted(), 0).astype(jnp.int32),
      spec_rounds=s.stats.spec_rounds + 1)
  ctl = s.ctl
  if ctl is not None:  # each live row's running tau; probes back off while they fail
    tau = jnp.where(live, (1 - TAU_DECAY) * ctl.tau + TAU_DECAY * (v.n_acc + 1.0), ctl.tau)
    probe = ctl.streak >= ctl.gap
    pays = _mean_tau(s.replace(ctl=ctl.replace(tau=tau))) > inp.ratio * (1.0 + inp.margin)
    lo, hi = probe_gaps(inp.ratio)
    gap = jnp.where(pays, lo, jnp.where(probe, jnp.minimum(2 * ctl.gap, hi), ctl.gap))
    ctl = Control(tau=tau, streak=jnp.zeros_like(ctl.streak), gap=gap.astype(jnp.int32))
  return s.replace(seq=seq, n=n, done=done, cache=cache, dstate=dstate, stats=stats, ctl=ctl)


def _plain(spec: EngineSpec, tparams, dparams, inp: Inputs, s: State, r: Round,
           k_verify) -> State:
  """One target forward of the pending token: plain decoding inside a speculative program.
  The drafter only keeps its state in step (`DrafterSpec.commit_plain`)."""
  d = spec.drafter
  live = ~s.done
  pending = jnp.take_along_axis(s.seq, (s.n - 1)[:, None], axis=1)  # [B, 1]
  out = forward(tparams, spec.target, pending, s.cache, taps=d.feature_layers)
  none = jnp.zeros((pending.shape[0], 0), jnp.int32)
  n_acc, emit = verify.chain(k_verify, none, None, out.logits, d.mode, r.sp)  # [B], [B, 1]
  seq, n, done = _commit(spec, inp, s, emit, n_acc)
  dstate = d.commit_plain(dparams, s.dstate, r, Accepted(
      n_new=n, n_acc=n_acc, path=jnp.zeros_like(pending), hidden=_features(out), tokens=pending,
      logits=out.logits))
  bad = ~jnp.isfinite(out.logits).all(axis=(1, 2))
  stats = s.stats.replace(target_calls=s.stats.target_calls + live.astype(jnp.int32),
                          rounds=s.stats.rounds + 1, nonfinite=s.stats.nonfinite | (live & bad))
  return s.replace(seq=seq, n=n, done=done, cache=out.cache.rewind(n - 1), dstate=dstate,
                   stats=stats, ctl=s.ctl.replace(streak=s.ctl.streak + 1))


def _run(spec: EngineSpec, tparams, dparams, inp: Inputs, state: State, max_rounds) -> State:
  start = state.stats.rounds

  def cond(s):
    return jnp.any(~s.done) & (s.stats.rounds - start < max_rounds)

  return jax.lax.while_loop(cond, functools.partial(_round, spec, tparams, dparams, inp), state)


# Continuous batching (`jaxspec.batching`): the state's rows are slots; finished rows are
# refilled by `insert` while the others keep their place, and `serve` runs the loop until
# enough rows are free to refill.


def scatter_rows(state, rows, slots: jax.Array):
  """Writes the rows of `rows` (an engine pytree of batch I) into `state` (batch B) at `slots`
  [I]; slots >= B are dropped (padding). Arrays have the batch as leading axis, KV caches as
  axis 1 of stacked k / v (axis 0 of per-layer ones); scalars (the round counter) keep the
  state's value."""

  def one(big, small):
    if isinstance(big, KVCache):
      big = big.map_rows(lambda buf, lead, new: buf.at[lead + (slots,)].set(new, mode="drop"),
                         small)
      return big.replace(lengths=big.lengths.at[slots].set(small.lengths, mode="drop"))
    if getattr(big, "ndim", 0) == 0:
      return big
    return big.at[slots].set(small, mode="drop")
  return jax.tree.map(one, state, rows, is_leaf=lambda x: isinstance(x, KVCache))


def _insert(spec: EngineSpec, tparams, dparams, inp: Inputs, state: State, prompt, prompt_lens,
            live, slots, key, ids) -> State:
  """Prefills I new prompts [I, P] and writes their rows (token buffer, lengths, done flags,
  target cache, drafter state, stats, per-row keys fold_in(key, ids)) into `state` at `slots`
  [I]; every other row is untouched."""
  i, p = prompt.shape  # p: the new prompts' own bucket (at most the plan's)
  sub = dataclasses.replace(spec, batch=i, prompt_len=p)
  rows_inp = inp.replace(stop=inp.stop[jnp.clip(slots, 0, spec.batch - 1)])  # [I, MAX_STOP]
  new = _prefill(sub, tparams, dparams, prompt, prompt_lens, live, rows_inp, row_keys(key, ids))
  return scatter_rows(state, new, slots)


def _empty(spec: EngineSpec, tparams, dparams, inp: Inputs, key) -> State:
  """B rows that are all done (free slots for `insert`), built without running the model: the
  prefill's state shapes, zeros, one committed token after a one-token prompt per row."""
  b = spec.batch
  shapes = jax.eval_shape(functools.partial(_prefill, spec), tparams, dparams,
                          jnp.zeros((b, spec.prompt_len), jnp.int32), jnp.ones((b,), jnp.int32),
                          jnp.zeros((b,), bool), inp, key)

  def zeros(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jnp.broadcast_to(key, x.shape)
    return jnp.zeros(x.shape, x.dtype)
  s = jax.tree.map(zeros, shapes)
  ones = jnp.ones((b,), jnp.int32)
  # The switch's state as a prefill leaves it (zeros would mean a probe gap of 0: a probe every
  # round, and speculation whether it pays or not)
  return s.replace(n=ones + 1, prompt_lens=ones, done=jnp.ones((b,), bool),
                   cache=s.cache.rewind(ones), ctl=_control(spec, inp, b))


def _serve(spec: EngineSpec, tparams, dparams, inp: Inputs, state: State, max_rounds,
           min_done) -> State:
  """The loop until `min_done` rows are done (or all are, or `max_rounds` rounds ran)."""
  start = state.stats.rounds

  def cond(s):
    return (jnp.any(~s.done) & (jnp.sum(s.done) < min_done) &
            (s.stats.rounds - start < max_rounds))

  return jax.lax.while_loop(cond, functools.partial(_round, spec, tparams, dparams, inp), state)


_FNS = {"prefill": (_prefill, ()), "run": (_run, (4,)), "empty": (_empty, ()),
        "insert": (_insert, (4,)), "serve": (_serve, (4,))}  # function, donated argnums


def _signature(args) -> tuple:
  """Shapes, dtypes and placements: an executable only accepts arguments laid out as it was
  compiled for (a model loaded onto a mesh needs its own program)."""
  return tuple((x.shape, str(x.dtype), getattr(x, "sharding", None))
               for x in jax.tree.leaves(args))


def state_shardings(tree, mesh):
  """Shardings for loop state (or any engine pytree): KV caches by their logical axes, arrays
  whose leading axis is the batch split over the data axis, everything else replicated."""
  from jaxspec import sharding

  def one(x):
    if isinstance(x, KVCache):
      return sharding.cache_shardings(x, mesh)
    return sharding.batch_sharding(x, mesh) if getattr(x, "ndim", 0) >= 1 else \
        sharding.logical_to_sharding((), mesh, ())
  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, KVCache))


def arg_shardings(name: str, spec: EngineSpec, args, mesh):
  """Explicit input and output shardings of one compiled program."""
  from jaxspec import sharding

  tparams, dparams = args[0], args[1]
  params_sh = (sharding.param_shardings(tparams, mesh),
               sharding.param_shardings(dparams, mesh) if dparams is not None else None)
  rest = state_shardings(args[2:], mesh)
  fn, _ = _FNS[name]
  out = jax.eval_shape(functools.partial(fn, spec), *args)
  return params_sh + tuple(rest), state_shardings(out, mesh)


class Programs:
  """Compiled executables, keyed by program name, `EngineSpec`, mesh and the arguments'
  structure, shapes, dtypes and placements.

  Bounded: it keeps the `capacity` most recently used executables and drops the rest (a
  long-lived process that meets many shapes would otherwise keep every executable's code and
  memory mappings alive; XLA:CPU aborts once a process passes the kernel's map limit,
  `vm.max_map_count`). The default, `JAXSPEC_PROGRAM_CACHE` or 64, holds every program a job
  with a handful of prompt buckets uses.

  Thread-safe: when several threads need the same program, one compiles it and the others
  wait for it (never two compilations of one key). `count` is the number of executables this
  cache has built (tests assert it does not grow when nothing should recompile).
  """

  def __init__(self, capacity: int | None = None):
    if capacity is None:
      capacity = int(os.environ.get("JAXSPEC_PROGRAM_CACHE", "64"))
    if capacity < 1:
      raise ValueError(f"the program cache needs a capacity >= 1, got {capacity}")
    self.capacity = capacity
    self._exes: collections.OrderedDict = collections.OrderedDict()  # least recent first
    self._building: dict = {}  # key -> threading.Event, set when the build ends
    self._lock = threading.Lock()
    self.count = 0

  def get(self, name: str, spec: EngineSpec, *args, mesh=None):
    """Returns (executable, compile seconds; 0.0 when it came from the cache)."""
    key = (name, spec, mesh, jax.tree.structure(args), _signature(args))
    while True:
      with self._lock:
        if key in self._exes:
          self._exes.move_to_end(key)
          return self._exes[key], 0.0
        event = self._building.get(key)
        if event is None:
          event = self._building[key] = threading.Event()
          break
      event.wait()  # another thread is compiling it; then look again (it may have failed)
    try:
      t0 = time.perf_counter()
      exe = _compile(name, spec, args, mesh)
      with self._lock:
        self._exes[key] = exe
        self.count += 1
        while len(self._exes) > self.capacity:
          self._exes.popitem(last=False)
      return exe, time.perf_counter() - t0
    finally:
      with self._lock:
        del self._building[key]
      event.set()

  def clear(self) -> None:
    with self._lock:
      self._exes.clear()

  def __len__(self) -> int:
    return len(self._exes)


def _compile(name: str, spec: EngineSpec, args, mesh):
  """With a mesh, the program gets explicit in/out shardings (params by their logical axes,
  rows of the batch and of every cache over "data", heads and MLP over "tensor")."""
  fn, donate = _FNS[name]
  if mesh is None:
    jitted = jax.jit(fn, static_argnums=0, donate_argnums=donate)
  else:
    in_sh, out_sh = arg_shardings(name, spec, args, mesh)
    jitted = jax.jit(fn, static_argnums=0, donate_argnums=donate, in_shardings=in_sh,
                     out_shardings=out_sh)
  exe = jitted.lower(spec, *args).compile()
  if mesh is None:
    return exe
  from jaxspec.sharding import place

  def placed(*a):
    return exe(*place(a, in_sh))  # a no-op for arrays already in place
  placed.compiled = exe
  return placed


PROGRAMS = Programs()  # the process-wide cache every entry point shares


def compiled(name: str, spec: EngineSpec, *args, mesh=None, programs: Programs | None = None):
  """`programs.get(...)` on the process-wide cache unless another is given."""
  return (PROGRAMS if programs is None else programs).get(name, spec, *args, mesh=mesh)


def __getattr__(name: str):
  if name == "compile_count":  # executables built by this process's shared cache
    return PROGRAMS.count
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

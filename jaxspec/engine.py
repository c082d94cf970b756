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

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxspec import sampling, trees, verify
from jaxspec.drafters.base import DrafterSpec, Round
from jaxspec.models import KVCache, ModelConfig, forward, head
from jaxspec.sampling import SamplingParams

MAX_STOP = 8  # stop-token slots per row (padded with -1)


@dataclasses.dataclass(frozen=True)
class EngineSpec:
  """Everything static about one compiled generation program."""

  target: ModelConfig
  drafter: DrafterSpec
  batch: int
  prompt_len: int  # prompt bucket
  buf_len: int  # token buffer = KV cache slots

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


@struct.dataclass
class State:
  seq: jax.Array  # [B, buf] int32: prompt, then committed output
  n: jax.Array  # [B] committed tokens (prompt included)
  prompt_lens: jax.Array  # [B]
  done: jax.Array  # [B] bool
  cache: KVCache  # target cache; lengths == n - 1
  dstate: Any  # drafter state
  key: jax.Array
  stats: Stats


@struct.dataclass
class Inputs:
  """Per-call traced values: changing any of them never recompiles."""

  sp: SamplingParams
  max_new: jax.Array  # [] int32
  stop: jax.Array  # [B, MAX_STOP] int32, -1 padded


def _is_stop(tokens: jax.Array, stop: jax.Array) -> jax.Array:
  """tokens [B, T], stop [B, S] -> [B, T] bool."""
  return jnp.any(tokens[:, :, None] == stop[:, None, :], axis=-1)


def _prefill(spec: EngineSpec, tparams, dparams, prompt, prompt_lens, live, inp: Inputs, key):
  b, p = prompt.shape
  dtype = tparams["embed"].dtype
  cache = KVCache.init(spec.target, b, spec.buf_len, dtype)
  out = forward(tparams, spec.target, prompt, cache, logits=False)
  last_h = jnp.take_along_axis(out.hidden, (prompt_lens - 1)[:, None, None], axis=1)  # [B,1,D]
  logits = head(tparams, spec.target, last_h)[:, 0]
  key, k0 = jax.random.split(key)
  first, _ = sampling.sample(k0, logits, spec.drafter.mode, inp.sp)
  seq = jnp.zeros((b, spec.buf_len), jnp.int32).at[:, :p].set(prompt)
  seq = seq.at[jnp.arange(b), prompt_lens].set(first)
  done = ~live | _is_stop(first[:, None], inp.stop)[:, 0] | (inp.max_new <= 1)
  dstate = spec.drafter.init(dparams, tparams, prompt, prompt_lens, spec.buf_len, out.hidden)
  stats = Stats(target_calls=live.astype(jnp.int32),
                accept_hist=jnp.zeros((b, spec.depth + 1), jnp.int32),
                rounds=jnp.zeros((), jnp.int32),
                nonfinite=live & ~jnp.isfinite(logits).all(axis=-1),
                drafted=jnp.zeros((b,), jnp.int32))
  return State(seq=seq, n=prompt_lens + 1, prompt_lens=prompt_lens, done=done,
               cache=out.cache.rewind(prompt_lens), dstate=dstate, key=key, stats=stats)


def _draft_and_verify(spec: EngineSpec, tparams, dparams, s: State, r: Round, k_verify):
  """Chain: k drafts verified at positions n-1 .. n-1+k. Tree: N nodes verified at positions
  n-1+depth with the ancestor mask, then the accepted path moved to contiguous slots.

  Returns (dstate, cache, n_acc [B], emit [B, depth+1], hidden along the accepted path,
  path [B, depth+1] or None for chains, nonfinite [B], drafts verified [B])."""
  d = spec.drafter
  if d.tree is None:
    dstate, tcache, drafts, dprobs = d.propose(dparams, s.dstate, r)
    pending = jnp.take_along_axis(s.seq, (s.n - 1)[:, None], axis=1)  # [B, 1]
    out = forward(tparams, spec.target, jnp.concatenate([pending, drafts], axis=1), tcache)
    n_acc, emit = verify.chain(k_verify, drafts, dprobs, out.logits, d.mode, r.sp)
    if getattr(d, "observes_logits", False):
      dstate = d.observe(dparams, dstate, jnp.concatenate([pending, drafts], axis=1), out.logits)
    return (dstate, out.cache, n_acc, emit, out.hidden, None, _nonfinite(out.logits),
            jnp.sum(drafts >= 0, axis=1))
  dstate, tcache, tree = d.propose_tree(dparams, s.dstate, r)
  depth = d.tree.max_depth
  anc = trees.ancestor_mask(tree.parents, depth)
  out = forward(tparams, spec.target, tree.tokens, tcache,
                positions=(s.n - 1)[:, None] + tree.depth, tree_mask=anc)
  children = (jnp.asarray(d.tree.children()) if isinstance(d.tree, trees.Static) else None)
  n_acc, emit, path = verify.tree(k_verify, tree, out.logits, depth, d.tree.max_children, d.mode,
                                  r.sp, children)
  if getattr(d, "observes_logits", False):
    dstate = d.observe(dparams, dstate, tree.tokens, out.logits)
  cache = out.cache.gather_slots(s.n - 1, path)
  hidden = jnp.take_along_axis(out.hidden, path[:, :, None], axis=1)  # [B, D+1, Dm]
  return (dstate, cache, n_acc, emit, hidden, path, _nonfinite(out.logits),
          jnp.sum(tree.valid[:, 1:], axis=1))


def _nonfinite(logits: jax.Array) -> jax.Array:
  """[B] rows whose verify logits hold a NaN or inf."""
  return ~jnp.isfinite(logits).all(axis=(1, 2))


def _round(spec: EngineSpec, tparams, dparams, inp: Inputs, s: State) -> State:
  b = s.seq.shape[0]
  key, k_draft, k_verify = jax.random.split(s.key, 3)
  r = Round(tparams=tparams, tcache=s.cache, seq=s.seq, n=s.n, key=k_draft, sp=inp.sp)
  dstate, cache, n_acc, emit, hidden, path, bad, drafted = _draft_and_verify(
      spec, tparams, dparams, s, r, k_verify)

  # Commit up to n_acc + 1 tokens, cut at max_new_tokens and at the first stop token.
  live = ~s.done
  count = jnp.minimum(n_acc + 1, inp.max_new - (s.n - s.prompt_lens))
  j = jnp.arange(emit.shape[1])[None, :]
  stop_hit = _is_stop(emit, inp.stop) & (j < count[:, None])
  has_stop = jnp.any(stop_hit, axis=1)
  count = jnp.where(has_stop, jnp.argmax(stop_hit, axis=1) + 1, count)
  count = jnp.where(live, count, 0)
  idx = s.n[:, None] + j  # [B, depth+1] buffer positions of the emitted tokens
  old = jnp.take_along_axis(s.seq, jnp.clip(idx, 0, spec.buf_len - 1), axis=1)
  rows = jnp.arange(b)[:, None]
  seq = s.seq.at[rows, idx].set(jnp.where(j < count[:, None], emit, old), mode="drop")
  n = s.n + count
  done = s.done | has_stop | (n - s.prompt_lens >= inp.max_new)
  cache = cache.rewind(n - 1)
  if path is None:
    dstate = spec.drafter.commit(dparams, dstate, r, n, n_acc, hidden)
  else:
    dstate = spec.drafter.commit_tree(dparams, dstate, r, n, n_acc, hidden, path)

  hist = s.stats.accept_hist + (jax.nn.one_hot(n_acc, spec.depth + 1, dtype=jnp.int32) *
                                live[:, None].astype(jnp.int32))
  stats = Stats(target_calls=s.stats.target_calls + live.astype(jnp.int32), accept_hist=hist,
                rounds=s.stats.rounds + 1, nonfinite=s.stats.nonfinite | (live & bad),
                drafted=s.stats.drafted + jnp.where(live, drafted, 0).astype(jnp.int32))
  return s.replace(seq=seq, n=n, done=done, cache=cache, dstate=dstate, key=key, stats=stats)


def _run(spec: EngineSpec, tparams, dparams, inp: Inputs, state: State, max_rounds) -> State:
  start = state.stats.rounds

  def cond(s):
    return jnp.any(~s.done) & (s.stats.rounds - start < max_rounds)

  return jax.lax.while_loop(cond, functools.partial(_round, spec, tparams, dparams, inp), state)


_COMPILED: dict = {}
compile_count = 0  # executables built by this process (tests assert it does not grow)

_FNS = {"prefill": (_prefill, ()), "run": (_run, (4,))}  # function, donated argnums


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


def compiled(name: str, spec: EngineSpec, *args, mesh=None):
  """Returns (executable, compile seconds; 0.0 when it came from the cache).

  With a mesh, the program gets explicit in/out shardings (params by their logical axes,
  rows of the batch and of every cache over "data", heads and MLP over "tensor")."""
  global compile_count
  key = (name, spec, mesh, jax.tree.structure(args), _signature(args))
  if key in _COMPILED:
    return _COMPILED[key], 0.0
  fn, donate = _FNS[name]
  t0 = time.perf_counter()
  if mesh is None:
    jitted = jax.jit(fn, static_argnums=0, donate_argnums=donate)
  else:
    in_sh, out_sh = arg_shardings(name, spec, args, mesh)
    jitted = jax.jit(fn, static_argnums=0, donate_argnums=donate, in_shardings=in_sh,
                     out_shardings=out_sh)
  exe = jitted.lower(spec, *args).compile()
  if mesh is not None:
    from jaxspec.sharding import place
    compiled_exe = exe

    def exe(*a):
      return compiled_exe(*place(a, in_sh))  # a no-op for arrays already in place
    exe.compiled = compiled_exe
  _COMPILED[key] = exe
  compile_count += 1
  return exe, time.perf_counter() - t0


def clear_cache() -> None:
  _COMPILED.clear()

"""Speculation that never loses: the in-graph switch between speculative and plain rounds.

With a drafter, the compiled loop holds two round programs and runs one per round: a
speculative round (draft, verify k + 1 tokens or a tree, commit) and a plain round (one target
forward of one token; the drafter only keeps its state in step, `DrafterSpec.commit_plain`).
Each round the graph picks one from what it has seen (`engine.Control`):

    speculate  iff  mean over live rows of tau_ema  >  ratio * (1 + margin)   (or a probe is due)

where `tau_ema` is each row's running mean of tokens committed per speculative round (accepted
drafts + 1) and `ratio` the measured cost of a speculative round over a plain one. While the
loop decodes plainly it still probes speculation now and then (every 8 plain rounds, the gap
doubling up to 64 while probes keep failing; an expensive drafter's gaps are longer, so that
failed probes cost at most 5% of the plain rounds: `engine.probe_gaps`), so a drafter that
starts to pay again is picked up. Both branches are exact, so the output is lossless whatever the graph picks.

`ratio` is measured once per model, drafter, shapes, mesh and sampling mode, by timing a few
rounds of the real compiled program forced to each branch (the mode is a traced input, so
nothing is compiled for it), and cached in this process (keyed by fingerprints, never ids).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec import engine, fingerprint, session

MARGIN = 0.05  # speculate only when predicted to beat plain decoding by this much
WARM_ROUNDS = 2  # rounds run before timing (first-execution effects)
TIMED_ROUNDS = 4

_RATIOS: dict = {}  # (fingerprints, shapes, mesh, sampling mode) -> Measured


@dataclasses.dataclass(frozen=True)
class Measured:
  ratio: float  # seconds per speculative round / seconds per plain round
  plain_round_s: float
  spec_round_s: float
  seconds: float  # what measuring took in this call (0.0: from the cache)
  compile_s: float = 0.0  # of which compiling the program (built once, then reused)


def clear_cache() -> None:
  _RATIOS.clear()


def _key(model, drafter, plan: session.Plan) -> tuple:
  spec = plan.spec
  return (fingerprint.of_model(model), fingerprint.of_drafter(drafter), spec.batch,
          spec.prompt_len, spec.buf_len, spec.drafter.mode, str(plan.mesh))


def round_seconds(model, plan: session.Plan, mode: int, warm: int,
                   rounds: int) -> tuple[float, float]:
  """(seconds per round of the compiled loop forced to one branch, compile seconds): one
  prefill (not timed), `warm` rounds, then `rounds` timed rounds (fewer if every row
  finishes)."""
  forced = dataclasses.replace(plan, inputs=plan.inputs.replace(
      mode=jnp.asarray(mode, jnp.int32)))
  state, c0 = session.start(model, forced)
  state, c1 = session.run_rounds(model, forced, state, warm)
  before = int(session.fetch(state.stats.rounds))
  t0 = time.perf_counter()
  state, c = session.run_rounds(model, forced, state, rounds)
  done = int(session.fetch(state.stats.rounds)) - before
  dt = time.perf_counter() - t0 - c
  return (dt / done if done > 0 else float("nan")), c0 + c1 + c


def measure(model, drafter, plan: session.Plan, *, warm: int = WARM_ROUNDS,
            rounds: int = TIMED_ROUNDS) -> Measured:
  """Times both branches of `plan`'s program (cached per model, drafter, shapes, mesh and
  sampling mode; `seconds` is what this call spent, 0 when cached)."""
  key = _key(model, drafter, plan)
  if key in _RATIOS:  # measured before: nothing spent now
    return dataclasses.replace(_RATIOS[key], seconds=0.0, compile_s=0.0)
  t0 = time.perf_counter()
  plain, c_plain = round_seconds(model, plan, engine.MODE_PLAIN, warm, rounds)
  spec, c_spec = round_seconds(model, plan, engine.MODE_SPECULATE, warm, rounds)
  ok = np.isfinite(spec) and np.isfinite(plain) and plain > 0
  # A speculative round does all of a plain round's work and more (a target pass over k + 1
  # tokens instead of 1, plus drafting), so a ratio below 1 is timing noise: a load spike
  # while the plain branch was timed. Left in, it would make a drafter that is never right
  # look worth running (tau 1 > ratio) and the loop would speculate every round.
  ratio = max(1.0, spec / plain) if ok else 1.0
  if jax.process_count() > 1 and _spans_processes(plan):  # one program over every process:
    from jax.experimental import multihost_utils  # all of them must take the same branches
    ratio = float(multihost_utils.broadcast_one_to_all(np.float32(ratio)))
  _RATIOS[key] = Measured(ratio=float(ratio), plain_round_s=plain, spec_round_s=spec,
                          seconds=time.perf_counter() - t0)
  return dataclasses.replace(_RATIOS[key], compile_s=c_plain + c_spec)


def _spans_processes(plan: session.Plan) -> bool:
  """The plan's program runs on other processes' devices too (a global mesh). A process-local
  plan (`jaxspec run`'s shares, one host's `generate`) measures for itself: a collective there
  would wait for processes that may never measure (a share with nothing left to do)."""
  mesh = plan.mesh
  me = jax.process_index()
  return mesh is not None and any(d.process_index != me for d in mesh.devices.flat)


def calibrated(model, drafter, plan: session.Plan, *, ratio: float | None = None):
  """`plan` with its switch inputs set: the measured (or given) cost ratio, auto mode.
  Returns (plan, Measured or None)."""
  if not plan.spec.switch:
    return plan, None
  m = None
  if ratio is None:
    m = measure(model, drafter, plan)
    ratio = m.ratio
  inputs = plan.inputs.replace(mode=jnp.asarray(engine.MODE_AUTO, jnp.int32),
                               ratio=jnp.asarray(ratio, jnp.float32),
                               margin=jnp.asarray(MARGIN, jnp.float32))
  return dataclasses.replace(plan, inputs=inputs), m

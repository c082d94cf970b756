"""The verifier: greedy acceptance by hand, and statistical proof that sampling is lossless.

The statistical tests draw 200k two-token continuations from a target that is a known Markov
chain, with adversarial draft distributions, and compare the joint law of the first two emitted
tokens with the exact target law (chi-square). The same harness, fed deliberately broken
samplers, must reject them: that is what shows the test has the power to catch a real bug.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxspec import sampling, verify

V = 6
N = 200_000
P_MIN = 1e-4  # a correct sampler fails with this probability per case


def test_greedy_by_hand():
  logits = jnp.full((3, 4, 8), -1.0)
  target = jnp.array([[5, 6, 7, 1], [5, 0, 7, 1], [2, 6, 7, 3]])  # argmax per position
  logits = logits.at[jnp.arange(3)[:, None], jnp.arange(4)[None, :], target].set(1.0)
  drafts = jnp.array([[5, 6, 7], [5, 6, 7], [5, 6, 7]])
  n_acc, toks = verify.greedy(drafts, logits)
  assert n_acc.tolist() == [3, 1, 0]
  assert toks[0].tolist() == [5, 6, 7, 1]  # all accepted, bonus = target's token at position 3
  assert toks[1, :2].tolist() == [5, 0]  # one accepted, correction 0
  assert toks[2, :1].tolist() == [2]  # none accepted, correction 2


def _markov(seed, sharp=1.0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=V) * sharp).astype(np.float32), (
      rng.normal(size=(V, V)) * sharp).astype(np.float32)


def _law(l0, l1, mode, sp):
  p0 = np.asarray(sampling.probs(jnp.asarray(l0), mode, sp), np.float64)
  p1 = np.asarray(sampling.probs(jnp.asarray(l1), mode, sp), np.float64)
  return p0[:, None] * p1  # [V, V] joint law of (t1, t2)


def two_tokens(key, target, draft, mode, sp, sampler=verify.rejection, deterministic=False):
  """Runs rounds of k=2 speculation for N rows; returns the first two emitted tokens [N, 2].

  target / draft: (logits0 [V], logits1 [V, V]) of Markov chains t1 -> t2.
  deterministic: the draft proposes argmax tokens with one-hot q (draft_probs=None).
  """
  (t0, t1), (d0, d1) = [tuple(jnp.asarray(x) for x in m) for m in (target, draft)]
  q0 = sampling.probs(d0, mode, sp)
  q1 = sampling.probs(d1, mode, sp)  # [V, V]
  ks = jax.random.split(key, 6)
  if deterministic:
    x1 = jnp.full((N,), jnp.argmax(q0))
    x2 = jnp.argmax(q1, -1)[x1]
  else:
    x1 = jax.random.categorical(ks[0], jnp.log(q0), shape=(N,))
    x2 = jax.random.categorical(ks[1], jnp.log(q1[x1]))
  drafts = jnp.stack([x1, x2], 1).astype(jnp.int32)
  probs = None if deterministic else jnp.stack([jnp.broadcast_to(q0, (N, V)), q1[x1]], 1)
  logits = jnp.stack([jnp.broadcast_to(t0, (N, V)), t1[x1], jnp.zeros((N, V))], 1)
  n_acc, toks = sampler(ks[2], drafts, probs, logits, mode, sp)
  first = toks[:, 0]
  # Rows that accepted nothing emitted one token; their second comes from a new round (k=1)
  # drafting from state t1.
  if deterministic:
    y = jnp.argmax(q1, -1)[first][:, None]
    qy = None
  else:
    y = jax.random.categorical(ks[3], jnp.log(q1[first]))[:, None]
    qy = q1[first][:, None]
  l2 = jnp.stack([t1[first], jnp.zeros((N, V))], 1)
  _, toks2 = sampler(ks[4], y.astype(jnp.int32), qy, l2, mode, sp)
  second = jnp.where(n_acc >= 1, toks[:, 1], toks2[:, 0])
  return np.asarray(jnp.stack([first, second], 1))


def chi2_pvalue(samples, law):
  counts = np.zeros((V, V))
  np.add.at(counts, (samples[:, 0], samples[:, 1]), 1)
  exp = law * len(samples)
  if counts[exp == 0].sum() > 0:  # a token the target can never produce: certainly wrong
    return 0.0
  # Cells expected fewer than 5 times are pooled into one (the chi-square approximation).
  small = exp < 5
  obs, exp = counts[~small], exp[~small]
  pooled = (law * len(samples))[small].sum()
  if pooled > 0:
    obs, exp = np.append(obs, counts[small].sum()), np.append(exp, pooled)
  exp = exp * obs.sum() / exp.sum()  # renormalise float32 rounding
  return stats.chisquare(obs, exp).pvalue


def _uniformish(seed):
  l0, l1 = _markov(seed, sharp=0.05)
  return l0, l1


def _disjoint():
  """Target only on tokens 0..2, draft only on 3..5 (rejection every time)."""
  big = np.float32(30.0)
  t0 = np.array([1, 0.5, 0, -big, -big, -big], np.float32)
  t1 = np.tile(t0, (V, 1))
  d0 = np.array([-big, -big, -big, 1, 0.5, 0], np.float32)
  return (t0, t1), (d0, np.tile(d0, (V, 1)))


CASES = {
    "identical": lambda: (_markov(1), _markov(1)),
    "independent": lambda: (_markov(1), _markov(2)),
    "disjoint_support": _disjoint,
    "near_uniform_target_sharp_draft": lambda: (_uniformish(3), _markov(4, sharp=4.0)),
    "sharp_target_near_uniform_draft": lambda: (_markov(5, sharp=4.0), _uniformish(6)),
}
MODES = {
    "t1": (1.0, None, None),
    "t0.7_topk3": (0.7, 3, None),
    "t1.2_topp0.8": (1.2, None, 0.8),
    "topk4_topp0.7": (1.0, 4, 0.7),
}


@pytest.mark.parametrize("mode_name", list(MODES))
@pytest.mark.parametrize("case", list(CASES))
def test_rejection_sampling_is_lossless(case, mode_name):
  target, draft = CASES[case]()
  mode, sp = sampling.make(*MODES[mode_name])
  law = _law(*target, mode, sp)
  seed = list(CASES).index(case) * 100 + list(MODES).index(mode_name)
  samples = two_tokens(jax.random.key(seed), target, draft, mode, sp)
  assert chi2_pvalue(samples, law) > P_MIN


@pytest.mark.parametrize("mode_name", ["t1", "topk4_topp0.7"])
def test_one_hot_draft_is_lossless(mode_name):
  target, draft = _markov(7), _markov(8, sharp=3.0)
  mode, sp = sampling.make(*MODES[mode_name])
  samples = two_tokens(jax.random.key(11), target, draft, mode, sp, deterministic=True)
  assert chi2_pvalue(samples, _law(*target, mode, sp)) > P_MIN


def _no_residual(key, drafts, probs, logits, mode, sp):
  """BROKEN: on rejection, resample from p instead of normalise(max(p - q, 0))."""
  n_acc, toks = verify.rejection(key, drafts, probs, logits, mode, sp)
  p = sampling.probs(logits, mode, sp)
  p_at = jnp.take_along_axis(p, n_acc[:, None, None], axis=1)[:, 0]
  redo = sampling.categorical_from_probs(jax.random.fold_in(key, 1), p_at)
  return n_acc, toks.at[jnp.arange(len(n_acc)), n_acc].set(redo)


def _bonus_from_draft(key, drafts, probs, logits, mode, sp):
  """BROKEN: when every draft passes, take the draft's own next guess instead of a target bonus
  (here: position k-1's draft distribution), i.e. the bonus token is skipped."""
  n_acc, toks = verify.rejection(key, drafts, probs, logits, mode, sp)
  k = drafts.shape[1]
  q_last = probs[:, k - 1] if probs is not None else jax.nn.one_hot(drafts[:, -1], V)
  guess = sampling.categorical_from_probs(jax.random.fold_in(key, 2), q_last)
  return n_acc, toks.at[:, k].set(jnp.where(n_acc == k, guess, toks[:, k]))


def _accept_all(key, drafts, probs, logits, mode, sp):
  """BROKEN: accepts every draft (no rejection test at all)."""
  k = drafts.shape[1]
  n_acc, toks = verify.rejection(key, drafts, probs, logits, mode, sp)
  return jnp.full_like(n_acc, k), toks.at[:, :k].set(drafts)


@pytest.mark.parametrize("broken", [_no_residual, _accept_all])
def test_harness_rejects_broken_samplers(broken):
  target, draft = _markov(1), _markov(2)
  mode, sp = sampling.make(1.0)
  samples = two_tokens(jax.random.key(5), target, draft, mode, sp, sampler=broken)
  assert chi2_pvalue(samples, _law(*target, mode, sp)) < 1e-12


def test_harness_rejects_skipped_bonus():
  """With k=1 the bonus token is the second emitted token, so skipping it must show."""
  target, draft = _markov(1), _markov(2)
  mode, sp = sampling.make(1.0)
  (t0, t1), (d0, d1) = [tuple(jnp.asarray(x) for x in m) for m in (target, draft)]

  def run(sampler):
    ks = jax.random.split(jax.random.key(9), 3)
    q0 = sampling.probs(d0, mode, sp)
    x1 = jax.random.categorical(ks[0], jnp.log(q0), shape=(N,)).astype(jnp.int32)
    logits = jnp.stack([jnp.broadcast_to(t0, (N, V)), t1[x1]], 1)
    probs = jnp.broadcast_to(q0, (N, 1, V))
    n_acc, toks = sampler(ks[1], x1[:, None], probs, logits, mode, sp)
    second = jax.random.categorical(ks[2], jnp.log(sampling.probs(t1, mode, sp))[toks[:, 0]])
    return np.asarray(jnp.stack([toks[:, 0], jnp.where(n_acc == 1, toks[:, 1], second)], 1))

  law = _law(*target, mode, sp)
  assert chi2_pvalue(run(verify.rejection), law) > P_MIN
  assert chi2_pvalue(run(_bonus_from_draft), law) < 1e-12

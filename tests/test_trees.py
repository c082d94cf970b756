"""Token trees: topology helpers, lossless greedy and sampled tree verification, cache commit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec
from jaxspec import drafters, sampling, session, trees, verify
from jaxspec.models import KVCache, forward
from conftest import truncated

from test_verify import V, N, P_MIN, _law, _markov, chi2_pvalue

PROMPTS = ["Once upon a time", "Tom and his dog went to the", "The little bird",
           "Lily wanted to play with her friend in the big park. She said"]
N_NEW = 24
STATIC = trees.Static.from_branching((3, 2, 1))
DYNAMIC = trees.Dynamic(nodes=12, topk=3, depth=4)


@pytest.fixture(scope="module")
def plain(stories):
  return jaxspec.generate(stories, PROMPTS, max_new_tokens=N_NEW, stop_tokens=())


# Topology --------------------------------------------------------------------------------

def test_static_constructors():
  t = trees.Static.from_branching((3, 2))
  assert t.n_nodes == 10 and t.max_depth == 2 and t.max_children == 3
  assert t.levels == ((0, 1), (1, 4), (4, 10))
  assert t.branch == (0, 0, 1, 2, 0, 0, 1, 1, 2, 2)
  c = trees.Static.chains(2, 3)
  assert c.parents == (-1, 0, 0, 1, 2, 3, 4) and c.max_depth == 3
  anc = t.ancestor_mask()
  assert anc[7].tolist() == [True, False, True, False, False, False, False, True, False, False]


def test_from_acceptance_is_best_first():
  # Rank-0 children are accepted far more often: the budget goes to a deep main chain.
  t = trees.Static.from_acceptance([0.8, 0.1, 0.05], nodes=8)
  assert t.n_nodes == 8
  assert t.max_depth >= 5
  # Uniform acceptance: a bushy tree instead.
  u = trees.Static.from_acceptance([0.5, 0.5, 0.5], nodes=8)
  assert u.max_depth < t.max_depth
  # The expected accepted length of the built tree beats any other shape tried by hand.
  def expected(tree, rates):
    prob = [1.0]
    for i in range(1, tree.n_nodes):
      prob.append(prob[tree.parents[i]] * rates[tree.ranks[i]])
    return sum(prob) - 1
  rates = [0.8, 0.1, 0.05]
  for other in [trees.Static.chains(1, 7), trees.Static.from_branching((3, 1)),
                trees.Static.chains(2, 3).__class__((-1, 0, 0, 1, 1, 3, 5, 6))]:
    assert expected(t, rates) >= expected(other, rates) - 1e-12


@pytest.mark.parametrize("bad", [(0,), (-1, 1), (-1, 0, 0, 1, 0)])
def test_static_rejects_bad_parents(bad):
  with pytest.raises(ValueError):
    trees.Static(bad)


def test_dynamic_and_tree_argument_errors():
  with pytest.raises(ValueError, match="can only produce"):
    trees.Dynamic(nodes=64, topk=2, depth=2)
  with pytest.raises(ValueError, match="positive integer"):
    trees.Dynamic(nodes=8, topk=0)
  with pytest.raises(ValueError, match="tree must be"):
    drafters.EarlyExit(layers=2, tree="big")
  with pytest.raises(ValueError, match="Static"):
    drafters.NGram(tree=trees.Dynamic(nodes=8))
  assert drafters.EarlyExit(layers=2, tree=10).tree == trees.Dynamic(nodes=10)


def test_array_helpers():
  par = jnp.asarray([[0, 0, 0, 1, 1, 2]])
  dep = jnp.asarray([[0, 1, 1, 2, 2, 2]])
  assert trees.children_table(par, jnp.ones((1, 6), bool), 2).tolist() == [
      [[1, 2], [3, 4], [5, -1], [-1, -1], [-1, -1], [-1, -1]]]
  assert trees.path_to(par, dep, jnp.asarray([4]), 2).tolist() == [[0, 1, 4]]
  static = trees.Static((-1, 0, 0, 1, 1, 2))
  assert static.children().tolist() == trees.children_table(par, jnp.ones((1, 6), bool), 2)[0].tolist()
  assert trees.path_to(par, dep, jnp.asarray([2]), 2).tolist() == [[0, 2, 2]]
  anc = trees.ancestor_mask(par, 2)[0].astype(int)
  assert anc[5].tolist() == [1, 0, 1, 0, 0, 1]


# Greedy: lossless for every drafter ---------------------------------------------------------

@pytest.mark.parametrize("tree", [STATIC, DYNAMIC], ids=["static", "dynamic"])
@pytest.mark.parametrize("kind", ["draft", "early-exit"])
def test_tree_greedy_equals_plain(stories, plain, kind, tree):
  d = (drafters.DraftModel(truncated(stories, 2), tree=tree) if kind == "draft" else
       drafters.EarlyExit(layers=3, tree=tree))
  out = jaxspec.generate(stories, PROMPTS, drafter=d, max_new_tokens=N_NEW, stop_tokens=())
  assert out.tokens == plain.tokens
  assert 1.0 <= out.stats.mean_accepted <= tree.max_depth + 1


@pytest.mark.parametrize("d", [drafters.NGram(n=2, tree=trees.Static.chains(3, 4)),
                               drafters.Recycling(),
                               drafters.Recycling(tree=trees.Static.from_branching((2, 2)), m=2)],
                         ids=["ngram", "recycling", "recycling-small"])
def test_model_free_tree_greedy_equals_plain(stories, plain, d):
  out = jaxspec.generate(stories, PROMPTS, drafter=d, max_new_tokens=N_NEW, stop_tokens=())
  assert out.tokens == plain.tokens


def test_tree_beats_chain_tau(stories):
  """Same drafter, a 16-node tree vs a 4-token chain: more tokens per target call."""
  prompts = PROMPTS + ["Sam found a red ball", "One day, a little cat"]
  chain = jaxspec.generate(stories, prompts, drafter=drafters.EarlyExit(layers=3, k=4),
                           max_new_tokens=48, stop_tokens=())
  tree = jaxspec.generate(stories, prompts, drafter=drafters.EarlyExit(layers=3, tree=STATIC),
                          max_new_tokens=48, stop_tokens=())
  assert tree.tokens == chain.tokens
  assert tree.stats.mean_accepted > chain.stats.mean_accepted


def test_tree_commit_leaves_plain_cache(stories):
  """After several tree rounds the live cache equals a fresh prefill of the committed tokens."""
  pr = session.prepare(stories, PROMPTS, drafter=drafters.EarlyExit(layers=3, tree=DYNAMIC),
                       max_new_tokens=N_NEW, temperature=0.0, top_k=None, top_p=None, seed=0,
                       stop_tokens=(), mesh=None)
  state, _ = session.start(stories, pr)
  state, _ = session.run_rounds(stories, pr, state, 3)
  seq, n = np.asarray(state.seq), np.asarray(state.n)
  assert (n > np.asarray(pr.lens) + 3).any()  # some row accepted tree tokens
  ref = forward(stories.params, stories.config, jnp.asarray(seq),
                KVCache.init(stories.config, seq.shape[0], seq.shape[1]))
  k, v, kr, vr = (np.asarray(x) for x in (state.cache.k, state.cache.v, ref.cache.k, ref.cache.v))
  for b in range(len(PROMPTS)):
    live = n[b] - 1
    assert int(state.cache.lengths[b]) == live
    np.testing.assert_allclose(k[:, b, :live], kr[:, b, :live], atol=2e-5)
    np.testing.assert_allclose(v[:, b, :live], vr[:, b, :live], atol=2e-5)


def test_sampled_tree_generation_runs(stories):
  d = drafters.EarlyExit(layers=4, tree=DYNAMIC)
  a = jaxspec.generate(stories, PROMPTS, drafter=d, max_new_tokens=N_NEW, temperature=1.0,
                       top_p=0.9, seed=3)
  b = jaxspec.generate(stories, PROMPTS, drafter=d, max_new_tokens=N_NEW, temperature=1.0,
                       top_p=0.9, seed=3)
  assert a.tokens == b.tokens and a.stats.mean_accepted > 1.0


# Sampling: lossless, by statistics -------------------------------------------------------

def _tree_two_tokens(key, target, siblings, mode, sp, sampler=verify.tree_rejection):
  """A depth-2 tree: root children `siblings` (token ids, duplicates allowed), each with
  children `siblings` again. Target = Markov chain (l0 at the root, l1[t] after token t).
  Returns the first two emitted tokens [N, 2] (a second round from t1 when only one came)."""
  m = len(siblings)
  parents = [-1] + [0] * m + [1 + i for i in range(m) for _ in range(m)]
  toks = np.asarray([0] + list(siblings) + list(siblings) * m, np.int32)
  out = _two_tokens_jit(key, tuple(jnp.asarray(x) for x in target), jnp.asarray(toks), mode, sp,
                        sampler, trees.Static(tuple(parents)), trees.Static(tuple([-1] + [0] * m)))
  return np.asarray(out)


@functools.partial(jax.jit, static_argnums=(3, 5, 6, 7))
def _two_tokens_jit(key, target, toks, mode, sp, sampler, tree, t1):
  # Everything batch-sized derives from traced inputs: XLA would otherwise constant-fold
  # arrays of N rows at compile time.
  l0, l1 = target
  m = t1.n_nodes - 1
  rows = jnp.zeros((N, 1), jnp.int32) + jax.random.randint(key, (N, 1), 0, 1)
  arrays = tree.arrays(rows + toks[None, :])
  logits = jnp.concatenate([rows[:, :, None] + l0[None, None, :],
                            rows[:, :, None] + l1[toks[1:1 + m]][None, :, :],
                            jnp.zeros((N, m * m, V)) + 0 * l0[0]], axis=1)
  k1, k2 = jax.random.split(key)
  n_acc, out, _ = sampler(k1, arrays, logits, 2, m, mode, sp, jnp.asarray(tree.children()))
  first = out[:, 0]
  # Rows with one token continue from t1 with a fresh one-level tree of the same siblings.
  a2 = t1.arrays(jnp.concatenate([first[:, None], rows + toks[None, 1:1 + m]], axis=1))
  l2 = jnp.concatenate([l1[first][:, None], jnp.zeros((N, m, V)) + 0 * l0[0]], axis=1)
  _, out2, _ = sampler(k2, a2, l2, 1, m, mode, sp, jnp.asarray(t1.children()))
  return jnp.stack([first, jnp.where(n_acc >= 1, out[:, 1], out2[:, 0])], 1)


SIBLINGS = {
    "distinct": (0, 3, 5),
    "duplicates": (2, 2, 4, 2),
    "all_rejected": (5, 5),  # the target gives token 5 no mass at all (see below)
    "single": (1,),
}


@pytest.mark.parametrize("sib,mode_name", [
    ("distinct", "t1"), ("distinct", "topk4_topp0.7"), ("duplicates", "t1"),
    ("duplicates", "t0.7_topk3"), ("all_rejected", "t1"), ("all_rejected", "topk4_topp0.7"),
    ("single", "t1")])
def test_tree_sampling_is_lossless(sib, mode_name):
  from test_verify import MODES
  target = _markov(21)
  if sib == "all_rejected":
    target = (target[0].copy(), target[1].copy())
    target[0][5] = -1e9
    target[1][:, 5] = -1e9
  mode, sp = sampling.make(*MODES[mode_name])
  seed = list(SIBLINGS).index(sib) * 10 + ["t1", "t0.7_topk3", "topk4_topp0.7"].index(mode_name)
  samples = _tree_two_tokens(jax.random.key(seed), target, SIBLINGS[sib], mode, sp)
  assert chi2_pvalue(samples, _law(*target, mode, sp)) > P_MIN


def _tree_no_residual(key, tree, logits, depth, m, mode, sp, children=None):
  """BROKEN: tries every sibling against the unmodified target distribution."""
  p = sampling.probs(logits, mode, sp)
  b = tree.tokens.shape[0]
  children = trees.children_table(tree.parents, tree.valid, m)
  rows = jnp.arange(b)
  u = jax.random.uniform(key, (b, m))
  c = children[rows, 0]
  px = p[rows[:, None], 0, tree.tokens[rows[:, None], jnp.maximum(c, 0)]]
  acc = (c >= 0) & (u < px)
  first_acc = jnp.argmax(acc, axis=1)
  any_acc = acc.any(axis=1)
  node = jnp.where(any_acc, c[rows, first_acc], 0)
  drawn = jax.random.categorical(jax.random.fold_in(key, 1), jnp.log(p[:, 0]))
  n_acc = any_acc.astype(jnp.int32)
  bonus = jax.random.categorical(jax.random.fold_in(key, 2), jnp.log(p[rows, node]))
  out = jnp.stack([jnp.where(any_acc, tree.tokens[rows, node], drawn), bonus], 1)
  return n_acc, out, None


def test_tree_harness_rejects_broken_sampler():
  target = _markov(21)
  mode, sp = sampling.make(1.0)
  samples = _tree_two_tokens(jax.random.key(1), target, SIBLINGS["distinct"], mode, sp,
                             sampler=_tree_no_residual)
  assert chi2_pvalue(samples, _law(*target, mode, sp)) < 1e-12

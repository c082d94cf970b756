"""Token trees: topology helpers, lossless greedy and sampled tree verification, cache commit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec
from jaxspec import drafters, sampling, session, trees, verify
from jaxspec.models import KVCache, forward
from conftest import (STORY_PROMPTS, assert_second_and_third_follow_the_target, next_token_laws,
                      tiny_model, truncated)

from test_verify import V, N, P_MIN, _law, _markov, chi2_pvalue

PROMPTS = STORY_PROMPTS
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


def test_static_sampled_is_a_bool():
  assert trees.Static((-1, 0)).sampled and not trees.Static((-1, 0), sampled=False).sampled
  with pytest.raises(ValueError, match="sampled must be True or False, got 'yes'"):
    trees.Static((-1, 0), sampled="yes")


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


# Siblings sampled from the draft's distribution (Static trees, sampled=True) ---------------

def _q_two_tokens(key, target, draft, m, mode, sp, sampler=verify.tree_rejection_q):
  """Like `_tree_two_tokens`, with the siblings drawn by the drafters' own tree builder
  (`tree_draft.static_tree`) from a draft Markov chain `draft` (d0 at the root, d1[t] after
  token t) without replacement, m per node, two levels. Returns (first two tokens [N, 2],
  drafts accepted in the first round [N])."""
  tree, t1 = trees.Static.from_branching((m, m)), trees.Static.from_branching((m,))
  out, n_acc = _q_two_tokens_jit(key, tuple(jnp.asarray(x) for x in target),
                                 tuple(jnp.asarray(x) for x in draft), mode, sp, sampler, tree, t1)
  return np.asarray(out), np.asarray(n_acc)


@functools.partial(jax.jit, static_argnums=(3, 5, 6, 7))
def _q_two_tokens_jit(key, target, draft, mode, sp, sampler, tree, t1):
  from jaxspec.drafters import tree_draft
  (l0, l1), (d0, d1) = target, draft
  rows = jnp.zeros((N,), jnp.int32) + jax.random.randint(key, (N,), 0, 1)  # traced: no folding
  feed = lambda cache, toks, pos, base, mask, parent: (cache, d1[toks], None)
  k1, k2, k3, k4 = jax.random.split(key, 4)
  _, arrays, _ = tree_draft.static_tree(feed, None, d0[None] + 0 * rows[:, None], rows, rows,
                                        tree, sample=(k1, mode, sp))
  logits = jnp.concatenate([l0[None, None] + 0 * rows[:, None, None], l1[arrays.tokens[:, 1:]]],
                           axis=1)
  n_acc, out, _ = sampler(k2, arrays, logits, 2, tree.max_children, mode, sp,
                          jnp.asarray(tree.children()))
  first = out[:, 0]
  # Rows with one token continue from t1 with a fresh one-level tree drawn the same way.
  _, a2, _ = tree_draft.static_tree(feed, None, d1[first], first, rows, t1, sample=(k3, mode, sp))
  l2 = jnp.concatenate([l1[first][:, None], l1[a2.tokens[:, 1:]]], axis=1)
  _, out2, _ = sampler(k4, a2, l2, 1, t1.max_children, mode, sp, jnp.asarray(t1.children()))
  return jnp.stack([first, jnp.where(n_acc >= 1, out[:, 1], out2[:, 0])], 1), n_acc


def _q_case(name):
  """(target, draft) Markov chains: adversarial and friendly drafts."""
  target = _markov(31)
  if name == "close":  # a good draft: the target, slightly off
    rng = np.random.default_rng(5)
    return target, tuple(x + 0.3 * rng.normal(size=x.shape).astype(np.float32) for x in target)
  if name == "opposite":  # prefers what the target does not
    return target, tuple(-x for x in target)
  if name == "same":
    return target, target
  if name == "sharp":  # a near one-hot draft: with top-k, fewer candidates than siblings
    return target, _markov(32, sharp=6.0)
  if name == "target_refuses":  # the target gives token 5 no mass; the draft loves it
    l0, l1 = (x.copy() for x in target)
    l0[5], l1[:, 5] = -1e9, -1e9
    d0, d1 = (x.copy() for x in _markov(33))
    d0[5], d1[:, 5] = 8.0, 8.0
    return (l0, l1), (d0, d1)
  raise ValueError(name)


Q_CASES = [("close", "t1", 3), ("opposite", "t1", 3), ("same", "t1", 2), ("sharp", "t1", 3),
           ("sharp", "t0.7_topk3", 4), ("target_refuses", "t1", 2),
           ("opposite", "topk4_topp0.7", 3), ("close", "t0.7_topk3", 2)]


@pytest.mark.parametrize("case,mode_name,m", Q_CASES)
def test_sampled_siblings_are_lossless(case, mode_name, m):
  """Siblings drawn from q without replacement and verified against q give the target's
  two-token law, whatever the draft (good, opposite, sharper than the warp leaves candidates
  for, in love with a token the target refuses)."""
  from test_verify import MODES
  target, draft = _q_case(case)
  mode, sp = sampling.make(*MODES[mode_name])
  seed = 100 + Q_CASES.index((case, mode_name, m))
  samples, _ = _q_two_tokens(jax.random.key(seed), target, draft, m, mode, sp)
  assert chi2_pvalue(samples, _law(*target, mode, sp)) > P_MIN


def test_sampled_siblings_harness_rejects_unnormalised_residual(monkeypatch):
  """The same harness fails the sampler with one bug: the residual after a rejected sibling
  left unnormalised (accepting the next sibling too rarely)."""
  monkeypatch.setattr(verify, "_residual", lambda r, q: jnp.maximum(r - q, 0.0))
  target, draft = _q_case("opposite")
  mode, sp = sampling.make(1.0)
  broken = lambda *a: verify.tree_rejection_q(*a)  # a new static argument: traced anew
  samples, _ = _q_two_tokens(jax.random.key(7), target, draft, 3, mode, sp, sampler=broken)
  assert chi2_pvalue(samples, _law(*target, mode, sp)) < 1e-12


def test_sampled_siblings_accept_more_than_top_candidates():
  """A draft equal to the target is accepted every time when its siblings are checked against
  q; the top candidates, as one-hot drafts, only as often as the target puts its mass there."""
  from jaxspec.drafters import tree_draft
  target, _ = _q_case("same")
  mode, sp = sampling.make(1.0)
  _, n_acc = _q_two_tokens(jax.random.key(3), target, target, 2, mode, sp)
  assert (n_acc == 2).all()
  # Top candidates of the same draft, verified one-hot (Static(sampled=False)).
  tree = trees.Static.from_branching((2, 2))
  l0, l1 = (jnp.asarray(x) for x in target)
  feed = lambda cache, toks, pos, base, mask, parent: (cache, l1[toks], None)
  rows = jnp.zeros((N,), jnp.int32)
  _, arrays, _ = tree_draft.static_tree(feed, None, jnp.broadcast_to(l0, (N, V)), rows, rows,
                                        tree)
  logits = jnp.concatenate([jnp.broadcast_to(l0, (N, 1, V)), l1[arrays.tokens[:, 1:]]], axis=1)
  top, _, _ = verify.tree_rejection(jax.random.key(4), arrays, logits, 2, 2, mode, sp)
  assert float(np.mean(top)) < 1.6


def _sampled_tree_drafters(model):
  tree = trees.Static.from_branching((3, 2))
  p1, _, _ = next_token_laws(model, [5, 9, 2])
  return {
      "draft": drafters.DraftModel(truncated(model, 1), tree=tree),
      # a draft vocabulary without the target's 8 favourite first tokens: q = 0 where p is large
      "draft-few-ids": drafters.DraftModel(truncated(model, 1), tree=tree,
                                           vocab=sorted(np.argsort(-p1)[8:24].tolist())),
      "layer-skip": drafters.LayerSkip(layers=(0,), tree=tree),
      "top-candidates": drafters.DraftModel(truncated(model, 1),
                                            tree=trees.Static(tree.parents, sampled=False)),
  }


@pytest.mark.parametrize("name", ["draft", "draft-few-ids", "layer-skip", "top-candidates"])
def test_sampled_tree_generation_is_exact(name):
  """Temperature 1, 8192 rows, every round speculative on a (3, 2) tree: the second and third
  tokens (drafts of the first round, siblings drawn from q without replacement, or the top
  candidates with sampled=False) follow the target's law."""
  model = tiny_model(seed=3, max_seq_len=64)
  prompt = [5, 9, 2]
  d = _sampled_tree_drafters(model)[name]
  out = jaxspec.generate(model, [prompt] * 8192, drafter=d, max_new_tokens=3, stop_tokens=(),
                         temperature=1.0, seed=13, speculate="always")
  assert sum(sum(h[1:]) for h in out.stats.accepted) > 0
  assert_second_and_third_follow_the_target(model, prompt, out.tokens)


def test_sampled_siblings_accept_more_in_generation(stories):
  """stories260K drafting for itself at temperature 1 on a (3, 2, 1) tree: siblings drawn from
  q and checked against it are all accepted (q = p); the top candidates much less often."""
  tree = trees.Static.from_branching((3, 2, 1))
  full = {}  # the share of rounds that accepted a whole root-to-leaf path
  for sampled in (True, False):
    d = drafters.DraftModel(stories, tree=trees.Static(tree.parents, sampled=sampled))
    out = jaxspec.generate(stories, PROMPTS, drafter=d, max_new_tokens=N_NEW, stop_tokens=(),
                           temperature=1.0, seed=3, speculate="always")
    hist = np.asarray(out.stats.accepted)  # [rows, depth + 1]: rounds by drafts accepted
    full[sampled] = hist[:, 3].sum() / hist.sum()
  assert full[True] == 1.0 and full[False] < 0.8, full

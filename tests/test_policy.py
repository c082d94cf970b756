"""The speculation switch (jaxspec.policy, engine `_speculate` / `_plain`, one of them per round):
lossless for every drafter whichever branch a round takes, compiled once, and settling on plain
decoding when the drafter does not pay."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec
from jaxspec import drafters, engine, policy, session, trees
from jaxspec.drafters import eagle, medusa
from conftest import chisquare_p, next_token_laws, tiny_model, truncated

pytestmark = pytest.mark.usefixtures("fast_compile")

PROMPTS = ["Once upon a time", "The little bird", "One day, Lily went"]
N_NEW = 40
N_LONG = 96  # room for probes after 64 plain rounds (the longest first gap)


def _run(model, drafter, ratio, prompts=PROMPTS, n_new=N_NEW, **kw):
  """Greedy (unless kw says otherwise) through the switch with a given cost ratio:
  (tokens per row, plain rounds, speculative rounds, accept histogram)."""
  plan = session.prepare(model, prompts, drafter=drafter, max_new_tokens=n_new,
                         stop_tokens=(), speculate="auto", **kw)
  plan, _ = policy.calibrated(model, drafter, plan, ratio=ratio)
  state, _ = session.start(model, plan)
  state, _ = session.run_rounds(model, plan, state, 1 << 30)
  seq, n, lens, rounds, spec, hist = session.fetch(
      (state.seq, state.n, state.prompt_lens, state.stats.rounds, state.stats.spec_rounds,
       state.stats.accept_hist))
  tokens = [seq[i, lens[i]:n[i]].tolist() for i in range(len(prompts))]
  return tokens, int(rounds) - int(spec), int(spec), hist[:len(prompts)]


def _heads(cfg):
  ec = eagle.EagleConfig(cfg)
  mc = medusa.MedusaConfig(cfg, n_heads=4)
  return (drafters.EagleHead(params=eagle.init_params(ec), config=ec),
          drafters.MedusaHeads(params=medusa.init_params(mc), config=mc))


@pytest.fixture(scope="module")
def plain(stories):
  return jaxspec.generate(stories, PROMPTS, max_new_tokens=N_NEW, stop_tokens=()).tokens


@pytest.fixture(scope="module")
def plain_long(stories):
  return jaxspec.generate(stories, PROMPTS, max_new_tokens=N_LONG, stop_tokens=()).tokens


def _drafters(stories):
  head, heads = _heads(stories.config)
  small = truncated(stories, 4)
  return {
      "ngram": drafters.NGram(k=4),
      "ngram-tree": drafters.NGram(k=3, tree=trees.Static.chains(3, 3)),
      "early-exit-tree": drafters.EarlyExit(layers=3, tree=trees.Dynamic(nodes=8, topk=2,
                                                                         depth=3)),
      "draft": drafters.DraftModel(small, k=4),
      "draft-tree": drafters.DraftModel(small, tree=trees.Static.from_branching((2, 2, 1))),
      "recycling": drafters.Recycling(),
      "eagle": drafters.Eagle(head, k=3),
      "medusa": drafters.Medusa(heads, k=3),
  }


@pytest.mark.parametrize("name", ["ngram", "ngram-tree", "early-exit-tree", "draft",
                                  "draft-tree", "recycling", "eagle", "medusa"])
def test_switch_is_lossless_for_every_drafter(stories, plain, plain_long, name):
  """ratio 100: speculation never pays, so rounds are plain with speculative probes now and then
  (the drafter's state must follow the plain rounds; at ratio 100 the first probe comes after
  64 plain rounds, hence the longer output); ratio 0.5: every round speculates."""
  d = _drafters(stories)[name]
  tokens, n_plain, n_spec, hist = _run(stories, d, ratio=100.0, n_new=N_LONG)
  assert tokens == plain_long
  assert n_plain > 0 and n_spec > 0  # both branches ran, interleaved
  tokens, n_plain, _, _ = _run(stories, d, ratio=0.5)
  assert tokens == plain and n_plain == 0


def test_drafter_state_follows_plain_rounds(stories, plain, plain_long):
  """A draft model equal to the target accepts every draft; after plain streaks (its cache fed
  by commit_plain) its probes still do. A stale draft cache would draft from a wrong context."""
  d = drafters.DraftModel(truncated(stories, stories.config.n_layers), k=4)
  _, _, _, hist_spec = _run(stories, d, ratio=0.5)
  _, n_plain, n_spec, hist_mixed = _run(stories, d, ratio=100.0, n_new=N_LONG)
  mean = lambda h: float((h.sum(0) * np.arange(h.shape[1])).sum() / max(1, h.sum()))
  assert n_plain > n_spec
  assert mean(hist_mixed) >= 0.9 * mean(hist_spec) > 3.5


def test_always_wrong_drafter_settles_on_plain(stories, plain):
  """Measured costs, a drafter whose every draft is wrong: after a few speculative rounds the
  loop decodes plainly, probing speculation at growing gaps (8, 16, 32, ...)."""
  bad = drafters.Oracle([t + [0] * 8 for t in plain], k=4, correct=0)
  out = jaxspec.generate(stories, PROMPTS, drafter=bad, max_new_tokens=N_NEW, stop_tokens=(),
                         speculate="auto")
  assert out.tokens == plain
  n_spec = out.stats.rounds_by_tokens.get(5, 0)
  assert out.stats.rounds_by_tokens[1] >= N_NEW - 1 - n_spec
  ratio = out.stats.switch_ratio
  assert ratio >= 1.0 and out.stats.calibration_s > 0  # measured, floored at 1
  # Each row's running tau starts at most at k + 1 and moves TAU_DECAY of its distance to 1
  # per failed round, so the loop stops speculating after j rounds,
  # 1 + 4 * (1 - TAU_DECAY)**j <= ratio * (1 + margin); then probes at gaps 8, 16, ...
  bar, keep = ratio * (1 + policy.MARGIN), 1 - engine.TAU_DECAY
  j = next(j for j in range(200) if 1 + 4 * keep ** j <= bar)
  probes = sum(1 for g in (8, 16, 32) if j + g <= N_NEW)  # gaps are never shorter than these
  assert n_spec <= j + probes, (ratio, out.stats.rounds_by_tokens)
  # A drafter that is always right keeps speculating (given a ratio it beats).
  good = drafters.Oracle([t + [0] * 8 for t in plain], k=4)
  _, n_plain, n_spec, _ = _run(stories, good, ratio=2.0)
  assert n_plain == 0 and n_spec > 0


@pytest.mark.parametrize("ratio", [1.2, 2.0, 4.0])
def test_probe_gaps_follow_the_cost_of_a_failed_probe(stories, plain, ratio):
  """With a given cost ratio, an always-wrong drafter runs exactly the speculative rounds the
  switch's rule predicts: the optimistic start, then probes at gaps that start at
  max(8, (ratio - 1) / 5%) and double while probes fail (a draft model at ratio 4 waits 60
  plain rounds before its first probe, a table drafter 8)."""
  bad = drafters.Oracle([t + [0] * 8 for t in plain], k=4, correct=0)
  tokens, n_plain, n_spec, _ = _run(stories, bad, ratio=ratio)
  assert tokens == plain
  lo, hi = (int(x) for x in engine.probe_gaps(jnp.float32(ratio)))
  assert lo == min(64, max(8, int(np.ceil((ratio - 1) / engine.PROBE_BUDGET))))
  bar = ratio * (1 + policy.MARGIN)
  tau, gap, streak, want = min(5.0, 2 * bar), lo, 0, 0
  for _ in range(N_NEW - 1):  # the first token comes from the prefill
    if tau > bar or streak >= gap:
      probe = streak >= gap
      want += 1
      tau = (1 - engine.TAU_DECAY) * tau + engine.TAU_DECAY * 1.0
      gap = lo if tau > bar else (min(2 * gap, hi) if probe else gap)
      streak = 0
    else:
      streak += 1
  assert n_spec == want and n_plain == N_NEW - 1 - want


def test_switch_compiles_once_and_calibrates_once(stories):
  d = drafters.NGram(k=3)
  built = engine.compile_count
  first = jaxspec.generate(stories, ["Once upon a time"], drafter=d, max_new_tokens=24,
                           speculate="auto")
  if engine.compile_count > built:  # compiled while calibrating: still reported as compile
    assert first.stats.compile_s > 0
  before = engine.compile_count
  again = jaxspec.generate(stories, ["The cat sat on"], drafter=d, max_new_tokens=20, seed=3,
                           speculate="auto")
  assert engine.compile_count == before and again.stats.compile_s == 0.0
  assert again.stats.switch_ratio == first.stats.switch_ratio  # the cached measurement
  with pytest.raises(ValueError, match="speculate must be one of"):
    jaxspec.generate(stories, ["x"], drafter=d, speculate="sometimes")


def test_only_a_global_mesh_shares_the_measured_ratio(stories, monkeypatch):
  """In a multi-process job a process-local plan (no mesh, or a mesh of this process's own
  devices: `jaxspec run`'s shares) measures for itself; only a plan over other processes'
  devices agrees on one ratio through a collective, which every process then runs."""
  from jax.experimental import multihost_utils
  from jaxspec import sharding
  calls = []
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all",
                      lambda x: calls.append(x) or x)
  policy.clear_cache()
  d = drafters.NGram(k=2)
  for mesh in (None, sharding.make_mesh(data=2, devices=jax.local_devices()[:2])):
    plan = session.prepare(stories, ["Once upon a time"] * 2, drafter=d, max_new_tokens=16,
                           speculate="auto", mesh=mesh)
    assert not policy._spans_processes(plan)
    policy.measure(stories, d, plan)
  assert calls == []


@pytest.mark.parametrize("ratio", [100.0, 0.01])
def test_switch_sampling_is_exact(ratio):
  """Temperature 1 on a 64-token model, 8192 rows: the second emitted token (the first round:
  plain with ratio 100, speculative with ratio 0.01) follows the target's own marginal."""
  model = tiny_model(seed=3, max_seq_len=64)
  d = drafters.DraftModel(truncated(model, 1), k=2)
  prompt = [5, 9, 2]
  rows = 8192
  tokens, n_plain, n_spec, _ = _run(model, d, ratio, prompts=[prompt] * rows, n_new=2,
                                    temperature=1.0, seed=11)
  assert (n_plain > 0) == (ratio > 1) and (n_spec > 0) == (ratio < 1)
  _, _, law = next_token_laws(model, prompt)
  assert chisquare_p([t[1] for t in tokens], law) > 1e-4


@pytest.mark.parametrize("name", ["ngram", "early-exit"])
def test_switch_adds_no_cache_copies(stories, name):
  """The optimized loop with the switch holds no more copies of a whole K or V buffer than the
  loop without it (a lax.cond made XLA copy both on every round)."""
  drafter = (drafters.NGram(n=2, k=4) if name == "ngram" else drafters.EarlyExit(layers=2, k=3))

  def cache_copies(speculate):
    plan = session.prepare(stories, PROMPTS, drafter=drafter, max_new_tokens=N_NEW,
                           speculate=speculate)
    progs = engine.Programs()
    state, _ = session.start(stories, plan, programs=progs)
    shape = ",".join(map(str, state.cache.k.shape))
    args = (stories.params, plan.dparams, plan.inputs, state, np.int32(4))
    exe, _ = engine.compiled("run", plan.spec, *args, programs=progs)
    lines = exe.as_text().splitlines()
    return sum(f"[{shape}]" in x and " copy(" in x for x in lines)

  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", False)  # copy insertion as users get it
  try:
    assert cache_copies("auto") <= cache_copies("always")
  finally:
    jax.config.update("jax_disable_most_optimizations", old)

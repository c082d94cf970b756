"""Adaptive speculation: the batch-aware k policy (injected costs), confidence-based draft
stopping (lossless, fewer verified drafts), and the bench --batch-sizes / --roofline paths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec
from jaxspec import adaptive, cli, drafters, peers, verify
from jaxspec.adaptive import Costs
from jaxspec.sampling import SamplingMode
from conftest import STORY_PROMPTS

pytestmark = pytest.mark.usefixtures("fast_compile")


PROMPTS = STORY_PROMPTS
N_NEW = 24


# ------------------------------------------------------------------------------------- policy


def test_expected_tokens_and_alpha():
  assert adaptive.expected_tokens(0, 0.9) == 1.0
  assert adaptive.expected_tokens(4, 0.0) == 1.0
  assert adaptive.expected_tokens(4, 1.0) == 5.0
  assert adaptive.expected_tokens(2, 0.5) == pytest.approx(1 + 0.5 + 0.25)
  # 10 rounds at k=2: 4 accepted none, 3 one, 3 both -> 9 successes, 7 failures
  assert adaptive.alpha_from_histogram([[4, 3, 3]], 2) == pytest.approx(9 / 16)
  assert adaptive.alpha_from_histogram([[0, 0, 0]], 2) == 0.0


def test_policy_plain_when_verify_is_expensive():
  """Large batch: verifying T tokens costs ~T decode steps (compute bound) -> plain."""
  costs = Costs(verify={t: float(t) for t in range(1, 10)}, draft_step=0.2, overhead=0.1)
  for alpha in (0.3, 0.6, 0.8):
    c = adaptive.choose_k(costs=costs, alpha=alpha, drafter=drafters.NGram(k=4))
    assert c.k == 0 and c.drafter is None and c.speedup == 1.0
  # A drafter that is never right is never worth it, even when verification is free.
  free = Costs(verify={t: 1.0 for t in range(1, 10)})
  assert adaptive.choose_k(costs=free, alpha=0.0).k == 0


def test_policy_speculates_when_verify_is_free():
  """Batch 1: a verify pass costs about one decode step (memory bound) -> speculate, and the
  better the drafter the longer the draft."""
  free = Costs(verify={t: 1.0 for t in range(1, 10)}, overhead=0.05)
  d = drafters.NGram(k=4)
  c = adaptive.choose_k(costs=free, alpha=0.9, drafter=d)
  assert c.k == 8 and c.drafter.k == 8 and c.drafter.n == d.n and c.speedup > 4
  weak = adaptive.choose_k(costs=Costs(verify={t: 1 + 0.1 * (t - 1) for t in range(1, 10)},
                                       draft_step=0.1), alpha=0.5)
  assert 1 <= weak.k < 8 and weak.speedup > 1.05
  # The choice maximises the model's predicted speed over the candidates.
  assert weak.table[weak.k] == max(weak.table.values())


def test_policy_margin_and_interpolation():
  costs = Costs(verify={1: 1.0, 3: 1.2, 9: 3.0})
  assert costs.verify_cost(2) == pytest.approx(1.1)
  assert costs.verify_cost(12) == pytest.approx(3.0 + 0.3 * 3)
  # Predicted gain below the margin: plain.
  c = adaptive.best_k(Costs(verify={1: 1.0, 2: 1.0}), alpha=0.04, ks=(1,), margin=0.05)
  assert c.k == 0


# ------------------------------------------------------------------------ confidence stopping


@pytest.fixture(scope="module")
def plain(stories):
  return jaxspec.generate(stories, PROMPTS, max_new_tokens=N_NEW, stop_tokens=())


@pytest.mark.parametrize("kind", ["early-exit", "draft"])
def test_confidence_stop_is_lossless_and_verifies_fewer(stories, plain, kind):
  def make(**kw):
    if kind == "early-exit":
      return drafters.EarlyExit(layers=3, k=4, **kw)
    return drafters.DraftModel(peers.truncate(stories, 2), k=4, **kw)

  full = jaxspec.generate(stories, PROMPTS, drafter=make(), max_new_tokens=N_NEW,
                          stop_tokens=())
  short = jaxspec.generate(stories, PROMPTS, drafter=make(stop_below=0.5),
                           max_new_tokens=N_NEW, stop_tokens=())
  assert full.tokens == plain.tokens and short.tokens == plain.tokens
  f, s = full.stats, short.stats
  assert f.drafts_verified == f.drafts_proposed == 4 * (f.target_calls - 4)
  assert s.drafts_proposed == 4 * (s.target_calls - 4)
  assert s.drafts_verified < s.drafts_proposed
  assert s.drafts_verified / s.drafts_proposed < f.drafts_verified / f.drafts_proposed
  assert s.new_tokens == N_NEW * 4 and s.mean_accepted >= 1.0
  if kind == "draft":
    return
  # stop_below near 1 leaves little more than the first draft of each round.
  one = jaxspec.generate(stories, PROMPTS, drafter=make(stop_below=0.999999),
                         max_new_tokens=N_NEW, stop_tokens=())
  assert one.tokens == plain.tokens
  rounds = one.stats.target_calls - 4
  assert rounds <= one.stats.drafts_verified < 2 * rounds  # the first draft is always verified


def test_confidence_stop_errors():
  with pytest.raises(ValueError, match="stop_below"):
    drafters.EarlyExit(layers=2, stop_below=1.5)
  with pytest.raises(ValueError, match="stop_below"):
    drafters.EarlyExit(layers=2, stop_below="0.5")
  from jaxspec import trees
  with pytest.raises(ValueError, match="chains"):
    drafters.EarlyExit(layers=2, stop_below=0.5, tree=trees.Dynamic(nodes=8))


def test_empty_slot_rejection_samples_from_target():
  """An empty draft slot (-1) is rejected and its token drawn from p itself (not from the
  residual), so stopping early keeps sampling exact."""
  b, v = 40000, 4
  p_logits = jnp.log(jnp.asarray([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1],
                                  [0.25, 0.25, 0.25, 0.25]]))
  target = jnp.broadcast_to(p_logits, (b, 3, v))
  q = jnp.broadcast_to(jnp.asarray([[0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]]), (b, 2, v))
  drafts = jnp.broadcast_to(jnp.asarray([3, -1], jnp.int32), (b, 2))
  from jaxspec import sampling
  mode, sp = sampling.make(1.0, None, None)
  assert mode == SamplingMode(greedy=False)
  n_acc, emit = jax.jit(verify.rejection, static_argnums=4)(jax.random.key(0), drafts, q,
                                                            target, mode, sp)
  n_acc, emit = np.asarray(n_acc), np.asarray(emit)
  assert n_acc.max() == 1  # never past the empty slot
  assert abs((n_acc == 1).mean() - 0.4) < 0.01  # draft 3 accepted with p(3) = 0.4
  at1 = emit[n_acc == 1, 1]  # the token at the empty slot: distributed as p[1]
  freq = np.bincount(at1, minlength=v) / len(at1)
  np.testing.assert_allclose(freq, [0.4, 0.3, 0.2, 0.1], atol=0.015)
  # (with the slot's q = one-hot(0) used as a real draft, token 0 would be rejected first)


# ------------------------------------------------------------------------ adaptive generate


def test_generate_adaptive(stories, plain):
  adaptive.clear_cache()
  out = jaxspec.generate(stories, PROMPTS, drafter=drafters.NGram(k=4), max_new_tokens=N_NEW,
                         stop_tokens=(), adaptive=True)
  assert out.tokens == plain.tokens
  c = out.stats.policy
  assert c is not None and c.k in (0,) + adaptive.KS and 0.0 <= c.alpha <= 1.0
  assert c.costs.verify[1] == 1.0 and c.costs.decode_s > 0
  assert out.stats.k == c.k
  assert list(c.costs.verify.values()) == sorted(c.costs.verify.values())  # monotone
  # measured once: a second call reuses the calibration and the cost measurements
  again = jaxspec.generate(stories, PROMPTS, drafter=drafters.NGram(k=4), max_new_tokens=N_NEW,
                           stop_tokens=(), adaptive=True)
  assert again.stats.policy.costs == c.costs and again.stats.policy.calibration_s < 1.0
  assert again.tokens == plain.tokens
  # adaptive without a drafter is plain decoding
  assert jaxspec.generate(stories, PROMPTS, max_new_tokens=N_NEW, stop_tokens=(),
                          adaptive=True).stats.policy is None


# ------------------------------------------------------------------------------ bench paths


def test_bench_roofline_tiny(capsys):
  rc = cli.main(["bench", "--roofline", "--shape", "tiny", "--context", "64", "--verify-tokens",
                 "2,4", "--copy-mib", "8", "--dtype", "float32", "--out", "-"])
  out = capsys.readouterr().out
  assert rc == 0, out
  assert "## Roofline: tiny" in out and "roofline efficiency" in out
  assert "| cost |" in out and "Compile time" in out and "early-exit k=4" in out


def test_batch_scaling_table(stories, plain):
  """Plain, oracle, a drafter and the adaptive policy at one batch size (programs shared with
  the tests above)."""
  from jaxspec import perf

  ids = [stories.tokenizer.encode(p) for p in PROMPTS]
  table = perf.batch_scaling(stories, ids, [4], [("ngram k=4", drafters.NGram(k=4))],
                             max_new_tokens=N_NEW, oracle_ks=[2], progress=False)
  assert list(table) == ["plain", "oracle k=2 (all accepted)", "ngram k=4", "adaptive(ngram k=4)"]
  cells = {name: per[4] for name, per in table.items()}
  assert all(c["same"] for c in cells.values())
  assert cells["plain"]["speedup"] == 1.0 and cells["plain"]["tau"] == 1.0
  assert cells["oracle k=2 (all accepted)"]["tau"] == pytest.approx(N_NEW / (1 + 8))
  assert cells["adaptive(ngram k=4)"]["k"] in (0,) + adaptive.KS
  md = perf.batch_markdown("stories260K", table, [4], "test")
  assert "| adaptive(ngram k=4) |" in md and "tok/s" in md and "**yes**" in md


def test_bench_batch_sizes_cli(tmp_path):
  report = tmp_path / "perf.md"
  rc = cli.main(["bench", "--batch-sizes", "1", "--max-new-tokens", "4", "--drafters", "none",
                 "--oracle-k", "2", "--limit", "1", "--categories", "qa", "--out", str(report)])
  assert rc == 0
  text = report.read_text()
  assert "## Batch scaling: stories260K" in text and "| method | batch 1 |" in text
  assert "| plain |" in text and "| oracle k=2 (all accepted) |" in text
  assert "identical to plain decoding in every cell: **yes**" in text


def test_bench_flag_errors():
  assert cli.main(["bench", "--roofline", "--shape", "nope"]) == 2
  assert cli.main(["bench", "--batch-sizes", "1,x"]) == 2

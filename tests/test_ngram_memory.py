"""NGram memory across calls (`NGram(memory=M)`, `NGram.remember(result)`): earlier outputs are
searched too, lossless, bounded, without recompiling or recalibrating as the memory fills."""

import numpy as np
import pytest

import jaxspec
from jaxspec import drafters, engine, policy, trees
from jaxspec.drafters import ngram
from conftest import STORY_PROMPTS

PROMPTS = STORY_PROMPTS
N_NEW = 48


@pytest.fixture(scope="module")
def plain(stories):
  return jaxspec.generate(stories, PROMPTS, max_new_tokens=N_NEW, stop_tokens=())


def _run(model, d):
  return jaxspec.generate(model, PROMPTS, drafter=d, max_new_tokens=N_NEW, stop_tokens=(),
                          speculate="always")


@pytest.mark.parametrize("tree", [None, trees.Static.chains(2, 4)])
def test_memory_drafts_earlier_outputs_losslessly(stories, plain, tree):
  """The same prompts again: with the first call's outputs in memory, nearly every draft of a
  chain is accepted (the continuation is in the memory) where the row alone offers little;
  output equals plain decoding either way."""
  d = drafters.NGram(tree=tree, memory=2048)
  first = _run(stories, d)
  again = _run(stories, d.remember(first))
  assert first.tokens == plain.tokens and again.tokens == plain.tokens
  assert again.stats.mean_accepted > 3.3 > first.stats.mean_accepted + 1.0, (
      first.stats.mean_accepted, again.stats.mean_accepted)


def test_memory_is_bounded_and_ordered(stories):
  d = drafters.NGram(memory=10)
  r1 = jaxspec.generate(stories, ["Once upon a time"], max_new_tokens=4, stop_tokens=())
  r2 = jaxspec.generate(stories, ["The little bird"], max_new_tokens=3, stop_tokens=())
  h = d.remember(r1).remember(r2).history
  want = [-1] + r1.tokens[0] + [-1] + r2.tokens[0] + [-1]
  assert h.tolist() == want[-10:] and h.shape == (10,)
  # a batch: every row's output, in row order
  both = jaxspec.generate(stories, ["Once upon a time", "The little bird"], max_new_tokens=3,
                          stop_tokens=())
  h = drafters.NGram(memory=12).remember(both).history.tolist()
  assert h == [-1] * 4 + both.tokens[0] + [-1] + both.tokens[1] + [-1]


def test_own_row_outranks_memory_of_the_same_length():
  """A row whose suffix [7, 8] occurs in itself and in memory copies its own continuation; a
  longer match in memory wins over a shorter one in the row."""
  import jax.numpy as jnp
  seq = jnp.asarray([[7, 8, 1, 2, 7, 8, 0, 0]], jnp.int32)
  n = jnp.asarray([6])
  mem = jnp.asarray([-1, 7, 8, 5, 6, -1], jnp.int32)
  props, found = ngram.lookup(seq, n, 2, 2, mem)
  assert found.tolist() == [True] and props.tolist() == [[1, 2]]
  mem = jnp.asarray([-1, 2, 7, 8, 5, 6], jnp.int32)  # [2, 7, 8] matches 3 tokens
  props, _ = ngram.lookup(seq, n, 3, 2, mem)
  assert props.tolist() == [[5, 6]]
  # a match at the end of the memory has no continuation; the row's own match is used
  props, _ = ngram.lookup(seq, n, 3, 3, jnp.asarray([5, 6, 9, 2, 7, 8], jnp.int32))
  assert props.tolist() == [[1, 2, 7]]


def test_remembering_never_recompiles_or_recalibrates(stories):
  d = drafters.NGram(k=3, memory=1024)
  first = jaxspec.generate(stories, PROMPTS[:2], drafter=d, max_new_tokens=16, stop_tokens=())
  before, ratios = engine.compile_count, len(policy._RATIOS)
  for _ in range(2):
    d = d.remember(first)
    out = jaxspec.generate(stories, PROMPTS[:2], drafter=d, max_new_tokens=16, stop_tokens=())
    assert out.stats.calibration_s == 0.0
  assert engine.compile_count == before and len(policy._RATIOS) == ratios


def test_memory_errors(stories):
  with pytest.raises(ValueError, match="NGram memory must be an integer in"):
    drafters.NGram(memory=-1)
  with pytest.raises(ValueError, match="keeps no history: give it memory=N"):
    drafters.NGram().remember(jaxspec.generate(stories, ["Hi"], max_new_tokens=2))
  with pytest.raises(TypeError, match="NGram.remember takes a jaxspec.generate result"):
    drafters.NGram(memory=8).remember([[1, 2]])
  with pytest.raises(ValueError, match="history must be 8 token ids"):
    drafters.NGram(memory=8, history=np.zeros(3, np.int32))
  alien = drafters.NGram(memory=8, history=np.full(8, 600, np.int32))  # stories has 512 ids
  with pytest.raises(ValueError, match="token id 600, outside the model's vocabulary"):
    jaxspec.generate(stories, ["Hi"], drafter=alien, max_new_tokens=2)
  # Drafters that keep nothing across calls remember nothing
  d = drafters.EarlyExit(layers=3, k=2)
  assert d.remember(jaxspec.generate(stories, ["Hi"], max_new_tokens=2)) is d


def test_generate_many_remembers_finished_rows(stories):
  """Two prompts four times each through 2 slots: each row that starts after a copy of its
  prompt finished drafts from that output (tau well above the first rows'), output equals
  plain decoding, and rebinding the memory never recompiles."""
  two = PROMPTS[:2]
  want = jaxspec.generate(stories, two, max_new_tokens=N_NEW, stop_tokens=()).tokens
  jobs = [{"id": i, "prompt": two[i % 2]} for i in range(8)]
  it = jaxspec.generate_many(stories, jobs, batch_size=2, drafter=drafters.NGram(memory=2048),
                             max_new_tokens=N_NEW, stop_tokens=(), speculate="always")
  got = [next(it), next(it)]  # the first two rows: every program has been built
  built = engine.compile_count
  got += list(it)
  assert engine.compile_count == built
  got.sort(key=lambda c: c.index)
  assert [c.tokens for c in got] == [want[i % 2] for i in range(8)]
  first, later = [c.tau for c in got[:2]], [c.tau for c in got[4:]]
  assert min(later) > max(first) + 1.0, (first, [c.tau for c in got[2:]])

"""Speculative decoding: exact greedy equality, hand-computable mock drafters, no recompiles."""

import math

import pytest

import jaxspec
from jaxspec import drafters, engine
from conftest import STORY_PROMPTS, truncated

PROMPTS = STORY_PROMPTS
N_NEW = 24


@pytest.fixture(scope="module")
def plain(stories):
  return jaxspec.generate(stories, PROMPTS, max_new_tokens=N_NEW, stop_tokens=())


@pytest.fixture(scope="module")
def reference(stories):
  """The target's greedy continuation, long enough for any k."""
  return jaxspec.generate(stories, PROMPTS, max_new_tokens=N_NEW + 16, stop_tokens=()).tokens


def expected_calls(n_new: int, per_round: int) -> int:
  return 1 + math.ceil((n_new - 1) / per_round)


@pytest.mark.parametrize("k", [1, 3, 4, 8])
@pytest.mark.parametrize("kind", ["draft", "early-exit", "ngram"])
def test_greedy_equals_plain_stories(stories, plain, kind, k):
  d = {"draft": lambda: drafters.DraftModel(truncated(stories, 2), k=k),
       "early-exit": lambda: drafters.EarlyExit(layers=3, k=k),
       "ngram": lambda: drafters.NGram(n=3, k=k)}[kind]()
  out = jaxspec.generate(stories, PROMPTS, drafter=d, max_new_tokens=N_NEW, stop_tokens=())
  assert out.tokens == plain.tokens
  assert out.texts == plain.texts
  s = out.stats
  assert 1.0 <= s.mean_accepted <= k + 1
  assert s.new_tokens == N_NEW * len(PROMPTS)
  assert len(s.accepted) == 4 and all(len(h) == k + 1 for h in s.accepted)
  assert sum(map(sum, s.accepted)) == s.target_calls - 4  # one round per call after prefill
  # Each round commits its accepted drafts plus one token (the last round may be cut short).
  for h, toks in zip(s.accepted, out.tokens):
    committed = sum((a + 1) * c for a, c in enumerate(h)) + 1
    assert len(toks) <= committed < len(toks) + k + 1
  if kind != "ngram":
    assert s.draft_calls == s.rounds * k


@pytest.mark.parametrize("j", range(0, 5))
def test_oracle_right_for_exactly_j(stories, plain, reference, j):
  """Drafts right for exactly j tokens per round: output = plain, tau and rewinds exact."""
  k = 4
  out = jaxspec.generate(stories, PROMPTS, drafter=drafters.Oracle(reference, k=k, correct=j),
                         max_new_tokens=N_NEW, stop_tokens=())
  assert out.tokens == plain.tokens
  calls = expected_calls(N_NEW, j + 1)
  assert out.stats.target_calls == 4 * calls
  assert out.stats.mean_accepted == pytest.approx(N_NEW / calls)
  for h in out.stats.accepted:  # every round accepted exactly j drafts
    assert h[j] == calls - 1 and sum(h) == calls - 1


def test_identical_draft_accepts_everything(stories, plain):
  k = 4
  out = jaxspec.generate(stories, PROMPTS, drafter=drafters.DraftModel(stories, k=k),
                         max_new_tokens=N_NEW, stop_tokens=())
  assert out.tokens == plain.tokens
  calls = expected_calls(N_NEW, k + 1)
  assert out.stats.target_calls == 4 * calls
  assert all(h[k] == calls - 1 for h in out.stats.accepted)


def test_always_wrong_draft_is_plain(stories, plain, reference):
  out = jaxspec.generate(stories, PROMPTS, drafter=drafters.Oracle(reference, k=3, correct=0),
                         max_new_tokens=N_NEW, stop_tokens=())
  assert out.tokens == plain.tokens
  assert out.stats.mean_accepted == 1.0
  assert out.stats.target_calls == 4 * N_NEW


def test_eos_inside_accepted_block_ends_row(stories, reference):
  """A stop token in the middle of an accepted block ends the row right there."""
  stops = [[r[9]] for r in reference]  # each row's 10th token (first occurrence cut below)
  plain = jaxspec.generate(stories, PROMPTS, max_new_tokens=N_NEW, stop_tokens=stops)
  spec = jaxspec.generate(stories, PROMPTS, drafter=drafters.Oracle(reference, k=8),
                          max_new_tokens=N_NEW, stop_tokens=stops)
  assert spec.tokens == plain.tokens
  for toks, s in zip(spec.tokens, stops):
    assert toks[-1] == s[0] and s[0] not in toks[:-1]


@pytest.mark.parametrize("max_new", [1, 2, 7, 13])
def test_max_new_tokens_exact(stories, reference, max_new):
  out = jaxspec.generate(stories, PROMPTS, drafter=drafters.Oracle(reference, k=8),
                         max_new_tokens=max_new, stop_tokens=())
  assert [len(t) for t in out.tokens] == [max_new] * 4
  assert out.tokens == [r[:max_new] for r in reference]


def test_no_recompile_across_prompts_and_stream(stories):
  d = drafters.EarlyExit(layers=3, k=4)
  jaxspec.generate(stories, ["Once upon a time"], drafter=d, max_new_tokens=20)
  list(jaxspec.stream(stories, "Once upon a time", drafter=d, max_new_tokens=20))
  before = engine.compile_count
  jaxspec.generate(stories, ["A big dog ran to the"], drafter=d, max_new_tokens=30)
  pieces = list(jaxspec.stream(stories, "Tom said", drafter=d, max_new_tokens=30))
  assert engine.compile_count == before
  assert len(pieces) > 1


def test_stream_speculative_text(stories, plain):
  d = drafters.NGram(k=4)
  text = "".join(jaxspec.stream(stories, PROMPTS[0], drafter=d, max_new_tokens=N_NEW,
                                stop_tokens=()))
  assert text == plain.texts[0]


def test_smollm_greedy_equals_plain(smollm):
  prompts = ["Once upon a time", "The capital of France is", "def fibonacci(n):",
             "Summarize: the cat sat on the mat. The cat sat on the mat because"]
  n = 16
  plain = jaxspec.generate(smollm, prompts, max_new_tokens=n, stop_tokens=())
  # (EarlyExit(24, k=4) and NGram(k=4) on SmolLM2: test_real_checkpoints.py::TestSmolLM2)
  for d in [drafters.NGram(n=2, k=3), drafters.DraftModel(truncated(smollm, 8), k=1),
            drafters.DraftModel(truncated(smollm, 8), k=8)]:
    out = jaxspec.generate(smollm, prompts, drafter=d, max_new_tokens=n, stop_tokens=())
    assert out.tokens == plain.tokens, type(d).__name__


def test_drafter_errors(stories):
  from conftest import tiny_model
  other = tiny_model(vocab_size=100)
  other = type(other)(other.config, other.params, None, name="no tokenizer")
  with pytest.raises(ValueError, match="has no tokenizer to translate"):
    jaxspec.generate(stories, ["hi"], drafter=drafters.DraftModel(other))
  with pytest.raises(ValueError, match="fewer layers"):
    jaxspec.generate(stories, ["hi"], drafter=drafters.EarlyExit(layers=5))
  for bad in (0, -1, 100, 2.5):
    with pytest.raises(ValueError, match="draft length k"):
      drafters.NGram(k=bad)
  with pytest.raises(TypeError, match="drafter"):
    jaxspec.generate(stories, ["hi"], drafter="ngram")

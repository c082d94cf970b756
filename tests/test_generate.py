"""Plain decoding through `jaxspec.generate`: golden parity, ragged batches, buckets, sampling."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec
from jaxspec import engine, sampling

from conftest import DATA


def golden_cases(name):
  data = json.loads((DATA / name / "golden_greedy.json").read_text())
  return [c for c in data["cases"] if c["min_top2_logit_margin"] > 0.001]


@pytest.mark.parametrize("case", golden_cases("stories260K"), ids=lambda c: repr(c["prompt"][:12]))
def test_golden_stories(stories, case):
  want = case["output_ids"][len(case["prompt_ids"]):]
  assert stories.tokenizer.encode(case["prompt"]) == case["prompt_ids"]
  out = jaxspec.generate(stories, [case["prompt"]], max_new_tokens=len(want), stop_tokens=())
  assert out.tokens[0] == want
  assert out.stats.mean_accepted == 1.0
  assert out.stats.target_calls == len(want)


def test_golden_smollm(smollm):
  cases = golden_cases("smollm2-135m")
  assert all(c["min_top2_logit_margin"] > 0.01 for c in cases)
  n = max(len(c["output_ids"]) - len(c["prompt_ids"]) for c in cases)
  out = jaxspec.generate(smollm, [c["prompt"] for c in cases], max_new_tokens=n, stop_tokens=())
  for c, toks in zip(cases, out.tokens):
    want = c["output_ids"][len(c["prompt_ids"]):]
    assert toks[:len(want)] == want
  assert out.texts[0].startswith(", the city of Nova Haven")


PROMPTS = ["Once upon a time", "Tom and his dog went to the", "The little bird",
           "Lily wanted to play with her friend in the big park"]


def test_long_generation_equals_full_recomputation():
  """A 1,152-slot buffer takes the live-length chunked attention path (models.llama.ATTN_CHUNK):
  greedy decoding of 1,100 tokens (ragged batch) equals argmax of a cache-free forward over the
  whole sequence at every step, and speculative decoding equals both."""
  from conftest import tiny_model
  from jaxspec import drafters
  from jaxspec.models import forward
  from jaxspec.models.llama import ATTN_CHUNK

  m = tiny_model(seed=5, vocab_size=256, max_seq_len=2048)
  prompts, n_new = [[5, 6, 7], [9, 8, 7, 6, 5, 4, 3]], 1100
  out = jaxspec.generate(m, prompts, max_new_tokens=n_new, stop_tokens=())
  assert n_new > 2 * ATTN_CHUNK  # so the buffer is read in live chunks
  full = jax.jit(lambda ids: jnp.argmax(forward(m.params, m.config, ids).logits, -1))
  for p, got in zip(prompts, out.tokens):
    seq = np.zeros((1, 1152), np.int32)
    seq[0, :len(p)] = p
    seq[0, len(p):len(p) + n_new] = got
    want = np.asarray(full(jnp.asarray(seq)))[0, len(p) - 1:len(p) + n_new - 1]
    np.testing.assert_array_equal(got, want)
  spec = jaxspec.generate(m, prompts, max_new_tokens=n_new, stop_tokens=(),
                          drafter=drafters.NGram(n=2, k=4))
  assert spec.tokens == out.tokens


def test_ragged_batch_equals_rows_alone(stories):
  batch = jaxspec.generate(stories, PROMPTS, max_new_tokens=24, stop_tokens=())
  for p, toks in zip(PROMPTS, batch.tokens):
    alone = jaxspec.generate(stories, [p], max_new_tokens=24, stop_tokens=())
    assert alone.tokens[0] == toks
  assert [len(t) for t in batch.tokens] == [24] * 4


def test_no_recompile_within_bucket(stories):
  jaxspec.generate(stories, ["Once upon a time"], max_new_tokens=20)
  jaxspec.generate(stories, ["Once upon a time"], max_new_tokens=20, temperature=1.0, top_p=0.5)
  events = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda name, *a, **k: events.append(name) if "backend_compile" in name else None)
  before = engine.compile_count
  # Another prompt length in the same bucket, other max_new_tokens, seed and sampling values.
  a = jaxspec.generate(stories, ["The cat sat on a big red mat and"], max_new_tokens=17)
  b = jaxspec.generate(stories, ["A dog"], max_new_tokens=9, temperature=0.5, top_p=0.9, seed=4)
  assert engine.compile_count == before
  assert a.stats.compile_s == 0.0 and b.stats.compile_s == 0.0
  assert events == []


def test_stop_tokens_and_exact_max_new(stories):
  out = jaxspec.generate(stories, PROMPTS, max_new_tokens=64, stop_tokens=())
  assert [len(t) for t in out.tokens] == [64] * 4
  # Per-row stop tokens: stop each row at the first occurrence of a token it really produces.
  stops = [[t[10]] for t in out.tokens]
  cut = jaxspec.generate(stories, PROMPTS, max_new_tokens=64, stop_tokens=stops)
  for full, short, s in zip(out.tokens, cut.tokens, stops):
    first = full.index(s[0])
    assert short == full[:first + 1]


def test_default_stop_is_eos(stories):
  full = jaxspec.generate(stories, ["The little bird"], max_new_tokens=400, stop_tokens=())
  eos = stories.tokenizer.eos_ids
  first = next(i for i, t in enumerate(full.tokens[0]) if t in eos)  # the story ends (~230)
  out = jaxspec.generate(stories, ["The little bird"], max_new_tokens=400)
  assert out.tokens[0] == full.tokens[0][:first + 1]


def test_sampling_reproducible(stories):
  kw = dict(max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.95)
  a = jaxspec.generate(stories, PROMPTS, seed=1, **kw)
  b = jaxspec.generate(stories, PROMPTS, seed=1, **kw)
  c = jaxspec.generate(stories, PROMPTS, seed=2, **kw)
  assert a.tokens == b.tokens
  assert a.tokens != c.tokens


def np_warp(logits, temperature, top_k, top_p):
  """Reference in numpy, written from the HF warper definitions (temperature, top-k, top-p)."""
  x = logits.astype(np.float64) / temperature
  if top_k is not None:
    kth = np.sort(x)[::-1][top_k - 1]
    x = np.where(x < kth, -np.inf, x)
  if top_p is not None:
    order = np.argsort(x)  # ascending, as HF does
    p = np.exp(x[order] - x[order].max())
    p /= p.sum()
    remove = np.cumsum(p) <= 1 - top_p
    remove[-1] = False
    x = x.copy()
    x[order[remove]] = -np.inf
  p = np.exp(x - x.max())
  return p / p.sum()


@pytest.mark.parametrize("t,k,p", [(1.0, None, None), (0.7, 5, None), (1.3, None, 0.8),
                                   (0.9, 20, 0.6), (2.0, 1, None), (1.0, None, 0.05)])
def test_warp_matches_numpy(t, k, p):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 64)).astype(np.float32) * 3
  mode, sp = sampling.make(t, k, p)
  got = np.asarray(sampling.probs(jnp.asarray(logits), mode, sp))
  want = np.stack([np_warp(l, t, k, p) for l in logits])
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_sampling_frequencies_match_warped_target():
  """Direct draws follow the warped distribution (200k draws, chi-square)."""
  from scipy import stats
  logits = jnp.asarray([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
  mode, sp = sampling.make(0.8, 4, 0.9)
  p = np.asarray(sampling.probs(logits, mode, sp))
  toks, _ = sampling.sample(jax.random.key(0), jnp.broadcast_to(logits, (200_000, 6)), mode, sp)
  counts = np.bincount(np.asarray(toks), minlength=6)
  assert counts[p == 0].sum() == 0
  keep = p > 0
  assert stats.chisquare(counts[keep], p[keep] * counts.sum()).pvalue > 1e-4


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompts=[]), "empty"),
    (dict(prompts=[[]]), "empty"),
    (dict(prompts="hello"), "list"),
    (dict(prompts=[[1, 99999]]), "outside the vocabulary"),
    (dict(prompts=[[1] * 600]), "longer than the model's context"),
    (dict(prompts=[[1] * 400], max_new_tokens=200), "exceeds the model's context"),
    (dict(prompts=["hi"], temperature=-0.5), "temperature"),
    (dict(prompts=["hi"], temperature=float("nan")), "temperature"),
    (dict(prompts=["hi"], temperature=1.0, top_p=0.0), "top_p"),
    (dict(prompts=["hi"], temperature=1.0, top_p=1.5), "top_p"),
    (dict(prompts=["hi"], temperature=1.0, top_k=0), "top_k"),
    (dict(prompts=["hi"], max_new_tokens=0), "max_new_tokens"),
    (dict(prompts=["hi"], stop_tokens=[10**6]), "stop token"),
])
def test_bad_input(stories, kwargs, match):
  prompts = kwargs.pop("prompts")
  with pytest.raises((ValueError, TypeError), match=match):
    jaxspec.generate(stories, prompts, **kwargs)


def test_logits_api(stories):
  ids = [[1, 403, 407, 261, 378], [1, 403, 407, 261, 300]]
  lg = jaxspec.logits(stories, ids)
  assert lg.shape == (2, 5, 512) and lg.dtype == jnp.float32
  assert int(lg[0, -1].argmax()) == 432  # golden: "," follows "Once upon a time"
  with pytest.raises(ValueError, match="equal lengths"):
    jaxspec.logits(stories, [[1, 2], [1]])


def test_stream_matches_generate_without_recompiling(stories):
  full = jaxspec.generate(stories, ["Once upon a time"], max_new_tokens=30, stop_tokens=())
  pieces = list(jaxspec.stream(stories, "Once upon a time", max_new_tokens=30, stop_tokens=()))
  assert len(pieces) > 1
  assert "".join(pieces) == full.texts[0]
  before = engine.compile_count
  again = list(jaxspec.stream(stories, "The little bird", max_new_tokens=30, stop_tokens=()))
  assert engine.compile_count == before and len(again) > 1


def test_program_cache_keeps_the_most_recent(stories):
  """A bounded cache: the least recently used executable goes, and comes back by recompiling."""
  from jaxspec import session
  pr = session.prepare(stories, ["Once upon a time"], drafter=None, max_new_tokens=8,
                       temperature=0.0, top_k=None, top_p=None, seed=0, stop_tokens=(),
                       mesh=None)
  progs = engine.Programs(capacity=1)
  state, c_prefill = session.start(stories, pr, programs=progs)
  state, c_run = session.run_rounds(stories, pr, state, 1 << 30, programs=progs)
  assert c_prefill > 0 and c_run > 0 and progs.count == 2 and len(progs) == 1
  _, c = session.run_rounds(stories, pr, state, 1 << 30, programs=progs)  # still cached
  assert c == 0.0 and progs.count == 2
  _, c = session.start(stories, pr, programs=progs)  # evicted: built again
  assert c > 0 and progs.count == 3 and len(progs) == 1
  with pytest.raises(ValueError, match="capacity >= 1"):
    engine.Programs(capacity=0)


def test_max_new_tokens_recompiles_only_past_its_buffer_bucket(stories):
  """The KV cache is sized round_up(prompt bucket + max_new_tokens + draft room, 128): a
  max_new_tokens in the same 128-slot bucket reuses the programs, one past it compiles the
  prefill and the loop once more (as README and docs/architecture.md say)."""
  engine.PROGRAMS.clear()  # another test on this worker may have built the 256-slot programs
  jaxspec.generate(stories, ["Once upon a time"], max_new_tokens=100)  # 16 + 100 + 1 -> 128
  before = engine.compile_count
  jaxspec.generate(stories, ["Once upon a time"], max_new_tokens=110)  # still 128 slots
  assert engine.compile_count == before
  jaxspec.generate(stories, ["Once upon a time"], max_new_tokens=200)  # 256 slots
  assert engine.compile_count == before + 2


def test_concurrent_calls_compile_each_program_once(stories):
  """Four threads asking for the same new programs at once: one compiles, the others wait
  (never two compilations of one program), and all get the same tokens."""
  import threading

  engine.PROGRAMS.clear()  # the programs are new whatever ran before on this worker
  before = engine.compile_count
  barrier = threading.Barrier(4)
  out, errors = [None] * 4, []

  def call(i):
    try:
      barrier.wait()
      out[i] = jaxspec.generate(stories, ["The little bird"], max_new_tokens=333).tokens
    except Exception as e:  # surfaced below
      errors.append(e)

  threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=300)
  assert not errors and all(o == out[0] for o in out)
  assert engine.compile_count == before + 2  # prefill + loop, once each

"""Property tests (hypothesis) over random tiny models, drafters, k, ragged prompts and lengths.

  * speculative greedy decoding == plain greedy decoding, token for token, for every drafter;
  * no row ever gets more than `max_new_tokens` tokens, and a row that stops early ends with
    its first stop token (greedy and sampled).

Compiles dominate the cost, so the static shapes come from six (model config, drafter, k)
combinations (pytest parameters) that between them cover every drafter, k in {1, 3} and all
three configs, with a ragged batch of two prompts in one prompt bucket; hypothesis varies the
values (weights, prompt tokens and lengths, max_new_tokens, seeds, temperatures), which are
traced and never recompile, so each combination compiles once and its examples cost
milliseconds. A failure prints the example and a blob to reproduce it (@reproduce_failure).
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

import jaxspec
from jaxspec import drafters
from jaxspec.models import ByteTokenizer, Model, ModelConfig, init_params

# Target configs (dims 16-32, 1-2 layers, vocab 32-64) and, for DraftModel, a smaller draft
# with the same vocabulary.
TARGETS = {
    "d16-l1-v32": dict(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=32, vocab_size=32),
    "d32-l2-v32": dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=32),
    "d24-l2-v64": dict(dim=24, n_layers=2, n_heads=2, n_kv_heads=2, hidden_dim=48, vocab_size=64),
}
DRAFTS = {
    32: dict(dim=16, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=16, vocab_size=32),
    64: dict(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=32, vocab_size=64),
}
STOP = 2  # ByteTokenizer's EOS
# (target config, drafter, k): each drafter with both k and on two configs.
COMBOS = [("d16-l1-v32", "ngram", 3), ("d16-l1-v32", "draft", 1), ("d32-l2-v32", "early-exit", 1),
          ("d32-l2-v32", "draft", 3), ("d24-l2-v64", "early-exit", 3), ("d24-l2-v64", "ngram", 1)]
SETTINGS = settings(max_examples=5, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


pytestmark = pytest.mark.usefixtures("fast_compile")


def make_model(kw: dict, seed: int, name: str) -> Model:
  cfg = ModelConfig(max_seq_len=128, **kw)
  # Scaled-up random weights: well separated logits, so float rounding never flips a greedy pick.
  params = init_params(cfg, jax.random.key(seed), jnp.float32, scale=0.5)
  return Model(cfg, params, ByteTokenizer(vocab=cfg.vocab_size), name=name)


@functools.lru_cache(maxsize=None)
def target(name: str, seed: int) -> Model:
  return make_model(TARGETS[name], seed, f"{name}-s{seed}")


@functools.lru_cache(maxsize=None)
def draft(vocab: int, seed: int) -> Model:
  return make_model(DRAFTS[vocab], 1000 + seed, f"draft-v{vocab}-s{seed}")


def make_drafter(kind: str, model: Model, k: int, seed: int):
  if kind == "ngram":
    return drafters.NGram(n=2, k=k)
  if kind == "early-exit":
    return drafters.EarlyExit(layers=1, k=k)
  return drafters.DraftModel(draft(model.config.vocab_size, seed), k=k)


@st.composite
def cases(draw, combo):
  name, kind, k = combo
  vocab = TARGETS[name]["vocab_size"]
  # A small alphabet makes repeats (n-gram matches) likely; ids >= 3 avoid BOS/EOS in prompts.
  alphabet = st.integers(3, min(vocab - 1, draw(st.sampled_from([6, vocab - 1]))))
  prompts = [draw(st.lists(alphabet, min_size=0, max_size=15)) for _ in range(2)]
  return dict(name=name, seed=draw(st.integers(0, 2)), kind=kind, k=k,
              prompts=[[1] + p for p in prompts], max_new=draw(st.integers(1, 12)))


def check_lengths(tokens, max_new: int):
  for row in tokens:
    assert 1 <= len(row) <= max_new
    if STOP in row:  # generation ends at the first stop token, which is kept
      assert row.index(STOP) == len(row) - 1
    else:
      assert len(row) == max_new


def _ids(combos):
  return ["-".join(map(str, c)) for c in combos]


@pytest.mark.parametrize("combo", COMBOS, ids=_ids(COMBOS))
@SETTINGS
@given(data=st.data())
def test_speculative_greedy_equals_plain(combo, data):
  case = data.draw(cases(combo))
  model = target(case["name"], case["seed"])
  d = make_drafter(case["kind"], model, case["k"], case["seed"])
  plain = jaxspec.generate(model, case["prompts"], max_new_tokens=case["max_new"])
  spec = jaxspec.generate(model, case["prompts"], drafter=d, max_new_tokens=case["max_new"])
  assert spec.tokens == plain.tokens
  check_lengths(spec.tokens, case["max_new"])
  s = spec.stats
  assert 1.0 <= s.mean_accepted <= case["k"] + 1
  assert s.new_tokens == sum(map(len, spec.tokens))


SAMPLED = [c for c in COMBOS if c[2] == 3]  # one combination per drafter


@pytest.mark.parametrize("combo", SAMPLED, ids=_ids(SAMPLED))
@settings(SETTINGS, max_examples=5)
@given(data=st.data(), temperature=st.floats(0.5, 2.0), seed=st.integers(0, 2**31 - 1))
def test_sampled_rows_never_exceed_max_new_tokens(combo, data, temperature, seed):
  case = data.draw(cases(combo))
  model = target(case["name"], case["seed"])
  d = make_drafter(case["kind"], model, case["k"], case["seed"])
  out = jaxspec.generate(model, case["prompts"], drafter=d, max_new_tokens=case["max_new"],
                         temperature=temperature, top_p=0.9, seed=seed)
  check_lengths(out.tokens, case["max_new"])
  assert all(0 <= t < model.config.vocab_size for row in out.tokens for t in row)


# ----------------------------------------------------------------------------------------------
# Any value of any argument: a result or a documented error (issue 20)
#
# One tiny byte-level model (vocab 259, so text prompts work) and one-prompt batches of at most
# 16 tokens, so every valid call lands in the same prompt, batch and buffer buckets: the
# programs compiled are one per sampling mode and drafter (about ten), and most examples are
# refused in microseconds by validation.

import re  # noqa: E402
import threading  # noqa: E402

import numpy as np  # noqa: E402

DOCUMENTED = (ValueError, TypeError, FloatingPointError)  # docs/errors.md
NAMED = (r"prompt|max_new_tokens|temperature|top_k|top_p|seed|stop|drafter|rounds_per_chunk|"
         r"stream|non-finite logits|context")
CALL_BOUND_S = 120  # no call may run longer (compiles included) — a hang fails here
JUNK = [None, True, False, "0.5", "abc", b"x", 1.5, -1, 0, 2**32, 2**63, -(2**63), float("nan"),
        float("inf"), -float("inf"), 1e-30, 5e-324, [], [1], [[1, 2]], {}, object(), 1j,
        np.int64(3), np.float32(0.5), np.bool_(True), np.array(5), np.array([1, 2]),
        "\ud800", [1.0, 2.0], ["1"], [True], [[[1]]]]


@functools.lru_cache(maxsize=None)
def byte_model() -> Model:
  cfg = ModelConfig(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=32, vocab_size=259,
                    max_seq_len=128)
  params = init_params(cfg, jax.random.key(0), jnp.float32, scale=0.5)
  return Model(cfg, params, ByteTokenizer(), name="bytes")


def _or_junk(valid):
  """Mostly valid (about a quarter of the examples get valid values throughout), else junk."""
  return st.integers(0, 5).flatmap(lambda i: valid if i else st.sampled_from(JUNK))


ids = st.lists(st.integers(3, 258), min_size=1, max_size=12)
ARGS = {
    "prompts": _or_junk(st.one_of(
        ids.map(lambda x: [x]), ids.map(lambda x: [np.asarray(x, np.int32)]),
        st.text(min_size=1, max_size=10).map(lambda s: [s]))),
    "max_new_tokens": _or_junk(st.one_of(st.integers(1, 8), st.integers(1, 8).map(np.int64))),
    "temperature": _or_junk(st.sampled_from([0, 0.0, 0.7, 1.0, 1e-9, 1e-38, np.float32(0.9)])),
    "top_k": _or_junk(st.one_of(st.none(), st.integers(1, 300), st.integers(1, 9).map(np.int32))),
    "top_p": _or_junk(st.one_of(st.none(), st.floats(0.05, 1.0), st.just(np.float32(0.5)))),
    "seed": _or_junk(st.one_of(st.integers(0, 2**32 - 1), st.integers(0, 9).map(np.uint32))),
    "stop_tokens": _or_junk(st.one_of(st.none(), st.just(()), st.lists(st.integers(0, 258),
                                                                        max_size=3))),
    "drafter": _or_junk(st.sampled_from([None, "ngram"])),
}


def _bounded(fn):
  """Runs fn() in a thread: (its result or exception, elapsed); fails on a hang."""
  box = {}

  def run():
    try:
      box["out"] = fn()
    except BaseException as e:  # noqa: BLE001 (judged by the caller)
      box["err"] = e
  t = threading.Thread(target=run, daemon=True)
  t.start()
  t.join(CALL_BOUND_S)
  assert not t.is_alive(), f"call still running after {CALL_BOUND_S} s"
  return box.get("out"), box.get("err")


def _kwargs(data, names):
  kw = {name: data.draw(ARGS[name], label=name) for name in names}
  if isinstance(kw.get("drafter"), str) and kw["drafter"] == "ngram":
    kw["drafter"] = drafters.NGram(n=2, k=2)
  return kw


def _judge(out, err, tokens_of):
  event("result" if err is None else f"{type(err).__name__}: {str(err)[:40]}")
  if err is not None:
    assert isinstance(err, DOCUMENTED), f"undocumented {type(err).__name__}: {err}"
    # jaxspec's own message, naming what was wrong (not a raw int()/numpy/codec error)
    assert re.search(NAMED, str(err)), f"{type(err).__name__} names no argument: {err}"
    return
  for row in tokens_of(out):
    assert all(0 <= t < 259 for t in row), row


@settings(max_examples=60, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_generate_any_argument_value_is_a_result_or_a_documented_error(data):
  kw = _kwargs(data, list(ARGS))
  prompts = kw.pop("prompts")
  out, err = _bounded(lambda: jaxspec.generate(byte_model(), prompts, **kw))
  _judge(out, err, lambda r: r.tokens)


@settings(max_examples=30, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), rounds=_or_junk(st.integers(1, 3)))
def test_stream_any_argument_value_is_text_or_a_documented_error(data, rounds):
  kw = _kwargs(data, [n for n in ARGS if n != "prompts"])
  prompt = data.draw(_or_junk(st.one_of(ids, st.text(min_size=1, max_size=10))), label="prompt")
  out, err = _bounded(lambda: list(jaxspec.stream(byte_model(), prompt, rounds_per_chunk=rounds,
                                                  **kw)))
  _judge(out, err, lambda pieces: [])
  if err is None:
    assert all(isinstance(p, str) for p in out)

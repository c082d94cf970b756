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
from hypothesis import HealthCheck, given, settings, strategies as st

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

"""A reduced draft vocabulary (`jaxspec.drafters.vocab`, `DraftModel(vocab=...)`): lossless for
greedy and sampled decoding, the id map is right, and bad vocabularies are clear errors."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

import jaxspec
from jaxspec import drafters, trees
from jaxspec.drafters import vocab

from conftest import chisquare_p, next_token_laws, tiny_model, truncated

pytestmark = pytest.mark.usefixtures("fast_compile")

PROMPTS = ["Once upon a time", "The little bird", "One day, Lily went"]
N_NEW = 32


@pytest.fixture(scope="module")
def plain(stories):
  return jaxspec.generate(stories, PROMPTS, max_new_tokens=N_NEW, stop_tokens=()).tokens


@pytest.mark.parametrize("tree", [None, trees.Static.from_branching((2, 2, 1)),
                                  trees.Dynamic(nodes=8, topk=2, depth=3)])
def test_reduced_vocab_greedy_equals_plain(stories, plain, tree):
  d = drafters.DraftModel(truncated(stories, 3), k=4, tree=tree, vocab=128)
  out = jaxspec.generate(stories, PROMPTS, drafter=d, max_new_tokens=N_NEW, stop_tokens=(),
                         speculate="always")
  assert out.tokens == plain


def test_id_map_is_exact(stories, plain):
  """Draft = target. With a vocabulary holding every token the target emits, every draft is
  accepted as with the full head (a wrong id map would lose them); with one holding none of
  them, no draft is ever accepted."""
  same = truncated(stories, stories.config.n_layers)
  v = stories.config.vocab_size
  used = sorted({t for row in plain for t in row})
  run = lambda voc: jaxspec.generate(stories, PROMPTS, drafter=drafters.DraftModel(
      same, k=4, vocab=voc), max_new_tokens=N_NEW, stop_tokens=(), speculate="always")
  full, covered = run(None), run(used + [v - 1])
  assert covered.tokens == plain and full.tokens == plain
  assert covered.stats.mean_accepted == full.stats.mean_accepted > 3.5
  # vocab=n counts the built-in prompts: half of stories260K's ids keep nearly all acceptance
  # (its lowest 256 ids, byte-fallback tokens, kept none)
  assert run(256).stats.mean_accepted >= 0.9 * full.stats.mean_accepted
  assert run(list(vocab.leading(256, v))).stats.mean_accepted == 1.0
  unused = [t for t in range(v) if t not in set(used)]
  miss = run(unused)
  assert miss.tokens == plain
  assert miss.stats.mean_accepted == 1.0


@pytest.mark.parametrize("ids", ["few", "leading"])
def test_reduced_vocab_sampling_is_exact(ids):
  """Temperature 1 on a 64-token model, 8192 rows, every round speculative: the second emitted
  token follows the target's marginal although the draft can propose only some tokens (the
  residual max(0, p - q) must carry the rest of the mass)."""
  model = tiny_model(seed=3, max_seq_len=64)
  prompt = [5, 9, 2]
  p1, _, law = next_token_laws(model, prompt)
  # "few": the 8 tokens the target likes most at step 1 are left OUT of the draft vocabulary
  voc = (sorted(np.argsort(-p1)[8:24].tolist()) if ids == "few" else 16)
  d = drafters.DraftModel(truncated(model, 1), k=2, vocab=voc)
  rows = 8192
  out = jaxspec.generate(model, [prompt] * rows, drafter=d, max_new_tokens=2, stop_tokens=(),
                         temperature=1.0, seed=11, speculate="always")
  assert chisquare_p([t[1] for t in out.tokens], law) > 1e-4


def test_reduced_vocab_medusa_sampling_is_exact():
  """The same law through a trained-head readout: Medusa heads whose draft vocabulary leaves out
  the target's favourite tokens (zero blocks: each head reads the target's feature through the
  reduced head), temperature 1, 8192 rows, every round speculative."""
  from jaxspec.drafters import medusa
  model = tiny_model(seed=3, max_seq_len=64)
  prompt = [5, 9, 2]
  p1, _, law = next_token_laws(model, prompt)
  ids = np.sort(np.argsort(-p1)[4:20]).astype(np.int32)
  cfg = medusa.MedusaConfig(model.config, n_heads=2, draft_vocab=len(ids))
  params = dict(medusa.init_params(cfg), vocab_ids=ids)
  d = drafters.Medusa(drafters.MedusaHeads(params=params, config=cfg), k=2)
  rows = 8192
  out = jaxspec.generate(model, [prompt] * rows, drafter=d, max_new_tokens=2, stop_tokens=(),
                         temperature=1.0, seed=5, speculate="always")
  assert sum(sum(h[1:]) for h in out.stats.accepted) > 0  # reduced-set drafts were accepted
  assert chisquare_p([t[1] for t in out.tokens], law) > 1e-4


def test_vocab_helpers(stories):
  tok = stories.tokenizer
  v = stories.config.vocab_size
  ids = vocab.leading(10, v, tok.eos_ids)
  want = list(tok.eos_ids) + [t for t in range(v) if t not in tok.eos_ids][:10 - len(tok.eos_ids)]
  assert ids.tolist() == sorted(want)
  texts = ["the cat sat on the mat", "the dog"]
  counts = vocab.count(tok, texts)
  assert counts == Counter(t for s in texts for t in tok.encode(s))
  top = vocab.frequent(tok, texts, 5)
  most = sorted(counts, key=lambda t: (-counts[t], t))[:4]  # ties: lower id first
  assert set(most) <= set(top.tolist()) and set(tok.eos_ids) <= set(top.tolist())
  assert list(top) == sorted(top)
  # vocab=n: the built-in prompt set's most frequent ids (eos always in)
  ids = vocab.resolve(64, stories.config, tok)
  from jaxspec import prompts
  counts = vocab.count(tok, prompts.training_prompts())
  top = sorted(counts, key=lambda t: (-counts[t], t))[:60]
  assert len(ids) == 64 and set(top) <= set(ids.tolist()) and set(tok.eos_ids) <= set(ids.tolist())
  assert vocab.resolve(None, stories.config, tok) is None
  assert vocab.resolve(v, stories.config, tok) is None  # the whole vocabulary: no reduction


@pytest.mark.parametrize("bad, err, match", [
    ([1], ValueError, "at least 2"),
    ([0, 1, 10**6], ValueError, "outside the target's vocabulary"),
    ([-1, 3], ValueError, "outside the target's vocabulary"),
    ([[1, 2], [3, 4]], ValueError, "1-D sequence"),
    ([0.5, 1.5], ValueError, "integer token ids"),
    (1, ValueError, "must be in"),
    (10**7, ValueError, "must be in"),
    ("32", TypeError, "vocab must be"),
    (True, TypeError, "vocab must be"),
])
def test_bad_vocab_is_a_clear_error(stories, bad, err, match):
  with pytest.raises(err, match=match):
    drafters.DraftModel(truncated(stories, 2), vocab=bad)


def test_cli_draft_vocab_suffix(stories):
  from jaxspec.drafters import registry
  d = registry.get("draft").build("stories260K@64", None, None)
  assert d.vocab == 64 and d.draft_model.config.vocab_size == stories.config.vocab_size
  assert registry.get("draft").build("stories260K", None, None).vocab is None

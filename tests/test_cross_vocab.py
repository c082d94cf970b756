"""DraftModel across vocabularies: translation tables, greedy equality, exact sampling, errors."""

import numpy as np
import pytest

import jaxspec
from jaxspec import drafters, trees
from jaxspec.drafters import translate
from jaxspec.models import ByteTokenizer, Model
from jaxspec.models.tokenizer import Tokenizer

from conftest import STORY_PROMPTS, assert_second_and_third_follow_the_target, tiny_model


class Pieces(Tokenizer):
  """A toy tokenizer over explicit byte strings (greedy longest match): BOS 1, EOS 2."""

  def __init__(self, pieces):
    self.pieces = [None, None, None] + list(pieces)
    self.bos_id, self.eos_ids, self.add_bos = 1, (2,), True
    self.chat_template, self.special_tokens = None, {}
    self._table, self._longest = translate.lookup(self.pieces)

  @property
  def vocab_size(self):
    return len(self.pieces)

  def token_bytes(self):
    return list(self.pieces)

  def _encode(self, text):
    return translate.spell_bytes(text.encode(), self._table, self._longest, None)

  def decode(self, ids):
    return b"".join(self.pieces[i] or b"" for i in ids).decode("utf-8", "replace")


# bytes 0..29 alone, six two-byte pieces (a draft token that spells two target tokens), and
# nothing for bytes 30..60 (target tokens the draft cannot spell)
DRAFT_PIECES = [bytes([b]) for b in range(30)] + [bytes([a, a + 1]) for a in range(0, 12, 2)]


def _pair(seed=0, layers=2, **draft_kw):
  target = tiny_model(seed=3, n_layers=4, max_seq_len=128)  # ByteTokenizer(64): bytes 0..60
  d = tiny_model(seed=seed, n_layers=layers, vocab_size=len(DRAFT_PIECES) + 3, max_seq_len=512,
                 **draft_kw)
  return target, Model(d.config, d.params, Pieces(DRAFT_PIECES), name="pieces")


def test_tables():
  target, draft = _pair()
  t = translate.build(target.tokenizer, draft.tokenizer, 64, draft.config.vocab_size)
  # the intersection: the 30 single bytes and BOS / EOS, each one token both ways
  assert len(t.pair_draft) == 32
  for d, tt in zip(t.pair_draft, t.pair_target):
    assert t.spell_len[tt] == 1 and t.spell[tt, 0] == d
  assert set(t.pair_target) == {1, 2} | set(range(3, 33))
  assert t.spell_len[3 + 40] == 0  # byte 40: the draft cannot spell it
  assert t.prepend is None  # the target's BOS translates to the draft's


def test_real_tokenizers_spell_text(stories, smollm):
  t = translate.build(smollm.tokenizer, stories.tokenizer, smollm.config.vocab_size,
                      stories.config.vocab_size)
  text = "Once upon a time, there was a little girl named Lily."
  ids = smollm.tokenizer.encode(text)
  spelled = [int(x) for j, i in enumerate(ids)
             for x in (t.lead if j == 0 else t.spell)[i][:(t.lead_len if j == 0 else t.spell_len)[i]]]
  assert stories.tokenizer.decode(spelled).strip() == text
  assert spelled == stories.tokenizer.encode(text, add_bos=False)  # the same tokens here
  assert t.prepend == stories.tokenizer.bos_id and 300 < len(t.pair_draft) < 512


@pytest.mark.parametrize("k,tree", [(1, None), (4, None), (4, trees.Dynamic(12, 3, 4)),
                                    (3, trees.Static.from_branching((2, 2)))])
def test_greedy_equals_plain(k, tree):
  target, draft = _pair()
  prompts = [[1, 5, 9, 40, 7], [1, 3], [1, 8, 8, 8, 8, 8, 8, 8, 8, 8, 20]]  # ragged
  plain = jaxspec.generate(target, prompts, max_new_tokens=20, stop_tokens=())
  out = jaxspec.generate(target, prompts, drafter=drafters.DraftModel(draft, k=k, tree=tree),
                         max_new_tokens=20, stop_tokens=())
  assert out.tokens == plain.tokens


@pytest.mark.parametrize("tree", [None, trees.Dynamic(12, 3, 4)])
def test_sliding_window_draft_keeps_rings(tree):
  """A draft with sliding-window layers (window 6, local / global alternating) across the
  vocabularies: its own cache keeps rings in the local layers (prefill and catch-up write only
  the real draft ids), and greedy output equals plain decoding."""
  from jaxspec import session
  target, draft = _pair(sliding_window=6, local_pattern=(True, False))
  prompts = [[1, 5, 9, 40, 7], [1, 3], [1, 8, 8, 8, 8, 8, 8, 8, 8, 8, 20]]
  d = drafters.DraftModel(draft, k=4, tree=tree)
  plain = jaxspec.generate(target, prompts, max_new_tokens=24, stop_tokens=())
  for speculate in ("always", "auto"):
    out = jaxspec.generate(target, prompts, drafter=d, max_new_tokens=24, stop_tokens=(),
                           speculate=speculate)
    assert out.tokens == plain.tokens, speculate
  plan = session.prepare(target, prompts, drafter=d, max_new_tokens=24, stop_tokens=())
  cache = session.start(target, plan)[0].dstate.cache
  assert cache.ring == 6 + plan.spec.drafter.footprint + 1
  assert [x.shape[1] for x in cache.k] == [cache.ring, cache.size]


def test_greedy_equals_plain_real_pair(stories, smollm):
  """stories260K (SentencePiece, 512 tokens) drafting for SmolLM2 (byte-level BPE, 49,152)
  and the other way round."""
  for target, draft in [(smollm, stories), (stories, smollm)]:
    plain = jaxspec.generate(target, STORY_PROMPTS[:3], max_new_tokens=16, stop_tokens=())
    out = jaxspec.generate(target, STORY_PROMPTS[:3], drafter=drafters.DraftModel(draft, k=4),
                           max_new_tokens=16, stop_tokens=())
    assert out.tokens == plain.tokens
    assert out.stats.mean_accepted > 1.1, target.name  # some of the draft's guesses land


def test_draft_model_of_the_same_tokenizer_family_is_the_same_path(stories):
  spec, _ = drafters.DraftModel(stories, k=2).bind(stories)
  assert type(spec).__name__ == "DraftModelSpec"


@pytest.mark.parametrize("tree", [None, trees.Static.from_branching((2, 2))])
def test_sampling_is_exact(tree):
  """Temperature 1, 8192 rows: the second and third emitted tokens follow the target's law
  when a draft with another vocabulary (multi-byte pieces, bytes it cannot spell) drafts."""
  target, draft = _pair(seed=5)
  prompt = [1, 5, 9]
  d = drafters.DraftModel(draft, k=2, tree=tree)
  out = jaxspec.generate(target, [prompt] * 8192, drafter=d, max_new_tokens=3, stop_tokens=(),
                         temperature=1.0, seed=11, speculate="always")
  assert sum(sum(h[1:]) for h in out.stats.accepted) > 0
  assert_second_and_third_follow_the_target(target, prompt, out.tokens)


def test_errors(stories):
  other = tiny_model(vocab_size=100)
  bare = Model(other.config, other.params, None, name="bare")
  with pytest.raises(ValueError, match="has no tokenizer to translate"):
    jaxspec.generate(stories, ["hi"], drafter=drafters.DraftModel(bare))
  nothing = Model(other.config, other.params, Pieces([b"\xff\xfe" * (i + 1) for i in range(97)]),
                  name="nothing")
  with pytest.raises(ValueError, match="share no token"):
    jaxspec.generate(stories, ["hi"], drafter=drafters.DraftModel(nothing))
  bytes_only = Model(other.config, other.params, ByteTokenizer(vocab=100), name="b")
  spec, _ = drafters.DraftModel(bytes_only).bind(stories)
  assert type(spec).__name__ == "CrossVocabSpec"
  assert np.isfinite(spec.expansion)

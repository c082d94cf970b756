"""EAGLE-3 (`drafters.Eagle` with a head reading several target layers, trained by
`train_drafter(kind="eagle3")`): the layer taps, training-time test against the loop, lossless
greedy and sampled decoding, chains and trees."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec
from jaxspec import drafters, trees
from jaxspec.drafters import eagle
from jaxspec.models import KVCache, forward
from jaxspec.train import objectives

from conftest import STORY_PROMPTS, assert_second_and_third_follow_the_target, tiny_model

pytestmark = pytest.mark.usefixtures("fast_compile")


def _head(model, seed=0, scale=0.3, layers=None):
  """A random EAGLE-3 head with weights large enough that its drafts depend on its inputs."""
  cfg = eagle.EagleConfig(model.config, feature_layers=layers or
                          eagle.eagle3_layers(model.config.n_layers))
  p = eagle.init_params(cfg, seed)
  rng = np.random.default_rng(seed + 1)
  p = jax.tree.map(lambda x: x + jnp.asarray(rng.standard_normal(x.shape, np.float32))
                   * scale / np.sqrt(x.shape[0]) if x.ndim >= 2 else x, p)
  return drafters.EagleHead(params=p, config=cfg)


def test_taps_are_the_partial_forwards(stories):
  c, p = stories.config, stories.params
  tokens = jnp.asarray([[1, 400, 30, 50, 60], [1, 9, 8, 7, 6]], jnp.int32)
  out = forward(p, c, tokens, taps=(0, 2, 4), logits=False)
  for j, layer in enumerate((0, 2, 4)):
    part = forward(p, c, tokens, n_layers=layer + 1, logits=False).hidden
    np.testing.assert_array_equal(out.taps[..., j * c.dim:(j + 1) * c.dim], part)
  np.testing.assert_array_equal(out.hidden, forward(p, c, tokens, logits=False).hidden)
  with pytest.raises(ValueError, match="taps must be increasing"):
    forward(p, c, tokens, taps=(2, 1))
  with pytest.raises(ValueError, match="taps must be increasing"):
    forward(p, c, tokens, taps=(9,))


def test_default_layers():
  assert eagle.eagle3_layers(30) == (1, 14, 26)  # SmolLM2-135M
  assert eagle.eagle3_layers(32) == (1, 15, 28)  # Llama 3 8B, as the EAGLE-3 release taps it
  assert eagle.eagle3_layers(5) == (0, 2, 4)  # stories260K: too shallow, evenly spaced
  assert eagle.eagle3_layers(2) == (0, 1)


def test_training_time_test_is_the_loop():
  """Every training-time-test output g_j at position t equals what drafting computes: a
  drafter cache of true features up to t - j - 1, the root feed at t - j, then j steps fed
  with the head's own outputs (teacher-forced tokens)."""
  model = tiny_model(seed=2, n_layers=4, max_seq_len=64)
  head = _head(model, seed=4)
  cfg, p, tp = head.config, head.params, model.params
  steps, s = 3, 7
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 64, (2, s)), jnp.int32)
  taps = jnp.asarray(rng.standard_normal((2, s, 3 * model.config.dim)), jnp.float32)
  obj = objectives.Eagle3Objective(model.config, cfg, ttt=steps)
  got = obj.unroll(p, tp, taps, tokens)
  f = eagle.fuse(p, cfg, taps)
  checked = 0
  for j in range(steps):
    for t in range(j, s - 1):
      cache = KVCache.init(cfg.decoder, 2, 16, jnp.float32)
      root = t - j
      if root:
        _, cache = eagle.step(p, tp, cfg, f[:, :root], tokens[:, 1:root + 1], cache)
      g, cache = eagle.step(p, tp, cfg, f[:, root:root + 1], tokens[:, root + 1:root + 2], cache)
      for i in range(1, j + 1):
        g, cache = eagle.step(p, tp, cfg, g, tokens[:, root + i + 1:root + i + 2], cache)
      np.testing.assert_allclose(got[j][:, t], g[:, 0], rtol=2e-4, atol=2e-4)
      checked += 1
  assert checked == 6 + 5 + 4


def test_ttt_mask_rows():
  m = np.asarray(objectives.ttt_mask(4, 2, 3))[0]  # step 2, 4 positions, 3 steps
  # position 3 sees true features 0..1, step 1 at position 2, itself (step 2 at 3)
  assert np.flatnonzero(m[3]).tolist() == [0, 1, 4 + 2, 8 + 3]
  assert np.flatnonzero(m[0]).tolist() == [8]  # no chain behind it (masked in the loss)


@pytest.mark.parametrize("tree,k", [(None, 1), (None, 4), ("static", 4), ("dynamic", 4)])
def test_greedy_equals_plain_ragged(stories, tree, k):
  topo = {None: None, "static": trees.Static.from_branching((3, 2, 1)),
          "dynamic": trees.Dynamic(nodes=12, topk=3, depth=4)}[tree]
  d = drafters.Eagle(_head(stories), k=k, tree=topo)
  plain = jaxspec.generate(stories, STORY_PROMPTS, max_new_tokens=24, stop_tokens=())
  out = jaxspec.generate(stories, STORY_PROMPTS, drafter=d, max_new_tokens=24, stop_tokens=())
  assert out.tokens == plain.tokens
  # the switch off and a plain round mixed in keep the drafter's state in step too
  auto = jaxspec.generate(stories, STORY_PROMPTS, drafter=d, max_new_tokens=24, stop_tokens=(),
                          speculate="auto")
  assert auto.tokens == plain.tokens


def test_smollm_greedy_equals_plain(smollm):
  prompts = ["The capital of France is", "def fibonacci(n):"]
  d = drafters.Eagle(_head(smollm, scale=0.05), tree=trees.Dynamic(nodes=8, topk=2, depth=3))
  plain = jaxspec.generate(smollm, prompts, max_new_tokens=12, stop_tokens=())
  out = jaxspec.generate(smollm, prompts, drafter=d, max_new_tokens=12, stop_tokens=())
  assert out.tokens == plain.tokens


@pytest.mark.parametrize("tree", [None, trees.Static.from_branching((2, 2))])
def test_sampling_is_exact(tree):
  """Temperature 1, 8192 rows: the second and third emitted tokens (drafted by the EAGLE-3
  head, sampled siblings verified against q on the tree) follow the target's law."""
  model = tiny_model(seed=3, n_layers=4, max_seq_len=64)
  prompt = [5, 9, 2]
  d = drafters.Eagle(_head(model, seed=1, scale=1.0), k=2, tree=tree)
  out = jaxspec.generate(model, [prompt] * 8192, drafter=d, max_new_tokens=3, stop_tokens=(),
                         temperature=1.0, seed=11, speculate="always")
  assert sum(sum(h[1:]) for h in out.stats.accepted) > 0
  assert_second_and_third_follow_the_target(model, prompt, out.tokens)


def test_head_errors(stories):
  with pytest.raises(ValueError, match="feature_layers must be increasing"):
    objectives.make("eagle3", stories, k=4, feature_layers=(3, 1))
  with pytest.raises(ValueError, match="feature_layers must be increasing"):
    objectives.make("eagle3", stories, k=4, feature_layers=(0, 5))
  with pytest.raises(ValueError, match="ttt"):
    objectives.make("eagle3", stories, k=4, ttt=0)
  deep = tiny_model(seed=0, n_layers=4, dim=stories.config.dim,
                    vocab_size=stories.config.vocab_size)
  h = _head(deep, layers=(0, 1, 3))
  shallow = tiny_model(seed=0, n_layers=2, dim=stories.config.dim,
                       vocab_size=stories.config.vocab_size)
  with pytest.raises(ValueError, match="reads target layers"):
    jaxspec.generate(shallow, [[1, 2]], drafter=drafters.Eagle(h), max_new_tokens=2)

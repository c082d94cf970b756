"""Hydra heads in the loop (`drafters.Hydra`): each head reads the token drafted before it, so a
sampled chain's draft distribution is autoregressive; the output law is the target's."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec
from jaxspec import drafters, trees
from jaxspec.drafters import hydra

from conftest import assert_second_and_third_follow_the_target, tiny_model

pytestmark = pytest.mark.usefixtures("fast_compile")


def _heads(model, n_heads=3, seed=0, scale=0.5):
  """Random heads whose output depends on the previous token (W_in's lower half nonzero)."""
  cfg = hydra.HydraConfig(model.config, n_heads=n_heads)
  p = hydra.init_params(cfg)
  rng = np.random.default_rng(seed)
  d = model.config.dim
  lower = rng.standard_normal((n_heads, d, d)).astype(np.float32) * scale / np.sqrt(d)
  p["w_in"] = p["w_in"].at[:, d:].set(jnp.asarray(lower))
  return drafters.HydraHeads(params=p, config=cfg)


def test_heads_read_the_previous_token():
  model = tiny_model(seed=3, max_seq_len=64)
  h = _heads(model)
  f = jnp.ones((2, model.config.dim))
  a = hydra.features(h.params, model.params, f, jnp.array([1, 1]), 1)
  b = hydra.features(h.params, model.params, f, jnp.array([1, 7]), 1)
  assert np.allclose(a[0], b[0]) and not np.allclose(a[0], b[1])
  # teacher-forced training features agree with the loop's, head by head
  toks = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 6)), jnp.int32)
  feats = jnp.asarray(np.random.default_rng(2).standard_normal((2, 6, model.config.dim)),
                      jnp.float32)
  x = hydra.training_features(h.params, model.params, feats, toks)  # [B, T, H, D]
  for i in range(3):
    want = hydra.features(h.params, model.params, feats[:, 1], toks[:, 2 + i], i)
    np.testing.assert_allclose(x[:, 1, i], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tree", [None, trees.Static.from_branching((2, 2))])
def test_hydra_sampling_is_exact(tree):
  """Temperature 1, 8192 rows, every round speculative: the second and third emitted tokens
  (the first round's drafts, each sampled from a head conditioned on the draft before it)
  follow the target's law."""
  model = tiny_model(seed=3, max_seq_len=64)
  prompt = [5, 9, 2]
  d = drafters.Hydra(_heads(model), k=2, tree=tree)
  rows = 8192
  out = jaxspec.generate(model, [prompt] * rows, drafter=d, max_new_tokens=3, stop_tokens=(),
                         temperature=1.0, seed=7, speculate="always")
  assert sum(sum(h[1:]) for h in out.stats.accepted) > 0
  assert_second_and_third_follow_the_target(model, prompt, out.tokens)

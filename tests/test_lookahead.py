"""Lookahead decoding (`drafters.Lookahead`): lossless greedy and sampled, the window and pool
mechanics by hand, CLI and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec
from jaxspec import drafters
from jaxspec.drafters import Accepted, Prefill, Round
from jaxspec.drafters.registry import parse as parse_drafter
from jaxspec.sampling import make as make_sampling
from conftest import STORY_PROMPTS, chisquare_p, next_token_laws, tiny_model

PROMPTS = STORY_PROMPTS


@pytest.fixture(scope="module")
def plain(stories):
  return jaxspec.generate(stories, PROMPTS, max_new_tokens=48, stop_tokens=())


@pytest.mark.parametrize("opts", [dict(), dict(window=4, ngram=2, k=3),
                                  dict(window=6, ngram=4, k=1, pool=8)])
def test_greedy_equals_plain(stories, plain, opts):
  out = jaxspec.generate(stories, PROMPTS, drafter=drafters.Lookahead(**opts),
                         max_new_tokens=48, stop_tokens=(), speculate="always")
  assert out.tokens == plain.tokens
  assert out.stats.mean_accepted > 1.05


def test_sampling_is_exact():
  """Temperature 1, 8192 rows, every round speculative: the second token follows the target's
  law (window and pool branches are one-hot proposals)."""
  model = tiny_model(seed=3, max_seq_len=64)
  prompt = [5, 9, 2, 5, 9, 2, 5, 9]
  out = jaxspec.generate(model, [prompt] * 8192, drafter=drafters.Lookahead(window=3, k=2),
                         max_new_tokens=2, stop_tokens=(), temperature=1.0, seed=17,
                         speculate="always")
  assert sum(sum(h[1:]) for h in out.stats.accepted) > 0
  _, _, law = next_token_laws(model, prompt)
  assert chisquare_p([t[1] for t in out.tokens], law) > 1e-4


def _spec(model, **kw):
  spec, params = drafters.Lookahead(**kw).bind(model)
  mode, _ = make_sampling(0.0)
  return spec.with_mode(mode), params


def test_pool_and_window_by_hand(stories):
  """init seeds the pool with the prompt's n-grams (oldest first, duplicates once); commit
  adds this round's trajectories and moves the window by the tokens committed."""
  spec, params = _spec(stories, window=3, ngram=3, k=2, pool=4)
  prompt = jnp.asarray([[7, 8, 9, 7, 8, 9, 0, 0]], jnp.int32)
  lens = jnp.asarray([6])
  st = spec.init(params, Prefill(tparams=None, prompt=prompt, prompt_lens=lens, hidden=None,
                                 cache_size=64))
  # n-grams of [7 8 9 7 8 9]: 789, 897, 978, 789 (a duplicate)
  got = {(int(k), tuple(c.tolist())) for k, c, s in zip(st.keys[0], st.conts[0], st.stamps[0])
         if s >= 0}
  assert got == {(7, (8, 9)), (8, (9, 7)), (9, (7, 8))} and int(st.clock[0]) == 3
  assert st.window.tolist() == [[7, 8, 9]]
  # Propose from the pending token 9: the pool's n-gram (9, 7, 8) is drafted.
  seq = jnp.concatenate([prompt[:, :6], jnp.asarray([[9, 0, 0]])], axis=1)
  r = Round(tparams=None, tcache=None, seq=seq, n=jnp.asarray([7]), key=jax.random.key(0),
            sp=make_sampling(0.0)[1])
  st, prop = spec.propose(params, st, r)
  nodes = spec.tree.branch_nodes()
  toks = prop.tree.tokens[0]
  assert toks[np.asarray(nodes[0])].tolist() == [7, 8, 9]  # the window
  assert toks[np.asarray(nodes[1])].tolist() == [7, 8]  # the pool's n-gram after 9
  assert not bool(prop.tree.valid[0, nodes[2][0]])  # only one n-gram starts with 9
  # Commit: the target's argmax at the root and the window nodes is [1, 2, 3, 4].
  v = stories.config.vocab_size
  logits = jnp.zeros((1, spec.tree.n_nodes, v))
  for node, tok in zip([0] + nodes[0], [1, 2, 3, 4]):
    logits = logits.at[0, node, tok].set(5.0)
  a = Accepted(n_new=jnp.asarray([8]), n_acc=jnp.asarray([0]), path=None, hidden=None,
               tokens=prop.tree.tokens, logits=logits)
  st2 = spec.commit(params, st, r, a)
  # One token committed: the window becomes g[1:] = [2, 3, 4] (past the guesses: the last).
  assert st2.window.tolist() == [[2, 3, 4]]
  # hist held nothing yet (-1): no 3-gram is complete, the pool is unchanged.
  assert int(st2.clock[0]) == 3
  # The next commit has a history level: the window [7, 8, 9] shifted by one is [8, 9, -1];
  # trajectories (hist[i], window[i+1], g[i+2]): (8, 3, 11) and (9, 4, 12). The pool holds 4:
  # the second lands on the oldest entry, (7, 8, 9).
  logits2 = jnp.zeros((1, spec.tree.n_nodes, v))
  for node, tok in zip([0] + nodes[0], [5, 6, 11, 12]):
    logits2 = logits2.at[0, node, tok].set(5.0)
  a2 = Accepted(n_new=jnp.asarray([9]), n_acc=jnp.asarray([0]), path=None, hidden=None,
                tokens=prop.tree.tokens, logits=logits2)
  st3 = spec.commit(params, st2, r.replace(n=jnp.asarray([8])), a2)
  got = {(int(k), tuple(c.tolist())) for k, c, s in zip(st3.keys[0], st3.conts[0],
                                                         st3.stamps[0]) if s >= 0}
  assert {(8, (3, 11)), (9, (4, 12))} <= got and (7, (8, 9)) not in got
  assert int(st3.clock[0]) == 5


def test_cli_and_errors(stories):
  d = parse_drafter("lookahead:6,4", k=3)
  assert (d.window, d.ngram, d.k) == (6, 4, 3) and d.tree.n_nodes == 1 + 6 + 3 * 3
  with pytest.raises(ValueError, match="window=2 must be at least ngram - 1"):
    drafters.Lookahead(window=2, ngram=4)
  with pytest.raises(ValueError, match="Lookahead ngram must be an integer in \\[2, 8\\]"):
    drafters.Lookahead(ngram=1)
  with pytest.raises(ValueError, match="--tree does not apply to lookahead"):
    parse_drafter("lookahead", k=2, tree=8)
  with pytest.raises(ValueError, match="nodes; at most 256"):
    drafters.Lookahead(window=32, ngram=8, k=40)

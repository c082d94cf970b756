"""LayerSkip: drafting from any subset of the target's layers (not only a prefix), sharing its
weights and cache; chains (with and without the confidence stop), static and dynamic trees, and
a skip set searched per model. Greedy output equals plain greedy output on a ragged batch."""

import numpy as np
import pytest

import jaxspec
from jaxspec import drafters, trees
from jaxspec.drafters import layer_skip, registry
from conftest import assert_second_and_third_follow_the_target, tiny_model

pytestmark = pytest.mark.usefixtures("fast_compile")

PROMPTS = ["Once upon a time, there was a", "The little bird", "One day"]  # ragged
N_NEW = 32

CASES = {
    "chain-k1-searched": lambda: drafters.LayerSkip(None, k=1),
    "chain-k4-skip": lambda: drafters.LayerSkip((0, 2, 4), k=4),
    "chain-k4-stop": lambda: drafters.LayerSkip([3, 1, 4], k=4, stop_below=0.3),
    "static-tree": lambda: drafters.LayerSkip((1, 3), tree=trees.Static.from_branching((2, 2))),
    "dynamic-tree": lambda: drafters.LayerSkip((0, 2, 4),
                                               tree=trees.Dynamic(nodes=8, topk=2, depth=3)),
}


@pytest.fixture(scope="module")
def plain(stories):
  return jaxspec.generate(stories, PROMPTS, max_new_tokens=N_NEW, stop_tokens=())


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_equals_plain(stories, plain, case):
  d = CASES[case]()
  got = jaxspec.generate(stories, PROMPTS, max_new_tokens=N_NEW, drafter=d, stop_tokens=())
  assert got.tokens == plain.tokens
  assert got.stats.mean_accepted > 1.0  # drafts were accepted, not only verified away


@pytest.mark.parametrize("d", [drafters.LayerSkip((0,), k=2),
                               drafters.LayerSkip((1,), k=3, stop_below=0.2)],
                         ids=["chain", "chain-stop"])
def test_sampled_chains_are_exact(d):
  """Temperature 1, 8192 rows, every round speculative on a 2-layer model drafting with one of
  its layers (the tree case is in test_trees.py): the second and third tokens follow the
  target's law."""
  model = tiny_model(seed=3, max_seq_len=64)
  prompt = [5, 9, 2]
  out = jaxspec.generate(model, [prompt] * 8192, drafter=d, max_new_tokens=3, stop_tokens=(),
                         temperature=1.0, seed=21, speculate="always")
  assert sum(sum(h[1:]) for h in out.stats.accepted) > 0
  assert_second_and_third_follow_the_target(model, prompt, out.tokens)


def test_searched_skip_set_is_cached_per_model(stories):
  n = stories.config.n_layers
  d = drafters.LayerSkip()  # layers=None: search at bind
  ids = d.resolve(stories)
  assert len(ids) == 3 and list(ids) == sorted(set(ids)) and all(0 <= i < n for i in ids)
  assert layer_skip.search(stories, 3) is ids  # cached: no second search
  spec, params = d.bind(stories)
  assert spec.layers == ids and params is None
  assert d.draft_forward(stories)[2] == 3  # known without searching
  assert drafters.LayerSkip((0, 4)).draft_forward(stories)[2] == 2


def test_bad_arguments(stories):
  for bad, err, match in [
      ([], ValueError, "at least one layer"),
      ((0, 2, 2), ValueError, "distinct.*2 repeats"),
      ((0, -1), ValueError, "-1"),
      ((0, 1.5), TypeError, "1.5"),
      ((0, True), TypeError, "True"),
      ("0,2", TypeError, "sequence of layer ids"),
      (3, TypeError, "sequence of layer ids"),
  ]:
    with pytest.raises(err, match=match):
      drafters.LayerSkip(bad)
  with pytest.raises(ValueError, match="layer id 5 is out of range.*5 layers"):
    drafters.LayerSkip((0, 5)).bind(stories)
  with pytest.raises(ValueError, match="must skip at least one"):
    drafters.LayerSkip(range(5)).bind(stories)
  with pytest.raises(ValueError, match="at least 2 layers"):
    drafters.LayerSkip().bind(tiny_model(n_layers=1))
  for keep in (0, 1.0, 1.5, True, "half"):
    with pytest.raises(ValueError, match="keep must be a fraction"):
      drafters.LayerSkip(keep=keep)
  with pytest.raises(ValueError, match="k must be"):
    drafters.LayerSkip((0,), k=0)
  with pytest.raises(ValueError, match="stop_below applies to chains"):
    drafters.LayerSkip((0,), stop_below=0.5, tree=trees.Dynamic(nodes=8))
  with pytest.raises(ValueError, match="comma-separated layer ids"):
    registry.parse("layer-skip:0,x")
  assert drafters.LayerSkip(np.array([4, 0])).layers == (0, 4)


def test_registry_parse():
  d = registry.parse("layer-skip:0,2,4", k=4)
  assert isinstance(d, drafters.LayerSkip) and d.layers == (0, 2, 4) and d.k == 4
  assert registry.parse("layer-skip", k=2).layers is None
  assert registry.parse("layer-skip:4+0", k=2).layers == (0, 4)  # inside --drafters a,b lists
  t = registry.parse("layer-skip:1,3", k=3, tree=8)
  assert isinstance(t.tree, trees.Dynamic) and t.tree.n_nodes == 8
  assert "layer-skip[:L1,L2,...]" in registry.usage()

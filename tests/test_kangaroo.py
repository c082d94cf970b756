"""Kangaroo: the target's first layers plus a trained adapter, sharing the target's weights and
cache. Trained with `train_drafter(kind="adapter")`; greedy output equals plain greedy output
for chains (with and without the second early exit) and trees on a ragged batch; sampling is
exact; the adapter beats the bare prefix it starts from."""

import jax
import numpy as np
import pytest

import jaxspec
from jaxspec import drafters, trees
from jaxspec.drafters import kangaroo
from conftest import assert_second_and_third_follow_the_target, tiny_model

# one worker trains the module's adapter once (under --dist loadgroup each worker that runs a
# test here would otherwise train its own: ~33 s each)
pytestmark = [pytest.mark.usefixtures("fast_compile"), pytest.mark.xdist_group("kangaroo")]

PROMPTS = ["Once upon a time, there was a", "The little bird", "One day"]  # ragged
N_NEW = 32
EXIT = 2  # of stories260K's 5 layers


@pytest.fixture(scope="module")
def adapter(stories, tmp_path_factory):
  out = tmp_path_factory.mktemp("adapter")
  head = jaxspec.train.train_drafter(stories, kind="adapter", layers=EXIT, out_dir=str(out),
                                     steps=200, num_prompts=32, samples_per_prompt=2,
                                     seq_len=96, batch_size=16, eval_every=0, progress=False)
  return head, out


@pytest.fixture(scope="module")
def plain(stories):
  return jaxspec.generate(stories, PROMPTS, max_new_tokens=N_NEW, stop_tokens=())


CASES = {
    "chain-k1": lambda h: drafters.Kangaroo(h, k=1),
    "chain-k4": lambda h: drafters.Kangaroo(h, k=4),
    "chain-k4-stop": lambda h: drafters.Kangaroo(h, k=4, stop_below=0.6),
    "static-tree": lambda h: drafters.Kangaroo(h, tree=trees.Static.from_branching((2, 2))),
    "dynamic-tree": lambda h: drafters.Kangaroo(h, tree=trees.Dynamic(nodes=8, topk=2, depth=3)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_equals_plain(stories, plain, adapter, case):
  got = jaxspec.generate(stories, PROMPTS, max_new_tokens=N_NEW, drafter=CASES[case](adapter[0]),
                         stop_tokens=(), speculate="always")
  assert got.tokens == plain.tokens
  assert got.stats.mean_accepted > 1.3  # the adapter's drafts are accepted (the prefix: ~1.03)


def test_trained_adapter_beats_its_prefix_and_loads_from_the_run(stories, adapter):
  """The untrained adapter is the identity (EarlyExit's drafts, the same tau); 200 steps take
  the same prefix from tau ~1.0 to >= 2 (measured 2.59 at 300 steps); the run's folder loads."""
  head, out = adapter
  assert head.meta["kind"] == "adapter" and head.config.exit_layer == EXIT
  cfg = kangaroo.AdapterConfig(stories.config, exit_layer=EXIT)
  fresh = kangaroo.AdapterHead(params=kangaroo.init_params(cfg), config=cfg)
  tau = {}
  for name, d in [("prefix", drafters.EarlyExit(EXIT, k=4)),
                  ("untrained", drafters.Kangaroo(fresh, k=4)),
                  ("trained", drafters.Kangaroo(head, k=4)),
                  ("loaded", drafters.Kangaroo(str(out), k=4))]:
    got = jaxspec.generate(stories, PROMPTS, max_new_tokens=48, drafter=d, stop_tokens=(),
                           speculate="always")
    tau[name] = got.stats.mean_accepted
  assert tau["untrained"] == tau["prefix"] < 1.3, tau
  assert tau["trained"] == tau["loaded"] >= 2.0, tau


def _random_adapter(model, exit_layer, seed=1):
  """An adapter with random weights everywhere (its output projections too), so its drafts
  differ from the prefix's."""
  cfg = kangaroo.AdapterConfig(model.config, exit_layer=exit_layer)
  shapes = kangaroo.param_shapes_adapter(cfg)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: rng.standard_normal(s).astype(np.float32) * 0.3, shapes,
                        is_leaf=lambda s: isinstance(s, tuple))
  return kangaroo.AdapterHead(params=params, config=cfg)


@pytest.mark.parametrize("stop", [None, 0.2], ids=["chain", "chain-stop"])
def test_sampled_chains_are_exact(stop):
  """Temperature 1, 8192 rows, every round speculative, a random adapter after the first of a
  2-layer model's layers: the second and third tokens follow the target's law."""
  model = tiny_model(seed=3, max_seq_len=64)
  prompt = [5, 9, 2]
  d = drafters.Kangaroo(_random_adapter(model, 1), k=2, stop_below=stop)
  out = jaxspec.generate(model, [prompt] * 8192, drafter=d, max_new_tokens=3, stop_tokens=(),
                         temperature=1.0, seed=22, speculate="always")
  assert sum(sum(h[1:]) for h in out.stats.accepted) > 0
  assert_second_and_third_follow_the_target(model, prompt, out.tokens)


def test_bad_arguments(stories, adapter, tmp_path):
  head = adapter[0]
  small = tiny_model(seed=0)  # another dim and vocabulary
  with pytest.raises(ValueError, match="Kangaroo adapter head was trained for a model with dim"):
    jaxspec.generate(small, [[1, 2]], drafter=drafters.Kangaroo(head), max_new_tokens=2)
  deep = kangaroo.AdapterConfig(stories.config, exit_layer=5)
  bad = kangaroo.AdapterHead(params=kangaroo.init_params(deep), config=deep)
  with pytest.raises(ValueError, match="exits after layer 5; 'stories260K' has 5 layers"):
    jaxspec.generate(stories, ["hi"], drafter=drafters.Kangaroo(bad), max_new_tokens=2)
  with pytest.raises(ValueError, match="expected a 'adapter' head, got a 'eagle' checkpoint|"
                                       "not a 'adapter' head"):
    eagle = jaxspec.drafters.EagleHead(params={"x": np.zeros(2, np.float32)}, config=None)
    eagle.save(tmp_path / "eagle")
    drafters.Kangaroo(str(tmp_path / "eagle"))
  with pytest.raises(ValueError, match="needs a checkpoint"):
    drafters.registry.parse("kangaroo")
  for layers in (5, 7):  # (0 is not a positive integer, refused as for every kind)
    with pytest.raises(ValueError, match=r"layers must be the adapter's exit layer, an integer in "
                                         r"\[1, 4\]"):
      jaxspec.train.train_drafter(stories, kind="adapter", layers=layers,
                                  out_dir=str(tmp_path / "x"), steps=1)
  with pytest.raises(ValueError, match="draft_vocab must be None for kind 'adapter'"):
    jaxspec.train.train_drafter(stories, kind="adapter", draft_vocab=64,
                                out_dir=str(tmp_path / "y"), steps=1)
  assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()

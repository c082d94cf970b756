"""Per-layer weights and caches (`models.layout`): the same tokens as the stacked layout through
every path that reads layers (engine, drafters, trees, continuous batching, sharding,
checkpoints, exports), the "auto" rule, and the XLA flags jaxspec sets (`jaxspec.xla_flags`)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import STORY_PROMPTS, tiny_model, truncated
from jax.sharding import PartitionSpec as P

import jaxspec
from jaxspec import drafters, xla_flags
from jaxspec import sharding as sh
from jaxspec.models import KVCache, forward, layout

PROMPTS = STORY_PROMPTS
N_NEW = 20


@pytest.fixture(scope="module")
def per_layer():
  return jaxspec.load_model("stories260K", layers="per_layer", progress=False)


@pytest.fixture(scope="module")
def plain(stories):
  return jaxspec.generate(stories, PROMPTS, max_new_tokens=N_NEW, stop_tokens=()).tokens


def test_round_trip_and_helpers(stories, per_layer):
  assert not layout.is_per_layer(stories.params) and layout.is_per_layer(per_layer.params)
  assert isinstance(per_layer.params["layers"], tuple)
  assert layout.n_layers(per_layer.params) == layout.n_layers(stories.params) == 5
  for a, b in zip(jax.tree.leaves(layout.stacked(per_layer.params)),
                  jax.tree.leaves(stories.params)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(layout.layer(per_layer.params, 3)["w_up"],
                                stories.params["layers"]["w_up"][3])
  short = layout.first_layers(per_layer.params, 2)
  assert len(short["layers"]) == 2 and layout.n_layers(layout.first_layers(stories.params, 2)) == 2
  assert layout.layer_bytes(stories.params) == layout.layer_bytes(per_layer.params)
  assert layout.per_layer(per_layer.params) is per_layer.params  # already per-layer


def test_auto_rule(stories):
  big = {"embed": np.zeros((4, 8), np.float32),
         "layers": {"w": np.zeros((2, 1024, 8 << 10), np.float32)}}  # 32 MiB a layer
  assert layout.choose("auto", big, backend="cpu") == "per_layer"
  assert layout.choose("auto", big, backend="gpu") == "stacked"
  assert layout.choose("auto", big, jnp.bfloat16, backend="cpu") == "stacked"  # 16 MiB
  assert layout.choose("auto", stories.params, backend="cpu") == "stacked"
  assert layout.choose("per_layer", stories.params) == "per_layer"
  with pytest.raises(ValueError, match="layers must be one of"):
    layout.choose("rows", stories.params)
  with pytest.raises(ValueError, match="layers must be one of"):
    jaxspec.load_model("stories260K", layers="per-layer")


def test_forward_and_cache_match_stacked(stories, per_layer):
  cfg = stories.config
  toks = jnp.asarray([stories.tokenizer.encode("Once upon a time there was")] * 2)
  fwd = jax.jit(forward, static_argnums=(1,), static_argnames=("layer_ids",))
  a = fwd(stories.params, cfg, toks, KVCache.like(stories.params, cfg, 2, 32))
  b = fwd(per_layer.params, cfg, toks, KVCache.like(per_layer.params, cfg, 2, 32))
  assert b.cache.per_layer and not a.cache.per_layer and b.cache.size == 32 and b.cache.batch == 2
  np.testing.assert_allclose(b.logits, a.logits, atol=1e-5, rtol=1e-5)
  for i in range(cfg.n_layers):
    np.testing.assert_allclose(b.cache.k[i], a.cache.k[i], atol=1e-6)
    np.testing.assert_allclose(b.cache.v[i], a.cache.v[i], atol=1e-6)
  ids = (0, 2, 4)  # static layer skipping on per-layer weights
  np.testing.assert_allclose(fwd(per_layer.params, cfg, toks, b.cache, layer_ids=ids).logits,
                             fwd(stories.params, cfg, toks, a.cache, layer_ids=ids).logits,
                             atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="traced layer_ids need stacked layer weights"):
    jax.jit(lambda p, ids: forward(p, cfg, toks, layer_ids=ids))(per_layer.params,
                                                                 jnp.asarray([0, 1]))


@pytest.mark.parametrize("kind", ["ngram", "early-exit", "layer-skip", "draft", "ngram-tree",
                                  "draft-tree", "layer-skip-search"])
def test_greedy_equals_plain(stories, per_layer, plain, kind):
  """Speculative decoding on per-layer weights (the target's cache per-layer too) gives the
  stacked model's plain greedy tokens, for every drafter that reads the target's layers."""
  from jaxspec import trees
  d = {"ngram": lambda: drafters.NGram(n=3, k=4),
       "early-exit": lambda: drafters.EarlyExit(layers=3, k=3),
       "layer-skip": lambda: drafters.LayerSkip(layers=[0, 2, 4], k=3),
       "layer-skip-search": lambda: drafters.LayerSkip(k=3),
       "draft": lambda: drafters.DraftModel(truncated(per_layer, 2), k=3),
       "ngram-tree": lambda: drafters.NGram(n=3, k=3, tree=trees.Static.chains(2, 3)),
       "draft-tree": lambda: drafters.DraftModel(truncated(per_layer, 2), k=3,
                                                 tree=trees.Dynamic(nodes=8))}[kind]()
  out = jaxspec.generate(per_layer, PROMPTS, drafter=d, max_new_tokens=N_NEW, stop_tokens=())
  assert out.tokens == plain
  assert out.stats.mean_accepted >= 1.0


def test_sampling_identical_to_stacked(stories, per_layer):
  kw = dict(max_new_tokens=N_NEW, temperature=1.0, top_k=20, seed=7, stop_tokens=())
  a = jaxspec.generate(stories, PROMPTS, drafter=drafters.NGram(k=3), **kw)
  b = jaxspec.generate(per_layer, PROMPTS, drafter=drafters.NGram(k=3), **kw)
  assert a.tokens == b.tokens


def test_generate_many_refills_per_layer_cache(per_layer, plain):
  """Continuous batching inserts new rows into a per-layer cache (axis 0 of each buffer)."""
  done = list(jaxspec.generate_many(per_layer, PROMPTS, batch_size=2, max_new_tokens=N_NEW,
                                    stop_tokens=(), drafter=drafters.NGram(k=3)))
  assert [c.tokens for c in sorted(done, key=lambda c: c.index)] == plain


def test_sharded_per_layer(stories):
  mesh = sh.make_mesh(2, 4)
  m = jaxspec.load_model("stories260K", layers="per_layer", mesh=mesh, progress=False)
  assert m.params["layers"][0]["wq"].sharding.spec == P(None, "tensor")
  assert m.params["layers"][1]["w_down"].sharding.spec == P("tensor")
  cache = sh.shard_cache(KVCache.like(m.params, m.config, 2, 16), mesh)
  assert cache.k[0].sharding.spec[0] == "data"  # [B, S, K, H]: rows over data
  assert sh.param_axes(m.params)["layers"][0]["wq"] == (sh.EMBED, sh.HEADS, sh.HEAD_DIM)
  tokens = jnp.asarray([stories.tokenizer.encode("Once upon a time")] * 2)
  np.testing.assert_allclose(forward(m.params, m.config, tokens, cache).logits,
                             forward(stories.params, stories.config, tokens).logits,
                             atol=1e-4, rtol=1e-5)
  out = jaxspec.generate(m, PROMPTS, max_new_tokens=8, stop_tokens=(), mesh=mesh)
  assert out.tokens == [t[:8] for t in jaxspec.generate(stories, PROMPTS, max_new_tokens=8,
                                                         stop_tokens=()).tokens]


def test_checkpoint_and_export_write_stacked(per_layer, stories, tmp_path):
  from jaxspec import checkpoint
  from jaxspec.models import hf_names
  path = checkpoint.save(per_layer, tmp_path / "ck")
  back = jaxspec.load_model(path, layers="stacked")
  for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(stories.params)):
    np.testing.assert_array_equal(a, b)
  again = jaxspec.load_model(path, layers="per_layer")
  assert layout.is_per_layer(again.params)
  sd_a = hf_names.state_dict(stories.config, stories.params)
  sd_b = hf_names.state_dict(stories.config, per_layer.params)
  assert sd_a.keys() == sd_b.keys()
  for k in sd_a:
    np.testing.assert_array_equal(sd_a[k], sd_b[k])


def test_gather_slots_per_layer():
  m = tiny_model(seed=2, n_layers=3)
  cfg = m.config
  stacked_cache = KVCache.init(cfg, 2, 12)
  k = np.arange(np.prod(stacked_cache.k.shape), dtype=np.float32).reshape(stacked_cache.k.shape)
  a = stacked_cache.replace(k=jnp.asarray(k), v=jnp.asarray(-k))
  b = KVCache.init(cfg, 2, 12, per_layer=True).replace(
      k=tuple(jnp.asarray(x) for x in k), v=tuple(jnp.asarray(-x) for x in k))
  start, src = jnp.asarray([3, 9]), jnp.asarray([[0, 2, 1], [1, 0, 2]])  # row 1 runs past S
  got, want = b.gather_slots(start, src), a.gather_slots(start, src)
  for i in range(3):
    np.testing.assert_array_equal(got.k[i], want.k[i])
    np.testing.assert_array_equal(got.v[i], want.v[i])


# ----------------------------------------------------------------------------------- XLA flags


def test_xla_flags_rules(monkeypatch):
  env = {}
  assert xla_flags.wanted(env) == xla_flags.CPU_FLAGS  # this jaxlib is new enough
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert xla_flags.apply(env) == xla_flags.CPU_FLAGS
  assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8",
                                      *xla_flags.CPU_FLAGS]
  assert xla_flags.apply(env) == ()  # idempotent
  user = {"XLA_FLAGS": "--xla_cpu_enable_concurrency_optimized_scheduler=true"}
  assert xla_flags.apply(user) == () and "=true" in user["XLA_FLAGS"]  # the user's choice stays
  assert xla_flags.wanted({xla_flags.OPT_OUT: "0"}) == ()
  monkeypatch.setattr(xla_flags, "_jaxlib_version", lambda: (0, 4, 35))
  assert xla_flags.wanted({}) == ()  # an older jaxlib may not know the flag: never add it


def test_import_jaxspec_sets_flags_before_the_backend_starts():
  """`import jax; import jaxspec` (jax imported, no computation yet): the backend that starts
  next runs with the flag; with JAXSPEC_XLA_FLAGS=0 it does not."""
  code = ("import os, jax, jaxspec; from jaxspec import xla_flags; jax.numpy.ones(2).block_until_ready(); "
          "print(os.environ.get('XLA_FLAGS', ''), xla_flags.applied())")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True).stdout
  assert xla_flags.CPU_FLAGS[0] in out and out.strip().endswith("True")
  out = subprocess.run([sys.executable, "-c", code], env=dict(env, JAXSPEC_XLA_FLAGS="0"),
                       capture_output=True, text=True, check=True).stdout
  assert xla_flags.CPU_FLAGS[0] not in out and out.strip().endswith("False")
  late = ("import jax; jax.numpy.ones(2).block_until_ready(); import jaxspec; "
          "from jaxspec import xla_flags; print(xla_flags.applied())")
  out = subprocess.run([sys.executable, "-c", late], env=env, capture_output=True, text=True,
                       check=True).stdout
  assert out.strip() == "False"  # jax ran first: the flags could not reach this backend

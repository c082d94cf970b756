"""jaxspec.sharding: meshes, the logical-axis rules, sharded forward parity, no weight gathers."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config, tiny_model
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxspec
from jaxspec import sharding as sh
from jaxspec.models import KVCache, ModelConfig, forward, param_shapes

FWD = jax.jit(forward, static_argnums=(1,), static_argnames=("n_layers", "logits"))


# ----------------------------------------------------------------------------------------------
# make_mesh


@pytest.mark.parametrize("data,tensor,shape", [
    (1, 8, (1, 8)), (8, 1, (8, 1)), (2, 4, (2, 4)), (-1, 2, (4, 2)), (2, -1, (2, 4)),
    (1, 1, None)])
def test_make_mesh_shapes(data, tensor, shape):
  if shape is None:  # 1 x 1 over one device
    mesh = sh.make_mesh(data, tensor, devices=jax.devices()[:1])
    shape = (1, 1)
  else:
    mesh = sh.make_mesh(data, tensor)
  assert mesh.axis_names == ("data", "tensor")
  assert mesh.devices.shape == shape
  assert len(set(mesh.devices.flat)) == np.prod(shape)  # distinct devices
  assert set(mesh.devices.flat) <= set(jax.devices())


def test_make_mesh_subset_of_devices():
  mesh = sh.make_mesh(2, 2, devices=jax.devices()[4:])
  assert {d.id for d in mesh.devices.flat} == {d.id for d in jax.devices()[4:]}


@pytest.mark.parametrize("kw,match", [
    ({"data": 3, "tensor": 3}, r"data=3 x tensor=3 = 9 devices, but 8 are available"),
    ({"data": 1, "tensor": 4}, r"4 devices, but 8 are available"),
    ({"data": -1, "tensor": -1}, "only one of data / tensor may be -1"),
    ({"data": -1, "tensor": 3}, "8 devices cannot be split into groups of 3"),
    ({"data": 0, "tensor": 8}, "data must be a positive int or -1"),
    ({"data": 2, "tensor": 2.0}, "tensor must be a positive int or -1"),
])
def test_make_mesh_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    sh.make_mesh(**kw)


# ----------------------------------------------------------------------------------------------
# The rules


def test_logical_to_spec_drops_axes_that_do_not_divide():
  mesh = sh.make_mesh(4, 2)
  spec = lambda axes, shape: sh.logical_to_spec(axes, mesh, shape)
  assert spec((sh.KV_HEADS,), (4,)) == P("tensor")
  assert spec((sh.KV_HEADS,), (3,)) == P()  # 3 kv heads on tensor=2: replicated
  assert spec((sh.VOCAB, sh.EMBED), (64, 32)) == P("tensor")
  assert spec((sh.VOCAB, sh.EMBED), (49153, 32)) == P()
  assert spec((sh.BATCH, sh.LENGTH), (8, 5)) == P("data")
  assert spec((sh.BATCH, sh.LENGTH), (2, 5)) == P()  # 2 rows on data=4
  assert spec((sh.HEADS, sh.MLP), (4, 8)) == P("tensor")  # a mesh axis is used once
  assert spec((None, sh.HEADS), (3, 4)) == P(None, "tensor")
  assert sh.logical_to_spec((sh.HEADS,)) == P("tensor")  # no mesh, no shape: the raw rule
  one = sh.make_mesh(8, 1)
  assert sh.logical_to_sharding((sh.HEADS,), one, (3,)) == NamedSharding(one, P("tensor"))
  with pytest.raises(ValueError, match="unknown logical axis 'head'"):
    spec(("head",), (4,))
  with pytest.raises(ValueError, match="do not match an array of shape"):
    spec((sh.HEADS,), (4, 4))


def test_rules_table_is_small_and_complete():
  table = dict(sh.RULES)
  assert len(table) == len(sh.RULES) <= 12
  used = {a for axes in (*sh.PARAM_AXES.values(), *sh.CACHE_AXES.values()) for a in axes}
  assert used <= set(table)
  assert set(table.values()) <= {None, "data", "tensor"}


def test_param_axes_cover_every_param():
  cfg = tiny_config(qkv_bias=True, qk_norm=True, tied_embeddings=False)
  shapes = param_shapes(cfg)
  is_shape = lambda x: isinstance(x, tuple) and all(isinstance(d, int) for d in x)
  axes = sh.param_axes(shapes)
  pairs = zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)),
              jax.tree.leaves(shapes, is_leaf=is_shape))
  for ax, shape in pairs:
    assert len(ax) == len(shape) and any(a is not None for a in ax)
  assert axes["layers"]["wq"] == (sh.LAYERS, sh.EMBED, sh.HEADS, sh.HEAD_DIM)
  assert axes["layers"]["wo"] == (sh.LAYERS, sh.HEADS, sh.HEAD_DIM, sh.EMBED)
  assert axes["lm_head"] == (sh.EMBED, sh.VOCAB)


def test_param_shardings_accept_shapes_structs_and_arrays():
  model = tiny_model()
  mesh = sh.make_mesh(2, 4)
  structs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), model.params)
  a = sh.param_shardings(param_shapes(model.config), mesh)
  b = sh.param_shardings(structs, mesh)
  c = sh.param_shardings(model.params, mesh)
  assert a == b == c
  specs = jax.tree.map(lambda s: s.spec, c)
  assert specs["layers"]["wq"] == P(None, None, "tensor")  # 4 heads on tensor=4
  assert specs["layers"]["wk"] == P()  # 2 kv heads on tensor=4: replicated
  assert specs["layers"]["w_down"] == P(None, "tensor")
  assert specs["embed"] == P("tensor")
  assert specs["final_norm"] == P()
  # Leaves with unknown names (drafter heads) are replicated.
  other = sh.param_shardings({"medusa": {"w": (32, 64)}, "wq": (3,)}, mesh)
  assert other["medusa"]["w"].spec == P() and other["wq"].spec == P()


def test_cache_shardings():
  cfg = tiny_config()  # 2 kv heads
  mesh = sh.make_mesh(4, 2)
  abstract = jax.eval_shape(lambda: KVCache.init(cfg, 4, 16))
  s = sh.cache_shardings(abstract, mesh)
  assert isinstance(s, KVCache)
  assert s.k.spec == s.v.spec == P(None, "data", None, "tensor")
  assert s.lengths.spec == P("data")
  cache = sh.shard_cache(KVCache.init(cfg, 4, 16), mesh)
  assert cache.k.sharding == s.k and cache.lengths.sharding == s.lengths


def test_check_divisible():
  cfg = tiny_config()  # 4 query heads, 2 kv heads
  sh.check_divisible(cfg, sh.make_mesh(2, 4))
  sh.check_divisible(cfg, sh.make_mesh(8, 1))
  with pytest.raises(ValueError, match=r"4 query heads are not divisible by the mesh's tensor "
                                       r"axis \(8\); use a tensor size in \[1, 2, 4\]"):
    sh.check_divisible(cfg, sh.make_mesh(1, 8))
  smol = ModelConfig(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                     vocab_size=49152)
  sh.check_divisible(smol, sh.make_mesh(-1, 1, devices=jax.devices()[:3]))
  with pytest.raises(ValueError, match="9 query heads are not divisible"):
    sh.check_divisible(smol, sh.make_mesh(4, 2))
  with pytest.raises(ValueError, match="query heads are not divisible"):
    sh.shard_params(tiny_model().params, sh.make_mesh(1, 8), tiny_config())


# ----------------------------------------------------------------------------------------------
# Sharded forward


@pytest.fixture(scope="module")
def sharded():
  """A tiny model (4 heads, 2 kv heads), its params on a 2 x 4 mesh, and inputs."""
  model = tiny_model(seed=3)
  mesh = sh.make_mesh(2, 4)
  params = sh.shard_params(model.params, mesh, model.config)
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 64, (2, 5)), jnp.int32)
  return model, mesh, params, tokens


def test_sharded_params_are_split(sharded):
  model, mesh, params, _ = sharded
  wq = params["layers"]["wq"]
  assert wq.sharding == NamedSharding(mesh, P(None, None, "tensor"))
  assert {s.data.shape for s in wq.addressable_shards} == {(2, 32, 1, 8)}
  np.testing.assert_array_equal(wq, model.params["layers"]["wq"])


def test_sharded_forward_matches_unsharded(sharded):
  model, mesh, params, tokens = sharded
  cfg = model.config
  ref = FWD(model.params, cfg, tokens)
  got = FWD(params, cfg, tokens)
  np.testing.assert_allclose(got.logits, ref.logits, atol=1e-5, rtol=1e-5)

  # Prefill + one decode step with the cache sharded over data (and kv heads when they divide).
  cache = KVCache.init(cfg, 2, 16)
  ref1 = FWD(model.params, cfg, tokens, cache)
  got1 = FWD(params, cfg, tokens, sh.shard_cache(cache, mesh))
  np.testing.assert_allclose(got1.logits, ref1.logits, atol=1e-5, rtol=1e-5)
  nxt = tokens[:, :1]
  ref2 = FWD(model.params, cfg, nxt, ref1.cache)
  got2 = FWD(params, cfg, nxt, got1.cache)
  np.testing.assert_allclose(got2.logits, ref2.logits, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(got2.cache.k, ref2.cache.k, atol=1e-5, rtol=1e-5)


def test_load_model_onto_a_mesh(stories):
  mesh = sh.make_mesh(2, 4)
  m = jaxspec.load_model("stories260K", mesh=mesh)
  assert m.params["layers"]["wq"].sharding.spec == P(None, None, "tensor")
  tokens = jnp.asarray([stories.tokenizer.encode("Once upon a time")])
  np.testing.assert_allclose(FWD(m.params, m.config, tokens).logits,
                             FWD(stories.params, stories.config, tokens).logits,
                             atol=1e-4, rtol=1e-5)


_GATHER = re.compile(r"=\s*(.*?)\s+all-gather(?:-start)?\(")
_SHAPE = re.compile(r"[a-z]+\d*\[([\d,]*)\]")


def _all_gather_shapes(hlo: str) -> list[tuple[int, ...]]:
  """Result shapes of every all-gather in compiled HLO text."""
  out = []
  for m in _GATHER.finditer(hlo):
    for dims in _SHAPE.findall(m.group(1)):
      out.append(tuple(int(d) for d in dims.split(",") if d))
  return out


def _weight_shapes(params) -> set[tuple[int, ...]]:
  """Full weight shapes, stacked and per layer (the scan slices one layer at a time)."""
  out = set()
  for w in jax.tree.leaves(params):
    out.add(tuple(w.shape))
  for w in jax.tree.leaves(params["layers"]):
    out.add(tuple(w.shape[1:]))
  return {s for s in out if len(s) >= 2}  # matrices and up


def test_detector_sees_a_weight_all_gather(sharded):
  _, mesh, params, _ = sharded
  gather = jax.jit(lambda w: w * 2, out_shardings=NamedSharding(mesh, P()))
  hlo = gather.lower(params["layers"]["w_up"]).compile().as_text()
  assert (2, 32, 64) in _all_gather_shapes(hlo)


def test_sharded_forward_gathers_no_weight(sharded):
  model, mesh, params, tokens = sharded
  weights = _weight_shapes(model.params)
  cache = sh.shard_cache(KVCache.init(model.config, 2, 16), mesh)
  for args in [(tokens,), (tokens, cache), (tokens[:, :1], cache)]:
    hlo = FWD.lower(params, model.config, *args).compile().as_text()
    gathered = set(_all_gather_shapes(hlo))
    assert not gathered & weights, f"all-gathers of full weights: {gathered & weights}"
    assert "all-reduce" in hlo  # tensor parallelism really happened


# ----------------------------------------------------------------------------------------------
# initialize


@pytest.fixture
def fake_distributed(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  for name in ("JAXSPEC_COORDINATOR", "JAXSPEC_NUM_PROCESSES", "JAXSPEC_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  return calls


def test_initialize_single_process_is_a_no_op(fake_distributed):
  assert sh.initialize() is False
  assert sh.initialize(num_processes=1, process_id=0) is False
  assert fake_distributed == []


def test_initialize_from_args_and_env(fake_distributed, monkeypatch):
  assert sh.initialize("10.0.0.1:1234", 4, 2) is True
  monkeypatch.setenv("JAXSPEC_COORDINATOR", "host:99")
  monkeypatch.setenv("JAXSPEC_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAXSPEC_PROCESS_ID", "1")
  assert sh.initialize() is True
  assert sh.initialize(process_id=0, local_device_ids=[0]) is True  # args win over env
  assert fake_distributed == [
      dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2),
      dict(coordinator_address="host:99", num_processes=2, process_id=1),
      dict(coordinator_address="host:99", num_processes=2, process_id=0, local_device_ids=[0])]


def test_initialize_errors(fake_distributed, monkeypatch):
  with pytest.raises(ValueError, match="needs a coordinator address"):
    sh.initialize(num_processes=2, process_id=0)
  with pytest.raises(ValueError, match="out of range for 2 processes"):
    sh.initialize("h:1", 2, 5)
  monkeypatch.setenv("JAXSPEC_NUM_PROCESSES", "two")
  with pytest.raises(ValueError, match="JAXSPEC_NUM_PROCESSES must be an integer"):
    sh.initialize()
  assert fake_distributed == []

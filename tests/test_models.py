"""The forward pass: cached decoding, token trees, cache slot moves, early exit, RoPE, bf16.

Every check compares against `forward(params, config, tokens)` with no cache (a plain causal
recomputation). Right padding never changes a causal forward at earlier positions, so one
padded full forward gives the reference logits of every row at every step.

Letters: B batch, T new tokens, P padded prompt, S cache slots, V vocabulary.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config, tiny_model

from jaxspec.models import KVCache, forward, layout

# One jitted forward for the whole file; it recompiles only per config and shape.
FWD = jax.jit(forward, static_argnums=(1,),
              static_argnames=("n_layers", "layer_ids", "logits", "attn_chunk"))

ATOL = 2e-5  # fp32: cached and uncached paths differ only in reduction order
# A tree pass against root-path chains: other shapes, so other dot blocking and softmax sums
# (seen 5.7e-5 on a logit of 0.25 under a loaded CI machine); a wrong mask is off by O(1).
ATOL_TREE = 1e-4


pytestmark = pytest.mark.usefixtures("fast_compile")


def _randomize_norms(params, seed=1):
  """Replaces the all-ones norm weights of `init_params` so permutation checks see them."""
  key = jax.random.key(seed)

  def f(path, w):
    if "norm" not in jax.tree_util.keystr(path):
      return w
    k = jax.random.fold_in(key, hash(jax.tree_util.keystr(path)) % (2**31))
    return w * (1.0 + 0.3 * jax.random.normal(k, w.shape, w.dtype))

  return jax.tree_util.tree_map_with_path(f, params)


def _tiny(kind):
  if kind == "gqa":
    m = tiny_model(seed=0)  # 4 query heads, 2 kv heads
  else:
    m = tiny_model(seed=1, n_kv_heads=4)  # multi-head attention
  return m.config, _randomize_norms(m.params)


@pytest.fixture(params=["gqa", "mha", "stories", "gqa-per_layer", "stories-per_layer"])
def model(request):
  """(config, params) of a tiny random model (GQA, MHA) or of stories260K; `-per_layer` keeps
  the layers one pytree each (`models.layout`), and the tests' caches follow (`KVCache.like`)."""
  kind, _, per = request.param.partition("-")
  if kind == "stories":
    m = request.getfixturevalue("stories")
    cfg, params = m.config, m.params
  else:
    cfg, params = _tiny(kind)
  return cfg, (layout.per_layer(params) if per else params)


def _rows(x, starts, n):
  """x [B, T, ...] -> [B, n, ...]: row b's slice starts[b] .. starts[b] + n - 1."""
  idx = np.asarray(starts)[:, None] + np.arange(n)[None, :]
  return np.take_along_axis(np.asarray(x), idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


# ----------------------------------------------------------------------------------------------
# (1) cached decoding == full recomputation


# Attention over a 32-slot buffer: dense (one block), or live chunks of 12 slots (the last one
# shifted back to end at slot 32), of which only those below the longest row are read.
CHUNKS = [None, 12]


@pytest.mark.parametrize("chunk", CHUNKS)
def test_cached_decoding_matches_full_forward(model, chunk):
  cfg, params = model
  FWD = functools.partial(globals()["FWD"], attn_chunk=chunk)
  rng = np.random.default_rng(0)
  lens = np.array([5, 2, 7])  # ragged prompts
  b, p, steps, k1, total = len(lens), 8, 4, 4, 16
  seq = rng.integers(3, cfg.vocab_size, size=(b, total)).astype(np.int32)  # true sequences
  ref = np.asarray(FWD(params, cfg, jnp.asarray(seq)).logits)  # [B, total, V]

  # Prefill right-padded prompts; the padding is junk that must never be seen again.
  prompts = np.where(np.arange(p)[None] < lens[:, None], seq[:, :p],
                     rng.integers(3, cfg.vocab_size, size=(b, p))).astype(np.int32)
  cache = KVCache.like(params, cfg, b, 32)
  out = FWD(params, cfg, jnp.asarray(prompts), cache)
  np.testing.assert_array_equal(out.cache.lengths, [p] * b)
  for r in range(b):
    np.testing.assert_allclose(out.logits[r, :lens[r]], ref[r, :lens[r]], atol=ATOL, rtol=ATOL)
  cache = out.cache.rewind(jnp.asarray(lens))
  pos = lens.copy()

  # T = 1 decode steps.
  for _ in range(steps):
    out = FWD(params, cfg, jnp.asarray(_rows(seq, pos, 1)), cache)
    np.testing.assert_allclose(out.logits, _rows(ref, pos, 1), atol=ATOL, rtol=ATOL)
    cache, pos = out.cache, pos + 1
    np.testing.assert_array_equal(cache.lengths, pos)

  # A rejected chunk of junk, rolled back by rewinding, must leave no trace.
  junk = rng.integers(3, cfg.vocab_size, size=(b, k1)).astype(np.int32)
  cache = FWD(params, cfg, jnp.asarray(junk), cache).cache.rewind(jnp.asarray(pos))

  # A T = k + 1 verify chunk of the true continuation.
  out = FWD(params, cfg, jnp.asarray(_rows(seq, pos, k1)), cache)
  np.testing.assert_allclose(out.logits, _rows(ref, pos, k1), atol=ATOL, rtol=ATOL)

  # Rows accept different counts: rewind per row, then decode the next true token.
  accepted = np.array([0, 2, 4])
  pos = pos + accepted
  out = FWD(params, cfg, jnp.asarray(_rows(seq, pos, 1)), out.cache.rewind(jnp.asarray(pos)))
  np.testing.assert_allclose(out.logits, _rows(ref, pos, 1), atol=ATOL, rtol=ATOL)
  np.testing.assert_array_equal(out.cache.lengths, pos + 1)


@pytest.mark.parametrize("chunk", [4, 7, 16])
def test_attention_live_equals_dense_and_skips_dead_chunks(chunk):
  """Online-softmax chunks == one softmax over the buffer (GQA, ragged rows, a random mask),
  including a last chunk shifted back to end at S; chunks past `limit` are never read (NaN
  there would poison the output)."""
  from jaxspec.models import layers as nn

  rng = np.random.default_rng(chunk)
  b, t, n, kh, h, s, n_layers = 2, 3, 4, 2, 8, 22, 2
  q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
  kbuf = rng.standard_normal((n_layers, b, s, kh, h)).astype(np.float32)
  vbuf = rng.standard_normal((n_layers, b, s, kh, h)).astype(np.float32)
  for lengths in ([9, 19], [4, 9]):
    limit = max(lengths) + t
    slot = np.arange(s)[None, None, :]
    mask = (rng.random((b, t, s)) < 0.6) & (slot < np.asarray(lengths)[:, None, None] + t)
    mask[:, :, 0] = True  # every query sees something
    dense = nn.attention(q, jnp.asarray(kbuf[1]), jnp.asarray(vbuf[1]), jnp.asarray(mask))
    k_dead, v_dead = kbuf.copy(), vbuf.copy()
    first_unread = -(-limit // chunk) * chunk
    k_dead[:, :, first_unread:] = np.nan
    v_dead[:, :, first_unread:] = np.nan
    live = nn.attention_live(q, jnp.asarray(k_dead[1]), jnp.asarray(v_dead[1]),
                             jnp.asarray(mask), jnp.asarray(limit), chunk)
    np.testing.assert_allclose(live, dense, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# (2) token trees


# Two trees of 7 nodes as parent lists (node 0 is the root; a parent precedes its children).
TREES = ([-1, 0, 0, 1, 1, 2, 4], [-1, 0, 1, 0, 3, 3, 5])


def _tree_arrays(parents):
  """parents [T] -> (ancestor-or-self mask [T, T] bool, depth [T], root paths list[list[int]])."""
  t = len(parents)
  mask = np.zeros((t, t), bool)
  depth = np.zeros(t, np.int32)
  paths = []
  for i in range(t):
    path, j = [], i
    while j >= 0:
      path.append(j)
      mask[i, j] = True
      j = parents[j]
    depth[i] = len(path) - 1
    paths.append(path[::-1])
  return mask, depth, paths


def _tree_setup(cfg, params, rng):
  """Prefills a ragged batch and returns what a tree step needs and the reference logits.

  Returns (cache, lens, tree_tokens [B, T], mask [B, T, T], positions [B, T], paths, ref)
  where ref[b][i] are the full-forward logits of prompt_b + the tokens on node i's root path.
  """
  lens = np.array([3, 5])
  b, p, t = 2, 8, len(TREES[0])
  prompts = rng.integers(3, cfg.vocab_size, size=(b, p)).astype(np.int32)
  cache = KVCache.like(params, cfg, b, 32)
  cache = FWD(params, cfg, jnp.asarray(prompts), cache).cache.rewind(jnp.asarray(lens))
  tokens = rng.integers(3, cfg.vocab_size, size=(b, t)).astype(np.int32)
  arrays = [_tree_arrays(pa) for pa in TREES]
  mask = np.stack([a[0] for a in arrays])
  positions = lens[:, None] + np.stack([a[1] for a in arrays])
  paths = [a[2] for a in arrays]
  chains = np.zeros((b * t, 16), np.int32)  # every root path as its own (right-padded) row
  for r in range(b):
    for i, path in enumerate(paths[r]):
      chain = list(prompts[r, :lens[r]]) + list(tokens[r, path])
      chains[r * t + i, :len(chain)] = chain
  full = np.asarray(FWD(params, cfg, jnp.asarray(chains)).logits)
  ref = [[full[r * t + i, lens[r] + len(paths[r][i]) - 1] for i in range(t)] for r in range(b)]
  return cache, lens, tokens, mask, positions, paths, np.asarray(ref), prompts


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("model", ["gqa", "stories", "stories-per_layer"], indirect=True)
def test_tree_mask_matches_root_path_chains(model, chunk):
  cfg, params = model
  FWD = functools.partial(globals()["FWD"], attn_chunk=chunk)
  rng = np.random.default_rng(1)
  cache, lens, tokens, mask, positions, _, ref, _ = _tree_setup(cfg, params, rng)
  out = FWD(params, cfg, jnp.asarray(tokens), cache, positions=jnp.asarray(positions),
            tree_mask=jnp.asarray(mask))
  np.testing.assert_allclose(out.logits, ref, atol=ATOL_TREE, rtol=ATOL_TREE)
  np.testing.assert_array_equal(out.cache.lengths, lens + tokens.shape[1])


def test_tree_mask_without_cache_and_shared_2d_mask():
  cfg, params = _tiny("gqa")
  mask, depth, paths = _tree_arrays(TREES[0])
  tokens = np.random.default_rng(2).integers(3, cfg.vocab_size, size=(1, len(paths)))
  out = FWD(params, cfg, jnp.asarray(tokens, jnp.int32), positions=jnp.asarray(depth)[None],
            tree_mask=jnp.asarray(mask))
  chains = np.zeros((len(paths), 8), np.int32)
  for i, path in enumerate(paths):
    chains[i, :len(path)] = tokens[0, path]
  full = np.asarray(FWD(params, cfg, jnp.asarray(chains)).logits)
  ref = np.stack([full[i, len(path) - 1] for i, path in enumerate(paths)])
  np.testing.assert_allclose(out.logits[0], ref, atol=ATOL_TREE, rtol=ATOL_TREE)


# ----------------------------------------------------------------------------------------------
# (3) KVCache.gather_slots


def test_gather_slots_moves_entries():
  cfg = tiny_config(n_layers=2, n_kv_heads=2, dim=16, n_heads=4)
  c0 = KVCache.init(cfg, 3, 12)
  shape = c0.k.shape  # [L, B, S, K, H]
  k = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
  cache = c0.replace(k=jnp.asarray(k), v=jnp.asarray(-k), lengths=jnp.asarray([4, 2, 10]))
  start = np.array([4, 2, 10])
  src = np.array([[0, 2, 5], [0, 1, 2], [1, 0, 1]])  # row 2's last write is past S=12: dropped
  out = jax.jit(KVCache.gather_slots)(cache, jnp.asarray(start), jnp.asarray(src))
  want = k.copy()
  for b in range(3):
    for j in range(src.shape[1]):
      if start[b] + j < shape[2]:
        want[:, b, start[b] + j] = k[:, b, start[b] + src[b, j]]
  np.testing.assert_array_equal(out.k, want)
  np.testing.assert_array_equal(out.v, -want)
  np.testing.assert_array_equal(out.lengths, cache.lengths)  # lengths are the caller's business


@pytest.mark.parametrize("model", ["gqa", "stories", "stories-per_layer"], indirect=True)
def test_gather_slots_commits_tree_path(model):
  """Tree verify, move the accepted path to contiguous slots, then decode on top of it."""
  cfg, params = model
  rng = np.random.default_rng(3)
  cache, lens, tokens, mask, positions, paths, _, prompts = _tree_setup(cfg, params, rng)
  out = FWD(params, cfg, jnp.asarray(tokens), cache, positions=jnp.asarray(positions),
            tree_mask=jnp.asarray(mask))
  accept = [paths[0][6], paths[1][2]]  # a depth-3 path and a depth-2 path
  src = np.array([a + [a[-1]] * (4 - len(a)) for a in accept])  # padded; extra slots are dead
  n = np.array([len(a) for a in accept])
  cache = out.cache.gather_slots(jnp.asarray(lens), jnp.asarray(src)).rewind(jnp.asarray(lens + n))
  nxt = rng.integers(3, cfg.vocab_size, size=(2, 1)).astype(np.int32)
  got = FWD(params, cfg, jnp.asarray(nxt), cache).logits[:, 0]
  chains = np.zeros((2, 16), np.int32)
  for r in range(2):
    chain = list(prompts[r, :lens[r]]) + list(tokens[r, accept[r]]) + [nxt[r, 0]]
    chains[r, :len(chain)] = chain
  full = np.asarray(FWD(params, cfg, jnp.asarray(chains)).logits)
  ref = full[np.arange(2), lens + n]
  np.testing.assert_allclose(got, ref, atol=ATOL, rtol=ATOL)


# ----------------------------------------------------------------------------------------------
# (4) early exit


@pytest.mark.parametrize("n_layers", [1, 2])
def test_early_exit_equals_truncated_model(n_layers):
  m = tiny_model(seed=4, n_layers=3)
  cfg, params = m.config, _randomize_norms(m.params)
  short_cfg = dataclasses.replace(cfg, n_layers=n_layers)
  short = dict(params, layers=jax.tree.map(lambda w: w[:n_layers], params["layers"]))
  tokens = jnp.asarray(np.random.default_rng(4).integers(3, cfg.vocab_size, size=(2, 6)),
                       jnp.int32)

  got = FWD(params, cfg, tokens, KVCache.init(cfg, 2, 16), n_layers=n_layers)
  want = FWD(short, short_cfg, tokens, KVCache.init(short_cfg, 2, 16))
  np.testing.assert_allclose(got.logits, want.logits, atol=ATOL, rtol=ATOL)
  np.testing.assert_allclose(got.hidden, want.hidden, atol=ATOL, rtol=ATOL)
  np.testing.assert_allclose(got.cache.k[:n_layers], want.cache.k, atol=ATOL, rtol=ATOL)
  np.testing.assert_allclose(got.cache.v[:n_layers], want.cache.v, atol=ATOL, rtol=ATOL)
  assert not np.any(np.asarray(got.cache.k[n_layers:]))  # deeper layers untouched
  np.testing.assert_array_equal(got.cache.lengths, [6, 6])


@pytest.mark.parametrize("ids", [(0, 2), (1, 3), (0, 1, 3)])
def test_layer_ids_equal_model_of_those_layers(ids):
  """Layer skipping: forward(layer_ids=ids) is the model built from only those layers'
  weights, through a cache (prefill then one decode step); skipped layers' cache stays put."""
  m = tiny_model(seed=6, n_layers=4)
  cfg, params = m.config, _randomize_norms(m.params)
  sub_cfg = dataclasses.replace(cfg, n_layers=len(ids))
  sub = dict(params, layers=jax.tree.map(lambda w: w[np.asarray(ids)], params["layers"]))
  rng = np.random.default_rng(6)
  tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, size=(2, 6)), jnp.int32)
  step = jnp.asarray(rng.integers(3, cfg.vocab_size, size=(2, 1)), jnp.int32)

  got = FWD(params, cfg, tokens, KVCache.init(cfg, 2, 16), layer_ids=ids)
  want = FWD(sub, sub_cfg, tokens, KVCache.init(sub_cfg, 2, 16))
  got = FWD(params, cfg, step, got.cache, layer_ids=ids)
  want = FWD(sub, sub_cfg, step, want.cache)
  np.testing.assert_allclose(got.logits, want.logits, atol=ATOL, rtol=ATOL)
  np.testing.assert_allclose(got.hidden, want.hidden, atol=ATOL, rtol=ATOL)
  np.testing.assert_allclose(got.cache.k[np.asarray(ids)], want.cache.k, atol=ATOL, rtol=ATOL)
  np.testing.assert_allclose(got.cache.v[np.asarray(ids)], want.cache.v, atol=ATOL, rtol=ATOL)
  skipped = [i for i in range(cfg.n_layers) if i not in ids]
  assert not np.any(np.asarray(got.cache.k[np.asarray(skipped)]))
  np.testing.assert_array_equal(got.cache.lengths, [7, 7])
  prefix = FWD(params, cfg, tokens, n_layers=2).logits  # n_layers=n is layer_ids=range(n)
  np.testing.assert_allclose(FWD(params, cfg, tokens, layer_ids=range(2)).logits, prefix,
                             atol=ATOL, rtol=ATOL)
  for bad in [(), (1, 0), (0, 4), (0, 0)]:
    with pytest.raises(ValueError, match="layer_ids"):
      FWD(params, cfg, tokens, layer_ids=bad)


# ----------------------------------------------------------------------------------------------
# (5) RoPE layouts


def _half_perm(h):
  """Head-dim permutation taking interleaved pairs (2i, 2i+1) to half pairs (i, i + h/2)."""
  return np.concatenate([np.arange(0, h, 2), np.arange(1, h, 2)])


@pytest.mark.parametrize("extra", [{}, {"qkv_bias": True, "qk_norm": True}],
                         ids=["plain", "bias+qknorm"])
def test_rope_layouts_equivalent_under_permutation(extra):
  from jaxspec.models import init_params
  cfg = tiny_config(rope_layout="interleaved", **extra)
  params = _randomize_norms(init_params(cfg, jax.random.key(5), jnp.float32, scale=0.5))
  perm = _half_perm(cfg.head_dim)
  lay = dict(params["layers"])
  for name in ("wq", "wk", "bq", "bk", "q_norm", "k_norm"):  # everything on q/k's head dim
    if name in lay:
      lay[name] = lay[name][..., perm]
  half_cfg = dataclasses.replace(cfg, rope_layout="half")
  half = dict(params, layers=lay)

  tokens = jnp.asarray(np.random.default_rng(5).integers(3, cfg.vocab_size, size=(2, 6)),
                       jnp.int32)
  positions = jnp.asarray([[100, 101, 102, 103, 104, 105], [0, 7, 30, 31, 200, 255]], jnp.int32)
  a = FWD(params, cfg, tokens, positions=positions).logits
  b = FWD(half, half_cfg, tokens, positions=positions).logits
  np.testing.assert_allclose(a, b, atol=ATOL, rtol=ATOL)
  c = FWD(params, half_cfg, tokens, positions=positions).logits  # the permutation matters
  assert np.max(np.abs(np.asarray(a) - np.asarray(c))) > 1e-2


# ----------------------------------------------------------------------------------------------
# (6) bfloat16


def test_bf16_params_close_to_fp32(stories):
  cfg, params = stories.config, stories.params
  bf = jax.tree.map(lambda w: w.astype(jnp.bfloat16), params)
  tokens = jnp.asarray([[1, 403, 407, 261, 378, 432, 383, 286],
                        [1, 261, 376, 298, 315, 421, 395, 317]], jnp.int32)
  ref = np.asarray(FWD(params, cfg, tokens).logits)

  full = FWD(bf, cfg, tokens)
  assert full.logits.dtype == jnp.float32
  assert full.hidden.dtype == jnp.bfloat16
  cached = FWD(bf, cfg, tokens, KVCache.init(cfg, 2, 16, jnp.bfloat16))
  assert cached.logits.dtype == jnp.float32
  assert cached.cache.k.dtype == jnp.bfloat16
  scale = np.abs(ref).max()
  for got in (np.asarray(full.logits), np.asarray(cached.logits)):
    assert np.all(np.isfinite(got))
    assert np.abs(got - ref).max() < 0.05 * scale
    assert np.mean(got.argmax(-1) == ref.argmax(-1)) >= 0.9

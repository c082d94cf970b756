"""Orbax checkpoints: bit-identical round trips of models (with their tokenizers) and heads."""

import dataclasses
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

import jaxspec
from jaxspec import checkpoint
from jaxspec.models import ByteTokenizer, Model, ModelConfig, forward, param_shapes

FWD = jax.jit(forward, static_argnums=(1,))


def tiny_model(seed=0, **kw):
  """A small random model; numpy init (no per-shape compiles, unlike `init_params`)."""
  cfg = tiny_config(**kw)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.5, s).astype(np.float32)),
                        param_shapes(cfg), is_leaf=lambda s: isinstance(s, tuple))
  return Model(cfg, params, ByteTokenizer(vocab=cfg.vocab_size), name=f"tiny{seed}")


def _timed(fn, *args, **kw):
  t = time.perf_counter()
  out = fn(*args, **kw)
  return out, time.perf_counter() - t


def _report(capsys, what, save_s, load_s):
  with capsys.disabled():
    print(f"\n  [checkpoint] {what}: save {save_s * 1e3:.0f} ms, load {load_s * 1e3:.0f} ms")


def _assert_same_params(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _round_trip(model, path, capsys, what):
  path, save_s = _timed(jaxspec.save_checkpoint, model, path)
  back, load_s = _timed(jaxspec.load_model, path)
  _report(capsys, what, save_s, load_s)
  assert back.config == model.config and back.name == model.name
  _assert_same_params(model.params, back.params)
  ids = jnp.asarray(np.random.default_rng(0).integers(3, model.config.vocab_size, (2, 10)))
  np.testing.assert_array_equal(np.asarray(FWD(model.params, model.config, ids).logits),
                                np.asarray(FWD(back.params, back.config, ids).logits))
  return back


def test_stories_round_trip(stories, tmp_path, capsys):
  back = _round_trip(stories, tmp_path / "stories", capsys, "stories260K")
  tok, ref = back.tokenizer, stories.tokenizer
  assert type(tok) is type(ref)
  assert (tok.bos_id, tok.eos_ids, tok.add_bos, tok.vocab_size) == (
      ref.bos_id, ref.eos_ids, ref.add_bos, ref.vocab_size)
  text = "Once upon a time, there was a little girl named Lily."
  assert tok.encode(text) == ref.encode(text)
  assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text))
  assert os.path.exists(tmp_path / "stories" / "tokenizer.model")


def test_hf_round_trip(tmp_path, capsys):
  test_hf = pytest.importorskip("test_hf")  # needs torch + transformers
  src = tmp_path / "hf"
  test_hf.build_hf("qwen2-bias").save_pretrained(src)
  test_hf._train_bpe(src, add_bos_token=True)
  model = jaxspec.load_model(str(src), progress=False)
  back = _round_trip(model, tmp_path / "orbax", capsys, "tiny HF Qwen2 + tokenizer")
  tok, ref = back.tokenizer, model.tokenizer
  assert (tok.bos_id, tok.eos_ids, tok.add_bos, tok.special_tokens, tok.chat_template) == (
      ref.bos_id, ref.eos_ids, ref.add_bos, ref.special_tokens, ref.chat_template)
  for text in test_hf.TEXTS:
    assert tok.encode(text) == ref.encode(text)
    assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text))
  assert tok.apply_chat_template(test_hf.MESSAGES, tokenize=True) == ref.apply_chat_template(
      test_hf.MESSAGES, tokenize=True)


def test_byte_tokenizer_and_dtype(tmp_path):
  model = tiny_model(seed=3, qkv_bias=True, qk_norm=True, tied_embeddings=False)
  path = jaxspec.save_checkpoint(model, tmp_path / "tiny")
  back = jaxspec.load_model(path)
  assert back.tokenizer == model.tokenizer
  _assert_same_params(model.params, back.params)
  half = jaxspec.load_model(path, dtype="bfloat16")
  assert half.dtype == jnp.bfloat16
  _assert_same_params(jax.tree.map(lambda x: x.astype(jnp.bfloat16), model.params), half.params)
  with open(os.path.join(path, checkpoint.META_FILE)) as f:
    assert json.load(f)["dtype"] == "float32"


def test_rope_scaling_config_round_trip(tmp_path):
  from jaxspec.models import RopeScaling
  model = tiny_model(seed=4, rope_scaling=RopeScaling(factor=4.0), head_dim=16)
  back = jaxspec.load_model(jaxspec.save_checkpoint(model, tmp_path / "scaled"))
  assert back.config == model.config and back.config.rope_scaling.factor == 4.0


def test_overwrite_and_foreign_directories(tmp_path):
  model = tiny_model(seed=5)
  path = jaxspec.save_checkpoint(model, tmp_path / "ckpt")
  with pytest.raises(FileExistsError, match="overwrite=True"):
    jaxspec.save_checkpoint(model, path)
  other = tiny_model(seed=6)
  jaxspec.save_checkpoint(other, path, overwrite=True)
  _assert_same_params(other.params, jaxspec.load_model(path).params)
  os.remove(os.path.join(path, checkpoint.META_FILE))  # as if a save had died midway
  with pytest.raises(FileExistsError, match="unfinished"):
    jaxspec.save_checkpoint(model, path)
  jaxspec.save_checkpoint(model, path, overwrite=True)
  _assert_same_params(model.params, jaxspec.load_model(path).params)
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="not a jaxspec checkpoint"):
    jaxspec.save_checkpoint(model, foreign, overwrite=True)


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  n_heads: int
  widths: tuple[int, ...]
  target: ModelConfig


@dataclasses.dataclass
class Head:
  params: dict
  config: HeadConfig
  kind: str = "medusa"


def test_head_round_trip(tmp_path):
  target = tiny_model(seed=7).config
  key = jax.random.key(0)
  params = {"w": jax.random.normal(key, (3, 32, 32)), "b": jnp.zeros((3, 32), jnp.bfloat16)}
  head = Head(params, HeadConfig(n_heads=3, widths=(1, 2), target=target))
  path = jaxspec.save_checkpoint(head, tmp_path / "head", meta={"steps": 10})
  got = checkpoint.load_head(path)
  assert got.kind == "medusa" and got.meta == {"steps": 10}
  assert got.config == head.config  # rebuilt dataclasses, tuples kept
  _assert_same_params(params, got.params)
  with pytest.raises(ValueError, match="'medusa' checkpoint, not a model.*load_head"):
    jaxspec.load_model(path)

  plain = jaxspec.save_checkpoint(params, tmp_path / "plain", meta={"kind": "eagle", "lr": 1e-3})
  got = checkpoint.load_head(plain)
  assert (got.kind, got.meta, got.config) == ("eagle", {"lr": 1e-3}, None)
  _assert_same_params(params, got.params)
  with pytest.raises(ValueError, match="needs a kind"):
    jaxspec.save_checkpoint(params, tmp_path / "nokind")
  with pytest.raises(ValueError, match="holds a model"):
    checkpoint.load_head(jaxspec.save_checkpoint(tiny_model(), tmp_path / "model"))


def test_damaged_checkpoints(tmp_path):
  model = tiny_model(seed=8)
  path = jaxspec.save_checkpoint(model, tmp_path / "ckpt")
  meta = os.path.join(path, checkpoint.META_FILE)
  with open(meta) as f:
    info = json.load(f)
  info["config"]["hidden_dim"] = 48
  with open(meta, "w") as f:
    json.dump(info, f)
  with pytest.raises(ValueError, match="do not match the model config"):
    jaxspec.load_model(path)
  info["config"]["hidden_dim"] = model.config.hidden_dim
  info["config"]["sliding"] = 3
  with open(meta, "w") as f:
    json.dump(info, f)
  with pytest.raises(ValueError, match=r"unknown model config fields \['sliding'\]"):
    jaxspec.load_model(path)
  with open(meta, "w") as f:
    f.write("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    jaxspec.load_model(path)
  other = jaxspec.save_checkpoint(model, tmp_path / "other")
  shutil.rmtree(os.path.join(other, checkpoint.PARAMS_DIR))
  with pytest.raises(FileNotFoundError, match="no params/ directory"):
    jaxspec.load_model(other)


def test_mesh(tmp_path):
  model = tiny_model(seed=9)
  path = jaxspec.save_checkpoint(model, tmp_path / "ckpt")
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "tensor"))
  import jaxspec.sharding as sh
  if not hasattr(sh, "param_shardings"):
    with pytest.raises(NotImplementedError, match="param_shardings"):
      jaxspec.load_model(path, mesh=mesh)
    return
  back = jaxspec.load_model(path, mesh=mesh)
  _assert_same_params(model.params, back.params)
  wq = back.params["layers"]["wq"]
  assert isinstance(wq.sharding, jax.sharding.NamedSharding) and wq.sharding.mesh == mesh

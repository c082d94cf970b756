"""Loaders and tokenizers: stories260K (llama2.c), SmolLM2 (GGUF), GGUF round trips, bad input.

Tiny GGUF files are written here with `gguf.GGUFWriter`, so the quantized formats are checked
against `gguf.quants` without any downloaded model.
"""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DATA, SMOLLM_GGUF, tiny_config

import jaxspec
from jaxspec.models import forward, param_shapes
from jaxspec.models.load import embedded_path

FWD = jax.jit(forward, static_argnums=(1,), static_argnames=("n_layers", "logits"))
SMOLLM_DIR = DATA / "smollm2-135m"
STORIES_BIN = os.path.join(embedded_path("stories260K"), "stories260K.bin")


def _golden(folder):
  with open(folder / "golden_greedy.json") as f:
    return json.load(f)["cases"]


def _greedy(model, prompts, n):
  """n greedy tokens per prompt by full recomputation (no cache) over one padded shape."""
  width = max(len(p) for p in prompts) + n
  buf = np.zeros((len(prompts), width), np.int32)
  lens = np.array([len(p) for p in prompts])
  for r, p in enumerate(prompts):
    buf[r, :len(p)] = p
  for _ in range(n):
    logits = FWD(model.params, model.config, jnp.asarray(buf)).logits
    nxt = np.asarray(jnp.argmax(logits[jnp.arange(len(prompts)), lens - 1], -1))
    buf[np.arange(len(prompts)), lens] = nxt
    lens = lens + 1
  return [buf[r, len(p):len(p) + n].tolist() for r, p in enumerate(prompts)]


# ----------------------------------------------------------------------------------------------
# stories260K


def test_stories_config(stories):
  c = stories.config
  assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim) == (
      64, 172, 5, 8, 4, 8)
  assert (c.vocab_size, c.max_seq_len, c.norm_eps, c.rope_theta) == (512, 512, 1e-5, 10000.0)
  assert c.rope_layout == "interleaved" and c.tied_embeddings and not c.qkv_bias
  assert stories.params["embed"].dtype == jnp.float32
  assert "lm_head" not in stories.params


def test_stories_tokenizer(stories):
  tok = stories.tokenizer
  assert tok.encode("Once upon a time") == [1, 403, 407, 261, 378]
  assert tok.vocab_size == 512 and tok.bos_id == 1 and set(tok.eos_ids) == {1, 2}
  for s in ["Once upon a time", "Lily had 3 cats and 12 dogs.", "café naïve", "你好 🙂", "a\nb"]:
    assert tok.decode(tok.encode(s)) == s


def test_stories_greedy_matches_golden(stories):
  # tests/data/stories260K/golden_greedy.json: llama2.c run.c, temperature 0.
  prompt = stories.tokenizer.encode("Once upon a time")
  want = [432, 383, 286, 261, 376, 298, 315, 421, 395, 317]
  assert _greedy(stories, [prompt], 10)[0] == want
  assert stories.tokenizer.decode(prompt + want) == ("Once upon a time, there was a little "
                                                        "girl named Lily")


def test_stories_bin_from_a_path(tmp_path, stories):
  path = tmp_path / "model.bin"
  shutil.copy(STORIES_BIN, path)
  m = jaxspec.load_model(str(path))
  assert m.config == stories.config and m.tokenizer is None  # no tok512.model beside it
  jax.tree.map(np.testing.assert_array_equal, m.params, stories.params)


def test_dtype_argument():
  m = jaxspec.load_model("stories260K", dtype="bfloat16")
  assert all(w.dtype == jnp.bfloat16 for w in jax.tree.leaves(m.params))


# ----------------------------------------------------------------------------------------------
# SmolLM2 (GGUF, Q4_1)

TOKENIZER_STRINGS = [
    "Once upon a time",
    "The capital of France is",
    "In 2024, pi was 3.14159 and 1000000 people agreed.",
    "  leading spaces,\ttabs\nand newlines\n\n",
    "café naïve Zürich résumé",
    "你好，世界。東京は日本の首都です。",
    "emoji 🙂👍🏽 and 🇫🇷",
    "don't stop-believin' <b>HTML</b> x**2 + y_1",
]


@pytest.fixture(scope="module")
def reference_bpe():
  """The SmolLM2 vocabulary read by gguf-py and handed to the `tokenizers` library directly
  (digits split first), independent of jaxspec's reader."""
  import gguf
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  if not SMOLLM_GGUF.exists():
    pytest.skip("SmolLM2 GGUF not found; `python -m jaxspec.fetch smollm2-135m`")
  fields = gguf.GGUFReader(str(SMOLLM_GGUF)).fields
  tokens = fields["tokenizer.ggml.tokens"].contents()
  merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
  tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tok.decoder = decoders.ByteLevel()
  return tok


def test_smollm_config(smollm):
  c = smollm.config
  assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim) == (
      576, 1536, 30, 9, 3, 64)
  assert (c.vocab_size, c.max_seq_len, c.rope_theta) == (49152, 8192, 100000.0)
  assert c.rope_layout == "interleaved" and c.tied_embeddings and c.arch == "gguf-llama"


def test_smollm_tokenizer_golden_prompts(smollm):
  tok = smollm.tokenizer
  for case in _golden(SMOLLM_DIR):
    assert tok.encode(case["prompt"]) == case["prompt_ids"]
  assert tok.bos_id == 1 and tok.eos_ids == (2,) and not tok.add_bos
  assert tok.vocab_size == 49152


def test_smollm_tokenizer_matches_reference_bpe(smollm, reference_bpe):
  tok = smollm.tokenizer
  for s in TOKENIZER_STRINGS:
    ids = tok.encode(s)
    assert ids == reference_bpe.encode(s).ids, s
    assert tok.decode(ids) == s
  assert tok.encode("2024") == [tok.encode(d)[0] for d in "2024"]  # one token per digit


def test_smollm_chat_template(smollm):
  tok = smollm.tokenizer
  msgs = [{"role": "user", "content": "What is the capital of France?"}]
  assert tok.apply_chat_template(msgs) == (
      "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
      "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
      "<|im_start|>assistant\n")
  msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello!"}]
  text = tok.apply_chat_template(msgs, add_generation_prompt=False)
  assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                  "<|im_start|>assistant\nHello!<|im_end|>\n")
  ids = tok.apply_chat_template(msgs, add_generation_prompt=False, tokenize=True)
  assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 3  # specials are single ids
  assert tok.decode(ids) == text


def test_smollm_greedy_matches_golden(smollm):
  cases = _golden(SMOLLM_DIR)
  got = _greedy(smollm, [c["prompt_ids"] for c in cases], 10)
  for c, g in zip(cases, got):
    n = len(c["prompt_ids"])
    assert g == c["output_ids"][n:n + 10], c["prompt"]


# ----------------------------------------------------------------------------------------------
# Tiny GGUF files written here

CHATML = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + "
          "'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{'<|im_start|>assistant\n'}}{% endif %}")


def _tiny_vocab(size):
  """A byte-level BPE vocabulary of `size` tokens: 3 specials, 'Ġ', a-z, merges, digits, fill."""
  import string
  tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "Ġ"] + list(string.ascii_lowercase)
  merges = []
  for a, b in [("Ġ", "a"), ("Ġ", "t"), ("a", "b"), ("Ġa", "b")]:
    merges.append(f"{a} {b}")
    tokens.append(a + b)
  tokens += [str(d) for d in range(10)]
  tokens += [f"<extra_{i}>" for i in range(size - len(tokens))]
  assert len(tokens) == size
  return tokens, merges


def _to_gguf_layout(cfg, params):
  """jaxspec params -> {GGUF tensor name: float32 numpy array in llama.cpp's [out, in] layout}."""
  lay = jax.tree.map(np.asarray, params["layers"])
  D = cfg.dim
  out = {"token_embd.weight": np.asarray(params["embed"]),
         "output_norm.weight": np.asarray(params["final_norm"])}
  if not cfg.tied_embeddings:
    out["output.weight"] = np.asarray(params["lm_head"]).T
  for i in range(cfg.n_layers):
    p = f"blk.{i}."
    out[p + "attn_norm.weight"] = lay["attn_norm"][i]
    out[p + "ffn_norm.weight"] = lay["mlp_norm"][i]
    out[p + "attn_q.weight"] = lay["wq"][i].reshape(D, -1).T
    out[p + "attn_k.weight"] = lay["wk"][i].reshape(D, -1).T
    out[p + "attn_v.weight"] = lay["wv"][i].reshape(D, -1).T
    out[p + "attn_output.weight"] = lay["wo"][i].reshape(-1, D).T
    out[p + "ffn_gate.weight"] = lay["w_gate"][i].T
    out[p + "ffn_up.weight"] = lay["w_up"][i].T
    out[p + "ffn_down.weight"] = lay["w_down"][i].T
    for k, name in [("bq", "attn_q.bias"), ("bk", "attn_k.bias"), ("bv", "attn_v.bias"),
                    ("q_norm", "attn_q_norm.weight"), ("k_norm", "attn_k_norm.weight")]:
      if k in lay:
        out[p + name] = lay[k][i].reshape(-1)
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def _from_gguf_layout(cfg, tensors):
  """The inverse of `_to_gguf_layout`."""
  L, D, N, K, H = cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  blk = lambda name: np.stack([tensors[f"blk.{i}.{name}.weight"] for i in range(L)])
  params = {
      "embed": tensors["token_embd.weight"], "final_norm": tensors["output_norm.weight"],
      "layers": {
          "attn_norm": blk("attn_norm"), "mlp_norm": blk("ffn_norm"),
          "wq": blk("attn_q").transpose(0, 2, 1).reshape(L, D, N, H),
          "wk": blk("attn_k").transpose(0, 2, 1).reshape(L, D, K, H),
          "wv": blk("attn_v").transpose(0, 2, 1).reshape(L, D, K, H),
          "wo": blk("attn_output").transpose(0, 2, 1).reshape(L, N, H, D),
          "w_gate": blk("ffn_gate").transpose(0, 2, 1), "w_up": blk("ffn_up").transpose(0, 2, 1),
          "w_down": blk("ffn_down").transpose(0, 2, 1)}}
  for k, name, shape in [("bq", "attn_q.bias", (N, H)), ("bk", "attn_k.bias", (K, H)),
                         ("bv", "attn_v.bias", (K, H)), ("q_norm", "attn_q_norm.weight", (H,)),
                         ("k_norm", "attn_k_norm.weight", (H,))]:
    if f"blk.0.{name}" in tensors:
      params["layers"][k] = np.stack([tensors[f"blk.{i}.{name}"].reshape(shape) for i in range(L)])
  if "output.weight" in tensors:
    params["lm_head"] = tensors["output.weight"].T
  return params


def _qtype(name):
  """A mix of every supported storage type across the tensors of a tiny model."""
  from gguf import GGMLQuantizationType as Q
  if "norm" in name or name.endswith(".bias"):
    return Q.F32
  table = {"token_embd": Q.F16, "output": Q.Q8_0, "attn_q": Q.Q8_0, "attn_k": Q.Q4_0,
           "attn_v": Q.Q4_1, "attn_output": Q.Q4_0, "ffn_gate": Q.Q4_1, "ffn_up": Q.Q8_0,
           "ffn_down": Q.Q4_1}
  return table[name.split(".")[-2]]


def quantize_bytes(x, t, seed=0):
  """`x` stored as GGML type `t`: quantized where gguf-py can, else random blocks of valid
  layout (the bytes gguf-py can only dequantize); returns (raw, dequantized float32 or None)."""
  import gguf
  from gguf import GGMLQuantizationType as Q
  if t == Q.F32:
    return x, x
  if t == Q.F16:
    return x.astype(np.float16), x.astype(np.float16).astype(np.float32)
  try:
    q = gguf.quants.quantize(x, t)
  except NotImplementedError:
    q = _random_blocks(x.shape, t, seed)
  try:
    return q, np.asarray(gguf.quants.dequantize(q, t), np.float32)
  except NotImplementedError:
    return q, None


def _random_blocks(shape, t, seed):
  """Random bytes in GGML type `t`'s block layout, blocks with non-finite values redrawn (a
  random f16 scale is inf or NaN one time in 32)."""
  import gguf
  rng = np.random.default_rng(seed)
  block, size = gguf.GGML_QUANT_SIZES[t]
  q = rng.integers(0, 256, (int(np.prod(shape)) // block, size), np.uint8)
  for _ in range(100):
    try:
      with np.errstate(all="ignore"):
        bad = ~np.isfinite(gguf.quants.dequantize(q, t)).all(-1)
    except NotImplementedError:
      break
    if not bad.any():
      break
    q[bad] = rng.integers(0, 256, (int(bad.sum()), size), np.uint8)
  return q.reshape(gguf.quants.quant_shape_to_byte_shape(shape, t))


def write_gguf(path, cfg, params, *, qtype=_qtype, arch="llama", tokenizer=None):
  """Writes a GGUF file of a jaxspec model; returns {name: dequantized float32 tensor}.
  `tokenizer(writer)` writes the vocabulary (default: the tiny byte-level BPE with ChatML)."""
  import gguf
  from gguf import GGMLQuantizationType as Q

  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg.n_layers)
  w.add_context_length(cfg.max_seq_len)
  w.add_embedding_length(cfg.dim)
  w.add_feed_forward_length(cfg.hidden_dim)
  w.add_head_count(cfg.n_heads)
  w.add_head_count_kv(cfg.n_kv_heads)
  if cfg.head_dim != cfg.dim // cfg.n_heads:
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
  w.add_layer_norm_rms_eps(cfg.norm_eps)
  w.add_rope_freq_base(cfg.rope_theta)
  if tokenizer is None:
    tokens, merges = _tiny_vocab(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
  else:
    tokenizer(w)
  dequantized = {}
  for i, (name, x) in enumerate(_to_gguf_layout(cfg, params).items()):
    t = qtype(name)
    q, x = quantize_bytes(x, t, seed=i)
    w.add_tensor(name, q, raw_dtype=None if t in (Q.F32, Q.F16) else t)
    dequantized[name] = x
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return dequantized


def _source(tied, seed=0, scale=0.1, **kw):
  """A tiny interleaved-RoPE config and random float32 params (numpy: no per-op compiles)."""
  cfg = tiny_config(**{"rope_layout": "interleaved", "tied_embeddings": tied, **kw})
  rng = np.random.default_rng(seed)
  shapes = param_shapes(cfg)
  is_shape = lambda x: isinstance(x, tuple)
  params = jax.tree.map(lambda s: (scale * rng.standard_normal(s)).astype(np.float32), shapes,
                        is_leaf=is_shape)
  for name in ("attn_norm", "mlp_norm"):
    params["layers"][name] = 1 + params["layers"][name]
  params["final_norm"] = 1 + params["final_norm"]
  return cfg, params


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
  """(path, source config, source params, dequantized params) of an untied quantized model."""
  cfg, params = _source(tied=False)
  path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
  deq = write_gguf(path, cfg, params)
  return path, cfg, params, _from_gguf_layout(cfg, deq)


def test_gguf_round_trip_weights(tiny_gguf):
  import gguf
  path, cfg, _, deq = tiny_gguf
  m = jaxspec.load_model(str(path), progress=False)
  assert m.config.norm_eps == pytest.approx(cfg.norm_eps, rel=1e-6)  # stored as float32
  assert m.config == dataclasses.replace(cfg, arch="gguf-llama", norm_eps=m.config.norm_eps)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, m.params), deq)
  kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
  assert {"F32", "F16", "Q8_0", "Q4_0", "Q4_1"} == set(kinds.values())


def test_gguf_round_trip_forward(tiny_gguf):
  path, cfg, params, deq = tiny_gguf
  m = jaxspec.load_model(str(path), progress=False)
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 8)), jnp.int32)
  got = np.asarray(FWD(m.params, m.config, tokens).logits)
  exact = np.asarray(FWD(jax.tree.map(jnp.asarray, deq), cfg, tokens).logits)
  np.testing.assert_allclose(got, exact, atol=1e-5, rtol=1e-5)
  src = np.asarray(FWD(params, cfg, tokens).logits)
  err = np.sqrt(np.mean((got - src) ** 2) / np.mean(src ** 2))
  assert 0 < err < 0.25, err  # 4-bit weights in a random network: close, not equal
  assert np.corrcoef(got.ravel(), src.ravel())[0, 1] > 0.97


def test_gguf_tokenizer_and_chat_template(tiny_gguf):
  tok = jaxspec.load_model(str(tiny_gguf[0]), progress=False).tokenizer
  vocab, _ = _tiny_vocab(64)
  assert tok.encode("ab tab 42") == [vocab.index(t) for t in ["ab", "Ġt", "ab", "Ġ", "4", "2"]]
  assert tok.decode(tok.encode("ab tab 42")) == "ab tab 42"
  text = tok.apply_chat_template([{"role": "user", "content": "ab"}])
  assert text == "<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n"
  assert tok.encode(text)[:1] == [1] and tok.encode(text).count(2) == 1


# ----------------------------------------------------------------------------------------------
# Bad input: every failure is a clear error naming the problem


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such model"):
    jaxspec.load_model(str(tmp_path / "nope.gguf"))
  with pytest.raises(FileNotFoundError, match="no such model"):
    jaxspec.load_model("stories15M")  # not an embedded name, not a path


def test_load_by_fetched_name(tmp_path, monkeypatch):
  """A checkpoint name from `jaxspec.fetch` loads the fetched file; an unfetched one says how
  to fetch it."""
  from jaxspec import fetch
  monkeypatch.setenv(fetch.ENV, str(tmp_path))
  with pytest.raises(FileNotFoundError, match="python -m jaxspec.fetch smollm2-135m"):
    jaxspec.load_model("smollm2-135m")
  spec = fetch.CHECKPOINTS["smollm2-135m"]
  real = fetch.path("smollm2-135m", os.path.expanduser("~/.cache/jaxspec/checkpoints"))
  if real is None:
    pytest.skip(f"SmolLM2 not fetched: {fetch.command('smollm2-135m')}")
  (tmp_path / "smollm2-135m").mkdir()
  os.symlink(real, tmp_path / "smollm2-135m" / spec.filename)
  m = jaxspec.load_model("smollm2-135m", progress=False)
  assert m.name == spec.filename and m.config.vocab_size == 49152


@pytest.mark.parametrize("size", [20, 4096, 1_000_000])
def test_truncated_llama2c(tmp_path, size):
  path = tmp_path / "cut.bin"
  with open(STORIES_BIN, "rb") as f:
    path.write_bytes(f.read(size))
  with pytest.raises(ValueError, match="truncated llama2.c"):
    jaxspec.load_model(str(path))


def test_llama2c_trailing_bytes(tmp_path):
  path = tmp_path / "long.bin"
  with open(STORIES_BIN, "rb") as f:
    path.write_bytes(f.read() + b"\0" * 64)
  with pytest.raises(ValueError, match="trailing bytes"):
    jaxspec.load_model(str(path))


@pytest.mark.parametrize("keep", [0.5, 0.99, 100], ids=["half", "tail", "header"])
def test_truncated_gguf(tmp_path, keep):
  import gguf
  cfg, params = _source(tied=True, seed=1)
  path = tmp_path / "cut.gguf"
  write_gguf(path, cfg, params,
             qtype=lambda n: gguf.GGMLQuantizationType.F32 if "norm" in n else
             gguf.GGMLQuantizationType.Q8_0)
  data = path.read_bytes()
  path.write_bytes(data[:keep if keep > 1 else int(len(data) * keep)])
  with pytest.raises(ValueError, match="truncated"):
    jaxspec.load_model(str(path), progress=False)


def test_unknown_formats(tmp_path):
  noise = tmp_path / "noise.bin"
  noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
  with pytest.raises(ValueError, match="not a llama2.c checkpoint"):
    jaxspec.load_model(str(noise))
  text = tmp_path / "model.txt"
  text.write_text("hello")
  with pytest.raises(ValueError, match="unknown model format"):
    jaxspec.load_model(str(text))
  fake = tmp_path / "fake.gguf"
  fake.write_bytes(b"GGML" + bytes(100))
  with pytest.raises(ValueError, match="not a GGUF file"):
    jaxspec.load_model(str(fake))
  with pytest.raises(ValueError, match="neither a Hugging Face checkpoint"):
    jaxspec.load_model(str(tmp_path))
  with pytest.raises(TypeError, match="name or a path"):
    jaxspec.load_model(123)


def test_gguf_unsupported_architecture(tmp_path):
  cfg, params = _source(tied=True)
  path = tmp_path / "mamba.gguf"
  write_gguf(path, cfg, params, arch="mamba")
  with pytest.raises(ValueError, match="architecture 'mamba' is not supported"):
    jaxspec.load_model(str(path), progress=False)


def test_gguf_unsupported_tensor_type(tmp_path):
  import gguf
  cfg, params = _source(tied=True, dim=256, hidden_dim=256)
  path = tmp_path / "q8k.gguf"
  write_gguf(path, cfg, params,  # Q8_K: llama.cpp's dot-product scratch type, never dequantized
             qtype=lambda n: gguf.GGMLQuantizationType.F32 if "norm" in n else
             gguf.GGMLQuantizationType.Q8_K)
  with pytest.raises(ValueError, match="GGML type Q8_K, not supported"):
    jaxspec.load_model(str(path), progress=False)


def test_bad_dtype():
  with pytest.raises(ValueError, match="dtype must be one of"):
    jaxspec.load_model("stories260K", dtype="float8")

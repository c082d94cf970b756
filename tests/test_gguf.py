"""GGUF without downloads: every tensor type bit for bit against gguf-py, every tokenizer kind and
pre-tokenizer against transformers' tokenizer for the same file, qwen2/qwen3/llama forwards
against transformers' GGUF loader, and the errors for what is not supported.
"""

import json
import string

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_loaders import _from_gguf_layout, _source, quantize_bytes, write_gguf

import jaxspec
from jaxspec.models import forward, gguf_file
from jaxspec.models.gguf_reader import GGUF

TEXT = ("Hello world! In 2024, pi was 3.14159 and 1000000 people agreed.  Two  spaces\n\n"
        "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # 递归\n\t{\"k\": [1]}\n"
        "你好，世界。東京は日本の首都です。 한국어 Ünïcödé café naïve don't I'M\r\n"
        "emoji 🙂👍🏽 🇫🇷 👨‍👩‍👧 <|im_start|>user\nhi<|im_end|> <b>x</b> x**2   ")
PIECES = [TEXT, " leading", "  two", "a\n\n\nb", "x" * 40, "<|im_end|><|im_end|>", "1234567"]


def test_supported_types_cover_k_and_iq_quants():
  kinds = set(gguf_file.supported_types())
  assert {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
          "Q5_K", "Q6_K", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S",
          "IQ4_NL", "IQ4_XS"} <= kinds
  assert not {"Q8_K", "Q8_1"} & kinds  # gguf-py cannot dequantize these


@pytest.mark.parametrize("kind", gguf_file.supported_types())
def test_dequantize_bit_for_bit(tmp_path, monkeypatch, kind):
  """Each type read through jaxspec's reader, in slices of one row, equals gguf-py's
  `dequantize` of `GGUFReader`'s bytes (quantized data where gguf-py can quantize, random
  blocks of valid layout where it cannot)."""
  import gguf
  t = gguf.GGMLQuantizationType[kind]
  x = np.random.default_rng(0).standard_normal((5, 512)).astype(np.float32)
  q, _ = quantize_bytes(x, t)
  path = tmp_path / f"{kind}.gguf"
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_tensor("w", q, raw_dtype=None if kind in ("F32", "F16") else t)
  w.add_tensor("v", quantize_bytes(x[0], t, seed=1)[0], raw_dtype=None if kind in ("F32", "F16")
               else t)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  monkeypatch.setattr(gguf_file, "_ROW_BYTES", 1)  # one row per slice
  mine = GGUF(str(path))
  for ref in gguf.GGUFReader(str(path)).tensors:
    got = gguf_file.dequantize(mine, mine.tensors[ref.name])
    want = np.asarray(gguf.quants.dequantize(ref.data, ref.tensor_type), np.float32)
    assert got.shape == tuple(int(s) for s in reversed(ref.shape))
    assert got.tobytes() == want.reshape(got.shape).tobytes()


def test_every_type_in_one_model_loads_bit_for_bit(tmp_path):
  """A 4-layer model whose 30 weight matrices cycle through every supported type."""
  import gguf
  kinds = [k for k in gguf_file.supported_types() if k != "F32"]
  names = iter(range(10_000))
  order = {}

  def qtype(name):
    if "norm" in name:
      return gguf.GGMLQuantizationType.F32
    order.setdefault(name, kinds[next(names) % len(kinds)])
    return gguf.GGMLQuantizationType[order[name]]

  cfg, params = _source(tied=False, dim=256, hidden_dim=256, n_layers=4)
  path = tmp_path / "all.gguf"
  deq = write_gguf(path, cfg, params, qtype=qtype)
  assert set(order.values()) == set(kinds)
  m = jaxspec.load_model(str(path), progress=False)
  want = _from_gguf_layout(cfg, deq)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), m.params, want)


# ----------------------------------------------------------------------------------------------
# Tokenizers: the same file through jaxspec and through transformers


def _corpus():
  return [TEXT] * 3 + ["the quick brown fox jumps over the lazy dog " * 4,
                       "for i in range(10):\n    print(i * 2)\n" * 3, "数字 12345 67890 2024年"]


def _byte_level_vocab(size=600):
  """A byte-level BPE trained here on a small mixed corpus (vocab, merges)."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = trainers.BpeTrainer(vocab_size=size, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_corpus(), trainer)
  data = json.loads(tok.to_str())["model"]
  vocab = sorted(data["vocab"], key=data["vocab"].get)
  merges = [m if isinstance(m, str) else " ".join(m) for m in data["merges"]]
  return vocab, merges


def _sentencepiece_vocab(size=500):
  """A SentencePiece-style vocabulary: <unk> <s> </s>, 256 byte pieces, then "▁" pieces with
  falling scores, as llama.cpp writes them (tokenizer.ggml.model = llama)."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=size, show_progress=False))
  learned = json.loads(tok.to_str())["model"]["vocab"]
  pieces = sorted(learned, key=learned.get)
  tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
  tokens += [p for p in pieces if p not in tokens] + ["  ", "<start_of_turn>", "<end_of_turn>"]
  types = [2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 262) + [1, 3, 3]
  scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
  return tokens, scores, types


def _tokenizer_writer(kind, pre=None, chat_template=None, size=None):
  def write(w):
    if kind == "gpt2":
      tokens, merges = _byte_level_vocab()
      n = len(tokens)
      tokens = tokens + ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>"]
      types = [1] * n + [3, 3, 3, 4]
      if size:  # padded to the model's vocabulary, as real files are
        types += [5] * (size - len(tokens))
        tokens += [f"<unused_{i}>" for i in range(size - len(tokens))]
      w.add_tokenizer_model("gpt2")
      w.add_tokenizer_pre(pre)
      w.add_token_list(tokens)
      w.add_token_merges(merges)
      w.add_token_types(types)
      w.add_bos_token_id(n + 1)
      w.add_eos_token_id(n + 2)
      w.add_add_bos_token(False)
    else:
      tokens, scores, types = _sentencepiece_vocab()
      w.add_tokenizer_model("llama")
      w.add_token_list(tokens)
      w.add_token_scores(scores)
      w.add_token_types(types)
      w.add_bos_token_id(1)
      w.add_eos_token_id(2)
      w.add_unk_token_id(0)
    if chat_template:
      w.add_chat_template(chat_template)
  return write


def _file(tmp_path, arch, writer, **cfg_kw):
  cfg, params = _source(tied=True, **{"vocab_size": 1024, **cfg_kw})
  path = tmp_path / f"{arch}.gguf"
  write_gguf(path, cfg, params, arch=arch, tokenizer=writer)
  return path


def _transformers_tokenizer(path):
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _same_tokens(mine, ref, texts):
  for s in texts:
    ids = ref(s)["input_ids"]
    assert mine.encode(s) == ids, s
    assert mine.decode(ids) == ref.decode(ids), s


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe", "smollm", "gpt2", "default", "tekken",
                                 "gpt-4o"])
def test_byte_level_pre_tokenizers_match_transformers(tmp_path, pre):
  path = _file(tmp_path, "qwen2" if pre == "qwen2" else "llama", _tokenizer_writer("gpt2", pre))
  mine = jaxspec.load_model(str(path), progress=False).tokenizer
  texts = PIECES + TEXT.split("\n")
  if pre == "smollm":
    # llama.cpp (and SmolLM's own tokenizer.json) split digits one by one before GPT-2's regex;
    # transformers' GGUF tokenizer does not, so with a vocabulary that merges digits the two
    # differ on numbers only. (SmolLM2's real vocabulary has no multi-digit tokens.)
    assert mine.encode("x 2024") == mine.encode("x ") + [mine.encode(d)[0] for d in "2024"]
    texts = [s.translate(str.maketrans("", "", string.digits)) for s in texts]
  _same_tokens(mine, _transformers_tokenizer(path), texts)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_sentencepiece_vocabulary_matches_transformers(tmp_path, arch):
  """tokenizer.ggml.model = llama: merges recovered from scores (llama) or from the file order
  with spaces respelled (Gemma); byte fallback for what no piece covers."""
  from jaxspec.models import gguf_reader
  path = _file(tmp_path, arch, _tokenizer_writer("llama"))
  r = gguf_reader.GGUF(str(path))
  mine = gguf_file.tokenizer(r, str(path))
  ref = _transformers_tokenizer(path)
  assert mine.add_bos and mine.bos_id == 1  # llama.cpp's default for SentencePiece
  _same_tokens(mine, ref, PIECES + TEXT.split("\n") + ["<start_of_turn>user\nhi<end_of_turn>"])


QWEN_LIKE_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n# Tools' }}{%- for tool in tools %}"
    "{{- '\\n' }}{{- tool | tojson }}{%- endfor %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}{%- endif %}{{ bos_token }}|{{ eos_token }}")


def test_chat_template_renders_like_transformers(tmp_path):
  path = _file(tmp_path, "qwen2", _tokenizer_writer("gpt2", "qwen2", QWEN_LIKE_TEMPLATE))
  mine = jaxspec.load_model(str(path), progress=False).tokenizer
  ref = _transformers_tokenizer(path)
  msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好 <b>&'"}]
  tools = [{"name": "f", "description": "x < y & 'z' — ü", "parameters": {"a": [1, 2.5]}}]
  for kw in [{}, {"add_generation_prompt": False}]:
    want = ref.apply_chat_template(msgs, tokenize=False, **{"add_generation_prompt": True, **kw})
    assert mine.apply_chat_template(msgs, **kw) == want
  want = ref.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=True)
  assert mine.apply_chat_template(msgs, tools=tools) == want
  ids = ref.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
  ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
  assert mine.apply_chat_template(msgs, tokenize=True) == list(ids)


# ----------------------------------------------------------------------------------------------
# Architectures: jaxspec's forward against transformers' GGUF loader (fp32) on tiny files


@pytest.mark.parametrize("arch,kw", [
    ("llama", {}),
    ("qwen2", {"qkv_bias": True, "rope_layout": "half"}),
    ("qwen3", {"qk_norm": True, "rope_layout": "half", "head_dim": 128}),  # HF's default
], ids=["llama", "qwen2", "qwen3"])
def test_tiny_architectures_match_transformers(tmp_path, arch, kw):
  import torch
  from transformers import AutoModelForCausalLM
  cfg, params = _source(tied=False, seed=3, scale=0.2, vocab_size=1024, **kw)
  if "q_norm" in params["layers"]:
    params["layers"]["q_norm"] = params["layers"]["q_norm"] + 1
    params["layers"]["k_norm"] = params["layers"]["k_norm"] + 1
  path = tmp_path / f"{arch}.gguf"
  write_gguf(path, cfg, params, arch=arch, tokenizer=_tokenizer_writer("gpt2", "qwen2", size=1024),
             qtype=lambda n: __import__("gguf").GGMLQuantizationType.F32)
  m = jaxspec.load_model(str(path), progress=False)
  assert m.config.arch == f"gguf-{arch}" and m.config.rope_layout == cfg.rope_layout
  assert (m.config.qkv_bias, m.config.qk_norm, m.config.head_dim) == (
      cfg.qkv_bias, cfg.qk_norm, cfg.head_dim)
  ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                             dtype=torch.float32).eval()
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12))
  with torch.no_grad():
    want = ref(torch.tensor(ids)).logits.numpy()
  got = np.asarray(forward(m.params, m.config, jnp.asarray(ids, jnp.int32)).logits)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# What is not supported is a clear one-line error


def test_unknown_pre_tokenizer_and_tokenizer_kind(tmp_path):
  path = _file(tmp_path, "llama", _tokenizer_writer("gpt2", "klingon"))
  with pytest.raises(ValueError, match="GGUF pre-tokenizer 'klingon' is not supported"):
    jaxspec.load_model(str(path), progress=False)

  def bert(w):
    w.add_tokenizer_model("bert")
    w.add_token_list([f"t{i}" for i in range(1024)])
  path = _file(tmp_path, "qwen2", bert)
  with pytest.raises(ValueError, match="GGUF tokenizer 'bert' is not supported"):
    jaxspec.load_model(str(path), progress=False)


def test_corrupt_metadata_is_one_error(tmp_path):
  path = _file(tmp_path, "llama", _tokenizer_writer("gpt2", "gpt2"))
  data = bytearray(path.read_bytes())
  data[24:32] = (2**40).to_bytes(8, "little")  # the first key's length: far past the end
  path.write_bytes(bytes(data))
  with pytest.raises(ValueError, match="corrupt or truncated GGUF file"):
    jaxspec.load_model(str(path), progress=False)
  data[4:8] = (1).to_bytes(4, "little")
  path.write_bytes(bytes(data))
  with pytest.raises(ValueError, match="GGUF version 1 is not supported"):
    jaxspec.load_model(str(path), progress=False)

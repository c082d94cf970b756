"""Hugging Face checkpoints: parity with transformers (logits and cached greedy decoding),
safetensors details (bf16, sharded indexes), tokenizer files, and clear errors.

Every model is a tiny random transformers model saved with `save_pretrained` (no network).
"""

import copy
import json
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxspec  # noqa: E402
from jaxspec import models  # noqa: E402
from jaxspec.models import hf  # noqa: E402

FWD = jax.jit(models.forward, static_argnums=(1,))
V = 320  # room for the 300-token BPE of the tokenizer tests
PROMPT, NEW = 8, 20

LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=64)
CASES = {
    # GQA, untied head, Llama 3 RoPE scaling, head_dim 16 != hidden 32 / 4 heads.
    "llama-gqa-llama3-untied": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
        rope_scaling=LLAMA3, rope_theta=10000.0)),
    # MHA, tied embeddings, a small rope_theta.
    "llama-mha-tied": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True, rope_theta=500.0)),
    "qwen2-bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)),
    "qwen3-qknorm": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
}


pytestmark = pytest.mark.usefixtures("fast_compile")


def build_hf(case: str, seed: int = 0):
  """A random float32 transformers model; weights scaled up so logits are well separated."""
  cfg_cls, model_cls, kw = CASES[case]
  cfg = getattr(transformers, cfg_cls)(
      vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, **kw)
  cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  m = getattr(transformers, model_cls)(cfg).eval()
  with torch.no_grad():
    for name, p in m.named_parameters():
      p.copy_(torch.randn_like(p) * (0.1 if "norm" in name else 0.25) + ("norm" in name))
  m.generation_config.eos_token_id = None  # generate exactly NEW tokens
  m.generation_config.pad_token_id = 0
  return m


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
  """(name, transformers model, saved checkpoint dir, jaxspec model)."""
  m = build_hf(request.param)
  d = tmp_path_factory.mktemp(request.param)
  m.save_pretrained(d)
  return request.param, m, str(d), jaxspec.load_model(str(d), progress=False)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  """A saved Llama checkpoint to copy and damage in the error tests."""
  d = tmp_path_factory.mktemp("llama")
  build_hf("llama-gqa-llama3-untied").save_pretrained(d)
  return str(d)


def _copy(src, tmp_path):
  dst = tmp_path / "ckpt"
  shutil.copytree(src, dst)
  return dst


def _ids(b, t, seed=0):
  return np.random.default_rng(seed).integers(3, V, size=(b, t)).astype(np.int32)


# ------------------------------------------------------------------------------------- parity


def test_config(case):
  name, m, _, model = case
  c, hc = model.config, m.config
  assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size) == (
      hc.hidden_size, hc.num_hidden_layers, hc.num_attention_heads, hc.num_key_value_heads, V)
  assert c.rope_layout == "half" and c.tied_embeddings == hc.tie_word_embeddings
  assert c.qkv_bias == name.startswith("qwen2") and c.qk_norm == name.startswith("qwen3")
  assert c.head_dim == (16 if name in ("llama-gqa-llama3-untied", "qwen3-qknorm") else 8)
  assert (c.rope_scaling is not None) == (name == "llama-gqa-llama3-untied")
  assert model.dtype == jnp.float32 and model.tokenizer is None
  hash(c)  # a static jit argument


def test_logits_match_transformers(case):
  _, m, _, model = case
  ids = _ids(2, 12)
  with torch.no_grad():
    want = m(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  got = np.asarray(FWD(model.params, model.config, jnp.asarray(ids)).logits)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def greedy(model, prompt, n):
  """n greedy tokens: prefill the prompt into a KV cache, then one token per step."""
  b, t = prompt.shape
  cache = models.KVCache.init(model.config, b, t + n, model.dtype)
  out = FWD(model.params, model.config, jnp.asarray(prompt), cache)
  toks = [jnp.argmax(out.logits[:, -1], axis=-1)]
  for _ in range(n - 1):
    out = FWD(model.params, model.config, toks[-1][:, None], out.cache)
    toks.append(jnp.argmax(out.logits[:, -1], axis=-1))
  return np.stack([np.asarray(x) for x in toks], axis=1)


def test_cached_greedy_matches_generate(case):
  _, m, _, model = case
  prompt = _ids(2, PROMPT, seed=1)
  with torch.no_grad():
    want = m.generate(torch.tensor(prompt, dtype=torch.long),
                      attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                      do_sample=False, max_new_tokens=NEW)[:, PROMPT:].numpy()
  got = greedy(model, prompt, NEW)
  assert want.shape == (2, NEW)
  np.testing.assert_array_equal(got, want)


# -------------------------------------------------------------------------------- safetensors


def test_bfloat16_checkpoint(tmp_path):
  m = copy.deepcopy(build_hf("qwen3-qknorm")).to(torch.bfloat16)
  m.save_pretrained(tmp_path)
  with open(tmp_path / "config.json") as f:
    cfg = json.load(f)
  assert (cfg.get("dtype") or cfg.get("torch_dtype")) == "bfloat16"
  model = jaxspec.load_model(str(tmp_path), progress=False)
  assert model.dtype == jnp.bfloat16  # the checkpoint's own dtype by default
  sd = {k: v.float().numpy() for k, v in m.state_dict().items()}
  np.testing.assert_array_equal(np.asarray(model.params["embed"], np.float32),
                                sd["model.embed_tokens.weight"])
  wq = sd["model.layers.1.self_attn.q_proj.weight"].T.reshape(32, 4, 16)
  np.testing.assert_array_equal(np.asarray(model.params["layers"]["wq"][1], np.float32), wq)
  np.testing.assert_array_equal(np.asarray(model.params["layers"]["k_norm"][0], np.float32),
                                sd["model.layers.0.self_attn.k_norm.weight"])
  as32 = jaxspec.load_model(str(tmp_path), dtype="float32", progress=False)
  assert as32.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(as32.params["lm_head"]), sd["lm_head.weight"].T)


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("sharded")
  build_hf("llama-gqa-llama3-untied").save_pretrained(d, max_shard_size="40KB")
  return str(d)


def test_sharded_index_loads_identically(sharded_dir, llama_dir):
  shards = [f for f in os.listdir(sharded_dir) if f.endswith(".safetensors")]
  assert len(shards) > 1 and os.path.exists(os.path.join(sharded_dir,
                                                         "model.safetensors.index.json"))
  a = jaxspec.load_model(sharded_dir, progress=False)
  b = jaxspec.load_model(llama_dir, progress=False)
  assert a.config == b.config
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_progress_bar(llama_dir, capsys):
  jaxspec.load_model(llama_dir, progress=True)
  assert "tensor" in capsys.readouterr().err
  jaxspec.load_model(llama_dir, progress=False)
  assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------- errors


def _edit_config(d, **kw):
  with open(d / "config.json") as f:
    cfg = json.load(f)
  cfg.update(kw)
  with open(d / "config.json", "w") as f:
    json.dump(cfg, f)


def test_truncated_safetensors(llama_dir, tmp_path):
  d = _copy(llama_dir, tmp_path)
  f = d / "model.safetensors"
  data = f.read_bytes()
  f.write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match=r"model\.safetensors: truncated safetensors file"):
    jaxspec.load_model(str(d), progress=False)
  f.write_bytes(data[:5])
  with pytest.raises(ValueError, match="truncated safetensors file"):
    jaxspec.load_model(str(d), progress=False)


def test_corrupt_safetensors_header(llama_dir, tmp_path):
  d = _copy(llama_dir, tmp_path)
  f = d / "model.safetensors"
  data = bytearray(f.read_bytes())
  data[8:24] = b"\x00garbage{{{{{{{{"
  f.write_bytes(bytes(data))
  with pytest.raises(ValueError, match=r"model\.safetensors: corrupt safetensors header"):
    jaxspec.load_model(str(d), progress=False)
  data[:8] = (10**12).to_bytes(8, "little")  # header length past the end of the file
  f.write_bytes(bytes(data))
  with pytest.raises(ValueError, match="truncated or corrupt safetensors file"):
    jaxspec.load_model(str(d), progress=False)


def test_missing_shard(sharded_dir, tmp_path):
  d = _copy(sharded_dir, tmp_path)
  shard = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))[-1]
  os.remove(d / shard)
  with pytest.raises(FileNotFoundError, match=f"lists shard '{shard}'.*does not exist"):
    jaxspec.load_model(str(d), progress=False)


def test_missing_tensor(llama_dir, tmp_path):
  from safetensors.numpy import load_file, save_file
  d = _copy(llama_dir, tmp_path)
  tensors = load_file(d / "model.safetensors")
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"no tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
    jaxspec.load_model(str(d), progress=False)


def test_no_weights(llama_dir, tmp_path):
  d = _copy(llama_dir, tmp_path)
  os.remove(d / "model.safetensors")
  with pytest.raises(FileNotFoundError, match="no model.safetensors"):
    jaxspec.load_model(str(d), progress=False)


@pytest.mark.parametrize("edit, match", [
    (dict(intermediate_size=48), r"'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \(64, 32\)"
                                 r" but config\.json implies \(48, 32\)"),
    (dict(num_key_value_heads=4), r"k_proj\.weight' has shape .* config and weights do not match"),
    (dict(vocab_size=300), "embed_tokens.weight' has shape"),
    (dict(num_hidden_layers=1), "more than num_hidden_layers=1 layers"),
])
def test_config_weight_mismatch(llama_dir, tmp_path, edit, match):
  d = _copy(llama_dir, tmp_path)
  _edit_config(d, **edit)
  with pytest.raises(ValueError, match=match):
    jaxspec.load_model(str(d), progress=False)


def test_unknown_architecture(llama_dir, tmp_path):
  d = _copy(llama_dir, tmp_path)
  _edit_config(d, architectures=["GPT2LMHeadModel"], model_type="gpt2")
  with pytest.raises(ValueError, match=r"GPT2LMHeadModel is not supported \(supported: "
                                       r"LlamaForCausalLM, Qwen2ForCausalLM"):
    jaxspec.load_model(str(d), progress=False)


def test_not_a_model_config(llama_dir, tmp_path):
  d = _copy(llama_dir, tmp_path)
  with open(d / "config.json", "w") as f:
    json.dump({"name": "notes about a GGUF file"}, f)
  (d / "model.gguf").write_bytes(b"GGUF")
  with pytest.raises(ValueError, match="not a Hugging Face model config.*pass its path"):
    jaxspec.load_model(str(d), progress=False)


def test_architecture_from_model_type():
  c = hf.read_config(dict(model_type="qwen3", hidden_size=32, intermediate_size=64, head_dim=16,
                          num_hidden_layers=2, num_attention_heads=4, vocab_size=V))
  assert c.qk_norm and c.arch == "qwen3" and c.head_dim == 16


def test_mesh(llama_dir):
  """Loading onto a mesh shards by `jaxspec.sharding` rules; values are unchanged."""
  import jaxspec.sharding as sh
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "tensor"))
  if not hasattr(sh, "param_shardings"):
    with pytest.raises(NotImplementedError, match="param_shardings"):
      jaxspec.load_model(llama_dir, mesh=mesh, progress=False)
    return
  ref = jaxspec.load_model(llama_dir, progress=False)
  got = jaxspec.load_model(llama_dir, mesh=mesh, progress=False)
  wq = got.params["layers"]["wq"]
  assert isinstance(wq.sharding, jax.sharding.NamedSharding) and wq.sharding.mesh == mesh
  assert len({s.device for s in wq.addressable_shards}) == 8
  for x, y in zip(jax.tree.leaves(ref.params), jax.tree.leaves(got.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with pytest.raises(ValueError, match="not divisible"):  # 4 query heads, tensor axis 8
    jaxspec.load_model(llama_dir, progress=False,
                       mesh=jax.sharding.Mesh(np.array(jax.devices()).reshape(1, 8),
                                              ("data", "tensor")))


def test_unsupported_rope_type(llama_dir, tmp_path):
  d = _copy(llama_dir, tmp_path)
  _edit_config(d, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
  with pytest.raises(ValueError, match=r"RoPE type 'yarn' is not supported \(supported: "
                                       r"default, llama3, linear\)"):
    jaxspec.load_model(str(d), progress=False)


def test_sliding_window_config():
  """A sliding window is kept (not a cap on the context): Mistral every layer, Qwen only with
  use_sliding_window and from max_window_layers on."""
  base = dict(architectures=["MistralForCausalLM"], hidden_size=32, intermediate_size=64,
              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=V, max_position_embeddings=128)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    c = hf.read_config(dict(base, sliding_window=16))
    assert c.max_seq_len == 128 and c.sliding_window == 16 and all(c.layer_is_local)
    assert hf.read_config(dict(base, sliding_window=None)).sliding_window is None
    qwen = dict(base, architectures=["Qwen2ForCausalLM"], sliding_window=16)
    assert hf.read_config(dict(qwen, use_sliding_window=False)).sliding_window is None
    c = hf.read_config(dict(qwen, use_sliding_window=True, max_window_layers=2))
    assert c.layer_is_local == (False, False, True, True) and c.max_seq_len == 128


def test_legacy_config_keys():
  """transformers 4 spelling: top-level rope_theta, rope_scaling with `type`, torch_dtype."""
  cfg = dict(architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128,
             num_hidden_layers=2, num_attention_heads=4, vocab_size=V, rope_theta=5e5,
             rope_scaling=dict(LLAMA3, rope_type=None, type="llama3", factor=32.0),
             torch_dtype="bfloat16", tie_word_embeddings=True)
  c = hf.read_config(cfg)
  assert c.rope_theta == 5e5 and c.rope_scaling.factor == 32.0 and c.n_kv_heads == 4
  assert c.head_dim == 16 and hf.checkpoint_dtype(cfg) == jnp.bfloat16
  with pytest.raises(ValueError, match="attention_bias=true is not supported"):
    hf.read_config(dict(cfg, attention_bias=True))


# ---------------------------------------------------------------------------------- tokenizer

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
            "{% endif %}")
TEXTS = ["Once upon a time there was a little fox who liked numbers like 12345.",
         "The quick brown fox jumps over the lazy dog!", "héllo wörld, naïve café 🙂 ünïcode",
         "  leading spaces\tand\ttabs\nnew lines"]
MESSAGES = [{"role": "system", "content": "You are a fox."}, {"role": "user", "content": "hi fox"},
            {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "again?"}]


def _train_bpe(folder, *, add_bos_token):
  """A 300-token byte-level BPE with ChatML specials; BOS prepended by the post-processor."""
  from tokenizers import Tokenizer, decoders, models as tm, pre_tokenizers, processors, trainers
  tok = Tokenizer(tm.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(TEXTS * 10, trainer)
  if add_bos_token:
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)])
  tok.save(os.path.join(folder, "tokenizer.json"))
  tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
          "eos_token": "<|im_end|>", "chat_template": TEMPLATE}
  if add_bos_token:
    tcfg["add_bos_token"] = True
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump(tcfg, f)


def _same_as_transformers(tok, folder):
  ref = transformers.AutoTokenizer.from_pretrained(folder)
  for text in TEXTS + ["", "<|im_start|>user\nhi<|im_end|>"]:
    ids = tok.encode(text)
    assert ids == ref(text)["input_ids"], text
    assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False)
  want = ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
  assert tok.apply_chat_template(MESSAGES) == want
  want_ids = ref.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
  want_ids = want_ids["input_ids"] if isinstance(want_ids, dict) or hasattr(
      want_ids, "keys") else want_ids
  assert tok.apply_chat_template(MESSAGES, tokenize=True) == list(want_ids)
  return ref


@pytest.mark.parametrize("add_bos_token", [True, False])
def test_tokenizer_matches_transformers(tmp_path, add_bos_token):
  _train_bpe(tmp_path, add_bos_token=add_bos_token)
  with open(tmp_path / "generation_config.json", "w") as f:
    json.dump({"eos_token_id": [3, 1]}, f)
  tok = hf.load_tokenizer(str(tmp_path), {"bos_token_id": 0, "eos_token_id": 1})
  assert tok.add_bos == add_bos_token and tok.bos_id == 0 and tok.eos_ids == (3, 1)
  assert tok.special_tokens == {"<s>": 0, "</s>": 1, "<|im_start|>": 2, "<|im_end|>": 3}
  ref = _same_as_transformers(tok, str(tmp_path))
  # What transformers writes back (its own file layout) reads the same.
  out = tmp_path / "resaved"
  ref.save_pretrained(out)
  again = hf.load_tokenizer(str(out), {})
  assert (again.bos_id, again.eos_ids[:1], again.add_bos) == (0, (3,), add_bos_token)
  _same_as_transformers(again, str(out))


def test_tokenizer_add_bos_from_post_processor(tmp_path):
  """No add_bos_token key (Llama 3 style): the post-processor decides."""
  _train_bpe(tmp_path, add_bos_token=True)
  with open(tmp_path / "tokenizer_config.json") as f:
    tcfg = json.load(f)
  del tcfg["add_bos_token"]
  with open(tmp_path / "tokenizer_config.json", "w") as f:
    json.dump(tcfg, f)
  tok = hf.load_tokenizer(str(tmp_path), {})
  assert tok.add_bos and tok.encode("fox")[0] == 0


def test_model_with_tokenizer(llama_dir, tmp_path):
  d = _copy(llama_dir, tmp_path)
  _train_bpe(d, add_bos_token=True)
  tok = jaxspec.load_model(str(d), progress=False).tokenizer
  assert isinstance(tok, models.HFTokenizer) and tok.eos_ids == (2, 3)  # config's, then <|im_end|>
  assert tok.bos_id == 0 and tok.decode(tok.encode(TEXTS[2])) == "<s>" + TEXTS[2]


# ------------------------------------------------------------- Gemma 1/2/3 and sliding windows

WINDOW = 8
_GEMMA3_ROPE = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
WINDOW_CASES = {
    # MQA, GeGLU, sqrt(dim) embeddings, (1 + w) norms, no window.
    "gemma1-mqa": ("GemmaConfig", "GemmaForCausalLM", dict(num_key_value_heads=1)),
    # Alternating local / global layers, attention and final soft-capping, query_pre_attn_scalar.
    "gemma2-window": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        sliding_window=WINDOW, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0)),
    # Two local layers (own RoPE base) then a global one (linear RoPE scaling), QK-norm.
    "gemma3-window": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_hidden_layers=3, sliding_window=WINDOW, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters=_GEMMA3_ROPE)),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW)),
}
W_PROMPT, W_NEW = 12, 20  # the generation runs well past the window


def build_windowed(case: str, seed: int = 0, **over):
  """A random float32 transformers model of a WINDOW_CASES kind (head_dim 16, GQA 4/2);
  `over` replaces config fields."""
  cfg_cls, model_cls, kw = WINDOW_CASES[case]
  kw = dict(kw, **over)
  base = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
  cfg = getattr(transformers, cfg_cls)(**dict(base, **kw))
  cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  m = getattr(transformers, model_cls)(cfg).eval()
  one = 0.0 if case.startswith("gemma") else 1.0  # Gemma norms hold w - 1
  with torch.no_grad():
    for name, p in m.named_parameters():
      p.copy_(torch.randn_like(p) * (0.1 if "norm" in name else 0.25) + ("norm" in name) * one)
  m.generation_config.eos_token_id = None
  m.generation_config.pad_token_id = 0
  return m


@pytest.fixture(scope="module", params=list(WINDOW_CASES))
def windowed(request, tmp_path_factory):
  m = build_windowed(request.param)
  d = tmp_path_factory.mktemp(request.param)
  m.save_pretrained(d)
  return request.param, m, jaxspec.load_model(str(d), progress=False)


def test_window_config(windowed):
  name, m, model = windowed
  c = model.config
  assert c.arch == name.split("-")[0].replace("gemma1", "gemma")
  assert c.max_seq_len == 128  # the window is not a cap on the context
  if name == "gemma1-mqa":
    assert c.sliding_window is None and c.n_kv_heads == 1 and c.act == "gelu_tanh"
  else:
    assert c.sliding_window == WINDOW
  want = {"gemma2-window": (True, False), "gemma3-window": (True, True, False),
          "mistral-window": (True, True), "gemma1-mqa": (False, False)}[name]
  assert c.layer_is_local == want
  if name == "gemma3-window":
    assert c.qk_norm and c.rope_local_theta == 1e4 and c.rope_scaling.rope_type == "linear"
  hash(c)


def test_window_logits_match_transformers(windowed):
  """30 tokens through a window of 8, fp32, within 1e-4."""
  _, m, model = windowed
  ids = _ids(2, 30)
  with torch.no_grad():
    want = m(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  got = np.asarray(FWD(model.params, model.config, jnp.asarray(ids)).logits)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


FWD_CHUNKED = jax.jit(models.forward, static_argnums=(1,),
                      static_argnames=("attn_chunk", "n_layers"))


@pytest.mark.parametrize("layers", ["stacked", "per_layer", "ring"])
@pytest.mark.parametrize("chunk", [None, 4])
def test_window_greedy_matches_generate(windowed, chunk, layers):
  """Prompt + generation cross the window; chunk=4 reads only each row's window chunks;
  per_layer keeps each layer's weights and cache in their own buffers (`models.layout`);
  ring keeps only the window in each local layer (`KVCache.init(footprint=1)`: 8 slots)."""
  _, m, model = windowed
  prompt = _ids(2, W_PROMPT, seed=1)
  with torch.no_grad():
    want = m.generate(torch.tensor(prompt, dtype=torch.long),
                      attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                      do_sample=False, max_new_tokens=W_NEW)[:, W_PROMPT:].numpy()
  b, t = prompt.shape
  params = models.layout.apply(model.params, "stacked" if layers == "ring" else layers)
  footprint = 1 if layers == "ring" else None
  cache = models.KVCache.like(params, model.config, b, t + W_NEW, footprint=footprint)
  assert cache.ring == (WINDOW if layers == "ring" and model.config.windowed else 0)
  fwd = lambda toks, cache, **kw: FWD_CHUNKED(params, model.config, toks, cache,
                                              attn_chunk=chunk, **kw)
  out = fwd(jnp.asarray(prompt), cache, valid=jnp.full((b,), t))
  toks = [jnp.argmax(out.logits[:, -1], axis=-1)]
  for _ in range(W_NEW - 1):
    out = fwd(toks[-1][:, None], out.cache)
    toks.append(jnp.argmax(out.logits[:, -1], axis=-1))
  np.testing.assert_array_equal(np.stack([np.asarray(x) for x in toks], axis=1), want)


def gemma_like_config(local_pattern=(True, True, False), n_layers=3):
  """A jaxspec ModelConfig with every Gemma feature and a WINDOW-slot sliding window
  (`local_pattern` None: every layer local, as Mistral)."""
  from jaxspec.models import ModelConfig
  return ModelConfig(dim=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, hidden_dim=64,
                     vocab_size=V, head_dim=16, max_seq_len=128, sliding_window=WINDOW,
                     local_pattern=local_pattern, rope_local_theta=1e4, embed_scale=True,
                     norm_plus_one=True, post_norms=True, qk_norm=True, act="gelu_tanh",
                     attn_softcap=5.0, final_softcap=3.0, query_scale=0.2)


def test_window_chunked_attention_ragged_tree():
  """Ragged rows, a tree mask over draft slots, early exit: reading only each row's window
  chunks equals dense attention over the whole buffer."""
  c = gemma_like_config()
  params = models.init_params(c, 0, scale=0.3)
  ids = jnp.asarray(_ids(2, 40, seed=2))
  cache = models.KVCache.init(c, 2, 64)
  full = FWD_CHUNKED(params, c, ids, cache, attn_chunk=4).cache.rewind(jnp.array([40, 23]))
  tree = jnp.asarray(np.tril(np.ones((4, 4), bool)) & np.array([[1, 0, 0, 0], [1, 1, 0, 0],
                                                                [1, 0, 1, 0], [1, 1, 0, 1]], bool))
  kw = dict(positions=full.lengths[:, None] + jnp.array([0, 1, 1, 2]), tree_mask=tree)
  toks = jnp.asarray(_ids(2, 4, seed=3))
  for n_layers in (None, 2):
    dense = FWD_CHUNKED(params, c, toks, full, attn_chunk=None, n_layers=n_layers, **kw)
    live = FWD_CHUNKED(params, c, toks, full, attn_chunk=4, n_layers=n_layers, **kw)
    np.testing.assert_allclose(np.asarray(live.logits), np.asarray(dense.logits), atol=1e-5)


RING_CASES = {"gemma3": (True, True, False), "gemma2": (True, False), "mistral": None}


@pytest.mark.parametrize("pattern", list(RING_CASES))
def test_window_ring_cache_equals_full_cache(pattern):
  """Local layers' ring buffers (window + footprint - 1 slots) against the full buffer, over
  a ragged padded prefill (valid=) and 40 random rounds as the engine runs them: chains and a
  tree of 1 to `footprint` tokens, tree paths gathered, each row rewound to a random accepted
  count. Logits agree every round. (A ring one slot shorter fails this within 8 rounds.)"""
  pat = RING_CASES[pattern]
  c = gemma_like_config(pat, n_layers=len(pat or (1, 1)))
  params = models.init_params(c, 0, scale=0.3)
  foot, size = 4, 96
  rng = np.random.default_rng(0)
  full = models.KVCache.init(c, 2, size)
  ring = models.KVCache.init(c, 2, size, footprint=foot)
  assert ring.ring == WINDOW + foot - 1 and ring.per_layer
  assert [x.shape[1] for x in ring.k] == [ring.ring if loc else size for loc in c.layer_is_local]
  lens = jnp.array([13, 5])
  prompt = jnp.asarray(rng.integers(0, V, (2, 13)))
  a = FWD(params, c, prompt, full, valid=lens)
  b = FWD(params, c, prompt, ring, valid=lens)
  np.testing.assert_allclose(np.asarray(b.logits), np.asarray(a.logits), atol=1e-5)
  fc, rc = a.cache.rewind(lens), b.cache.rewind(lens)
  tree = jnp.asarray(np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], bool))
  for step in range(40):
    t = int(rng.integers(1, foot + 1))
    toks = jnp.asarray(rng.integers(0, V, (2, t)))
    is_tree = t == foot and step % 2
    kw = dict(positions=fc.lengths[:, None] + jnp.array([0, 1, 1, 2]),
              tree_mask=tree) if is_tree else {}
    a, b = FWD(params, c, toks, fc, **kw), FWD(params, c, toks, rc, **kw)
    np.testing.assert_allclose(np.asarray(b.logits), np.asarray(a.logits), atol=1e-5,
                               err_msg=f"round {step}")
    acc = jnp.asarray(rng.integers(1, t + 1, (2,)))
    ac, bc = a.cache, b.cache
    if is_tree:  # the accepted root -> 1 -> 3 path, as Proposal.keep_path commits it
      path = jnp.array([[0, 1, 3], [0, 1, 3]])
      ac, bc = ac.gather_slots(fc.lengths, path), bc.gather_slots(rc.lengths, path)
      acc = jnp.minimum(acc, 3)
    fc, rc = ac.rewind(fc.lengths + acc), bc.rewind(rc.lengths + acc)
  assert int(jnp.min(rc.lengths)) > 3 * ring.ring  # the ring wrapped several times


def test_window_ring_cache_errors():
  from jaxspec.models import ModelConfig
  c = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=V,
                  head_dim=16, max_seq_len=128, sliding_window=WINDOW)
  params = models.init_params(c, 0)
  ring = models.KVCache.init(c, 1, 64, footprint=2)
  with pytest.raises(ValueError, match="a forward of 5 tokens on a cache whose ring layers hold "
                                       "2 speculative slots: pass valid="):
    models.forward(params, c, jnp.ones((1, 5), jnp.int32), ring)
  with pytest.raises(ValueError, match="attn_mask needs a cache without ring layers"):
    models.forward(params, c, jnp.ones((1, 2), jnp.int32), ring,
                   attn_mask=jnp.ones((1, 2, 64), bool))
  with pytest.raises(ValueError, match="footprint must be at least 1 slot, got 0"):
    models.KVCache.init(c, 1, 64, footprint=0)
  assert models.KVCache.init(c, 1, 9, footprint=2).ring == 0  # no smaller than the buffer


def test_gemma3_conditional_generation_language_model(tmp_path):
  """The language model inside Gemma3ForConditionalGeneration (vision tower skipped)."""
  text = transformers.Gemma3TextConfig(
      vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
      sliding_window=WINDOW, query_pre_attn_scalar=16, rope_parameters=_GEMMA3_ROPE,
      layer_types=["sliding_attention", "full_attention"])
  vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2,
                                           image_size=28, patch_size=14)
  cfg = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                  mm_tokens_per_image=4, image_token_index=V - 1,
                                  boi_token_index=V - 2, eoi_token_index=V - 3)
  cfg._attn_implementation = "eager"
  torch.manual_seed(0)
  m = transformers.Gemma3ForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    for name, p in m.named_parameters():
      p.copy_(torch.randn_like(p) * (0.1 if "norm" in name else 0.25))
  m.save_pretrained(tmp_path)
  model = jaxspec.load_model(str(tmp_path), progress=False)
  assert model.config.arch == "gemma3" and model.config.layer_is_local == (True, False)
  ids = _ids(2, 20)
  with torch.no_grad():
    want = m(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
  got = np.asarray(FWD(model.params, model.config, jnp.asarray(ids)).logits)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["gemma2-window", "gemma3-window", "mistral-window"])
def test_window_speculative_equals_plain(case, tmp_path):
  """NGram, EarlyExit and an EarlyExit dynamic tree across the window edge: greedy output
  equals plain greedy output, on a ragged batch. The engine's target cache keeps rings of
  window + footprint - 1 slots in the local layers and the whole buffer in global ones."""
  from jaxspec import session
  from jaxspec.drafters import EarlyExit, NGram
  from jaxspec.trees import Dynamic
  build_windowed(case).save_pretrained(tmp_path)
  model = jaxspec.load_model(str(tmp_path), progress=False)
  rep = [int(x) for x in _ids(1, 5, seed=4)[0]]
  prompts = [rep * 3, [int(x) for x in _ids(1, 6, seed=5)[0]]]  # 15 and 6 tokens
  kw = dict(max_new_tokens=24, stop_tokens=())
  plain = jaxspec.generate(model, prompts, **kw).tokens
  assert all(len(p) + 24 > 2 * WINDOW for p in prompts)
  for drafter in (NGram(n=2, k=3), EarlyExit(layers=1, k=3),
                  EarlyExit(layers=1, tree=Dynamic(nodes=8, topk=2, depth=3))):
    got = jaxspec.generate(model, prompts, drafter=drafter, **kw).tokens
    assert got == plain, drafter
    plan = session.prepare(model, prompts, drafter=drafter, **kw)
    cache = session.start(model, plan)[0].cache
    ring = WINDOW + plan.spec.drafter.footprint - 1
    assert [x.shape[1] for x in cache.k] == [ring if loc else plan.spec.buf_len
                                             for loc in model.config.layer_is_local]


@pytest.fixture(scope="module")
def gemma3_window(tmp_path_factory):
  """The gemma3-window case (seed 0) loaded through jaxspec."""
  d = tmp_path_factory.mktemp("gemma3-window-0")
  build_windowed("gemma3-window").save_pretrained(d)
  return jaxspec.load_model(str(d), progress=False)


def test_window_draft_model_with_rings(gemma3_window, tmp_path):
  """A sliding-window draft model keeps rings in its own cache (window + footprint + 1 slots:
  a bound on what a round writes past the rewind point, the root's two tokens, then the chain
  or tree; prefill and catch-up write only real tokens, `forward(valid=...)`): DraftModel
  chains and trees, a draft that always agrees (the target itself) and one that rarely does,
  every round speculating and under the switch (plain rounds, then a catch-up of the missed
  tokens), equal plain greedy decoding."""
  from jaxspec import session
  from jaxspec.drafters import DraftModel
  from jaxspec.trees import Dynamic
  model = gemma3_window
  build_windowed("gemma3-window", seed=1).save_pretrained(tmp_path)
  other = jaxspec.load_model(str(tmp_path), progress=False)
  prompts = [[int(x) for x in _ids(1, n, seed=30 + n)[0]] for n in (15, 6)]
  kw = dict(max_new_tokens=32, stop_tokens=())
  plain = jaxspec.generate(model, prompts, **kw).tokens
  for draft in (model, other):
    for d in (DraftModel(draft, k=3), DraftModel(draft, tree=Dynamic(nodes=8, topk=2, depth=3))):
      for speculate in ("always", "auto"):
        got = jaxspec.generate(model, prompts, drafter=d, speculate=speculate, **kw)
        assert got.tokens == plain, (draft is model, d, speculate)
        if draft is model and speculate == "always" and d.tree is None:  # the target's own
          # chain drafts from an exact draft cache are all accepted (this tree's top path
          # misses once, with rings or the full buffer alike)
          assert all(sum(h[:-1]) == 0 for h in got.stats.accepted), got.stats.accepted
      plan = session.prepare(model, prompts, drafter=d, **kw)
      cache = session.start(model, plan)[0].dstate.cache
      ring = WINDOW + plan.spec.drafter.footprint + 1
      assert cache.ring == ring and [x.shape[1] for x in cache.k] == [
          ring if loc else cache.size for loc in draft.config.layer_is_local]


def test_window_continuous_batching_with_rings(gemma3_window):
  """generate_many refills slots of an engine whose local layers are rings (prefill-and-insert
  of new prompts into chosen rows): each prompt's greedy tokens equal generate([prompt])."""
  from jaxspec.drafters import EarlyExit
  model = gemma3_window
  prompts = [[int(x) for x in _ids(1, n, seed=10 + n)[0]] for n in (3, 14, 7, 11, 5)]
  kw = dict(max_new_tokens=20, stop_tokens=())
  want = [jaxspec.generate(model, [p], **kw).tokens[0] for p in prompts]
  for d in (None, EarlyExit(layers=1, k=3)):
    got = {c.id: c.tokens for c in jaxspec.generate_many(
        model, prompts, batch_size=2, drafter=d, speculate=d and "always", **kw)}
    assert [got[i] for i in range(len(prompts))] == want, d


def test_window_rings_on_a_mesh(gemma3_window):
  """The engine's ring buffers sharded over a 2 x 2 (data x tensor) mesh: the same greedy
  tokens as one device, plain and with EarlyExit."""
  from jaxspec import sharding
  from jaxspec.drafters import EarlyExit
  model = gemma3_window
  prompts = [[int(x) for x in _ids(1, n, seed=20 + n)[0]] for n in (13, 4)]
  kw = dict(max_new_tokens=20, stop_tokens=())
  mesh = sharding.make_mesh(data=2, tensor=2, devices=jax.devices()[:4])
  for d in (None, EarlyExit(layers=1, k=3)):
    want = jaxspec.generate(model, prompts, drafter=d, **kw).tokens
    assert jaxspec.generate(model, prompts, drafter=d, mesh=mesh, **kw).tokens == want, d


def test_window_export_to_transformers(windowed):
  """`peers.to_transformers` (the same weight-name table and config, inverted) rebuilds a
  transformers model with the original's logits."""
  from jaxspec import peers
  _, m, model = windowed
  back = peers.to_transformers(model)
  assert type(back).__name__ == type(m).__name__
  ids = torch.tensor(_ids(2, 30), dtype=torch.long)
  with torch.no_grad():
    np.testing.assert_allclose(back(ids).logits.numpy(), m(ids).logits.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("edit, match", [
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention=true is not supported"),
    (dict(hidden_activation="gelu"), r"hidden_activation='gelu' is not supported for gemma3"),
    (dict(layer_types=["sliding_attention"]), "layer_types must list 'sliding_attention' or "
                                              "'full_attention' for each of the 3 layers"),
    (dict(rope_parameters={"sliding_attention": {"rope_type": "linear", "factor": 2.0},
                           "full_attention": {"rope_type": "default"}}),
     "RoPE scaling on sliding-window layers is not supported"),
])
def test_gemma_config_errors(edit, match):
  cfg = build_windowed("gemma3-window").config.to_dict()
  with pytest.raises(ValueError, match=match):
    hf.read_config(dict(cfg, **edit))
  with pytest.raises(ValueError, match="has no 'text_config' object"):
    hf.read_config(dict(architectures=["Gemma3ForConditionalGeneration"], model_type="gemma3"))


# llama.cpp's names for Gemma tensors (convert_hf_to_gguf.py), per-layer.
_GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
               "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
               "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
               "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _write_gemma_gguf(m, path, arch):
  """A float32 GGUF of a transformers Gemma model, written as llama.cpp's converter does
  (norm weights stored as 1 + w, names and metadata keys of llama.cpp)."""
  import gguf
  import test_loaders
  c = m.config
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_key_length(c.head_dim)
  w.add_value_length(c.head_dim)
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  if arch == "gemma3":
    w.add_rope_freq_base(c.rope_parameters["full_attention"]["rope_theta"])
  else:
    w.add_rope_freq_base(10000.0)
  if arch != "gemma":
    w.add_sliding_window(c.sliding_window)
  if arch == "gemma2":
    w.add_float32(f"{arch}.attn_logit_softcapping", c.attn_logit_softcapping)
    w.add_float32(f"{arch}.final_logit_softcapping", c.final_logit_softcapping)
  tokens, merges = test_loaders._tiny_vocab(V)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("smollm")
  w.add_token_list(tokens)
  w.add_token_merges(merges)
  w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
  for name, x in m.state_dict().items():
    x = x.float().numpy()
    if name.endswith("norm.weight"):
      x = x + 1
    name = name.removeprefix("model.")
    if name == "embed_tokens.weight":
      w.add_tensor("token_embd.weight", x)
    elif name == "norm.weight":
      w.add_tensor("output_norm.weight", x)
    elif name.startswith("layers."):
      _, i, rest = name.split(".", 2)
      rest = rest.removesuffix(".weight")
      if arch == "gemma":
        extra = {"post_attention_layernorm": "ffn_norm"}
      else:
        extra = {"post_attention_layernorm": "post_attention_norm",
                 "pre_feedforward_layernorm": "ffn_norm",
                 "post_feedforward_layernorm": "post_ffw_norm"}
      w.add_tensor(f"blk.{i}.{dict(_GGUF_NAMES, **extra)[rest]}.weight", x)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.mark.parametrize("case, arch", [("gemma1-mqa", "gemma"), ("gemma2-window", "gemma2"),
                                        ("gemma3-window", "gemma3")])
def test_gemma_gguf_matches_transformers(case, arch, tmp_path):
  """GGUF gemma / gemma2 / gemma3 as llama.cpp writes them: the same logits as transformers."""
  # llama.cpp derives the query scale from head_dim (as for Gemma 2 2B/9B, Gemma 3 up to 12B)
  # and cycles five local layers to one global on gemma3 (three layers: all local).
  over = {} if arch == "gemma" else dict(query_pre_attn_scalar=16)
  if arch == "gemma3":
    over.update(layer_types=["sliding_attention"] * 3, rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
  m = build_windowed(case, **over)
  path = tmp_path / f"{arch}.gguf"
  _write_gemma_gguf(m, path, arch)
  model = jaxspec.load_model(str(path), progress=False)
  c = model.config
  assert c.arch == f"gguf-{arch}" and c.norm_plus_one and c.sliding_window == (
      None if arch == "gemma" else WINDOW)
  ids = _ids(2, 30)
  with torch.no_grad():
    want = m(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  got = np.asarray(FWD(model.params, model.config, jnp.asarray(ids)).logits)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

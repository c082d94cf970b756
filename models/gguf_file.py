"""GGUF files (llama.cpp): metadata to config, tensors dequantized to numpy, embedded tokenizer.

Named `gguf_file` so it never shadows the `gguf` package it reads with.
"""

from __future__ import annotations

import os

import numpy as np

from .config import ModelConfig
from .tokenizer import HFTokenizer

SUPPORTED_ARCHS = ("llama", "qwen2")
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")


def _reader(path: str):
  import gguf

  try:
    r = gguf.GGUFReader(path)
  except Exception as e:  # the reader raises assorted errors on damaged files
    raise ValueError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from e
  size = os.path.getsize(path)
  for t in r.tensors:
    end = int(t.data_offset) + int(t.n_bytes)
    if end > size:
      raise ValueError(f"{path}: truncated GGUF file: tensor {t.name} ends at byte {end}, "
                       f"file has {size}")
  return r


def _field(r, key, default=None):
  f = r.fields.get(key)
  if f is None:
    return default
  return f.contents()


def read_config(r, path: str = "") -> ModelConfig:
  arch = _field(r, "general.architecture")
  if arch not in SUPPORTED_ARCHS:
    raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported "
                     f"(supported: {', '.join(SUPPORTED_ARCHS)})")
  g = lambda k, d=None: _field(r, f"{arch}.{k}", d)
  n_heads = int(g("attention.head_count"))
  dim = int(g("embedding_length"))
  vocab = g("vocab_size") or len(r.fields["tokenizer.ggml.tokens"].data)
  names = {t.name for t in r.tensors}
  return ModelConfig(
      dim=dim, n_layers=int(g("block_count")), n_heads=n_heads,
      n_kv_heads=int(g("attention.head_count_kv", n_heads)),
      hidden_dim=int(g("feed_forward_length")), vocab_size=int(vocab),
      head_dim=int(g("attention.key_length", dim // n_heads)),
      max_seq_len=int(g("context_length", 2048)),
      norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
      rope_theta=float(g("rope.freq_base", 10000.0)),
      # llama.cpp permutes llama q/k rows for its interleaved ("NORM") RoPE; qwen2 uses NEOX.
      rope_layout="interleaved" if arch == "llama" else "half",
      tied_embeddings="output.weight" not in names,
      qkv_bias="blk.0.attn_q.bias" in names, arch=f"gguf-{arch}")


def _dequantize(t, path: str) -> np.ndarray:
  import gguf

  kind = t.tensor_type.name
  if kind not in SUPPORTED_TYPES:
    raise ValueError(f"{path}: tensor {t.name} has GGML type {kind}, not supported "
                     f"(supported: {', '.join(SUPPORTED_TYPES)})")
  x = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
  shape = tuple(int(s) for s in reversed(t.shape))  # ne[0] varies fastest
  return np.asarray(x, np.float32).reshape(shape)


def load(path: str, progress: bool = True) -> tuple[ModelConfig, dict, HFTokenizer]:
  from tqdm.auto import tqdm

  r = _reader(path)
  c = read_config(r, path)
  tensors = {t.name: t for t in r.tensors}
  L, D, N, K, H = c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim

  def get(name):
    if name not in tensors:
      raise ValueError(f"{path}: GGUF file has no tensor {name!r}")
    return tensors[name]

  per_layer = {"attn_norm": "attn_norm.weight", "wq": "attn_q.weight", "wk": "attn_k.weight",
               "wv": "attn_v.weight", "wo": "attn_output.weight", "mlp_norm": "ffn_norm.weight",
               "w_gate": "ffn_gate.weight", "w_up": "ffn_up.weight", "w_down": "ffn_down.weight"}
  if c.qkv_bias:
    per_layer.update(bq="attn_q.bias", bk="attn_k.bias", bv="attn_v.bias")
  reshape = {
      "wq": lambda w: w.T.reshape(D, N, H), "wk": lambda w: w.T.reshape(D, K, H),
      "wv": lambda w: w.T.reshape(D, K, H), "wo": lambda w: w.T.reshape(N, H, D),
      "w_gate": lambda w: w.T, "w_up": lambda w: w.T, "w_down": lambda w: w.T,
      "bq": lambda w: w.reshape(N, H), "bk": lambda w: w.reshape(K, H),
      "bv": lambda w: w.reshape(K, H),
  }
  total = 2 + L * len(per_layer) + (0 if c.tied_embeddings else 1)
  bar = tqdm(total=total, desc=f"loading {os.path.basename(path)}", unit="tensor",
             disable=not progress, leave=False)

  def read(name):
    out = _dequantize(get(name), path)
    bar.update(1)
    return out

  try:
    params = {"embed": read("token_embd.weight"), "final_norm": read("output_norm.weight")}
    layers = {k: [] for k in per_layer}
    for i in range(L):
      for k, suffix in per_layer.items():
        w = read(f"blk.{i}.{suffix}")
        layers[k].append(reshape.get(k, lambda w: w)(w))
    params["layers"] = {k: np.stack(v) for k, v in layers.items()}
    if not c.tied_embeddings:
      params["lm_head"] = read("output.weight").T
  except ValueError:
    raise
  except Exception as e:
    raise ValueError(f"{path}: corrupt GGUF tensor data ({type(e).__name__}: {e})") from e
  finally:
    bar.close()
  return c, params, tokenizer(r, path)


def tokenizer(r, path: str = "") -> HFTokenizer:
  model = _field(r, "tokenizer.ggml.model")
  if model != "gpt2":
    raise ValueError(f"{path}: GGUF tokenizer {model!r} is not supported (supported: gpt2 "
                     f"byte-level BPE)")
  tokens = _field(r, "tokenizer.ggml.tokens")
  merges = [tuple(m.split(" ", 1)) for m in _field(r, "tokenizer.ggml.merges")]
  types = _field(r, "tokenizer.ggml.token_type") or [1] * len(tokens)
  vocab = {t: i for i, t in enumerate(tokens)}
  specials = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3}  # CONTROL
  bos = _field(r, "tokenizer.ggml.bos_token_id")
  eos = _field(r, "tokenizer.ggml.eos_token_id")
  pre = _field(r, "tokenizer.ggml.pre", "default")
  if pre not in ("smollm", "gpt2", "default"):
    raise ValueError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported (supported: smollm, "
                     f"gpt2); load the Hugging Face checkpoint directory instead")
  return HFTokenizer.from_bpe(
      vocab, merges, split_digits=pre == "smollm",
      bos_id=None if bos is None else int(bos),
      eos_ids=() if eos is None else (int(eos),),
      add_bos=bool(_field(r, "tokenizer.ggml.add_bos_token", False)),
      chat_template=_field(r, "tokenizer.chat_template"),
      special_tokens=specials,
      bos_token=None if bos is None else tokens[int(bos)],
      eos_token=None if eos is None else tokens[int(eos)])

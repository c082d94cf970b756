"""GGUF files (llama.cpp): metadata to config, tensors dequantized to numpy, embedded tokenizer.

Named `gguf_file` so it never shadows the `gguf` package it reads with. Every tensor type that
`gguf.quants` can dequantize loads (F32, F16, BF16, Q4_0..Q8_0, the K-quants, the IQ types,
TQ and MXFP4), one tensor at a time and bit for bit what `gguf.quants.dequantize` gives.
"""

from __future__ import annotations

import os

import numpy as np

from . import gguf_tokenizer
from .config import ModelConfig, RopeScaling
from .finite import check_finite
from .gguf_reader import GGUF, Tensor
from .tokenizer import HFTokenizer

# GGUF architecture -> the RoPE layout its q/k weights are stored for: llama.cpp's converter
# permutes llama rows for interleaved ("NORM") RoPE; qwen2/qwen3 and Gemma use NEOX RoPE,
# Hugging Face's rotate-half. Mistral 7B-style files are "llama" (llama.cpp has no "mistral"
# architecture; "mistral3" is a different model and is refused).
ARCHS = {"llama": "interleaved", "qwen2": "half", "qwen3": "half",
         "gemma": "half", "gemma2": "half", "gemma3": "half"}
GEMMA = ("gemma", "gemma2", "gemma3")
SUPPORTED_ARCHS = tuple(ARCHS)
_ROW_BYTES = 1 << 24  # dequantize big tensors in slices of rows of about this many bytes


def supported_types() -> tuple[str, ...]:
  """The GGML tensor types `gguf.quants.dequantize` implements in the installed gguf-py."""
  import gguf

  traits = getattr(gguf.quants, "_type_traits", {})
  kinds = [gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, *traits]
  return tuple(dict.fromkeys(k.name for k in kinds))


def _reader(path: str) -> GGUF:
  try:
    r = GGUF(path)
  except Exception as e:  # a damaged header fails in assorted ways
    raise ValueError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from e
  size = os.path.getsize(path)
  for t in r.tensors.values():
    if t.offset + t.n_bytes > size:
      raise ValueError(f"{path}: truncated GGUF file: tensor {t.name} ends at byte "
                       f"{t.offset + t.n_bytes}, file has {size}")
  return r


def _field(r: GGUF, key, default=None):
  return r.fields.get(key, default)


def read_config(r, path: str = "") -> ModelConfig:
  arch = _field(r, "general.architecture")
  if arch not in ARCHS:
    raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported "
                     f"(supported: {', '.join(SUPPORTED_ARCHS)})")
  g = lambda k, d=None: _field(r, f"{arch}.{k}", d)
  n_heads = int(g("attention.head_count"))
  dim = int(g("embedding_length"))
  names = set(r.tensors)
  embed = r.tensors.get("token_embd.weight")
  vocab = g("vocab_size") or (embed.ne[-1] if embed is not None else
                              len(r.fields.get("tokenizer.ggml.tokens", ())))
  extra = _gemma(g, arch, dim, n_heads, int(g("block_count"))) if arch in GEMMA else {}
  return ModelConfig(
      dim=dim, n_layers=int(g("block_count")), n_heads=n_heads,
      n_kv_heads=int(g("attention.head_count_kv", n_heads)),
      hidden_dim=int(g("feed_forward_length")), vocab_size=int(vocab),
      head_dim=int(g("attention.key_length", dim // n_heads)),
      max_seq_len=int(g("context_length", 2048)),
      norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
      rope_theta=float(g("rope.freq_base", 10000.0)), rope_layout=ARCHS[arch],
      tied_embeddings="output.weight" not in names,
      qkv_bias="blk.0.attn_q.bias" in names, qk_norm="blk.0.attn_q_norm.weight" in names,
      arch=f"gguf-{arch}", **extra)


def _gemma(g, arch: str, dim: int, n_heads: int, n_layers: int) -> dict:
  """Gemma fields as llama.cpp reads them: soft-caps and the window from metadata, local layers
  every other one (Gemma 2) or five of six (Gemma 3) with base 10000 on Gemma 3's, and the
  query scale 1/sqrt(head_dim) except 1/sqrt(dim / heads) for the 27B models."""
  out = dict(act="gelu_tanh", embed_scale=True, norm_plus_one=True)
  if arch == "gemma":
    return out
  head_dim = int(g("attention.key_length", dim // n_heads))
  big = n_layers in (46, 62)  # Gemma 2 / Gemma 3 27B: query_pre_attn_scalar = dim / heads
  cap = lambda k: float(g(k)) if g(k) is not None else None
  window = g("attention.sliding_window")
  out.update(post_norms=True, query_scale=(dim / n_heads if big else head_dim) ** -0.5,
             attn_softcap=cap("attn_logit_softcapping"),
             final_softcap=cap("final_logit_softcapping"),
             sliding_window=None if window is None else int(window),
             local_pattern=(True, False) if arch == "gemma2" else (True,) * 5 + (False,))
  if arch == "gemma3":
    out["rope_local_theta"] = float(g("rope.freq_base_swa", 10000.0))
    kind, factor = g("rope.scaling.type"), g("rope.scaling.factor")
    if kind not in (None, "none") and factor is not None and float(factor) != 1.0:
      if kind != "linear":
        raise ValueError(f"GGUF gemma3 RoPE scaling {kind!r} is not supported (supported: linear)")
      out["rope_scaling"] = RopeScaling(factor=float(factor), rope_type="linear")
  return out


def type_name(t: Tensor) -> str:
  import gguf

  try:
    return gguf.GGMLQuantizationType(t.type_id).name
  except ValueError:
    return f"#{t.type_id} (unknown)"


def dequantize(r: GGUF, t: Tensor, path: str = "") -> np.ndarray:
  """One tensor as float32 in numpy order (ne reversed): `gguf.quants.dequantize` of its bytes,
  in slices of rows so a big embedding never needs several full-size temporaries."""
  import gguf

  kind = type_name(t)
  if kind not in supported_types():
    raise ValueError(f"{path}: tensor {t.name} has GGML type {kind}, not supported "
                     f"(supported: {', '.join(supported_types())})")
  qtype = gguf.GGMLQuantizationType(t.type_id)
  rows = np.asarray(r.data(t))  # a plain view: numpy memmap slices are slow to create
  y = np.empty((rows.shape[0], t.ne[0]), np.float32)
  step = max(1, _ROW_BYTES // max(1, t.row_bytes))
  for i in range(0, rows.shape[0], step):
    y[i:i + step] = gguf.quants.dequantize(rows[i:i + step], qtype)
  return y.reshape(t.shape)


def _transpose_into(out: np.ndarray, w: np.ndarray, rows: int = 1024) -> None:
  """out[...] = w.T in slices of rows: ~4x faster than one big strided copy."""
  for i in range(0, w.shape[0], rows):
    out[:, i:i + rows] = w[i:i + rows].T


def _plan(c: ModelConfig) -> dict[str, tuple[str, bool]]:
  """jaxspec layer parameter -> (GGUF tensor suffix, whether llama.cpp's [out, in] matrix is
  transposed to jaxspec's [in, out] layout)."""
  plan = {"attn_norm": ("attn_norm.weight", False), "wq": ("attn_q.weight", True),
          "wk": ("attn_k.weight", True), "wv": ("attn_v.weight", True),
          "wo": ("attn_output.weight", True), "mlp_norm": ("ffn_norm.weight", False),
          "w_gate": ("ffn_gate.weight", True), "w_up": ("ffn_up.weight", True),
          "w_down": ("ffn_down.weight", True)}
  if c.qkv_bias:
    plan.update(bq=("attn_q.bias", False), bk=("attn_k.bias", False), bv=("attn_v.bias", False))
  if c.qk_norm:
    plan.update(q_norm=("attn_q_norm.weight", False), k_norm=("attn_k_norm.weight", False))
  if c.post_norms:  # Gemma 2 / 3; ffn_norm is the pre-feed-forward norm
    plan.update(post_attn_norm=("post_attention_norm.weight", False),
                post_mlp_norm=("post_ffw_norm.weight", False))
  return plan


def load(path: str, progress: bool = True) -> tuple[ModelConfig, dict, HFTokenizer]:
  from tqdm.auto import tqdm

  from .llama import param_shapes

  r = _reader(path)
  c = read_config(r, path)
  tensors = r.tensors
  plan = _plan(c)
  shapes = param_shapes(c)
  total = 2 + c.n_layers * len(plan) + (0 if c.tied_embeddings else 1)
  bar = tqdm(total=total, desc=f"loading {os.path.basename(path)}", unit="tensor",
             disable=not progress, leave=False)

  def read(name, shape, out=None, transpose=False):
    """Tensor `name` dequantized into `out` (a new array when None), transposed or not."""
    if name not in tensors:
      raise ValueError(f"{path}: GGUF file has no tensor {name!r}")
    t = tensors[name]
    if int(np.prod(t.shape)) != int(np.prod(shape)):
      raise ValueError(f"{path}: tensor {name} has shape {t.shape}, the config implies {shape}")
    w = dequantize(r, t, path)
    check_finite(name, w, path)
    if out is None:
      out = np.empty(shape, np.float32)
    if transpose:
      _transpose_into(out.reshape(w.shape[1], w.shape[0]), w)
    else:
      out[...] = w.reshape(out.shape)
    bar.update(1)
    return out

  try:
    params = {"embed": read("token_embd.weight", shapes["embed"]),
              "final_norm": read("output_norm.weight", shapes["final_norm"])}
    layers = {k: np.empty(shapes["layers"][k], np.float32) for k in plan}  # filled in place
    for i in range(c.n_layers):
      for k, (suffix, transpose) in plan.items():
        read(f"blk.{i}.{suffix}", shapes["layers"][k][1:], layers[k][i], transpose)
    params["layers"] = layers
    if c.norm_plus_one:  # llama.cpp stores Gemma norms as 1 + w; jaxspec (like HF) keeps w
      params["final_norm"] -= 1
      for k in (k for k in layers if "norm" in k):
        layers[k] -= 1
    if not c.tied_embeddings:
      params["lm_head"] = read("output.weight", shapes["lm_head"], transpose=True)
  except ValueError:
    raise
  except Exception as e:
    raise ValueError(f"{path}: corrupt GGUF tensor data ({type(e).__name__}: {e})") from e
  finally:
    bar.close()
  return c, params, tokenizer(r, path)


def tokenizer(r, path: str = "") -> HFTokenizer:
  """The tokenizer in a GGUF file's metadata (see `gguf_tokenizer`), with its specials, BOS
  policy and chat template."""
  tokens = _field(r, "tokenizer.ggml.tokens")
  if tokens is None:
    raise ValueError(f"{path}: GGUF file has no tokenizer (no tokenizer.ggml.tokens)")
  kind = _field(r, "tokenizer.ggml.model")
  unk = _field(r, "tokenizer.ggml.unknown_token_id")
  tok, specials = gguf_tokenizer.build(
      kind=kind, pre=_field(r, "tokenizer.ggml.pre"), arch=_field(r, "general.architecture"),
      tokens=tokens, merges=_field(r, "tokenizer.ggml.merges"),
      scores=_field(r, "tokenizer.ggml.scores"), token_types=_field(r, "tokenizer.ggml.token_type"),
      unk_id=None if unk is None else int(unk), path=path)
  bos = _field(r, "tokenizer.ggml.bos_token_id")
  eos = _field(r, "tokenizer.ggml.eos_token_id")
  # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise.
  add_bos = _field(r, "tokenizer.ggml.add_bos_token", kind == "llama")
  return HFTokenizer(
      tok, bos_id=None if bos is None else int(bos),
      eos_ids=() if eos is None else (int(eos),), add_bos=bool(add_bos),
      chat_template=_field(r, "tokenizer.chat_template"), special_tokens=specials,
      bos_token=None if bos is None else tokens[int(bos)],
      eos_token=None if eos is None else tokens[int(eos)])

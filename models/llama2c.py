"""llama2.c checkpoints: the legacy (version 0) `.bin` export and its tokenizer."""

from __future__ import annotations

import os

import numpy as np

from .config import ModelConfig
from .finite import check_finite

_HEADER = 7  # int32: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len


def read_config(path: str) -> tuple[ModelConfig, bool]:
  size = os.path.getsize(path)
  if size < _HEADER * 4:
    raise ValueError(f"{path}: truncated llama2.c file ({size} bytes, shorter than its header)")
  dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = np.fromfile(path, np.int32, _HEADER)
  shared = vocab > 0
  vocab = abs(int(vocab))
  if min(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len) <= 0 or dim % n_heads:
    raise ValueError(f"{path}: not a llama2.c checkpoint (implausible header "
                     f"{[int(x) for x in (dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len)]})")
  config = ModelConfig(dim=int(dim), hidden_dim=int(hidden), n_layers=int(n_layers),
                       n_heads=int(n_heads), n_kv_heads=int(n_kv), vocab_size=vocab,
                       max_seq_len=int(seq_len), norm_eps=1e-5, rope_theta=10000.0,
                       rope_layout="interleaved", tied_embeddings=shared, arch="llama2c")
  return config, shared


def load(path: str) -> tuple[ModelConfig, dict]:
  """Reads a llama2.c `.bin` into (config, params) with float32 numpy arrays."""
  c, shared = read_config(path)
  L, D, F, V, H = c.n_layers, c.dim, c.hidden_dim, c.vocab_size, c.head_dim
  kv = c.n_kv_heads * H
  sizes = [("embed", (V, D)), ("attn_norm", (L, D)), ("wq", (L, D, D)), ("wk", (L, kv, D)),
           ("wv", (L, kv, D)), ("wo", (L, D, D)), ("mlp_norm", (L, D)), ("w1", (L, F, D)),
           ("w2", (L, D, F)), ("w3", (L, F, D)), ("final_norm", (D,)),
           ("freq_real", (c.max_seq_len, H // 2)), ("freq_imag", (c.max_seq_len, H // 2))]
  if not shared:
    sizes.append(("wcls", (V, D)))
  n_floats = sum(int(np.prod(s)) for _, s in sizes)
  expected = _HEADER * 4 + n_floats * 4
  actual = os.path.getsize(path)
  if actual < expected:
    raise ValueError(f"{path}: truncated llama2.c checkpoint: {actual} bytes, the header implies "
                     f"{expected}")
  if actual > expected:
    raise ValueError(f"{path}: {actual - expected} unexpected trailing bytes after a llama2.c "
                     f"checkpoint of {expected} bytes (is it a newer version-1/2 export?)")
  flat = np.fromfile(path, np.float32, n_floats, offset=_HEADER * 4)
  t, off = {}, 0
  for name, shape in sizes:
    n = int(np.prod(shape))
    t[name] = flat[off:off + n].reshape(shape)
    check_finite(name, t[name], path)
    off += n
  N, K = c.n_heads, c.n_kv_heads
  # llama2.c stores W[out, in] (y = W @ x); jaxspec keeps x @ W with heads split out.
  layers = {
      "attn_norm": t["attn_norm"],
      "wq": t["wq"].transpose(0, 2, 1).reshape(L, D, N, H),
      "wk": t["wk"].transpose(0, 2, 1).reshape(L, D, K, H),
      "wv": t["wv"].transpose(0, 2, 1).reshape(L, D, K, H),
      "wo": t["wo"].transpose(0, 2, 1).reshape(L, N, H, D),
      "mlp_norm": t["mlp_norm"],
      "w_gate": t["w1"].transpose(0, 2, 1),
      "w_up": t["w3"].transpose(0, 2, 1),
      "w_down": t["w2"].transpose(0, 2, 1),
  }
  params = {"embed": t["embed"], "layers": layers, "final_norm": t["final_norm"]}
  if not shared:
    params["lm_head"] = t["wcls"].T
  return c, params

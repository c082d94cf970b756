"""The one table between jaxspec params and Hugging Face tensor names, used both ways.

`table(config)` maps each jaxspec parameter to its transformers name suffix, the shape
transformers stores, and the two layout conversions. `read_params` fills jaxspec params from a
checkpoint with it; `state_dict` writes a transformers state dict with it (export for
`--compare-transformers`).

Transformers keeps q/k rows in their natural order and rotates halves, so loading is transposes
and reshapes only; models with interleaved RoPE (GGUF llama, llama2.c) permute each head's q/k
dims on export (`rope_permutation`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from . import llama
from .config import ModelConfig

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Entry:
  name: str  # transformers name (per-layer entries: suffix after `layers.{i}.`)
  shape: tuple[int, ...]  # shape transformers stores
  load: Callable[[np.ndarray], np.ndarray]  # transformers layout -> jaxspec layout
  save: Callable[[np.ndarray], np.ndarray]  # jaxspec layout -> transformers layout


def rope_permutation(head_dim: int, layout: str) -> np.ndarray:
  """Head-dim permutation taking jaxspec's q/k layout to transformers' rotate-half layout."""
  if layout == "half":
    return np.arange(head_dim)
  return np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])


def table(c: ModelConfig) -> tuple[dict[str, Entry], dict[str, Entry]]:
  """(top-level entries, per-layer entries), keyed by jaxspec parameter name."""
  D, N, K, H, F, V = c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.hidden_dim, c.vocab_size
  p = rope_permutation(H, c.rope_layout)  # identity for checkpoints transformers wrote
  same = lambda w: w
  t = lambda w: w.T
  proj = lambda n: Entry("", (n * H, D), lambda w: w.T.reshape(D, n, H),
                         lambda w: w[:, :, p].reshape(D, n * H).T)
  top = {"embed": Entry("embed_tokens.weight", (V, D), same, same),
         "final_norm": Entry("norm.weight", (D,), same, same)}
  if not c.tied_embeddings:
    top["lm_head"] = Entry("lm_head.weight", (V, D), t, t)
  lay = {
      "attn_norm": Entry("input_layernorm.weight", (D,), same, same),
      "wq": dataclasses.replace(proj(N), name="self_attn.q_proj.weight"),
      "wk": dataclasses.replace(proj(K), name="self_attn.k_proj.weight"),
      "wv": Entry("self_attn.v_proj.weight", (K * H, D), lambda w: w.T.reshape(D, K, H),
                  lambda w: w.reshape(D, K * H).T),
      "wo": Entry("self_attn.o_proj.weight", (D, N * H), lambda w: w.T.reshape(N, H, D),
                  lambda w: w.reshape(N * H, D).T),
      "w_gate": Entry("mlp.gate_proj.weight", (F, D), t, t),
      "w_up": Entry("mlp.up_proj.weight", (F, D), t, t),
      "w_down": Entry("mlp.down_proj.weight", (D, F), t, t),
  }
  if c.post_norms:  # Gemma 2 / 3: post_attention_layernorm is the attention OUTPUT norm
    lay.update(post_attn_norm=Entry("post_attention_layernorm.weight", (D,), same, same),
               mlp_norm=Entry("pre_feedforward_layernorm.weight", (D,), same, same),
               post_mlp_norm=Entry("post_feedforward_layernorm.weight", (D,), same, same))
  else:
    lay["mlp_norm"] = Entry("post_attention_layernorm.weight", (D,), same, same)
  if c.qkv_bias:
    bias = lambda n, perm: Entry("", (n * H,), lambda w: w.reshape(n, H),
                                 lambda w: w[:, perm].reshape(-1))
    lay.update(bq=dataclasses.replace(bias(N, p), name="self_attn.q_proj.bias"),
               bk=dataclasses.replace(bias(K, p), name="self_attn.k_proj.bias"),
               bv=dataclasses.replace(bias(K, np.arange(H)), name="self_attn.v_proj.bias"))
  if c.qk_norm:
    lay.update(q_norm=Entry("self_attn.q_norm.weight", (H,), same, lambda w: w[p]),
               k_norm=Entry("self_attn.k_norm.weight", (H,), same, lambda w: w[p]))
  return top, lay


def prefixes(names) -> tuple[str, str]:
  """(prefix of the decoder's tensors, name of the LM head) in a checkpoint's tensor names:
  `model.` for *ForCausalLM, `model.language_model.` (transformers 5) or
  `language_model.model.` (transformers 4) for Gemma 3 multimodal checkpoints."""
  for pre, head in (("model.", "lm_head.weight"), ("", "lm_head.weight"),
                    ("model.language_model.", "lm_head.weight"),
                    ("language_model.model.", "language_model.lm_head.weight")):
    if f"{pre}embed_tokens.weight" in names:
      return pre, head
  return "model.", "lm_head.weight"  # let the missing-tensor error name the usual key


def read_params(w, c: ModelConfig, dtype, *, progress: bool = True,
                desc: str = "loading") -> dict[str, Any]:
  """Host (numpy) params in jaxspec's layout and `dtype`, filled one tensor at a time from
  `w` (a `safetensors_file.Weights`)."""
  from tqdm.auto import tqdm

  prefix, head_name = prefixes(w.where)
  np_dtype = np.dtype(dtype)
  shapes = llama.param_shapes(c)
  top, lay = table(c)
  extra = f"{prefix}layers.{c.n_layers}.input_layernorm.weight"
  if extra in w:
    raise ValueError(f"{w.where[extra]}: checkpoint has more than num_hidden_layers={c.n_layers} "
                     f"layers; config and weights do not match")
  used = set()
  bar = tqdm(total=len(top) + c.n_layers * len(lay), desc=desc, unit="tensor",
             disable=not progress, leave=False)

  def get(name, e: Entry, what):
    x = w.read(name, e.shape, what)
    used.add(name)
    bar.update(1)
    return e.load(x)

  try:
    params = {}
    for k, e in top.items():
      name = head_name if k == "lm_head" else prefix + e.name
      params[k] = np.ascontiguousarray(get(name, e, k), dtype=np_dtype)
    layers = {k: np.empty(s, np_dtype) for k, s in shapes["layers"].items()}
    for i in range(c.n_layers):
      for k, e in lay.items():
        layers[k][i] = get(f"{prefix}layers.{i}.{e.name}", e, f"layers.{k}[{i}]")
    params["layers"] = layers
  finally:
    bar.close()
  mine = lambda n: n.startswith(prefix) or n == head_name  # skip a multimodal vision tower
  tied_head = lambda n: c.tied_embeddings and n == head_name
  left = sorted(n for n in w.where if n not in used and mine(n)
                and not n.endswith(_IGNORED_SUFFIXES) and not tied_head(n))
  if left:
    more = f" and {len(left) - 5} more" if len(left) > 5 else ""
    raise ValueError(f"checkpoint has tensors the {c.arch} config does not use: "
                     f"{', '.join(left[:5])}{more}; config and weights do not match")
  llama.check_params(params, c)
  return params


def state_dict(c: ModelConfig, params) -> dict[str, np.ndarray]:
  """jaxspec params (host or device) -> {transformers *ForCausalLM name: float32 numpy}."""
  import jax

  p = jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(params))
  top, lay = table(c)
  sd = {("lm_head.weight" if k == "lm_head" else "model." + e.name): e.save(p[k])
        for k, e in top.items()}
  from . import layout
  for i in range(c.n_layers):
    w = layout.layer(p, i)
    for k, e in lay.items():
      sd[f"model.layers.{i}.{e.name}"] = e.save(w[k])
  return sd

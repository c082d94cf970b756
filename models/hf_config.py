"""Hugging Face `config.json` <-> `ModelConfig`, both directions.

`read_config` parses a transformers config (4.x or 5.x spelling) for the supported
architectures; `to_hf_config` is its inverse, used to export a jaxspec model to transformers.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp

from .config import ModelConfig, RopeScaling

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "mistral",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Gemma3ForConditionalGeneration": "gemma3",  # its language model; the vision tower is skipped
}
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "mistral",
               "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3", "gemma3_text": "gemma3"}
GEMMA = ("gemma", "gemma2", "gemma3")
ROPE_TYPES = ("default", "llama3", "linear")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# transformers' defaults for the fields Gemma 3 multimodal checkpoints leave out of text_config.
_GEMMA3_TEXT = dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216,
                    num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                    head_dim=256, rms_norm_eps=1e-6, query_pre_attn_scalar=256,
                    sliding_window=4096, max_position_embeddings=131072,
                    hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)
_GEMMA2_SOFTCAPS = dict(attn_logit_softcapping=50.0, final_logit_softcapping=30.0)


def read_json(path: str) -> dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      out = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(out, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(out).__name__}")
  return out


def optional_json(folder: str, name: str) -> dict[str, Any]:
  path = os.path.join(folder, name)
  return read_json(path) if os.path.exists(path) else {}


def architecture(cfg: dict[str, Any], path: str = "config.json") -> tuple[str, str]:
  """(transformers class name, jaxspec arch) of a config, or a ValueError naming what is
  supported."""
  archs = cfg.get("architectures") or []
  if not archs and "model_type" not in cfg:
    raise ValueError(f"{path}: not a Hugging Face model config (no 'architectures' or "
                     f"'model_type' field)")
  name = next((a for a in archs if a in ARCHITECTURES), None)
  if name is None and not archs and cfg.get("model_type") in MODEL_TYPES:
    arch = MODEL_TYPES[cfg["model_type"]]
    name = next(k for k, v in ARCHITECTURES.items() if v == arch)
  if name is None:
    got = ", ".join(archs) if archs else f"model_type={cfg.get('model_type')!r}"
    raise ValueError(f"{path}: architecture {got} is not supported (supported: "
                     f"{', '.join(ARCHITECTURES)})")
  return name, ARCHITECTURES[name]


# ------------------------------------------------------------------------------------- reading


def _scaling(rp: dict[str, Any], path: str) -> RopeScaling | None:
  """Scaling of one RoPE parameter block (`rope_scaling` or a `rope_parameters` entry)."""
  kind = rp.get("rope_type") or rp.get("type") or "default"
  if kind not in ROPE_TYPES:
    raise ValueError(f"{path}: RoPE type {kind!r} is not supported (supported: "
                     f"{', '.join(ROPE_TYPES)})")
  if kind == "default":
    return None
  d = RopeScaling()
  return RopeScaling(
      factor=float(rp.get("factor", d.factor)),
      low_freq_factor=float(rp.get("low_freq_factor", d.low_freq_factor)),
      high_freq_factor=float(rp.get("high_freq_factor", d.high_freq_factor)),
      original_max_position_embeddings=int(rp.get("original_max_position_embeddings",
                                                  d.original_max_position_embeddings)),
      rope_type=kind)


def _rope(cfg: dict[str, Any], path: str, arch: str):
  """(rope_theta, scaling, local theta or None) from `rope_theta` + `rope_scaling`
  (+ Gemma 3's `rope_local_base_freq`; transformers 4) or `rope_parameters` (transformers 5,
  per layer type for Gemma 3)."""
  rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
  if not isinstance(rp, dict):
    raise ValueError(f"{path}: rope parameters must be a JSON object, got {rp!r}")
  local_theta = None
  if "full_attention" in rp or "sliding_attention" in rp:  # transformers 5, per layer type
    local = rp.get("sliding_attention") or {}
    if _scaling(local, path) is not None:
      raise ValueError(f"{path}: RoPE scaling on sliding-window layers is not supported")
    local_theta = float(local.get("rope_theta", 10000.0))
    rp = rp.get("full_attention") or {}
  elif arch == "gemma3":
    local_theta = float(cfg.get("rope_local_base_freq", 10000.0))
  default_theta = 1e6 if arch == "gemma3" else 10000.0
  theta = float(cfg.get("rope_theta", rp.get("rope_theta", default_theta)))
  if float(cfg.get("partial_rotary_factor", rp.get("partial_rotary_factor", 1.0))) != 1.0:
    raise ValueError(f"{path}: partial rotary embeddings (partial_rotary_factor != 1) are not "
                     f"supported")
  return theta, _scaling(rp, path), local_theta


def _period(flags: list[bool]) -> tuple[bool, ...]:
  """The shortest cycle that repeats to `flags`."""
  n = len(flags)
  p = next(p for p in range(1, n + 1) if all(flags[i] == flags[i % p] for i in range(n)))
  return tuple(flags[:p])


def _window(cfg: dict[str, Any], arch: str, n_layers: int, path: str):
  """(sliding_window, local_pattern) or (None, None)."""
  window = cfg.get("sliding_window")
  types = cfg.get("layer_types")
  if cfg.get("use_bidirectional_attention"):
    raise ValueError(f"{path}: use_bidirectional_attention=true is not supported (jaxspec "
                     f"decodes causally)")
  if window is None or (arch in ("qwen2", "qwen3") and not cfg.get("use_sliding_window")):
    return None, None
  if types is not None:
    if len(types) != n_layers or not set(types) <= {"sliding_attention", "full_attention"}:
      raise ValueError(f"{path}: layer_types must list 'sliding_attention' or 'full_attention' "
                       f"for each of the {n_layers} layers, got {types!r}")
    flags = [t == "sliding_attention" for t in types]
  elif arch == "gemma2":
    flags = [(i + 1) % 2 == 1 for i in range(n_layers)]
  elif arch == "gemma3":
    every = int(cfg.get("sliding_window_pattern", 6))
    flags = [(i + 1) % every != 0 for i in range(n_layers)]
  elif arch in ("mistral", "qwen2", "qwen3"):
    lo = int(cfg.get("max_window_layers", 0)) if arch != "mistral" else 0
    flags = [i >= lo for i in range(n_layers)]
  else:
    return None, None
  if not any(flags):
    return None, None
  return int(window), _period(flags)


def _activation(cfg: dict[str, Any], arch: str, path: str) -> str:
  if arch in GEMMA:
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    ok = ("gelu_pytorch_tanh", "gelu_tanh") + (("gelu",) if arch == "gemma" else ())
    if act not in ok:  # Gemma 1's legacy "gelu" means the tanh approximation in transformers
      raise ValueError(f"{path}: hidden_activation={act!r} is not supported for {arch} "
                       f"(supported: gelu_pytorch_tanh)")
    return "gelu_tanh"
  act = cfg.get("hidden_act", "silu")
  if act not in ("silu", "swish"):
    raise ValueError(f"{path}: hidden_act={act!r} is not supported (supported: silu)")
  return "silu"


def read_config(cfg: dict[str, Any], path: str = "config.json") -> ModelConfig:
  """A `ModelConfig` from the contents of a Hugging Face `config.json`."""
  arch_name, arch = architecture(cfg, path)
  if arch_name == "Gemma3ForConditionalGeneration" or "text_config" in cfg:
    text = cfg.get("text_config")
    if not isinstance(text, dict):
      raise ValueError(f"{path}: {arch_name} config has no 'text_config' object")
    cfg = dict(_GEMMA3_TEXT, **text)
  elif arch == "gemma2":
    cfg = dict(_GEMMA2_SOFTCAPS, **cfg)

  def need(key):
    if cfg.get(key) is None:
      raise ValueError(f"{path}: missing required field {key!r} for {arch_name}")
    return cfg[key]

  if cfg.get("mlp_bias"):
    raise ValueError(f"{path}: mlp_bias=true is not supported")
  # Qwen2 always has q/k/v biases; Llama/Qwen3/Gemma `attention_bias` also adds one on o_proj.
  if arch != "qwen2" and cfg.get("attention_bias"):
    raise ValueError(f"{path}: attention_bias=true is not supported for {arch_name} (jaxspec has "
                     f"no output-projection bias)")
  act = _activation(cfg, arch, path)
  theta, scaling, local_theta = _rope(cfg, path, arch)
  dim, n_heads = int(need("hidden_size")), int(need("num_attention_heads"))
  n_layers = int(need("num_hidden_layers"))
  window, pattern = _window(cfg, arch, n_layers, path)
  head_dim = cfg.get("head_dim")
  gemma = arch in GEMMA
  scalar = cfg.get("query_pre_attn_scalar") if arch in ("gemma2", "gemma3") else None
  cap = lambda k: float(cfg[k]) if cfg.get(k) is not None else None
  return ModelConfig(
      dim=dim, n_layers=n_layers, n_heads=n_heads,
      n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
      hidden_dim=int(need("intermediate_size")), vocab_size=int(need("vocab_size")),
      head_dim=int(head_dim) if head_dim else None,
      max_seq_len=int(cfg.get("max_position_embeddings") or 2048),
      norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_layout="half",
      rope_scaling=scaling, tied_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
      qkv_bias=arch == "qwen2", qk_norm=arch in ("qwen3", "gemma3"), arch=arch, act=act,
      embed_scale=gemma, norm_plus_one=gemma, post_norms=arch in ("gemma2", "gemma3"),
      attn_softcap=cap("attn_logit_softcapping") if gemma else None,
      final_softcap=cap("final_logit_softcapping") if gemma else None,
      query_scale=float(scalar) ** -0.5 if scalar else None,
      sliding_window=window, local_pattern=pattern,
      rope_local_theta=local_theta if window is not None else None)


def checkpoint_dtype(cfg: dict[str, Any]):
  """The dtype config.json records (`dtype`, or `torch_dtype` before transformers 5)."""
  text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
  name = (cfg.get("dtype") or cfg.get("torch_dtype") or text.get("dtype") or
          text.get("torch_dtype") or "float32")
  return _DTYPES.get(str(name).removeprefix("torch."), jnp.float32)


# ------------------------------------------------------------------------------------ writing

EXPORT_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
                  "llama2c": ("LlamaConfig", "LlamaForCausalLM"),
                  "mistral": ("MistralConfig", "MistralForCausalLM"),
                  "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                  "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
                  "gemma": ("GemmaConfig", "GemmaForCausalLM"),
                  "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
                  "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM")}


def _rope_dict(theta: float, s: RopeScaling | None) -> dict[str, Any]:
  if s is None:
    return dict(rope_type="default", rope_theta=theta)
  if s.rope_type == "linear":
    return dict(rope_type="linear", rope_theta=theta, factor=float(s.factor))
  return dict(rope_type="llama3", rope_theta=theta, factor=float(s.factor),
              low_freq_factor=float(s.low_freq_factor), high_freq_factor=float(s.high_freq_factor),
              original_max_position_embeddings=int(s.original_max_position_embeddings))


def to_hf_config(c: ModelConfig) -> tuple[str, str, dict[str, Any]]:
  """(transformers config class, model class, config kwargs) equivalent to `c`; the inverse of
  `read_config` (token ids are the caller's)."""
  arch = c.arch.removeprefix("gguf-")
  if arch not in EXPORT_CLASSES:
    raise ValueError(f"cannot export architecture {c.arch!r} to transformers (supported: "
                     f"{', '.join(EXPORT_CLASSES)})")
  cfg_name, cls_name = EXPORT_CLASSES[arch]
  kw = dict(vocab_size=int(c.vocab_size), hidden_size=int(c.dim),
            intermediate_size=int(c.hidden_dim), num_hidden_layers=int(c.n_layers),
            num_attention_heads=int(c.n_heads), num_key_value_heads=int(c.n_kv_heads),
            head_dim=int(c.head_dim), max_position_embeddings=int(c.max_seq_len),
            rms_norm_eps=float(c.norm_eps), tie_word_embeddings=bool(c.tied_embeddings))
  types = ["sliding_attention" if x else "full_attention" for x in c.layer_is_local]
  if arch == "gemma3":
    local = _rope_dict(float(c.rope_local_theta or c.rope_theta), None)
    kw["rope_parameters"] = {"full_attention": _rope_dict(float(c.rope_theta), c.rope_scaling),
                             "sliding_attention": local}
  else:
    kw["rope_theta"] = float(c.rope_theta)
    if c.rope_scaling is not None:
      kw["rope_scaling"] = _rope_dict(float(c.rope_theta), c.rope_scaling)
  if arch in GEMMA:
    kw.update(hidden_activation="gelu_pytorch_tanh", hidden_act="gelu_pytorch_tanh")
  if arch in ("gemma2", "gemma3"):
    scalar = int(round(c.query_scale ** -2)) if c.query_scale else c.head_dim
    kw.update(query_pre_attn_scalar=scalar,
              attn_logit_softcapping=c.attn_softcap, final_logit_softcapping=c.final_softcap,
              sliding_window=c.sliding_window or c.max_seq_len, layer_types=types)
  elif c.sliding_window is not None:
    if arch != "mistral" and not all(c.layer_is_local):
      kw.update(layer_types=types)
    kw.update(sliding_window=c.sliding_window, use_sliding_window=True)
  return cfg_name, cls_name, kw

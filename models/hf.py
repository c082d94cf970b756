"""Hugging Face checkpoint directories: config.json + safetensors weights + tokenizer files.

Supported architectures: LlamaForCausalLM (Llama 2/3.x, SmolLM), Qwen2ForCausalLM,
Qwen3ForCausalLM and MistralForCausalLM. Hugging Face keeps q/k projection rows in their
natural order and applies rotate-half RoPE, so the weights map onto jaxspec's layout with
transposes only (`rope_layout="half"`).

Weights are read lazily, one tensor at a time, from `model.safetensors` or the shards named in
`model.safetensors.index.json`, and written straight into preallocated per-layer stacks in the
target dtype, so host memory peaks near one copy of the model.

Sliding-window attention (Mistral v0.1, Qwen with `use_sliding_window`) is exact as long as a
sequence fits in the window, so such models load with `max_seq_len` capped at the window
(with a warning) rather than being rejected.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import llama
from .config import ModelConfig, RopeScaling
from .model import Model
from .tokenizer import HFTokenizer

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "mistral",
}
ROPE_TYPES = ("default", "llama3")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# safetensors dtype codes numpy cannot hold natively, read from raw bytes via ml_dtypes.
_RAW_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8,
             "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _read_json(path: str) -> dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      out = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(out, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(out).__name__}")
  return out


def _optional_json(folder: str, name: str) -> dict[str, Any]:
  path = os.path.join(folder, name)
  return _read_json(path) if os.path.exists(path) else {}


# --------------------------------------------------------------------------------------- config


def _rope(cfg: dict[str, Any], path: str) -> tuple[float, RopeScaling | None]:
  """(rope_theta, scaling) from `rope_theta` + `rope_scaling` (transformers 4) or
  `rope_parameters` (transformers 5)."""
  rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
  if not isinstance(rp, dict):
    raise ValueError(f"{path}: rope parameters must be a JSON object, got {rp!r}")
  kind = rp.get("rope_type") or rp.get("type") or "default"
  if kind not in ROPE_TYPES:
    raise ValueError(f"{path}: RoPE type {kind!r} is not supported (supported: "
                     f"{', '.join(ROPE_TYPES)})")
  theta = float(cfg.get("rope_theta", rp.get("rope_theta", 10000.0)))
  if float(cfg.get("partial_rotary_factor", rp.get("partial_rotary_factor", 1.0))) != 1.0:
    raise ValueError(f"{path}: partial rotary embeddings (partial_rotary_factor != 1) are not "
                     f"supported")
  if kind == "default":
    return theta, None
  defaults = RopeScaling()
  scaling = RopeScaling(
      factor=float(rp.get("factor", defaults.factor)),
      low_freq_factor=float(rp.get("low_freq_factor", defaults.low_freq_factor)),
      high_freq_factor=float(rp.get("high_freq_factor", defaults.high_freq_factor)),
      original_max_position_embeddings=int(rp.get("original_max_position_embeddings",
                                                  defaults.original_max_position_embeddings)))
  return theta, scaling


def _sliding_window(cfg: dict[str, Any], arch: str) -> int | None:
  window = cfg.get("sliding_window")
  if window is None:
    return None
  layer_types = cfg.get("layer_types") or ()
  if arch == "mistral" or cfg.get("use_sliding_window") or "sliding_attention" in layer_types:
    return int(window)
  return None


def read_config(cfg: dict[str, Any], path: str = "config.json") -> ModelConfig:
  """A `ModelConfig` from the contents of a Hugging Face `config.json`."""
  archs = cfg.get("architectures") or []
  if not archs and "model_type" not in cfg:
    raise ValueError(f"{path}: not a Hugging Face model config (no 'architectures' or "
                     f"'model_type' field)")
  by_type = {v: k for k, v in ARCHITECTURES.items()}
  arch_name = next((a for a in archs if a in ARCHITECTURES), None)
  if arch_name is None and not archs:
    arch_name = by_type.get(cfg.get("model_type"))
  if arch_name is None:
    got = ", ".join(archs) if archs else f"model_type={cfg.get('model_type')!r}"
    raise ValueError(f"{path}: architecture {got} is not supported (supported: "
                     f"{', '.join(ARCHITECTURES)})")
  arch = ARCHITECTURES[arch_name]

  def need(key):
    if cfg.get(key) is None:
      raise ValueError(f"{path}: missing required field {key!r} for {arch_name}")
    return cfg[key]

  act = cfg.get("hidden_act", "silu")
  if act not in ("silu", "swish"):
    raise ValueError(f"{path}: hidden_act={act!r} is not supported (supported: silu)")
  if cfg.get("mlp_bias"):
    raise ValueError(f"{path}: mlp_bias=true is not supported")
  # Qwen2 always has q/k/v biases; Llama/Qwen3 `attention_bias` also adds one on o_proj.
  if arch != "qwen2" and cfg.get("attention_bias"):
    raise ValueError(f"{path}: attention_bias=true is not supported for {arch_name} (jaxspec has "
                     f"no output-projection bias)")
  theta, scaling = _rope(cfg, path)
  dim, n_heads = int(need("hidden_size")), int(need("num_attention_heads"))
  max_pos = int(cfg.get("max_position_embeddings") or 2048)
  window = _sliding_window(cfg, arch)
  if window is not None and window < max_pos:
    warnings.warn(f"{path}: sliding_window={window} is smaller than max_position_embeddings="
                  f"{max_pos}; jaxspec attends to the full prefix, which is exact only up to the "
                  f"window, so max_seq_len is capped at {window}", stacklevel=3)
    max_pos = window
  head_dim = cfg.get("head_dim")
  return ModelConfig(
      dim=dim, n_layers=int(need("num_hidden_layers")), n_heads=n_heads,
      n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
      hidden_dim=int(need("intermediate_size")), vocab_size=int(need("vocab_size")),
      head_dim=int(head_dim) if head_dim else None, max_seq_len=max_pos,
      norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_layout="half",
      rope_scaling=scaling, tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
      qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3", arch=arch)


def checkpoint_dtype(cfg: dict[str, Any]):
  """The dtype config.json records (`dtype`, or `torch_dtype` before transformers 5)."""
  name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
  return _DTYPES.get(str(name).removeprefix("torch."), jnp.float32)


# ---------------------------------------------------------------------------------- safetensors


def _header(path: str) -> tuple[dict[str, Any], int]:
  """Parses and validates a safetensors header: ({name: entry}, offset of the data section)."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ValueError(f"{path}: truncated safetensors file ({size} bytes, no header)")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
      raise ValueError(f"{path}: truncated or corrupt safetensors file: the header claims {n} "
                       f"bytes but the file has only {size}")
    raw = f.read(n)
  try:
    header = json.loads(raw)
    if not isinstance(header, dict):
      raise ValueError("not an object")
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: corrupt safetensors header ({e})") from e
  header.pop("__metadata__", None)
  data_size = size - 8 - n
  for name, e in header.items():
    try:
      dt, shape, (begin, end) = e["dtype"], [int(s) for s in e["shape"]], e["data_offsets"]
      want = math.prod(shape) * _ITEMSIZE[dt]
    except (KeyError, TypeError, ValueError) as err:
      raise ValueError(f"{path}: corrupt safetensors header entry for {name!r}: {e!r}") from err
    if end - begin != want:
      raise ValueError(f"{path}: corrupt safetensors header: tensor {name!r} ({dt} {shape}) "
                       f"spans {end - begin} bytes, expected {want}")
    if end > data_size:
      raise ValueError(f"{path}: truncated safetensors file: tensor {name!r} ends at data byte "
                       f"{end} but the data section has only {data_size} bytes")
  return header, 8 + n


class _File:
  """One safetensors file, opened lazily; tensors come back as host numpy arrays."""

  def __init__(self, path: str):
    self.path = path
    self.header, self.data_start = _header(path)
    self._handle = None

  def read(self, name: str) -> np.ndarray:
    e = self.header[name]
    if e["dtype"] in _RAW_DTYPES:  # numpy has no bfloat16/float8: map the raw bytes instead
      import ml_dtypes
      dt = np.dtype(getattr(ml_dtypes, _RAW_DTYPES[e["dtype"]]))
      return np.memmap(self.path, dtype=dt, mode="r", offset=self.data_start + e["data_offsets"][0],
                       shape=tuple(e["shape"]))
    if self._handle is None:
      from safetensors import safe_open
      try:
        self._handle = safe_open(self.path, framework="numpy")
      except Exception as err:  # SafetensorError and friends
        raise ValueError(f"{self.path}: corrupt safetensors file ({err})") from err
    try:
      return self._handle.get_tensor(name)
    except Exception as err:
      raise ValueError(f"{self.path}: cannot read tensor {name!r} ({err})") from err


class Weights:
  """The tensors of a checkpoint directory, across a single file or an index of shards."""

  def __init__(self, folder: str):
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    self.files: dict[str, _File] = {}
    self.where: dict[str, str] = {}  # tensor name -> file path
    if os.path.exists(index):
      weight_map = _read_json(index).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: no 'weight_map' object")
      for shard in sorted(set(weight_map.values())):
        p = os.path.join(folder, shard)
        if not os.path.exists(p):
          first = next(k for k, v in weight_map.items() if v == shard)
          raise FileNotFoundError(f"{index} lists shard {shard!r} (holding {first!r} and "
                                  f"others) but {p} does not exist")
        self.files[p] = _File(p)
      for name, shard in weight_map.items():
        p = os.path.join(folder, shard)
        if name not in self.files[p].header:
          raise ValueError(f"{index} places tensor {name!r} in {shard}, but that file has no "
                           f"such tensor")
        self.where[name] = p
    elif os.path.exists(single):
      self.files[single] = _File(single)
      self.where = {name: single for name in self.files[single].header}
    else:
      others = sorted(f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".safetensors")))
      hint = f" (found {', '.join(others)}; only safetensors is supported)" if others else ""
      raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json"
                              f"{hint}")

  def __contains__(self, name: str) -> bool:
    return name in self.where

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.files[self.where[name]].header[name]["shape"])

  def read(self, name: str, shape: tuple[int, ...], what: str) -> np.ndarray:
    """Reads tensor `name`, checking it has the `shape` the config implies."""
    if name not in self.where:
      raise ValueError(f"checkpoint has no tensor {name!r} ({what}); files: "
                       f"{', '.join(os.path.basename(p) for p in self.files)}")
    got = self.shape(name)
    if got != tuple(shape):
      raise ValueError(f"{self.where[name]}: tensor {name!r} has shape {got} but config.json "
                       f"implies {tuple(shape)} ({what}); config and weights do not match")
    return self.files[self.where[name]].read(name)


# ---------------------------------------------------------------------------------- parameters


def _plan(c: ModelConfig) -> dict[str, tuple[str, tuple[int, ...], Any]]:
  """Per-layer params: jaxspec name -> (HF suffix, HF shape, HF tensor -> jaxspec layout)."""
  D, N, K, H, F = c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.hidden_dim
  t = lambda w: w.T
  plan = {
      "attn_norm": ("input_layernorm.weight", (D,), None),
      "wq": ("self_attn.q_proj.weight", (N * H, D), lambda w: w.T.reshape(D, N, H)),
      "wk": ("self_attn.k_proj.weight", (K * H, D), lambda w: w.T.reshape(D, K, H)),
      "wv": ("self_attn.v_proj.weight", (K * H, D), lambda w: w.T.reshape(D, K, H)),
      "wo": ("self_attn.o_proj.weight", (D, N * H), lambda w: w.T.reshape(N, H, D)),
      "mlp_norm": ("post_attention_layernorm.weight", (D,), None),
      "w_gate": ("mlp.gate_proj.weight", (F, D), t),
      "w_up": ("mlp.up_proj.weight", (F, D), t),
      "w_down": ("mlp.down_proj.weight", (D, F), t),
  }
  if c.qkv_bias:
    plan.update(bq=("self_attn.q_proj.bias", (N * H,), lambda w: w.reshape(N, H)),
                bk=("self_attn.k_proj.bias", (K * H,), lambda w: w.reshape(K, H)),
                bv=("self_attn.v_proj.bias", (K * H,), lambda w: w.reshape(K, H)))
  if c.qk_norm:
    plan.update(q_norm=("self_attn.q_norm.weight", (H,), None),
                k_norm=("self_attn.k_norm.weight", (H,), None))
  return plan


def read_params(w: Weights, c: ModelConfig, dtype, *, progress: bool = True,
                desc: str = "loading") -> dict[str, Any]:
  """Host (numpy) params in jaxspec's layout and `dtype`, filled one tensor at a time."""
  from tqdm.auto import tqdm

  prefix = "model." if "model.embed_tokens.weight" in w else ""
  if prefix == "" and "embed_tokens.weight" not in w:
    prefix = "model."  # let the missing-tensor error name the usual key
  np_dtype = np.dtype(dtype)
  shapes = llama.param_shapes(c)
  plan = _plan(c)
  extra = f"{prefix}layers.{c.n_layers}.input_layernorm.weight"
  if extra in w:
    raise ValueError(f"{w.where[extra]}: checkpoint has more than num_hidden_layers={c.n_layers} "
                     f"layers; config and weights do not match")
  used = set()
  bar = tqdm(total=2 + c.n_layers * len(plan) + (0 if c.tied_embeddings else 1), desc=desc,
             unit="tensor", disable=not progress, leave=False)

  def get(name, hf_shape, what):
    x = w.read(name, hf_shape, what)
    used.add(name)
    bar.update(1)
    return x

  try:
    V, D = c.vocab_size, c.dim
    params = {
        "embed": np.array(get(f"{prefix}embed_tokens.weight", (V, D), "embed"), np_dtype),
        "final_norm": np.array(get(f"{prefix}norm.weight", (D,), "final_norm"), np_dtype),
    }
    layers = {k: np.empty(s, np_dtype) for k, s in shapes["layers"].items()}
    for i in range(c.n_layers):
      for k, (suffix, hf_shape, fn) in plan.items():
        x = get(f"{prefix}layers.{i}.{suffix}", hf_shape, f"layers.{k}[{i}]")
        layers[k][i] = fn(x) if fn is not None else x
    params["layers"] = layers
    if not c.tied_embeddings:
      params["lm_head"] = np.ascontiguousarray(get("lm_head.weight", (V, D), "lm_head").T,
                                               dtype=np_dtype)
  finally:
    bar.close()
  left = sorted(n for n in w.where if n not in used and not n.endswith(_IGNORED_SUFFIXES)
                and not (c.tied_embeddings and n == "lm_head.weight"))
  if left:
    more = f" and {len(left) - 5} more" if len(left) > 5 else ""
    raise ValueError(f"checkpoint has tensors the {c.arch} config does not use: "
                     f"{', '.join(left[:5])}{more}; config and weights do not match")
  llama.check_params(params, c)
  return params


def _sharding(name: str):
  """A function of `jaxspec.sharding`, or a clear error while sharding is not available."""
  import jaxspec.sharding as sh
  if not hasattr(sh, name):
    raise NotImplementedError(f"loading onto a mesh needs jaxspec.sharding.{name}, which is not "
                              f"available yet; load with mesh=None")
  return getattr(sh, name)


def param_shardings(shape_tree, mesh, config: ModelConfig | None = None):
  """Shardings of a params shape tree on `mesh` (checks the heads divide the tensor axis)."""
  if config is not None:
    _sharding("check_divisible")(config, mesh)
  return _sharding("param_shardings")(shape_tree, mesh)


def to_device(params: dict[str, Any], mesh=None, config: ModelConfig | None = None):
  """Moves host params to the default device, or shards them over `mesh` (each process
  builds only its own shards, so this is multi-host safe)."""
  if mesh is None:
    return jax.tree.map(jnp.asarray, params)
  return _sharding("shard_params")(params, mesh, config)


# ----------------------------------------------------------------------------------- tokenizer


def _token_text(t) -> str | None:
  """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
  if isinstance(t, dict):
    return t.get("content")
  return t if isinstance(t, str) else None


def _ids(x) -> list[int]:
  if x is None:
    return []
  return [int(i) for i in (x if isinstance(x, (list, tuple)) else [x])]


def _chat_template(folder: str, tcfg: dict[str, Any]) -> str | None:
  t = tcfg.get("chat_template")
  if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
    named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
    t = named.get("default") or next(iter(named.values()), None)
  if t:
    return t
  jinja = os.path.join(folder, "chat_template.jinja")
  if os.path.exists(jinja):
    with open(jinja, encoding="utf-8") as f:
      return f.read()
  return _optional_json(folder, "chat_template.json").get("chat_template")


def load_tokenizer(folder: str, cfg: dict[str, Any] | None = None) -> HFTokenizer | None:
  """`tokenizer.json` plus special-token metadata; None when the folder has no tokenizer.json.

  EOS ids are the union of generation_config.json, config.json and tokenizer_config.json
  (generation stops on any of them, as `transformers.generate` does for lists). Chat templates
  see `bos_token` / `eos_token` only as tokenizer_config.json names them, as in transformers.
  """
  path = os.path.join(folder, "tokenizer.json")
  if not os.path.exists(path):
    return None
  from tokenizers import Tokenizer

  try:
    tok = Tokenizer.from_file(path)
  except Exception as e:
    raise ValueError(f"{path}: cannot read tokenizer ({e})") from e
  cfg = cfg if cfg is not None else _optional_json(folder, "config.json")
  tcfg = _optional_json(folder, "tokenizer_config.json")
  gen = _optional_json(folder, "generation_config.json")

  bos_token = _token_text(tcfg.get("bos_token"))
  bos_id = tok.token_to_id(bos_token) if bos_token else None
  if bos_id is None:
    ids = _ids(gen.get("bos_token_id")) or _ids(cfg.get("bos_token_id"))
    bos_id = ids[0] if ids else None
  eos_token = _token_text(tcfg.get("eos_token"))
  eos = _ids(gen.get("eos_token_id")) + _ids(cfg.get("eos_token_id"))
  if eos_token and tok.token_to_id(eos_token) is not None:
    eos.append(tok.token_to_id(eos_token))
  eos = list(dict.fromkeys(eos))

  if "add_bos_token" in tcfg:
    add_bos = bool(tcfg["add_bos_token"])
  else:  # e.g. Llama 3: the tokenizer.json post-processor prepends BOS
    probe = tok.encode("a", add_special_tokens=True).ids
    add_bos = bos_id is not None and len(probe) > 0 and probe[0] == bos_id
  specials = {t.content: int(i) for i, t in tok.get_added_tokens_decoder().items() if t.special}
  return HFTokenizer(tok, bos_id=bos_id, eos_ids=eos, add_bos=add_bos,
                     chat_template=_chat_template(folder, tcfg), special_tokens=specials,
                     bos_token=bos_token, eos_token=eos_token)


# -------------------------------------------------------------------------------------- entry


def load(path: str, *, dtype=None, mesh=None, progress: bool = True) -> Model:
  """Loads a Hugging Face checkpoint directory as a `Model`.

  dtype: a jnp dtype (or None: the checkpoint's own `dtype`/`torch_dtype`, float32 if absent).
  """
  folder = os.path.abspath(path)
  cfg_path = os.path.join(folder, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{folder}: not a Hugging Face checkpoint (no config.json)")
  cfg = _read_json(cfg_path)
  if not cfg.get("architectures") and "model_type" not in cfg:
    files = sorted(f for f in os.listdir(folder) if f.endswith((".gguf", ".bin")))
    hint = f"; to load {files[0]}, pass its path" if files else ""
    raise ValueError(f"{cfg_path}: not a Hugging Face model config (no 'architectures' or "
                     f"'model_type' field){hint}")
  config = read_config(cfg, cfg_path)
  dt = dtype if dtype is not None else checkpoint_dtype(cfg)
  weights = Weights(folder)
  if "tie_word_embeddings" not in cfg and "lm_head.weight" not in weights:
    config = dataclasses.replace(config, tied_embeddings=True)
  name = os.path.basename(folder)
  host = read_params(weights, config, dt, progress=progress, desc=f"loading {name}")
  tok = load_tokenizer(folder, cfg)
  if tok is not None and tok.vocab_size > config.vocab_size:
    raise ValueError(f"{folder}: tokenizer.json has {tok.vocab_size} tokens but the model only "
                     f"{config.vocab_size}")
  return Model(config=config, params=to_device(host, mesh, config), tokenizer=tok, name=name)

"""Hugging Face checkpoint directories: config.json + safetensors weights + tokenizer files.

Supported architectures: LlamaForCausalLM (Llama 2/3.x, SmolLM), Qwen2ForCausalLM,
Qwen3ForCausalLM, MistralForCausalLM, GemmaForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM
and the language model of Gemma3ForConditionalGeneration. The pieces live in small modules:
`hf_config` (config.json <-> ModelConfig), `safetensors_file` (the reader), `hf_names` (the
one weight-name table, loading and export) and `hf_tokenizer` (tokenizer files); this module
puts them together.

Weights are read lazily, one tensor at a time, and written straight into preallocated
per-layer stacks in the target dtype, so host memory peaks near one copy of the model.
Sliding-window layers (Mistral, Gemma 2 / 3, Qwen with `use_sliding_window`) keep their window
(`ModelConfig.sliding_window`), so the context is the model's full `max_position_embeddings`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import hf_names, layout
from .config import ModelConfig
from .hf_config import ARCHITECTURES, checkpoint_dtype, read_config, read_json, to_hf_config
from .hf_names import read_params
from .hf_tokenizer import load_tokenizer
from .model import Model
from .safetensors_file import Weights

__all__ = ["ARCHITECTURES", "Weights", "checkpoint_dtype", "load", "load_tokenizer",
           "param_shardings", "read_config", "read_params", "to_device", "to_hf_config"]


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


def load(path: str, *, dtype=None, mesh=None, progress: bool = True,
         layers: str = "auto") -> Model:
  """Loads a Hugging Face checkpoint directory as a `Model`.

  dtype: a jnp dtype (or None: the checkpoint's own `dtype`/`torch_dtype`, float32 if absent).
  """
  folder = os.path.abspath(path)
  cfg_path = os.path.join(folder, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{folder}: not a Hugging Face checkpoint (no config.json)")
  cfg = read_json(cfg_path)
  if not cfg.get("architectures") and "model_type" not in cfg:
    files = sorted(f for f in os.listdir(folder) if f.endswith((".gguf", ".bin")))
    hint = f"; to load {files[0]}, pass its path" if files else ""
    raise ValueError(f"{cfg_path}: not a Hugging Face model config (no 'architectures' or "
                     f"'model_type' field){hint}")
  config = read_config(cfg, cfg_path)
  dt = dtype if dtype is not None else checkpoint_dtype(cfg)
  weights = Weights(folder)
  _, head_name = hf_names.prefixes(weights.where)
  if "tie_word_embeddings" not in cfg and head_name not in weights:
    config = dataclasses.replace(config, tied_embeddings=True)
  name = os.path.basename(folder)
  host = hf_names.read_params(weights, config, dt, progress=progress, desc=f"loading {name}")
  tok = load_tokenizer(folder, cfg)
  if tok is not None and tok.vocab_size > config.vocab_size:
    raise ValueError(f"{folder}: tokenizer.json has {tok.vocab_size} tokens but the model only "
                     f"{config.vocab_size}")
  if layout.choose(layers, host, dt) == "per_layer":
    host = layout.per_layer(host, convert=np.array, consume=True)
  return Model(config=config, params=to_device(host, mesh, config), tokenizer=tok, name=name)

"""`load(source)`: one entry point for every checkpoint format; the format comes from the path."""

from __future__ import annotations

import os
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np

from . import layout, llama
from .model import Model
from .tokenizer import SentencePieceTokenizer

EMBEDDED = ("stories260K",)
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype):
  if dtype is None:
    return None
  if isinstance(dtype, str):
    if dtype not in _DTYPES:
      raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]
  return jnp.dtype(dtype).type


def embedded_path(name: str) -> str:
  return str(resources.files("jaxspec") / "_data" / name)


def detect_format(source: str) -> str:
  if source in EMBEDDED:
    return "embedded"
  if not os.path.exists(source):
    raise FileNotFoundError(f"no such model: {source!r} (expected one of {list(EMBEDDED)}, a "
                            f"llama2.c .bin, a .gguf file, a Hugging Face checkpoint directory "
                            f"or a jaxspec Orbax checkpoint directory)")
  if os.path.isdir(source):
    if os.path.exists(os.path.join(source, "jaxspec_checkpoint.json")):
      return "orbax"
    if os.path.exists(os.path.join(source, "config.json")):
      return "hf"
    raise ValueError(f"{source}: directory is neither a Hugging Face checkpoint (no config.json) "
                     f"nor a jaxspec Orbax checkpoint (no jaxspec_checkpoint.json)")
  with open(source, "rb") as f:
    magic = f.read(4)
  if magic == b"GGUF":
    return "gguf"
  if source.endswith(".gguf"):
    raise ValueError(f"{source}: not a GGUF file (bad magic {magic!r})")
  if source.endswith(".bin"):
    return "llama2c"
  raise ValueError(f"{source}: unknown model format (supported: llama2.c .bin, .gguf, Hugging "
                   f"Face checkpoint directories, jaxspec Orbax checkpoints)")


def _to_device(params, dtype, mesh=None, config=None, layers: str = "stacked"):
  """Host arrays to jax arrays one at a time, each host array dropped once copied: the peak is
  the model plus its largest tensor, not twice the model. Empties the `params` dict it gets.
  `layers`: "per_layer" splits the stacked layer weights first (`models.layout`)."""
  if layers == "per_layer":
    params = layout.per_layer(params, convert=np.array, consume=True)
  leaves, treedef = jax.tree.flatten(params)
  if isinstance(params, dict):
    params.clear()  # the leaves list is now the only reference to the host arrays
  for i, x in enumerate(leaves):
    x = np.asarray(x)
    leaves[i] = jnp.asarray(x, dtype=dtype if dtype is not None else x.dtype)
  x = None
  params = jax.tree.unflatten(treedef, leaves)
  if mesh is not None:
    from jaxspec.sharding import shard_params  # sharding lives on floor 0, imported lazily
    params = shard_params(params, mesh, config)  # config: query heads must divide "tensor"
  return params


def _stories_tokenizer(folder: str) -> SentencePieceTokenizer:
  # run.c stops on BOS (1) as well as EOS (2): a story ends by starting the next one.
  return SentencePieceTokenizer(os.path.join(folder, "tok512.model"), add_bos=True, eos_ids=(2, 1))


def load(source: str, *, dtype=None, mesh=None, progress: bool = True,
         layers: str = "auto") -> Model:
  """See `jaxspec.load_model`; `layers` is the weight layout ("auto", "stacked", "per_layer";
  `models.layout`)."""
  if not isinstance(source, (str, os.PathLike)):
    raise TypeError(f"load_model expects a name or a path, got {type(source).__name__}")
  if layers not in layout.LAYOUTS:
    raise ValueError(f"layers must be one of {layout.LAYOUTS}, got {layers!r}")
  source = os.fspath(source)
  fmt = detect_format(source)
  dt = resolve_dtype(dtype)
  if fmt == "embedded":
    from . import llama2c
    folder = embedded_path(source)
    config, params = llama2c.load(os.path.join(folder, f"{source}.bin"))
    tok = _stories_tokenizer(folder)
    name = source
  elif fmt == "llama2c":
    from . import llama2c
    config, params = llama2c.load(source)
    folder = os.path.dirname(os.path.abspath(source))
    tok_file = os.path.join(folder, "tok512.model")
    alt = os.path.join(folder, "tokenizer.model")
    tok = (_stories_tokenizer(folder) if os.path.exists(tok_file) else
           SentencePieceTokenizer(alt) if os.path.exists(alt) else None)
    name = os.path.basename(source)
  elif fmt == "gguf":
    from . import gguf_file
    config, params, tok = gguf_file.load(source, progress=progress)
    name = os.path.basename(source)
  elif fmt == "hf":
    from . import hf
    return hf.load(source, dtype=dt, mesh=mesh, progress=progress, layers=layers)
  else:  # orbax
    from jaxspec import checkpoint
    model = checkpoint.load(source, dtype=dt, mesh=mesh)
    if layout.choose(layers, model.params) == "per_layer":
      model.params = layout.per_layer(model.params, consume=True)
      if mesh is not None:
        from jaxspec.sharding import shard_params
        model.params = shard_params(model.params, mesh, model.config)
    return model
  llama.check_params(params, config)
  if tok is not None and tok.vocab_size > config.vocab_size:
    raise ValueError(f"{source}: tokenizer has {tok.vocab_size} tokens but the model only "
                     f"{config.vocab_size}")
  chosen = layout.choose(layers, params, dt)
  return Model(config=config, params=_to_device(params, dt, mesh, config, chosen), tokenizer=tok,
               name=name)

"""jaxspec: accelerator-native speculative decoding for JAX.

    import jaxspec
    model = jaxspec.load_model("stories260K")
    out = jaxspec.generate(model, ["Once upon a time"], drafter=jaxspec.drafters.NGram(k=4))
"""

# Imported on first use (PEP 562), so `import jaxspec` is cheap and loads no jax: the
# `jaxspec` command installs its Ctrl-C handling (jaxspec.interrupt) before jax is imported,
# and jaxspec's XLA flags reach the backend when it starts (jaxspec.xla_flags).
from jaxspec import xla_flags as _xla_flags

_xla_flags.apply()

_EXPORTS = {
    "Result": ("jaxspec.api", "Result"),
    "Stats": ("jaxspec.api", "Stats"),
    "generate": ("jaxspec.api", "generate"),
    "generate_many": ("jaxspec.batching", "generate_many"),
    "logits": ("jaxspec.api", "logits"),
    "stream": ("jaxspec.api", "stream"),
    "Model": ("jaxspec.models", "Model"),
    "ModelConfig": ("jaxspec.models", "ModelConfig"),
    "save_checkpoint": ("jaxspec.checkpoint", "save"),
}


def load_model(source, *, dtype=None, mesh=None, progress: bool = True, layers: str = "auto"):
  """Loads a model from "stories260K", a llama2.c .bin, a .gguf, a Hugging Face checkpoint
  directory or a jaxspec Orbax checkpoint directory (the format is detected from the path), or
  a checkpoint fetched by `python -m jaxspec.fetch NAME` by that name (e.g.
  "qwen2.5-coder-0.5b"; an unfetched one is an error naming the fetch command).

  layers: how layer weights are stored: "stacked" (one [L, ...] array per weight, a scanned
  layer loop), "per_layer" (one buffer per layer, an unrolled loop: faster on CPU for large
  layers, longer compiles) or "auto" (per-layer on CPU for layers of 32 MB or more);
  see `jaxspec.models.layout`."""
  from jaxspec import fetch
  from jaxspec.models.load import load
  return load(fetch.resolve(source), dtype=dtype, mesh=mesh, progress=progress, layers=layers)


def __getattr__(name: str):
  import importlib
  import importlib.util
  if name in _EXPORTS:
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attr)
  elif not name.startswith("__") and importlib.util.find_spec(f"jaxspec.{name}") is not None:
    value = importlib.import_module(f"jaxspec.{name}")  # drafters, trees, train, models, ...
  else:
    raise AttributeError(f"module 'jaxspec' has no attribute {name!r}")
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(__all__))


__all__ = ["Model", "ModelConfig", "Result", "Stats", "drafters", "generate", "generate_many",
           "load_model", "logits",
           "save_checkpoint", "stream", "trees"]

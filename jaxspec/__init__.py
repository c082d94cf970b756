"""jaxspec: accelerator-native speculative decoding for JAX.

    import jaxspec
    model = jaxspec.load_model("stories260K")
    out = jaxspec.generate(model, ["Once upon a time"], drafter=jaxspec.drafters.NGram(k=4))
"""

from jaxspec import drafters, trees
from jaxspec.api import Result, Stats, generate, logits, stream
from jaxspec.models import Model, ModelConfig
from jaxspec.models.load import load as _load
from jaxspec.checkpoint import save as save_checkpoint


def load_model(source, *, dtype=None, mesh=None, progress: bool = True) -> Model:
  """Loads a model from "stories260K", a llama2.c .bin, a .gguf, a Hugging Face checkpoint
  directory or a jaxspec Orbax checkpoint directory (the format is detected from the path)."""
  return _load(source, dtype=dtype, mesh=mesh, progress=progress)


__all__ = ["Model", "ModelConfig", "Result", "Stats", "drafters", "generate", "load_model", "logits",
           "save_checkpoint", "stream", "trees"]

from jaxspec import train  # noqa: E402

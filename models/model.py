"""`Model`: config + params + tokenizer, the object every jaxspec entry point takes."""

from __future__ import annotations

import dataclasses
from typing import Any

from .config import ModelConfig
from .tokenizer import Tokenizer


@dataclasses.dataclass(eq=False)
class Model:
  config: ModelConfig
  params: Any  # pytree of arrays, see `llama.param_shapes`
  tokenizer: Tokenizer | None
  name: str = "model"

  @property
  def dtype(self):
    return self.params["embed"].dtype

  def __repr__(self) -> str:
    c = self.config
    return (f"Model({self.name!r}, arch={c.arch}, layers={c.n_layers}, dim={c.dim}, "
            f"heads={c.n_heads}/{c.n_kv_heads}, vocab={c.vocab_size}, dtype={self.dtype})")

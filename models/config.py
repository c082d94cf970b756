"""Model configuration: one frozen, hashable dataclass for the whole Llama family."""

from __future__ import annotations

import dataclasses
from typing import Literal

RopeLayout = Literal["interleaved", "half"]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3.x frequency scaling (`rope_scaling.rope_type == "llama3"` in HF configs)."""

  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyperparameters of a Llama-family decoder (Llama 2/3, Qwen2/3, Mistral, SmolLM).

  Frozen and hashable, so it can be a static argument of `jax.jit`.

  Attributes:
    rope_layout: "interleaved" rotates pairs (x[2i], x[2i+1]) as llama2.c and GGUF files
      expect; "half" rotates (x[i], x[i + H/2]) as Hugging Face checkpoints expect.
    qkv_bias: Qwen2-style biases on the q/k/v projections.
    qk_norm: Qwen3-style RMSNorm over each head of q and k before RoPE.
  """

  dim: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  hidden_dim: int
  vocab_size: int
  head_dim: int | None = None
  max_seq_len: int = 2048
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_layout: RopeLayout = "half"
  rope_scaling: RopeScaling | None = None
  tied_embeddings: bool = True
  qkv_bias: bool = False
  qk_norm: bool = False
  arch: str = "llama"

  def __post_init__(self):
    if self.head_dim is None:
      if self.dim % self.n_heads:
        raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; set head_dim")
      object.__setattr__(self, "head_dim", self.dim // self.n_heads)
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
    if self.rope_layout not in ("interleaved", "half"):
      raise ValueError(f"rope_layout must be 'interleaved' or 'half', got {self.rope_layout!r}")
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

  @property
  def q_per_kv(self) -> int:
    return self.n_heads // self.n_kv_heads

  @property
  def num_params(self) -> int:
    d, h, f, l = self.dim, self.head_dim, self.hidden_dim, self.n_layers
    attn = d * h * (2 * self.n_heads + 2 * self.n_kv_heads)
    per_layer = attn + 3 * d * f + 2 * d
    head = 0 if self.tied_embeddings else self.vocab_size * d
    return self.vocab_size * d + l * per_layer + d + head

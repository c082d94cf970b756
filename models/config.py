"""Model configuration: one frozen, hashable dataclass for the Llama and Gemma families."""

from __future__ import annotations

import dataclasses
from typing import Literal

RopeLayout = Literal["interleaved", "half"]
Activation = Literal["silu", "gelu_tanh"]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling: Llama 3.x (`rope_type == "llama3"` in HF configs) or linear
  position interpolation (`"linear"`: every frequency divided by `factor`, Gemma 3 global)."""

  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192
  rope_type: str = "llama3"

  def __post_init__(self):
    if self.rope_type not in ("llama3", "linear"):
      raise ValueError(f"rope_type must be 'llama3' or 'linear', got {self.rope_type!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyperparameters of a Llama-family decoder (Llama 2/3, Qwen2/3, Mistral, SmolLM).

  Frozen and hashable, so it can be a static argument of `jax.jit`.

  Attributes:
    rope_layout: "interleaved" rotates pairs (x[2i], x[2i+1]) as llama2.c and GGUF files
      expect; "half" rotates (x[i], x[i + H/2]) as Hugging Face checkpoints expect.
    qkv_bias: Qwen2-style biases on the q/k/v projections.
    qk_norm: Qwen3-style RMSNorm over each head of q and k before RoPE.
    act: MLP gate activation: "silu" (SwiGLU) or "gelu_tanh" (Gemma's GeGLU).
    embed_scale: multiply token embeddings by sqrt(dim), rounded to the compute dtype (Gemma).
    norm_plus_one: RMSNorm weights are stored as w - 1 and applied as (1 + w) (Gemma).
    post_norms: extra RMSNorms on the attention and MLP outputs before each residual add
      (Gemma 2 / 3 `post_attention_layernorm` / `post_feedforward_layernorm`).
    attn_softcap, final_softcap: tanh soft-capping of attention scores / final logits,
      `cap * tanh(x / cap)` (Gemma 2).
    query_scale: attention score scale (default head_dim ** -0.5; Gemma's
      `query_pre_attn_scalar ** -0.5`).
    sliding_window: local layers attend to the last `sliding_window` positions only (the
      query's own included), as transformers' sliding-window mask does.
    local_pattern: which layers are sliding-window (local) ones, repeating: layer i is local
      when `local_pattern[i % len(local_pattern)]` (Gemma 2: (True, False); Gemma 3: five True
      then one False). None with a window means every layer is local (Mistral). A cycle, so a
      config cut to its first layers (early exit, truncated assistants) stays consistent.
    rope_local_theta: RoPE base of local layers (Gemma 3). When set, local layers use it with no
      scaling and `rope_scaling` applies to global layers only; None: every layer uses
      `rope_theta` and `rope_scaling`.
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
  act: Activation = "silu"
  embed_scale: bool = False
  norm_plus_one: bool = False
  post_norms: bool = False
  attn_softcap: float | None = None
  final_softcap: float | None = None
  query_scale: float | None = None
  sliding_window: int | None = None
  local_pattern: tuple[bool, ...] | None = None
  rope_local_theta: float | None = None

  def __post_init__(self):
    if self.local_pattern is not None:  # lists (JSON) -> a hashable tuple
      object.__setattr__(self, "local_pattern", tuple(bool(x) for x in self.local_pattern))
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
    if self.act not in ("silu", "gelu_tanh"):
      raise ValueError(f"act must be 'silu' or 'gelu_tanh', got {self.act!r}")
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ValueError(f"sliding_window must be a positive integer, got {self.sliding_window}")
    if self.local_pattern is not None and not self.local_pattern:
      raise ValueError("local_pattern must have at least one flag (or be None)")

  @property
  def layer_is_local(self) -> tuple[bool, ...]:
    """Per layer: does it attend through the sliding window?"""
    if self.sliding_window is None:
      return (False,) * self.n_layers
    p = self.local_pattern or (True,)
    return tuple(p[i % len(p)] for i in range(self.n_layers))

  @property
  def windowed(self) -> bool:
    return any(self.layer_is_local)

  @property
  def q_per_kv(self) -> int:
    return self.n_heads // self.n_kv_heads

  @property
  def num_params(self) -> int:
    d, h, f, l = self.dim, self.head_dim, self.hidden_dim, self.n_layers
    attn = d * h * (2 * self.n_heads + 2 * self.n_kv_heads)
    per_layer = attn + 3 * d * f + (4 if self.post_norms else 2) * d
    head = 0 if self.tied_embeddings else self.vocab_size * d
    return self.vocab_size * d + l * per_layer + d + head

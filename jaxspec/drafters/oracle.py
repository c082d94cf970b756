"""`Oracle`: replays a recorded continuation (benchmarks and tests only).

It proposes the next tokens of a known reference output: the first `correct` of each round are
right and the rest deliberately wrong, so tau is known exactly. `correct=k` measures the engine's
own overhead at tau = k + 1; `correct=j` exercises the cache rewind at every acceptance length.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxspec.models import Model

from .base import Drafter, DrafterSpec, Prefill, Proposal, Round


@dataclasses.dataclass(frozen=True)
class OracleSpec(DrafterSpec):
  correct: int = 0

  def init(self, params, p: Prefill):
    return p.prompt_lens

  def propose(self, ref, prompt_lens, r: Round):
    b = r.seq.shape[0]
    if ref.shape[0] < b:  # batch padded to a bucket
      ref = jnp.pad(ref, ((0, b - ref.shape[0]), (0, 0)))
    ref = ref[:b]  # row i replays reference[i]; rows past the batch are never used
    done_out = r.n - prompt_lens  # tokens generated so far
    idx = done_out[:, None] + jnp.arange(self.k)[None, :]
    toks = jnp.take_along_axis(ref, jnp.clip(idx, 0, ref.shape[1] - 1), axis=1)
    wrong = (toks + 1) % self.target.vocab_size
    toks = jnp.where(jnp.arange(self.k)[None, :] < self.correct, toks, wrong)
    return prompt_lens, Proposal.chain(toks.astype(jnp.int32))


@dataclasses.dataclass(frozen=True, eq=False)
class Oracle(Drafter):
  """reference: per row, the target's own continuation (at least max_new_tokens + k long).
  Chains only (tree= is an error)."""

  reference: list
  k: int = 4
  correct: int | None = None
  tree: object = None

  tree_kinds = ()

  def check(self):
    c = self.k if self.correct is None else self.correct
    if not 0 <= c <= self.k:
      raise ValueError(f"Oracle correct must be in [0, k={self.k}], got {c}")

  def bind(self, target: Model):
    width = max(len(r) for r in self.reference)
    ref = np.zeros((len(self.reference), width), np.int32)
    for i, r in enumerate(self.reference):
      ref[i, :len(r)] = r
    c = self.k if self.correct is None else self.correct
    return OracleSpec(k=self.k, target=target.config, correct=c), jnp.asarray(ref)

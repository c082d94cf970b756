"""A reduced draft vocabulary (FR-Spec; EAGLE-3's draft-to-target map).

A drafter's LM head multiplies every draft step by a [V, D] matrix: for Qwen2.5's 151,936
tokens that is a quarter of the 0.5B model's weights. Most of those rows are tokens a draft
almost never needs to propose. A `DraftVocab` keeps N target ids (the most frequent ones) and
their N head rows; the draft's logits are computed over those N only and scattered back into
the target's vocabulary with every other token at -inf.

This is lossless: verification compares against the target, which still sees every token. A
token outside the set is simply never proposed (greedy), and under sampling the draft
distribution q is zero outside the set, which rejection sampling handles (the residual
max(0, p - q) keeps those tokens' full target mass).

Which ids: `frequent(tokenizer, texts, n)` counts the target tokenizer's ids over text the user
has (FR-Spec counts a pretraining corpus; a trained head uses its training data); `builtin`
(what `vocab=n` means) counts jaxspec's built-in prompt set, then fills up with the lowest ids;
`leading(n, ...)` takes the lowest ids only (byte-level BPE orders ids by merge rank, but
SentencePiece vocabularies start with hundreds of byte-fallback tokens: stories260K's first 256
ids drafted nothing). All keep the end-of-sequence ids.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.models import ModelConfig, head

MIN_IDS = 2  # fewer than this is not a vocabulary to draft from


def check_ids(ids, vocab_size: int) -> np.ndarray:
  """Sorted unique int32 ids in [0, vocab_size), or a ValueError naming what is wrong."""
  arr = np.asarray(ids)
  if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
    raise ValueError(f"a draft vocabulary is a 1-D sequence of integer token ids, got an array "
                     f"of shape {arr.shape} and dtype {arr.dtype}")
  arr = np.unique(arr.astype(np.int64))
  if arr.size < MIN_IDS:
    raise ValueError(f"a draft vocabulary needs at least {MIN_IDS} token ids, got {arr.size}")
  if arr[0] < 0 or arr[-1] >= vocab_size:
    bad = int(arr[0] if arr[0] < 0 else arr[-1])
    raise ValueError(f"draft vocabulary id {bad} is outside the target's vocabulary "
                     f"[0, {vocab_size})")
  return arr.astype(np.int32)


def _with_eos(order: Iterable[int], n: int, eos_ids: Sequence[int], vocab_size: int):
  """The eos ids, then ids in `order` not yet taken, until there are n; sorted."""
  keep = dict.fromkeys(int(e) for e in eos_ids if 0 <= int(e) < vocab_size)
  for t in order:
    if len(keep) >= n:
      break
    keep.setdefault(int(t))
  return np.sort(np.fromiter(keep, np.int32, len(keep)))


def _check_n(n, vocab_size: int) -> int:
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
    raise TypeError(f"a draft vocabulary size must be an integer, got {type(n).__name__}")
  if not MIN_IDS <= int(n) <= vocab_size:
    raise ValueError(f"a draft vocabulary size must be in [{MIN_IDS}, {vocab_size}] (the "
                     f"target's vocabulary), got {n}")
  return int(n)


def leading(n: int, vocab_size: int, eos_ids: Sequence[int] = ()) -> np.ndarray:
  """The end-of-sequence ids and the lowest ids, n in all (sorted)."""
  n = _check_n(n, vocab_size)
  return _with_eos(range(vocab_size), n, eos_ids, vocab_size)


def count(tokenizer, texts: Iterable[str]) -> Counter:
  """How often each token id occurs in the tokenizer's encoding of `texts`."""
  c: Counter = Counter()
  for t in texts:
    c.update(tokenizer.encode(t))
  return c


def ranked(counts: Counter, n: int, vocab_size: int, eos_ids: Sequence[int] = ()) -> np.ndarray:
  """The end-of-sequence ids and the ids most frequent in `counts` (ties: lower id first),
  n in all, sorted; ids never seen are taken lowest first (merge order) to fill n."""
  n = _check_n(n, vocab_size)
  seen = [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
          if 0 <= t < vocab_size]
  return _with_eos(seen + list(range(vocab_size)), n, eos_ids, vocab_size)


def frequent(tokenizer, texts: Iterable[str] | Counter, n: int) -> np.ndarray:
  """`ranked` over the tokenizer's encoding of `texts` (or over a `count` result)."""
  counts = texts if isinstance(texts, Counter) else count(tokenizer, texts)
  return ranked(counts, n, tokenizer.vocab_size, tokenizer.eos_ids)


def builtin(tokenizer, n: int) -> np.ndarray:
  """`frequent` over jaxspec's built-in prompt set (the Spec-Bench questions that `jaxspec
  bench` does not use: 450 prompts of chat, translation, summarization, QA, math and RAG)."""
  from jaxspec import prompts
  return frequent(tokenizer, prompts.training_prompts(), n)


def resolve(vocab, config: ModelConfig, tokenizer) -> np.ndarray | None:
  """A drafter's `vocab=` argument -> sorted target ids, or None (the full vocabulary):
  an int n is `builtin(tokenizer, n)` (`leading(n)` for a model without a tokenizer); a
  sequence is taken as given."""
  if vocab is None:
    return None
  v = config.vocab_size
  if isinstance(vocab, (int, np.integer)) and not isinstance(vocab, bool):
    _check_n(vocab, v)
    ids = leading(vocab, v) if tokenizer is None else builtin(tokenizer, int(vocab))
  else:
    if isinstance(vocab, (str, bytes, bool, float)):
      raise TypeError(f"vocab must be None, an integer size or a sequence of token ids, got "
                      f"{type(vocab).__name__}")
    ids = check_ids(vocab, v)
  return None if ids.size == v else ids


def params(model_params, config: ModelConfig, ids: np.ndarray) -> dict:
  """{"ids": [N] int32, "w": [N, D] the head rows of those ids, "final_norm": [D]}."""
  idx = jnp.asarray(ids)
  w = (model_params["embed"][idx] if config.tied_embeddings
       else jnp.take(model_params["lm_head"], idx, axis=1).T)
  return {"ids": idx, "w": w, "final_norm": model_params["final_norm"]}


def sub_logits(vp: dict, config: ModelConfig, x: jax.Array) -> jax.Array:
  """The model's own final norm and head with the N kept rows as a tied matrix: x [B, T, D]
  (before the final norm) -> float32 logits [B, T, N] over the draft vocabulary only (what
  training's softmax runs over)."""
  rows = {"final_norm": vp["final_norm"], "embed": vp["w"]}
  return head(rows, dataclasses.replace(config, tied_embeddings=True), x)


def scatter(vp: dict, config: ModelConfig, sub: jax.Array) -> jax.Array:
  """[..., N] logits over the draft vocabulary -> [..., V], -inf outside it."""
  full = jnp.full(sub.shape[:-1] + (config.vocab_size,), -jnp.inf, jnp.float32)
  return full.at[..., vp["ids"]].set(sub)


def logits(vp: dict, config: ModelConfig, x: jax.Array) -> jax.Array:
  """x [B, T, D] (before the final norm) -> float32 logits [B, T, V] over the full vocabulary,
  -inf outside the draft vocabulary."""
  return scatter(vp, config, sub_logits(vp, config, x))


def read_out(vp: dict | None, tparams, config: ModelConfig, x: jax.Array) -> jax.Array:
  """A trained head's readout of features x [B, T, D]: the target's own head (vp None) or the
  reduced one (`params(...)` of the head's ids)."""
  return head(tparams, config, x) if vp is None else logits(vp, config, x)


def bind_head(head_params: dict, target) -> dict:
  """A trained head's params for the loop: floating weights in the target's dtype, and its
  saved `vocab_ids` (if any) turned into the reduced head of the target (key "vocab")."""
  p = dict(head_params)
  ids = p.pop("vocab_ids", None)
  p = jax.tree.map(lambda x: jnp.asarray(x, target.dtype), p)
  p["vocab"] = None if ids is None else params(target.params, target.config, np.asarray(ids))
  return p

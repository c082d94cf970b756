"""The public entry points: `generate`, `stream`, `logits`.

They validate input, tokenize, pad to fixed buckets, call the compiled engine, copy the result
to the host once and decode it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec import engine, sampling
from jaxspec.drafters.base import NoDraft
from jaxspec.models import Model, forward

PROMPT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
BUF_ALIGN = 128


@dataclasses.dataclass
class Stats:
  """What a generation cost. `mean_accepted` is tau: tokens per target forward (bonus included;
  exactly 1.0 for plain decoding)."""

  mean_accepted: float
  target_calls: int  # target forward passes summed over rows (prefill included)
  draft_calls: int  # draft forward passes per row (model drafters; 0 for n-gram / plain)
  rounds: int  # loop iterations (batch-wide target forwards after prefill)
  accepted: list[list[int]]  # per row: histogram of accepted drafts per round, index 0..k
  new_tokens: int
  compile_s: float
  run_s: float
  tokens_per_s: float
  k: int
  drafts_proposed: int = 0  # draft slots per row and live round, summed (k per round for chains)
  drafts_verified: int = 0  # of those, drafts handed to verification (confidence stops leave
  #                           the rest empty; equal to drafts_proposed without stop_below)
  policy: object = None  # the adaptive.Choice behind this run (generate(..., adaptive=True))

  @property
  def per_row_mean_accepted(self) -> list[float]:
    return [float(sum((i + 1) * c for i, c in enumerate(h))) / max(1, sum(h)) for h in self.accepted]

  def summary(self) -> str:
    return (f"{self.new_tokens} tokens in {self.run_s:.2f}s ({self.tokens_per_s:.1f} tok/s), "
            f"tau {self.mean_accepted:.2f}, {self.target_calls} target calls, "
            f"compile {self.compile_s:.1f}s")


@dataclasses.dataclass
class Result:
  tokens: list[list[int]]
  texts: list[str]
  stats: Stats


def _bucket(n: int, buckets: Sequence[int] = PROMPT_BUCKETS) -> int:
  for b in buckets:
    if n <= b:
      return b
  return -(-n // buckets[-1]) * buckets[-1]


def _batch_bucket(b: int) -> int:
  return 1 << (b - 1).bit_length() if b > 1 else 1


def _encode_prompts(model: Model, prompts) -> list[list[int]]:
  if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
    raise TypeError("prompts must be a list of strings or a list of token-id lists "
                    "(wrap a single prompt in a list)")
  if len(prompts) == 0:
    raise ValueError("prompts is empty: pass at least one prompt")
  out = []
  for i, p in enumerate(prompts):
    if isinstance(p, str):
      if model.tokenizer is None:
        raise ValueError(f"{model.name!r} has no tokenizer: pass token ids instead of text")
      ids = model.tokenizer.encode(p)
    elif isinstance(p, (list, tuple, np.ndarray)):
      ids = [int(t) for t in p]
    else:
      raise TypeError(f"prompt {i} must be a str or a list of token ids, got {type(p).__name__}")
    if not ids:
      raise ValueError(f"prompt {i} is empty (no tokens); a prompt needs at least one token")
    bad = [t for t in ids if not 0 <= t < model.config.vocab_size]
    if bad:
      raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, "
                       f"{model.config.vocab_size}): {bad[:5]}")
    out.append(ids)
  return out


def _stop_array(model: Model, stop_tokens, batch: int) -> np.ndarray:
  if stop_tokens is None:
    rows = [list(model.tokenizer.eos_ids) if model.tokenizer else []] * batch
  elif len(stop_tokens) and all(isinstance(s, (list, tuple)) for s in stop_tokens):
    if len(stop_tokens) != batch:
      raise ValueError(f"per-row stop_tokens has {len(stop_tokens)} rows for {batch} prompts")
    rows = [list(s) for s in stop_tokens]
  else:
    rows = [list(stop_tokens)] * batch
  arr = np.full((batch, engine.MAX_STOP), -1, np.int32)
  for i, r in enumerate(rows):
    if len(r) > engine.MAX_STOP:
      raise ValueError(f"at most {engine.MAX_STOP} stop tokens per row, got {len(r)}")
    for t in r:
      if not isinstance(t, (int, np.integer)) or not 0 <= t < model.config.vocab_size:
        raise ValueError(f"stop token {t!r} is not a token id in [0, {model.config.vocab_size})")
    arr[i, :len(r)] = r
  return arr


@dataclasses.dataclass
class _Prepared:
  spec: engine.EngineSpec
  dparams: object
  prompt: np.ndarray
  lens: np.ndarray
  live: np.ndarray
  inputs: engine.Inputs
  key: jax.Array
  batch: int
  max_new: int
  mesh: object = None


def _prepare(model: Model, prompts, *, drafter, max_new_tokens, temperature, top_k, top_p,
             seed, stop_tokens, mesh) -> _Prepared:
  if not isinstance(model, Model):
    raise TypeError(f"model must be a jaxspec Model (from jaxspec.load_model), got "
                    f"{type(model).__name__}")
  if mesh is not None:
    from jaxspec import sharding
    sharding.check_divisible(model.config, mesh)
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
  mode, sp = sampling.make(temperature, top_k, top_p)
  ids = _encode_prompts(model, prompts)
  b = len(ids)
  longest = max(len(x) for x in ids)
  ctx = model.config.max_seq_len
  if longest > ctx:
    raise ValueError(f"prompt of {longest} tokens is longer than the model's context of {ctx}")
  if longest + max_new_tokens > ctx:
    raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                     f"model's context of {ctx} tokens; lower max_new_tokens to at most "
                     f"{ctx - longest}")
  if drafter is None:
    dspec, dparams = NoDraft(k=0, target=model.config), None
  else:
    if not hasattr(drafter, "bind"):
      raise TypeError(f"drafter must be a jaxspec drafter (jaxspec.drafters.*), got "
                      f"{type(drafter).__name__}")
    dspec, dparams = drafter.bind(model)
  dspec = dspec.with_mode(mode)
  p = _bucket(longest)
  bb = _batch_bucket(b)
  if mesh is not None:  # rows split evenly over the data axis
    data = mesh.shape.get("data", 1)
    bb = -(-bb // data) * data
  buf = -(-(p + max_new_tokens + dspec.footprint + 1) // BUF_ALIGN) * BUF_ALIGN
  prompt = np.zeros((bb, p), np.int32)
  lens = np.ones((bb,), np.int32)
  for i, x in enumerate(ids):
    prompt[i, :len(x)] = x
    lens[i] = len(x)
  live = np.arange(bb) < b
  stop = _stop_array(model, stop_tokens, b)
  stop = np.concatenate([stop, np.full((bb - b, engine.MAX_STOP), -1, np.int32)])
  spec = engine.EngineSpec(target=model.config, drafter=dspec, batch=bb, prompt_len=p,
                           buf_len=buf)
  inputs = engine.Inputs(sp=sp, max_new=jnp.asarray(max_new_tokens, jnp.int32),
                         stop=jnp.asarray(stop))
  return _Prepared(spec, dparams, prompt, lens, live, inputs, jax.random.key(seed), b,
                   int(max_new_tokens), mesh)


def _start(model: Model, pr: _Prepared):
  args = (model.params, pr.dparams, jnp.asarray(pr.prompt), jnp.asarray(pr.lens),
          jnp.asarray(pr.live), pr.inputs, pr.key)
  exe, c1 = engine.compiled("prefill", pr.spec, *args, mesh=pr.mesh)
  state = exe(*args)
  return state, c1


def _rounds(model: Model, pr: _Prepared, state, max_rounds: int):
  args = (model.params, pr.dparams, pr.inputs, state, jnp.asarray(max_rounds, jnp.int32))
  exe, c = engine.compiled("run", pr.spec, *args, mesh=pr.mesh)
  return exe(*args), c


def generate(model: Model, prompts, *, drafter=None, max_new_tokens: int = 128,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, stop_tokens=None, mesh=None, adaptive: bool = False) -> Result:
  """Generates up to `max_new_tokens` per prompt; speculative when `drafter` is given.

  Lossless either way: greedy output equals plain greedy decoding token for token, and sampled
  output follows the target's own distribution.
  stop_tokens: None (the tokenizer's EOS ids), () (never stop early), a list of ids, or one list
  per prompt.
  adaptive: pick the drafter's k, or plain decoding, for this model, batch bucket and drafter
  from measured costs and acceptance (`jaxspec.adaptive.choose_k`; measured once, cached);
  the choice is in `stats.policy`.
  """
  choice = None
  if adaptive and drafter is not None:
    from jaxspec import adaptive as _adaptive
    choice = _adaptive.choose_k(model, drafter, prompts=prompts, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                stop_tokens=stop_tokens, mesh=mesh)
    drafter = choice.drafter
  pr = _prepare(model, prompts, drafter=drafter, max_new_tokens=max_new_tokens,
                temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                stop_tokens=stop_tokens, mesh=mesh)
  # Compile outside the timed region so run_s measures execution only.
  t0 = time.perf_counter()
  state, c1 = _start(model, pr)
  state, c2 = _rounds(model, pr, state, 1 << 30)
  seq, n, lens, calls, hist, rounds, bad, drafted = _fetch(
      (state.seq, state.n, state.prompt_lens, state.stats.target_calls, state.stats.accept_hist,
       state.stats.rounds, state.stats.nonfinite, state.stats.drafted))
  run_s = time.perf_counter() - t0 - c1 - c2
  _check_finite(model, bad[:pr.batch])
  out = _result(model, pr, seq, n, lens, calls, hist, rounds, c1 + c2, run_s)
  d = pr.spec.drafter
  slots = d.k if d.tree is None else d.tree.n_nodes - 1
  out.stats.drafts_proposed = (out.stats.target_calls - pr.batch) * slots
  out.stats.drafts_verified = int(drafted[:pr.batch].sum())
  out.stats.policy = choice
  return out


def _fetch(tree):
  """Device -> host once; across processes, gathers the rows every process needs."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)),
                        tree)
  return jax.device_get(tree)


def _check_finite(model: Model, bad) -> None:
  """Raises instead of returning tokens drawn from NaN/inf logits."""
  rows = [int(i) for i in np.flatnonzero(bad)]
  if rows:
    raise FloatingPointError(
        f"{model.name!r} produced non-finite logits (NaN or inf) for prompt row(s) {rows}; its "
        f"weights or activations are broken (a corrupt checkpoint, or float16 overflow: try "
        f"dtype='float32' or 'bfloat16'), so no tokens are returned")


def _result(model, pr: _Prepared, seq, n, lens, calls, hist, rounds, compile_s, run_s) -> Result:
  b = pr.batch
  tokens = [seq[i, lens[i]:n[i]].tolist() for i in range(b)]
  texts = ([model.tokenizer.decode(t) for t in tokens] if model.tokenizer is not None
           else [""] * b)
  new = sum(len(t) for t in tokens)
  total_calls = int(calls[:b].sum())
  stats = Stats(
      mean_accepted=new / max(1, total_calls), target_calls=total_calls,
      draft_calls=int(rounds) * pr.spec.drafter.draft_forwards, rounds=int(rounds),
      accepted=hist[:b].tolist(), new_tokens=new, compile_s=compile_s, run_s=run_s,
      tokens_per_s=new / run_s if run_s > 0 else float("nan"), k=pr.spec.depth)
  return Result(tokens=tokens, texts=texts, stats=stats)


def stream(model: Model, prompt, *, rounds_per_chunk: int = 4, **kw) -> Iterator[str]:
  """Yields text pieces as tokens are committed (the loop runs in chunks of rounds; the
  chunked program is compiled once and reused for every chunk and every call)."""
  if isinstance(prompt, (list, tuple)) and prompt and not isinstance(prompt[0], (int, np.integer)):
    raise TypeError("stream takes a single prompt (a str or a list of token ids)")
  if model.tokenizer is None:
    raise ValueError(f"{model.name!r} has no tokenizer; stream needs one to produce text")
  pr = _prepare(model, [prompt], **_with_defaults(kw))
  state, _ = _start(model, pr)
  lens = int(pr.lens[0])
  shown = ""
  while True:
    n, done, bad = _fetch((state.n[0], state.done[0], state.stats.nonfinite[:1]))
    _check_finite(model, bad)
    text = model.tokenizer.decode(_fetch(state.seq[0, lens:n]).tolist())
    if not done and text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more
      text = text[:-1]
    if len(text) > len(shown) and text.startswith(shown):
      yield text[len(shown):]
      shown = text
    if done:
      break
    state, _ = _rounds(model, pr, state, rounds_per_chunk)


def _with_defaults(kw: dict) -> dict:
  unknown = set(kw) - {"drafter", "max_new_tokens", "temperature", "top_k", "top_p", "seed",
                       "stop_tokens", "mesh"}
  if unknown:
    raise TypeError(f"unexpected keyword arguments: {sorted(unknown)}")
  out = dict(drafter=None, max_new_tokens=128, temperature=0.0, top_k=None, top_p=None, seed=0,
             stop_tokens=None, mesh=None)
  out.update(kw)
  return out


_logits_jit = jax.jit(lambda params, cfg, ids: forward(params, cfg, ids).logits,
                      static_argnums=1)


def logits(model: Model, token_ids) -> jax.Array:
  """Logits [B, T, V] (float32) of a full causal forward pass with no cache."""
  ids = _encode_prompts(model, token_ids)
  if len({len(x) for x in ids}) != 1:
    raise ValueError("jaxspec.logits needs token_ids of equal lengths")
  if len(ids[0]) > model.config.max_seq_len:
    raise ValueError(f"{len(ids[0])} tokens exceed the model's context of "
                     f"{model.config.max_seq_len}")
  return _logits_jit(model.params, model.config, jnp.asarray(ids, jnp.int32))

"""The public entry points: `generate`, `stream`, `logits`.

They drive one `jaxspec.session` (validate, tokenize, pad to fixed buckets, run the compiled
engine), copy the result to the host once and decode it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec import policy, session, validate
from jaxspec.models import Model, forward
from jaxspec.session import Plan


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
  rounds_by_tokens: dict = dataclasses.field(default_factory=dict)  # {tokens per row a round
  #   verified: rounds}: 1 = plain rounds the speculation switch chose, k + 1 (or the tree's
  #   nodes) = speculative rounds
  switch_ratio: float | None = None  # the switch's measured cost of a speculative round / plain
  calibration_s: float = 0.0  # measuring that ratio (once per model, drafter and shapes)

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


def generate(model: Model, prompts, *, drafter=None, max_new_tokens: int = 128,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, stop_tokens=None, mesh=None, adaptive: bool = False,
             speculate: str | None = None) -> Result:
  """Generates up to `max_new_tokens` per prompt; speculative when `drafter` is given.

  Lossless either way: greedy output equals plain greedy decoding token for token, and sampled
  output follows the target's own distribution.
  stop_tokens: None (the tokenizer's EOS ids), () (never stop early), a list of ids, or one list
  per prompt.
  temperature: 0 is greedy, and so is anything below `sampling.MIN_TEMPERATURE` (1e-6).
  seed: an integer in [0, 2**32); every seed in that range gives its own stream.
  Numbers may be Python or numpy scalars, never bools or strings (jaxspec.validate).
  adaptive: pick the drafter's k, or plain decoding, for this model, batch bucket and drafter
  from measured costs and acceptance (`jaxspec.adaptive.choose_k`; measured once, cached);
  the choice is in `stats.policy`.
  speculate: "auto" (default): inside the compiled loop each round speculates only while the
  drafter's running acceptance beats the measured cost of a speculative round over a plain one,
  so a drafter that does not pay falls back to plain decoding (`jaxspec.policy`; rounds by kind
  in `stats.rounds_by_tokens`). "always": every round speculates (research, exact counts).
  None: the environment variable JAXSPEC_SPECULATE if set (the test suite sets "always"),
  else "auto".
  """
  adaptive = validate.flag("adaptive", adaptive)
  choice = None
  if adaptive and drafter is not None:
    from jaxspec import adaptive as _adaptive
    choice = _adaptive.choose_k(model, drafter, prompts=prompts, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                stop_tokens=stop_tokens, mesh=mesh)
    drafter = choice.drafter
  pr = session.prepare(model, prompts, drafter=drafter, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                       stop_tokens=stop_tokens, mesh=mesh, speculate=speculate)
  pr, measured = policy.calibrated(model, drafter, pr)
  # Compile outside the timed region so run_s measures execution only.
  t0 = time.perf_counter()
  state, c1 = session.start(model, pr)
  state, c2 = session.run_rounds(model, pr, state, 1 << 30)
  seq, n, lens, calls, hist, rounds, bad, drafted, spec_rounds = session.fetch(
      (state.seq, state.n, state.prompt_lens, state.stats.target_calls, state.stats.accept_hist,
       state.stats.rounds, state.stats.nonfinite, state.stats.drafted, state.stats.spec_rounds))
  run_s = time.perf_counter() - t0 - c1 - c2
  session.check_finite(model, bad[:pr.batch])
  if measured is not None:  # calibrating ran (and so compiled) this very program first
    c1 += measured.compile_s
  out = _result(model, pr, seq, n, lens, calls, hist, rounds, c1 + c2, run_s, spec_rounds)
  out.stats.drafts_proposed = int(hist[:pr.batch].sum()) * pr.spec.drafter.slots
  out.stats.drafts_verified = int(drafted[:pr.batch].sum())
  out.stats.policy = choice
  if measured is not None:
    out.stats.switch_ratio, out.stats.calibration_s = measured.ratio, measured.seconds
  return out


def _result(model, pr: Plan, seq, n, lens, calls, hist, rounds, compile_s, run_s,
            spec_rounds) -> Result:
  b = pr.batch
  tokens = [seq[i, lens[i]:n[i]].tolist() for i in range(b)]
  texts = ([model.tokenizer.decode(t) for t in tokens] if model.tokenizer is not None
           else [""] * b)
  new = sum(len(t) for t in tokens)
  total_calls = int(calls[:b].sum())
  stats = Stats(
      mean_accepted=new / max(1, total_calls), target_calls=total_calls,
      draft_calls=int(spec_rounds) * pr.spec.drafter.draft_forwards, rounds=int(rounds),
      accepted=hist[:b].tolist(), new_tokens=new, compile_s=compile_s, run_s=run_s,
      tokens_per_s=new / run_s if run_s > 0 else float("nan"), k=pr.spec.depth)
  d = pr.spec.drafter
  width = d.slots + 1  # tokens per row a speculative round verifies
  plain = int(rounds) - int(spec_rounds)
  stats.rounds_by_tokens = {t: c for t, c in ((1, plain), (width, int(spec_rounds))) if c}
  return Result(tokens=tokens, texts=texts, stats=stats)


def stream(model: Model, prompt, *, rounds_per_chunk: int = 4, **kw) -> Iterator[str]:
  """Yields text pieces as tokens are committed (the loop runs in chunks of rounds; the
  chunked program is compiled once and reused for every chunk and every call)."""
  rounds_per_chunk = validate.rounds_per_chunk(rounds_per_chunk)  # 0 used to loop forever
  if (isinstance(prompt, (list, tuple)) and prompt
      and isinstance(prompt[0], (str, bytes, list, tuple, np.ndarray))):
    raise TypeError("stream takes a single prompt (a str or a list of token ids)")
  if model.tokenizer is None:
    raise ValueError(f"{model.name!r} has no tokenizer; stream needs one to produce text")
  kw = _with_defaults(kw)
  pr = session.prepare(model, [prompt], **kw)
  pr, _ = policy.calibrated(model, kw["drafter"], pr)
  state, _ = session.start(model, pr)
  lens = int(pr.lens[0])
  shown = ""
  while True:
    n, done, bad = session.fetch((state.n[0], state.done[0], state.stats.nonfinite[:1]))
    session.check_finite(model, bad)
    text = model.tokenizer.decode(session.fetch(state.seq[0, lens:n]).tolist())
    if not done and text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more
      text = text[:-1]
    if len(text) > len(shown) and text.startswith(shown):
      yield text[len(shown):]
      shown = text
    if done:
      break
    state, _ = session.run_rounds(model, pr, state, rounds_per_chunk)


def _with_defaults(kw: dict) -> dict:
  unknown = set(kw) - {"drafter", "max_new_tokens", "temperature", "top_k", "top_p", "seed",
                       "stop_tokens", "mesh", "speculate"}
  if unknown:
    raise TypeError(f"unexpected keyword arguments: {sorted(unknown)}")
  out = dict(drafter=None, max_new_tokens=128, temperature=0.0, top_k=None, top_p=None, seed=0,
             stop_tokens=None, mesh=None, speculate=None)
  out.update(kw)
  return out


_logits_jit = jax.jit(lambda params, cfg, ids: forward(params, cfg, ids).logits,
                      static_argnums=1)


def logits(model: Model, token_ids) -> jax.Array:
  """Logits [B, T, V] (float32) of a full causal forward pass with no cache."""
  ids = session.encode_prompts(model, token_ids)
  if len({len(x) for x in ids}) != 1:
    raise ValueError("jaxspec.logits needs token_ids of equal lengths")
  if len(ids[0]) > model.config.max_seq_len:
    raise ValueError(f"{len(ids[0])} tokens exceed the model's context of "
                     f"{model.config.max_seq_len}")
  return _logits_jit(model.params, model.config, jnp.asarray(ids, jnp.int32))

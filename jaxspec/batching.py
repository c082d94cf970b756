"""Continuous batching: `generate_many` keeps a fixed number of slots busy in the compiled loop.

JetStream's prefill / insert / generate, with speculation:

    state = start(B empty rows)                     # the compiled prefill, every row done
    loop:
      insert(state, I new prompts, free slots)      # compiled: prefill [I, P], scatter rows
      serve(state, until min_done rows are done)    # compiled: the speculative loop
      yield the finished rows; their slots are free

The state's rows are slots. `insert` prefills a bucket of I prompts and writes their rows
(token buffer, lengths, done flags, target cache, drafter state, stats, per-row keys) into
chosen slots while the other rows keep decoding from where they are. `serve` is the same loop
as `generate`'s, returning as soon as I rows are free (or, once the input is exhausted, as soon
as any row finishes). Every shape is fixed by the plan (slots, insert width, prompt bucket,
buffer), so nothing recompiles after the first refill.

Same answer wherever a prompt lands: greedy output equals `generate([prompt])`; sampled output
depends only on the seed and the prompt's id (row keys are fold_in(key(seed), id)), never on
the batch size, the slot, the order or the other prompts.

A drafter with a memory across calls (`NGram(memory=M)`, `Drafter.remember`) learns from the
job while it runs: the rows that finish in one `serve` call join its memory before the next
(a traced input of fixed size: nothing recompiles). Greedy output is unchanged (lossless);
sampled output still has the target's distribution, but its exact draws then also depend on
what the memory held.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec import engine, policy, sampling, session
from jaxspec.models import Model

LOOKAHEAD = 4  # without max_prompt_tokens, an iterator is planned from its first 4 * slots


@dataclasses.dataclass
class Completion:
  """One finished prompt."""

  id: Any
  index: int  # position in the input
  tokens: list[int]  # new tokens
  text: str
  prompt_tokens: int
  target_calls: int  # target forwards for this row (its prefill included)
  accepted: list[int]  # histogram of accepted drafts per round, index 0..depth
  finish_reason: str  # "stop" (a stop token) | "length" (max_new_tokens)

  @property
  def new_tokens(self) -> int:
    return len(self.tokens)

  @property
  def tau(self) -> float:
    """New tokens per target forward (1.0 for plain decoding)."""
    return self.new_tokens / max(1, self.target_calls)


@dataclasses.dataclass
class _Job:
  index: int
  id: Any
  ids: list[int]  # prompt token ids
  key_id: int  # the id folded into the seed key


def id_key(id_: Any) -> int:
  """The integer folded into the seed for a prompt id: ints in [0, 2**31) as themselves (so
  `generate`'s row i and id i draw alike), anything else by a stable hash."""
  if isinstance(id_, (int, np.integer)) and not isinstance(id_, bool) and 0 <= id_ < 2**31:
    return int(id_)
  digest = hashlib.sha256(repr(id_).encode()).digest()
  return 2**31 + int.from_bytes(digest[:4], "little") % 2**31


def encode_one(model: Model, item, index: int) -> tuple[Any, list[int]]:
  """(id, token ids) of one input: a str, a token-id list, or a dict with `id` and `prompt`
  (str or token ids) or chat `messages`."""
  id_ = index
  if isinstance(item, dict):
    id_ = item.get("id", index)
    if "messages" in item:
      if model.tokenizer is None or not getattr(model.tokenizer, "chat_template", None):
        raise ValueError(f"prompt {id_!r} has chat messages, but {model.name!r} has no chat "
                         f"template")
      item = list(model.tokenizer.apply_chat_template(item["messages"], tokenize=True))
    elif "prompt" in item:
      item = item["prompt"]
    else:
      raise ValueError(f"prompt {id_!r}: a dict prompt needs 'prompt' or 'messages' (keys: "
                       f"{sorted(item)})")
    if isinstance(id_, (list, dict)):
      raise TypeError(f"prompt {index}: id must be a string or an integer, got "
                      f"{type(id_).__name__}")
  try:
    return id_, session.encode_prompts(model, [item])[0]
  except (TypeError, ValueError) as e:
    raise type(e)(f"prompt {id_!r}: {str(e).replace('prompt 0 ', '').replace('prompt 0', '')}"
                  ) from None


def _jobs(model: Model, prompts: Iterable) -> Iterator[_Job]:
  seen: set = set()
  for index, item in enumerate(prompts):
    id_, ids = encode_one(model, item, index)
    if id_ in seen:
      raise ValueError(f"prompt id {id_!r} appears twice (input {index}); ids must be unique")
    seen.add(id_)
    yield _Job(index, id_, ids, id_key(id_))


def generate_many(model: Model, prompts: Iterable, *, batch_size: int = 16, drafter=None,
                  max_new_tokens: int = 128, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                  stop_tokens=None, mesh=None, max_prompt_tokens: int | None = None,
                  insert_size: int | None = None, max_rounds: int = 1 << 30,
                  speculate: str | None = None) -> Iterator[Completion]:
  """Generates for every prompt of `prompts` (any iterable of strings, token-id lists or dicts
  with `id` and `prompt` or chat `messages`) with `batch_size` slots (rounded up to a power of
  two, like `generate`'s batch) in the compiled loop, refilling slots as rows finish. Yields one `Completion` per prompt as soon as its row
  finishes (so not in input order).

  Arguments are `generate`'s; stop_tokens is one list for every prompt. The prompt bucket is
  planned from `max_prompt_tokens`, else from the longest prompt (a list: all of them; an
  iterator: its first 4 * batch_size); a longer prompt later is an error naming
  max_prompt_tokens, never a truncation. insert_size: prompts prefilled per refill (default
  batch_size // 16, at least 1: a slot waits for at most that many others to free up before it
  is refilled). max_rounds: rounds per loop call (a bound on how long a call may keep the
  host waiting). speculate: as for `generate`; "auto" (greedy default) measures the switch's
  cost ratio at this batch (every slot busy) before the first refill. Sampled runs always
  speculate (see below).

  Validation and planning happen here; the compiled work runs as the iterator is consumed.
  """
  slots = session.batch_bucket(_positive("batch_size", batch_size))
  if stop_tokens is not None and len(stop_tokens) and isinstance(stop_tokens[0], (list, tuple)):
    raise TypeError("generate_many takes one stop_tokens list for every prompt")
  jobs = _jobs(model, prompts)
  if isinstance(prompts, Sequence) and not isinstance(prompts, (str, bytes)):
    ahead = list(jobs)
  else:
    ahead = list(itertools.islice(jobs, LOOKAHEAD * slots))
  if not ahead:
    raise ValueError("prompts is empty: pass at least one prompt")
  if max_prompt_tokens is None:
    max_prompt_tokens = max(len(j.ids) for j in ahead)
  longest = _positive("max_prompt_tokens", max_prompt_tokens)
  # Sampled runs speculate every round: the in-graph speculation switch decides for the whole
  # batch, and plain and speculative rounds draw differently, so it would tie a row's draws to
  # its neighbours. Greedy output is the same either way, so greedy runs keep the switch.
  greedy = sampling.make(temperature, top_k, top_p)[0].greedy
  pr = session.prepare(model, [[0] * longest] * slots, drafter=drafter,
                       max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, seed=seed, stop_tokens=stop_tokens, mesh=mesh,
                       speculate=speculate if greedy else "always")
  pr = _calibrated(model, drafter, pr)
  width = max(1, slots // 16) if insert_size is None else _positive("insert_size", insert_size)
  width = min(width, slots)
  if mesh is not None:
    data = mesh.shape.get("data", 1)
    width = -(-width // data) * data
  runner = _Runner(model, pr, width, seed, longest, drafter)
  return runner.iterate(itertools.chain(ahead, jobs), max_rounds)


def _calibrated(model: Model, drafter, pr: session.Plan) -> session.Plan:
  """The switch's cost ratio measured at the serving batch: every slot decoding, at the
  planned prompt bucket and buffer (`jaxspec.policy`, cached like `generate`'s). The rows keep
  changing but the shapes do not, and a round's cost follows the shapes. Timed on the plan's
  placeholder prompts with stops off, so no row finishes before the rounds are timed."""
  if not pr.spec.switch:
    return pr
  timing = dataclasses.replace(pr, inputs=pr.inputs.replace(
      stop=jnp.full_like(pr.inputs.stop, -1)))
  measured = policy.measure(model, drafter, timing)
  return policy.calibrated(model, drafter, pr, ratio=measured.ratio)[0]


def _positive(name: str, value) -> int:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or \
      value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")
  return int(value)


class _Runner:
  """The host side of continuous batching: which job holds which slot."""

  def __init__(self, model: Model, pr: session.Plan, width: int, seed: int, longest: int,
               drafter=None):
    self.model, self.pr, self.width, self.longest = model, pr, width, longest
    self.drafter = drafter
    b = pr.spec.batch
    # Every slot shares the stop list (the plan's rows past the first are padding).
    self.inputs = pr.inputs.replace(stop=jnp.broadcast_to(pr.inputs.stop[0], pr.inputs.stop.shape))
    self.stop = set(int(t) for t in np.asarray(pr.inputs.stop[0]) if t >= 0)
    self.seed_key = jax.random.key(seed)
    self.owner: list[_Job | None] = [None] * b
    self.ctx = model.config.max_seq_len

  def _call(self, name, *args):
    exe, _ = engine.compiled(name, self.pr.spec, *args, mesh=self.pr.mesh)
    return exe(*args)

  def _empty(self):
    """B free slots (every row done)."""
    return self._call("empty", self.model.params, self.pr.dparams, self.inputs, self.seed_key)

  def _check(self, job: _Job) -> None:
    if len(job.ids) > self.longest:
      raise ValueError(f"prompt {job.id!r} has {len(job.ids)} tokens, more than the "
                       f"{self.longest} this run was planned for; pass max_prompt_tokens >= "
                       f"{len(job.ids)} (or put the longest prompts first)")
    if len(job.ids) + self.pr.max_new > self.ctx:
      raise ValueError(f"prompt {job.id!r} ({len(job.ids)} tokens) + max_new_tokens "
                       f"({self.pr.max_new}) exceeds the model's context of {self.ctx} tokens")

  def _insert(self, state, jobs: list[_Job], free: list[int]):
    # The prompts' own bucket (a few programs, one per bucket up to the plan's, each compiled
    # once): short prompts do not pay for the longest one's prefill.
    b, i = self.pr.spec.batch, self.width
    p = min(session.bucket(max(len(j.ids) for j in jobs)), self.pr.spec.prompt_len)
    prompt = np.zeros((i, p), np.int32)
    lens = np.ones((i,), np.int32)
    live = np.zeros((i,), bool)
    slots = np.full((i,), b, np.int32)  # padding rows go past the end: dropped
    ids = np.zeros((i,), np.uint32)
    for r, (job, slot) in enumerate(zip(jobs, free)):
      prompt[r, :len(job.ids)] = job.ids
      lens[r], live[r], slots[r], ids[r] = len(job.ids), True, slot, job.key_id
      self.owner[slot] = job
    return self._call("insert", self.model.params, self.pr.dparams, self.inputs, state,
                      jnp.asarray(prompt), jnp.asarray(lens), jnp.asarray(live),
                      jnp.asarray(slots), self.seed_key, jnp.asarray(ids))

  def _fetch(self, state):
    tree = (state.done, state.n, state.prompt_lens, state.seq, state.stats.target_calls,
            state.stats.accept_hist, state.stats.nonfinite)
    if not state.done.is_fully_addressable:  # a mesh over every process: gather the rows
      return session.fetch(tree)
    return jax.device_get(tree)

  def _remember(self, finished: list[Completion]) -> None:
    """Finished rows join the drafter's memory (if it keeps one): its params are rebound, the
    compiled program stays (`Drafter.remember` keeps the options, so the spec is equal)."""
    if self.drafter is None or not self.drafter.remembers or not finished:
      return
    learned = self.drafter.remember(finished)
    spec, dparams = learned.bind(self.model)
    assert spec.with_mode(self.pr.spec.drafter.mode) == self.pr.spec.drafter
    self.drafter, self.pr = learned, dataclasses.replace(self.pr, dparams=dparams)

  def _completion(self, job: _Job, seq, n, plen, calls, hist) -> Completion:
    toks = seq[plen:n].tolist()
    tok = self.model.tokenizer
    text = tok.decode(toks) if tok is not None else ""
    reason = "stop" if toks and toks[-1] in self.stop else "length"
    return Completion(id=job.id, index=job.index, tokens=toks, text=text, prompt_tokens=plen,
                      target_calls=int(calls), accepted=hist.tolist(), finish_reason=reason)

  def iterate(self, jobs: Iterator[_Job], max_rounds: int) -> Iterator[Completion]:
    queue: collections.deque = collections.deque()
    state = self._empty()
    b = self.pr.spec.batch

    def pull(n: int) -> None:
      while len(queue) < n:
        job = next(jobs, None)
        if job is None:
          return
        self._check(job)
        queue.append(job)

    while True:
      free = [s for s in range(b) if self.owner[s] is None]
      pull(len(free) + 1)
      while free and queue:
        take = [queue.popleft() for _ in range(min(self.width, len(free), len(queue)))]
        state = self._insert(state, take, free[:len(take)])
        free = free[len(take):]
      held = b - len(free)
      if held == 0:
        return
      # Refill once `width` slots are free; with the input exhausted, hand back each finish.
      pull(1)
      min_done = len(free) + (min(self.width, held) if queue else 1)
      state = self._call("serve", self.model.params, self.pr.dparams, self.inputs, state,
                         jnp.asarray(max_rounds, jnp.int32), jnp.asarray(min_done, jnp.int32))
      done, n, plen, seq, calls, hist, bad = self._fetch(state)
      finished = []
      for s in range(b):
        job = self.owner[s]
        if job is None or not done[s]:
          continue
        if bad[s]:
          raise FloatingPointError(
              f"{self.model.name!r} produced non-finite logits (NaN or inf) for prompt "
              f"{job.id!r}; its weights or activations are broken, so no tokens are returned")
        self.owner[s] = None
        finished.append(self._completion(job, seq[s], int(n[s]), int(plen[s]), calls[s],
                                         hist[s]))
      self._remember(finished)
      yield from finished

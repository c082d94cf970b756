"""Static batching (chunks through `generate`) vs continuous batching (`generate_many`).

    python scripts/bench_continuous.py --model stories260K --num-prompts 128 --batch-size 16 \
        --max-new-tokens 256 --drafters none,ngram --repeats 3
    python scripts/bench_continuous.py --model smollm2-135m --chat --max-prompt-tokens 256 \
        --num-prompts 128 --max-new-tokens 512 --repeats 1

The first Spec-Bench prompts (file order) that fit the context with max_new_tokens, natural
stops (the tokenizer's EOS). The timed runs are
interleaved (static, continuous, static, ...) so a noisy machine hurts both alike; the ratio
is taken per repeat and the median quoted. Static batching times `generate`'s own run_s
(compile excluded); continuous batching times the whole iteration, its programs built first
by a short untimed run over one prompt of each prompt bucket.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jaxspec
from jaxspec import prompts as bench_prompts
from jaxspec.batching import generate_many
from jaxspec.drafters import registry


def pick_prompts(model, n: int, max_new: int, chat: bool = False,
                 max_prompt: int | None = None) -> list[list[int]]:
  """Token ids of the first n prompts that fit the context and max_prompt (chat: in the chat
  template)."""
  ctx = model.config.max_seq_len
  out = []
  for q in bench_prompts.spec_bench():
    if chat:
      ids = model.tokenizer.apply_chat_template([{"role": "user", "content": q["text"]}],
                                                tokenize=True)
    else:
      ids = model.tokenizer.encode(q["text"])
    if len(ids) + max_new <= ctx and (max_prompt is None or len(ids) <= max_prompt):
      out.append(list(ids))
    if len(out) == n:
      break
  return out


def static(model, texts, bs, drafter, max_new):
  new, run_s, calls = 0, 0.0, 0
  for i in range(0, len(texts), bs):
    out = jaxspec.generate(model, texts[i:i + bs], drafter=drafter, max_new_tokens=max_new)
    new += out.stats.new_tokens
    calls += out.stats.target_calls
    run_s += out.stats.run_s
  return new, run_s, calls


def continuous(model, texts, bs, drafter, max_new, insert_size, lengths=None, longest=None):
  t0 = time.perf_counter()
  new = calls = 0
  for c in generate_many(model, texts, batch_size=bs, drafter=drafter, max_new_tokens=max_new,
                         insert_size=insert_size, max_prompt_tokens=longest):
    new += c.new_tokens
    calls += c.target_calls
    if lengths is not None:
      lengths[c.index] = c.new_tokens
  return new, time.perf_counter() - t0, calls


def warm_up_prompts(model, texts, bs: int) -> list[list[int]]:
  """One prompt of each prompt bucket the set uses (the shortest), at least one batch's worth:
  enough for `generate_many` to build every program the timed runs use."""
  from jaxspec import session
  by_bucket = {}
  for ids in sorted(texts, key=len):
    by_bucket.setdefault(session.bucket(len(ids)), ids)
  picked = list(by_bucket.values())
  return picked + sorted(texts, key=len)[:max(0, bs - len(picked))]


def length_bound(lengths: list[int], bs: int) -> float:
  """What refilling can save at most (plain decoding, one token per round): the rounds of
  static chunks (each as long as its longest row) over the rounds of perfectly packed slots."""
  static_rounds = sum(max(lengths[i:i + bs]) for i in range(0, len(lengths), bs))
  return static_rounds / (sum(lengths) / bs)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="stories260K")
  p.add_argument("--num-prompts", type=int, default=128)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--max-new-tokens", type=int, default=256)
  p.add_argument("--drafters", default="none,ngram")
  p.add_argument("--k", type=int, default=4)
  p.add_argument("--insert-size", type=int, default=None)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
  p.add_argument("--max-prompt-tokens", type=int, default=None,
                 help="skip prompts longer than this (a chat model's context is long)")
  a = p.parse_args()
  model = jaxspec.load_model(a.model, progress=False)
  texts = pick_prompts(model, a.num_prompts, a.max_new_tokens, a.chat, a.max_prompt_tokens)
  print(f"{model.name}: {len(texts)} Spec-Bench prompts, batch {a.batch_size}, "
        f"max_new_tokens {a.max_new_tokens}, insert size {a.insert_size or max(1, a.batch_size // 16)}")
  lengths = [0] * len(texts)
  warm = warm_up_prompts(model, texts, a.batch_size)
  longest = max(map(len, texts))  # one plan for the warm-up and the timed runs
  rows = []
  for name in a.drafters.split(","):
    drafter = registry.parse(name, a.k, None)
    runs = {"static": lambda: static(model, texts, a.batch_size, drafter, a.max_new_tokens),
            "continuous": lambda: continuous(model, texts, a.batch_size, drafter,
                                             a.max_new_tokens, a.insert_size, lengths, longest)}
    # Compile: static batching's run_s excludes compile already; continuous batching builds
    # one insert program per prompt bucket, so one prompt of each bucket runs through it once.
    continuous(model, warm, a.batch_size, drafter, a.max_new_tokens, a.insert_size,
               longest=longest)
    got = {k: [] for k in runs}
    for _ in range(a.repeats):
      for k, fn in runs.items():
        new, secs, calls = fn()
        got[k].append((new / secs, new, calls))
        print(f"  {name:>8} {k:>10}: {new} tokens in {secs:.2f}s = {new / secs:.1f} tok/s, "
              f"tau {new / max(1, calls):.2f}", flush=True)
    if not rows:  # greedy output, and so every output's length, is the same for any drafter
      print(f"output lengths: {sorted(lengths)[len(lengths) // 2]} median, "
            f"{sum(x == a.max_new_tokens for x in lengths)} of {len(lengths)} at "
            f"max_new_tokens; refilling saves at most "
            f"{length_bound(lengths, a.batch_size):.2f}x of the rounds", flush=True)
    ratio = statistics.median(c[0] / s[0] for s, c in zip(got["static"], got["continuous"]))
    rows.append((name, statistics.median(x[0] for x in got["static"]),
                 statistics.median(x[0] for x in got["continuous"]), ratio,
                 got["static"][0][1], got["continuous"][0][1]))
  print("\n| drafter | static tok/s | continuous tok/s | continuous / static | tokens |")
  print("|---|---|---|---|---|")
  for name, s, c, r, ns, nc in rows:
    print(f"| {name} | {s:.0f} | {c:.0f} | {r:.2f}x | {ns} / {nc} |")


if __name__ == "__main__":
  main()

"""What one round of the compiled loop costs, program by program, on a real model.

For each drafter: a round of its program forced to the plain branch and forced to the
speculative branch (`policy.round_seconds`, the timing the speculation switch calibrates
with), next to a round of the plain program (no drafter), repeated in interleaved passes so
machine noise hits every cell alike. Prints ms per round (median of the passes) and the
speculative / plain ratio, i.e. the tau a drafter needs to break even.

    python scripts/bench_round.py --model qwen2.5-coder-1.5b \
        --drafters draft:qwen2.5-coder-0.5b,draft:qwen2.5-coder-0.5b@32768,ngram --passes 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jaxspec
from jaxspec import engine, policy, session
from jaxspec.drafters import registry

PROMPT = ("Write a Python function that returns the n-th Fibonacci number using memoization, "
          "with a docstring and two doctests.")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", default="smollm2-135m")
  ap.add_argument("--drafters", default="ngram")
  ap.add_argument("--k", type=int, default=4)
  ap.add_argument("--max-new-tokens", type=int, default=96)
  ap.add_argument("--passes", type=int, default=3)
  ap.add_argument("--rounds", type=int, default=6)
  a = ap.parse_args(argv)

  t0 = time.perf_counter()
  model = jaxspec.load_model(a.model)
  prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}],
                                               tokenize=True)
  rows = [("plain program", None)] + registry.methods(a.drafters.split(","), a.k, None)
  plans = {}
  for label, d in rows:
    plans[label] = session.prepare(model, [prompt], drafter=d, max_new_tokens=a.max_new_tokens,
                                   stop_tokens=(), speculate="auto" if d is not None else None)
  cells: dict[tuple[str, str], list[float]] = {}
  for p in range(a.passes):
    for label, d in rows:
      branches = [("plain", engine.MODE_PLAIN)] + ([("spec", engine.MODE_SPECULATE)] if d else [])
      for b, mode in branches:
        if d is None:  # the plain program has no switch: time its rounds as they are
          s, _ = _plain_program(model, plans[label], a.rounds)
        else:
          s, _ = policy.round_seconds(model, plans[label], mode, 2, a.rounds)
        cells.setdefault((label, b), []).append(s * 1e3)
      print(f"pass {p + 1}/{a.passes}: {label} done", file=sys.stderr, flush=True)
  base = statistics.median(cells[("plain program", "plain")])
  print(f"\nmodel {model.name}, prompt {len(prompt)} tokens, k={a.k}, {a.passes} interleaved "
        f"passes of {a.rounds} rounds, {time.perf_counter() - t0:.0f} s in all\n")
  print("| program | plain round ms | speculative round ms | spec / plain program |")
  print("|---|---|---|---|")
  for label, d in rows:
    pl = statistics.median(cells[(label, "plain")])
    sp = statistics.median(cells[(label, "spec")]) if d else float("nan")
    runs = ", ".join(f"{x:.0f}" for x in cells[(label, "plain")])
    sruns = ", ".join(f"{x:.0f}" for x in cells.get((label, "spec"), []))
    print(f"| {label} | {pl:.1f} ({runs}) | "
          + (f"{sp:.1f} ({sruns}) | {sp / base:.2f}x |" if d else "- | - |"))
  return 0


def _plain_program(model, plan, rounds):
  state, c0 = session.start(model, plan)
  state, c1 = session.run_rounds(model, plan, state, 2)
  before = int(session.fetch(state.stats.rounds))
  t0 = time.perf_counter()
  state, c = session.run_rounds(model, plan, state, rounds)
  done = int(session.fetch(state.stats.rounds)) - before
  return (time.perf_counter() - t0 - c) / done, c0 + c1 + c


if __name__ == "__main__":
  sys.exit(main())

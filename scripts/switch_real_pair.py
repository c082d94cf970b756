"""Qwen2.5-Coder 0.5B -> 1.5B, k=4: plain vs speculate="auto" vs "always", interleaved per
prompt, with the switch's running-tau weight (`engine.TAU_DECAY`) given on the command line
(docs/performance.md, "The switch's running tau").

  python -m jaxspec.fetch qwen2.5-coder-0.5b qwen2.5-coder-1.5b
  python scripts/switch_real_pair.py 0.2 --prompts 4 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os

import jaxspec
from jaxspec import drafters, engine, fetch

PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks",
                       "code_prompts.jsonl")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("decay", type=float)
  ap.add_argument("--prompts", type=int, default=4)
  ap.add_argument("--max-new-tokens", type=int, default=64)
  a = ap.parse_args()
  engine.TAU_DECAY = a.decay  # read when the program is traced: set before anything compiles
  target = jaxspec.load_model(fetch.path("qwen2.5-coder-1.5b"))
  draft = jaxspec.load_model(fetch.path("qwen2.5-coder-0.5b"))
  with open(PROMPTS) as f:
    questions = [json.loads(line)["turns"][0] for line in f if line.strip()][:a.prompts]
  prompts = [target.tokenizer.apply_chat_template([{"role": "user", "content": q}])
             for q in questions]
  d = drafters.DraftModel(draft, k=4)
  runs = {"plain": {}, "auto": {"drafter": d, "speculate": "auto"},
          "always": {"drafter": d, "speculate": "always"}}
  for kw in runs.values():  # compile and calibrate outside the timed runs
    jaxspec.generate(target, [prompts[0]], max_new_tokens=8, **kw)
  seconds, tokens = dict.fromkeys(runs, 0.0), dict.fromkeys(runs, 0)
  for i, p in enumerate(prompts):
    for name, kw in runs.items():
      s = jaxspec.generate(target, [p], max_new_tokens=a.max_new_tokens, **kw).stats
      seconds[name] += s.run_s
      tokens[name] += s.new_tokens
      print(f"prompt {i} {name}: {s.run_s:.2f} s, tau {s.mean_accepted:.2f}, "
            f"rounds {s.rounds_by_tokens}", flush=True)
  base = tokens["plain"] / seconds["plain"]
  for name in runs:
    rate = tokens[name] / seconds[name]
    print(f"{name}: {rate:.2f} tokens/s, {rate / base:.2f}x plain")


if __name__ == "__main__":
  main()

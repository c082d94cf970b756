"""Token trees under sampling: siblings drawn from the draft's distribution and verified against
it (`trees.Static(..., sampled=True)`, the default) against the top candidates verified as
one-hot drafts (`sampled=False`), for the same drafter, tree and prompts. Reports tau with every
round speculating (the drafter's own acceptance) and tokens/s with the default switch (median of
interleaved passes) at each temperature.

    python scripts/compare_tree_sampling.py --model stories260K --drafters early-exit:3,draft:stories260K
    python scripts/compare_tree_sampling.py --model smollm2-135m --chat --drafters early-exit:22 --limit 1
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys

import jaxspec
from jaxspec import prompts as prompts_lib
from jaxspec import trees
from jaxspec.drafters import registry
from jaxspec.train import data


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", default="stories260K")
  ap.add_argument("--drafters", default="early-exit:3")
  ap.add_argument("--branching", default="3,2,1", help="the Static tree, e.g. 3,2,1")
  ap.add_argument("--temperatures", default="1.0,0.7")
  ap.add_argument("--chat", action="store_true", help="Spec-Bench prompts in the chat template")
  ap.add_argument("--limit", type=int, default=1, help="Spec-Bench prompts per task (--chat)")
  ap.add_argument("--max-new-tokens", type=int, default=64)
  ap.add_argument("--passes", type=int, default=3)
  ap.add_argument("--seed", type=int, default=0)
  a = ap.parse_args(argv)

  model = jaxspec.load_model(a.model)
  if a.chat:
    rows = prompts_lib.for_bench(None, a.limit, None)
    prompts = [model.tokenizer.apply_chat_template([{"role": "user", "content": r["text"]}],
                                                   tokenize=True) for r in rows]
  else:
    prompts = data.story_prompts()[::40][:8]
  branching = tuple(int(x) for x in a.branching.split(","))
  parents = trees.Static.from_branching(branching).parents
  methods = []
  for spec in a.drafters.split(","):
    d = registry.parse(spec)
    for sampled in (True, False):
      label = f"{spec} {'q-sampled' if sampled else 'top'}"
      methods.append((label, dataclasses.replace(d, tree=trees.Static(parents, sampled=sampled))))
  results = []
  for temp in (float(t) for t in a.temperatures.split(",")):
    gen = lambda d, **kw: jaxspec.generate(model, prompts, drafter=d, stop_tokens=(),
                                           max_new_tokens=a.max_new_tokens, temperature=temp,
                                           seed=a.seed, **kw)
    tau = {label: gen(d, speculate="always").stats.mean_accepted for label, d in methods}
    secs: dict[str, list[float]] = {}
    for p in range(a.passes):
      for label, d in [("plain", None)] + methods:
        secs.setdefault(label, []).append(gen(d).stats.run_s)
      print(f"T={temp}: pass {p + 1}/{a.passes}", file=sys.stderr, flush=True)
    base = statistics.median(secs["plain"])
    for label, _ in methods:
      results.append((temp, label, tau[label], base / statistics.median(secs[label])))

  print(f"\nmodel {model.name}; {len(prompts)} prompts x {a.max_new_tokens} tokens; tree "
        f"Static.from_branching({branching}); tau with every round speculating; speed vs plain "
        f"with the default switch, median of {a.passes} interleaved passes\n")
  print("| temperature | drafter | siblings | tau | vs plain |")
  print("|---|---|---|---|---|")
  for temp, label, t, sp in results:
    spec, how = label.rsplit(" ", 1)
    print(f"| {temp:g} | {spec} | {how} | {t:.2f} | {sp:.2f}x |")
  return 0


if __name__ == "__main__":
  sys.exit(main())

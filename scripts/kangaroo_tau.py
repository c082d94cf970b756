"""Kangaroo against the training-free drafters of the same draft cost (docs/drafters.md,
"Kangaroo"): held-out tau, every round speculating, greedy, each output checked equal to plain.

A Kangaroo draft step runs the target's first E layers and one adapter layer: E + 1 layers, as
EarlyExit(E + 1) and a LayerSkip set of E + 1 layers (searched) do.

  python scripts/kangaroo_tau.py --adapter runs/adapter          # trained on stories260K
  python scripts/kangaroo_tau.py --model smollm2-135m --adapter runs/smollm_adapter --chat \
      --prompts 12 --max-new-tokens 64
"""

from __future__ import annotations

import argparse

import jaxspec
from jaxspec import drafters, fetch, prompts
from jaxspec.drafters import kangaroo

STORIES = ["Once upon a time", "The little bird", "One day, Lily", "Tom had a red ball",
           "There was a big tree", "Sam and Mia went to the park", "The cat", "A little girl"]


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="stories260K", help="stories260K or a checkpoint name")
  ap.add_argument("--adapter", required=True, help="a train-drafter --kind adapter run")
  ap.add_argument("--k", default="1,4", help="comma-separated draft lengths")
  ap.add_argument("--prompts", type=int, default=8, help="Spec-Bench prompts (2 per task "
                  "when 12 or more)")
  ap.add_argument("--max-new-tokens", type=int, default=64)
  ap.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
  a = ap.parse_args()
  src = a.model if a.model == "stories260K" else fetch.path(a.model)
  model = jaxspec.load_model(src)
  head = kangaroo.AdapterHead.load(a.adapter)
  e = head.config.exit_layer
  qs = prompts.spec_bench()
  qs = (prompts.by_task(qs, a.prompts // 6) if a.prompts >= 12 else qs[:a.prompts])
  sets = {"Spec-Bench": [q["text"] for q in qs]}
  if a.model == "stories260K":
    sets["stories"] = STORIES
  if a.chat:  # as `jaxspec bench --chat` renders them
    sets = {name: [model.tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                       tokenize=True) for p in ps]
            for name, ps in sets.items()}
  kw = dict(max_new_tokens=a.max_new_tokens, stop_tokens=())
  plain = {name: jaxspec.generate(model, ps, **kw).tokens for name, ps in sets.items()}
  print(f"{model.name}: adapter after {e} of {model.config.n_layers} layers; every drafter "
        f"below runs {e + 1} layers per draft step")
  for k in (int(x) for x in a.k.split(",")):
    for label, d in [(f"EarlyExit({e + 1})", drafters.EarlyExit(e + 1, k=k)),
                     (f"LayerSkip(searched, {e + 1})",
                      drafters.LayerSkip(k=k, keep=(e + 0.5) / model.config.n_layers)),
                     (f"Kangaroo(exit {e})", drafters.Kangaroo(head, k=k)),
                     (f"Kangaroo(exit {e}, stop_below=0.6)",
                      drafters.Kangaroo(head, k=k, stop_below=0.6) if k > 1 else None)]:
      if d is None:
        continue
      taus = []
      for name, ps in sets.items():
        out = jaxspec.generate(model, ps, drafter=d, speculate="always", **kw)
        assert out.tokens == plain[name], f"{label} k={k}: output differs from plain on {name}"
        taus.append(f"{out.stats.mean_accepted:.2f}")
      print(f"k={k} {label}: tau {' / '.join(taus)} ({' / '.join(sets)}), output == plain")


if __name__ == "__main__":
  main()

"""Acceptance of a draft with another tokenizer (DraftModel across vocabularies), every round
speculating, greedy, checked equal to plain decoding (docs/benchmarks.md, "Cross-vocabulary
drafting").

  python -m jaxspec.fetch all
  python scripts/cross_vocab_tau.py --target qwen2.5-coder-0.5b --draft smollm2-135m --k 1,4
  python scripts/cross_vocab_tau.py --target gemma3-270m --draft smollm2-135m --prompts 2 \
      --max-new-tokens 32
"""

from __future__ import annotations

import argparse

import jaxspec
from jaxspec import drafters, fetch
from jaxspec.drafters import translate

PROMPTS = ["def quicksort(arr):\n", "# Python: read a CSV file and print the first row\n",
           "The capital of France is"]


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--target", required=True, help="checkpoint name (python -m jaxspec.fetch)")
  ap.add_argument("--draft", required=True)
  ap.add_argument("--k", default="4", help="comma-separated draft lengths")
  ap.add_argument("--prompts", type=int, default=len(PROMPTS))
  ap.add_argument("--max-new-tokens", type=int, default=48)
  a = ap.parse_args()
  target = jaxspec.load_model(fetch.path(a.target))
  draft = jaxspec.load_model(fetch.path(a.draft))
  tables = translate.build(target.tokenizer, draft.tokenizer, target.config.vocab_size,
                           draft.config.vocab_size)
  print(f"intersection: {len(tables.pair_draft)} tokens; draft tokens per target token "
        f"{tables.expansion:.3f}")
  prompts = [target.tokenizer.encode(p) for p in PROMPTS[:a.prompts]]
  kw = dict(max_new_tokens=a.max_new_tokens, stop_tokens=())
  plain = jaxspec.generate(target, prompts, **kw)
  for k in (int(x) for x in a.k.split(",")):
    out = jaxspec.generate(target, prompts, drafter=drafters.DraftModel(draft, k=k),
                           speculate="always", **kw)
    same = "yes" if out.tokens == plain.tokens else "NO"
    print(f"k={k}: tau {out.stats.mean_accepted:.2f}, output == plain: {same}")


if __name__ == "__main__":
  main()

"""Lookahead decoding's own acceptance next to NGram's: tau with every round speculating, on
story openings (TinyStories models) or the first Spec-Bench prompt of each task in the chat
template (other models), 96 greedy tokens.

    python scripts/compare_lookahead.py stories260K
    python scripts/compare_lookahead.py smollm2-135m
"""
import sys, jaxspec
from jaxspec import drafters, prompts as P
from jaxspec.train import data
name = sys.argv[1]
m = jaxspec.load_model(name, progress=False)
if name.startswith("stories"):
  ps = data.story_prompts()[::40][:8]
else:
  rows = P.for_bench(None, 1, None)
  ps = [m.tokenizer.apply_chat_template([{"role": "user", "content": r["text"]}], tokenize=True) for r in rows]
for label, d in [("ngram k=4", drafters.NGram(k=4)), ("lookahead W5 N3 k2", drafters.Lookahead()),
                 ("lookahead W7 N4 k4", drafters.Lookahead(window=7, ngram=4, k=4)),
                 ("lookahead W10 N5 k8", drafters.Lookahead(window=10, ngram=5, k=8))]:
  o = jaxspec.generate(m, ps, drafter=d, max_new_tokens=96, stop_tokens=(), speculate="always")
  print(f"| {label} | {o.stats.mean_accepted:.2f} |", flush=True)

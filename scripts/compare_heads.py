"""Trained drafter heads side by side under one training budget: EAGLE-1, EAGLE-3, Medusa and
Hydra, each with the full vocabulary and with a reduced draft vocabulary, trained with the
same data, steps and settings, then measured on the trainer's held-out prompts: tau of a k=4 chain and of
a dynamic tree, and tokens/s against plain decoding (interleaved passes, median).

    python scripts/compare_heads.py --model stories260K --steps 500 --draft-vocab 128 --out runs/heads
    python scripts/compare_heads.py --model smollm2-135m --steps 150 --vocabs 8192 \
        --num-prompts 256 --samples-per-prompt 1 --out runs/heads_smollm

`--vocabs` lists the draft vocabularies to train (`full` and/or sizes; default: full and
`--draft-vocab`). A run directory that already holds a trained head is measured, not retrained.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time

import jaxspec
from jaxspec import drafters, trees
from jaxspec.train import data

HEADS = {"eagle": (drafters.Eagle, drafters.EagleHead), "eagle3": (drafters.Eagle,
         drafters.EagleHead), "medusa": (drafters.Medusa,
         drafters.MedusaHeads), "hydra": (drafters.Hydra, drafters.HydraHeads)}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", default="stories260K")
  ap.add_argument("--kinds", default="eagle,eagle3,medusa,hydra")
  ap.add_argument("--steps", type=int, default=500)
  ap.add_argument("--draft-vocab", type=int, default=128)
  ap.add_argument("--vocabs", default=None,
                  help="comma list of 'full' and sizes (default: full,<--draft-vocab>)")
  ap.add_argument("--batch-size", type=int, default=16)
  ap.add_argument("--num-prompts", type=int, default=512)
  ap.add_argument("--samples-per-prompt", type=int, default=2)
  ap.add_argument("--out", default="runs/heads")
  ap.add_argument("--max-new-tokens", type=int, default=64)
  ap.add_argument("--passes", type=int, default=3)
  a = ap.parse_args(argv)

  model = jaxspec.load_model(a.model)
  vocabs = (None, a.draft_vocab) if a.vocabs is None else tuple(
      None if v.strip() == "full" else int(v) for v in a.vocabs.split(","))
  settings = dict(steps=a.steps, batch_size=a.batch_size, num_prompts=a.num_prompts,
                  samples_per_prompt=a.samples_per_prompt, eval_every=0)  # measured below
  runs, first = [], {}  # first: the data of the first run of each family, generated once
  for kind in a.kinds.split(","):
    for dv in vocabs:
      out = os.path.join(a.out, kind + ("" if dv is None else f"_v{dv}"))
      family = "eagle3" if kind == "eagle3" else "last layer"  # EAGLE-3's holds more layers
      if family in first and not os.path.exists(os.path.join(out, "data")):
        shutil.copytree(first[family], os.path.join(out, "data"))
      first.setdefault(family, os.path.join(out, "data"))
      stamp = os.path.join(out, "train_seconds.txt")
      if not os.path.exists(stamp):  # trained before: keep its wall-clock
        t0 = time.perf_counter()
        jaxspec.train.train_drafter(model, kind=kind, out_dir=out, draft_vocab=dv, **settings)
        with open(stamp, "w") as f:
          f.write(f"{time.perf_counter() - t0:.1f}")
      with open(stamp) as f:
        runs.append((kind, dv, out, float(f.read())))

  _, held = data.split_prompts(data.encode_prompts(model, None, 32), seed=0, n_train=512,
                               n_eval=8)
  tree = trees.Dynamic(nodes=24, topk=4, depth=4)
  gen = lambda d, **kw: jaxspec.generate(model, held, drafter=d, max_new_tokens=a.max_new_tokens,
                                         stop_tokens=(), **kw)
  methods = [("plain", None)]
  for kind, dv, out, _ in runs:
    cls, head_cls = HEADS[kind]
    head = head_cls.load(out)
    label = kind + ("" if dv is None else f" @{dv}")
    methods += [(f"{label} k=4", cls(head, k=4)), (f"{label} tree=24", cls(head, tree=tree))]
  tau, secs = {}, {}
  for label, d in methods:  # tau of the drafter itself: every round speculates
    tau[label] = gen(d, speculate="always").stats.mean_accepted
  plain_tokens = gen(None).tokens
  for p in range(a.passes):
    for label, d in methods:
      out = gen(d)
      assert out.tokens == plain_tokens, label
      secs.setdefault(label, []).append(out.stats.run_s)
    print(f"pass {p + 1}/{a.passes}", file=sys.stderr, flush=True)
  base = statistics.median(secs["plain"])
  print(f"\nmodel {model.name}; {a.steps} steps each; held-out: {len(held)} prompts x "
        f"{a.max_new_tokens} greedy tokens; tree = Dynamic(24, 4, 4); tau with every round "
        f"speculating; speedup with the default switch, median of {a.passes} interleaved "
        f"passes; train s includes generating the data for the first run; outputs equal "
        f"plain: yes\n")
  print("| head | draft vocabulary | train s | tau k=4 | tau tree | k=4 vs plain | tree vs plain |")
  print("|---|---|---|---|---|---|---|")
  for kind, dv, _, t in runs:
    label = kind + ("" if dv is None else f" @{dv}")
    c, tr = f"{label} k=4", f"{label} tree=24"
    print(f"| {kind} | {dv or 'full'} | {t:.0f} | {tau[c]:.2f} | {tau[tr]:.2f} | "
          f"{base / statistics.median(secs[c]):.2f}x | {base / statistics.median(secs[tr]):.2f}x |")
  return 0


if __name__ == "__main__":
  sys.exit(main())

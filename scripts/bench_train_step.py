"""What a reduced draft vocabulary saves a training step: loss + gradient of the EAGLE and
Medusa objectives with the full head and with N-token draft vocabularies, on a real target's
head (random features and tokens of the training batch's shape; the cost does not depend on
their values). Interleaved passes, median ms per step.

    python scripts/bench_train_step.py --model smollm2-135m --draft-vocab 8192,32768
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxspec
from jaxspec.drafters import vocab
from jaxspec.train import objectives


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", default="smollm2-135m")
  ap.add_argument("--kinds", default="eagle,medusa")
  ap.add_argument("--draft-vocab", default="8192,32768")
  ap.add_argument("--batch-size", type=int, default=16)
  ap.add_argument("--seq-len", type=int, default=128)
  ap.add_argument("--passes", type=int, default=3)
  ap.add_argument("--steps", type=int, default=3)
  a = ap.parse_args(argv)

  model = jaxspec.load_model(a.model, layers="stacked")
  c = model.config
  rng = np.random.default_rng(0)
  b, t = a.batch_size, a.seq_len
  tokens = jnp.asarray(rng.integers(0, c.vocab_size, (b, t)), jnp.int32)
  lens = jnp.full((b,), t, jnp.int32)
  feats = jnp.asarray(rng.standard_normal((b, t, c.dim), dtype=np.float32))
  key = jax.random.key(0)
  sizes = [None] + [int(n) for n in a.draft_vocab.split(",") if n]
  eos = model.tokenizer.eos_ids if model.tokenizer is not None else ()

  cells = {}
  fns = {}
  for kind in a.kinds.split(","):
    for n in sizes:
      ids = None if n is None else vocab.leading(n, c.vocab_size, eos)
      obj = objectives.make(kind, model, k=4, ids=ids)
      params = obj.init(model, 0)
      fn = jax.jit(jax.value_and_grad(obj.loss, has_aux=True))
      jax.block_until_ready(fn(params, model.params, tokens, lens, feats, key))  # compile
      fns[(kind, n)] = (fn, params)
  for p in range(a.passes):
    for (kind, n), (fn, params) in fns.items():
      t0 = time.perf_counter()
      for _ in range(a.steps):
        jax.block_until_ready(fn(params, model.params, tokens, lens, feats, key))
      cells.setdefault((kind, n), []).append((time.perf_counter() - t0) / a.steps * 1e3)
    print(f"pass {p + 1}/{a.passes}", file=sys.stderr, flush=True)

  print(f"\nmodel {model.name} (V = {c.vocab_size}), batch {b} x {t} tokens, loss + gradient, "
        f"median of {a.passes} interleaved passes of {a.steps} steps\n")
  print("| kind | draft vocabulary | ms per step | vs full |")
  print("|---|---|---|---|")
  for (kind, n), runs in cells.items():
    ms = statistics.median(runs)
    full = statistics.median(cells[(kind, None)])
    print(f"| {kind} | {n or 'full'} | {ms:.0f} ({', '.join(f'{x:.0f}' for x in runs)}) | "
          f"{full / ms:.2f}x |")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Sliding-window layers with and without ring buffers (models.cache) on a real checkpoint.

For each context length, the KV cache bytes and the wall-clock of one decode step (T=1) and one
verify pass (T=5) with the whole buffer in every layer vs rings of window + footprint - 1 slots
in the local layers, interleaved (ring, full, ring, full ...) and reported as medians.

  python -m jaxspec.fetch gemma3-270m
  python scripts/window_cache.py --model gemma3-270m --contexts 1024,4096,16384
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxspec
from jaxspec import fetch
from jaxspec.models import KVCache, forward


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="gemma3-270m", help="a fetch name or a checkpoint path")
  ap.add_argument("--contexts", default="1024,4096,16384")
  ap.add_argument("--footprint", type=int, default=5, help="verify tokens (k + 1)")
  ap.add_argument("--reps", type=int, default=10)
  a = ap.parse_args(argv)
  model = jaxspec.load_model(fetch.path(a.model) or a.model, progress=False)
  c, params = model.config, model.params
  if not c.windowed:
    raise SystemExit(f"{a.model} has no sliding-window layers")
  fwd = jax.jit(forward, static_argnums=(1,), donate_argnums=(3,))
  print(f"{a.model}: window {c.sliding_window}, {sum(c.layer_is_local)} of {c.n_layers} layers "
        f"local, footprint {a.footprint}")
  print("| context | KV MB full | KV MB ring | T=1 ring / full | T=5 ring / full |")
  print("|---|---|---|---|---|")
  for ctx in (int(x) for x in a.contexts.split(",")):
    size = ctx + 128
    times = {}
    for t in (1, a.footprint):
      toks = jnp.ones((1, t), jnp.int32)
      caches = {name: KVCache.like(params, c, 1, size, footprint=foot).rewind(
          jnp.array([ctx], jnp.int32)) for name, foot in (("ring", a.footprint), ("full", None))}
      mib = {name: sum(buf.nbytes for buf in jax.tree.leaves((cache.k, cache.v))) / 2**20
             for name, cache in caches.items()}
      for name in caches:  # compile and warm
        caches[name] = fwd(params, c, toks, caches[name]).cache.rewind(jnp.array([ctx]))
      ts = {"ring": [], "full": []}
      for _ in range(a.reps):
        for name in ("ring", "full"):
          t0 = time.perf_counter()
          out = fwd(params, c, toks, caches[name])
          out.logits.block_until_ready()
          ts[name].append(time.perf_counter() - t0)
          caches[name] = out.cache.rewind(jnp.array([ctx]))
      times[t] = float(np.median(ts["ring"]) / np.median(ts["full"]))
    print(f"| {ctx} | {mib['full']:.0f} | {mib['ring']:.0f} | {times[1]:.2f} | "
          f"{times[a.footprint]:.2f} |")


if __name__ == "__main__":
  main()

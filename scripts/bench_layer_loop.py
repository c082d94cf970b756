"""How the layer loop reads stacked weights on this backend: a chain of L SwiGLU MLPs over
stacked [L, D, F] weights, looped four ways, timed at T = 1 and 5 rows.

    python scripts/bench_layer_loop.py                  # SmolLM2, Qwen2.5 0.5B, 1.5B shapes
    python scripts/bench_layer_loop.py --shape 28,1536,8960

`models.llama.forward` scans over stacked weights (`w[i]` with a traced layer id). On XLA:CPU
each `w[i]` is materialized (a dynamic-slice fusion copies the layer's matrix out of the
stack) before the dot reads it, so a layer's weights cross memory three times; separate
per-layer arrays are read once. docs/performance.md quotes a run.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

SHAPES = {"smollm2-135m": (30, 576, 1536), "qwen2.5-0.5b": (24, 896, 4864),
          "qwen2.5-1.5b": (28, 1536, 8960)}


def mlp(x, g, u, d):
  return x + (jax.nn.silu(x @ g) * (x @ u)) @ d


def loops(n_layers: int):
  def scan_index(x, wg, wu, wd):
    return jax.lax.scan(lambda x, i: (mlp(x, wg[i], wu[i], wd[i]), None), x,
                        jnp.arange(n_layers))[0]

  def scan_xs(x, wg, wu, wd):
    return jax.lax.scan(lambda x, w: (mlp(x, *w), None), x, (wg, wu, wd))[0]

  def unrolled_static(x, wg, wu, wd):
    for i in range(n_layers):
      x = mlp(x, wg[i], wu[i], wd[i])
    return x

  def per_layer_arrays(x, wg, wu, wd):  # wg, wu, wd: lists of L arrays
    for i in range(n_layers):
      x = mlp(x, wg[i], wu[i], wd[i])
    return x

  return {"scan, w[i] (models/ today)": (scan_index, False), "scan over w as xs": (scan_xs, False),
          "unrolled, static w[i]": (unrolled_static, False),
          "unrolled, per-layer arrays": (per_layer_arrays, True)}


def best_of(f, args, repeats: int) -> float:
  jax.block_until_ready(f(*args))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    best = min(best, time.perf_counter() - t0)
  return best


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shape", action="append", help="L,D,F (default: the three named shapes)")
  p.add_argument("--rows", default="1,5")
  p.add_argument("--repeats", type=int, default=5)
  a = p.parse_args()
  shapes = ({s: tuple(int(v) for v in s.split(",")) for s in a.shape} if a.shape else SHAPES)
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}")
  print("| shape (L, D, F) | loop | T | ms | GB/s of weights |\n|---|---|---|---|---|")
  for name, (n, d, f) in shapes.items():
    keys = jax.random.split(jax.random.key(0), 3)
    stacked = (jax.random.normal(keys[0], (n, d, f)) * 0.01,
               jax.random.normal(keys[1], (n, d, f)) * 0.01,
               jax.random.normal(keys[2], (n, f, d)) * 0.01)
    split = tuple([w[i] for i in range(n)] for w in stacked)
    nbytes = 3 * n * d * f * 4
    for t in (int(v) for v in a.rows.split(",")):
      x = jnp.ones((t, d), jnp.float32)
      for label, (fn, per_layer) in loops(n).items():
        s = best_of(jax.jit(fn), (x, *(split if per_layer else stacked)), a.repeats)
        print(f"| {name} ({n}, {d}, {f}) | {label} | {t} | {s * 1e3:.1f} | {nbytes / s / 1e9:.1f} |",
              flush=True)
    del stacked, split


if __name__ == "__main__":
  main()

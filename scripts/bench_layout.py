"""Decode-step and verify-pass cost of real checkpoints under each weight layout and with or
without jaxspec's XLA flags (`jaxspec.models.layout`, `jaxspec.xla_flags`).

    python scripts/bench_layout.py                       # the fetched Qwen2.5-Coder pair + SmolLM2
    python scripts/bench_layout.py --models smollm2-135m --rounds 2

XLA reads its flags once per process, so each (model, flags, layout) cell runs in a fresh
subprocess, and the cells of one model run back to back, round after round, so load on the
machine hits them alike. Each cell times `adaptive.forward_seconds_many` (T forwards in one
compiled loop, batch 1, 160 live of 256 slots, best of its repeats) and prints ms per forward.
docs/performance.md quotes a run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CELL = r"""
import json, os, sys, time
name, layers = sys.argv[1:3]
import jaxspec
from jaxspec import adaptive, fetch, xla_flags
t0 = time.perf_counter()
m = jaxspec.load_model(fetch.path(name), progress=False, layers=layers)
load = time.perf_counter() - t0
ts = [int(t) for t in sys.argv[3].split(",")]
r = adaptive.forward_seconds_many(m.params, m.config, 1, ts, 256, fill=160)
print(json.dumps({"ms": {t: 1000 * s for t, s in r.items()}, "load_s": load,
                  "flags": xla_flags.applied()}))
"""


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", default="qwen2.5-coder-0.5b,qwen2.5-coder-1.5b,smollm2-135m")
  ap.add_argument("--ts", default="1,5", help="tokens per forward to time")
  ap.add_argument("--rounds", type=int, default=1)
  a = ap.parse_args(argv)
  cells = [("0", "stacked"), ("1", "stacked"), ("1", "per_layer"), ("0", "per_layer")]
  print("| model | XLA flags | layers | " + " | ".join(f"T={t} ms" for t in a.ts.split(","))
        + " |")
  print("|---|---|---|" + "---|" * len(a.ts.split(",")))
  for name in a.models.split(","):
    for _ in range(a.rounds):
      for flag, layers in cells:
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env["JAXSPEC_XLA_FLAGS"] = flag
        out = subprocess.run([sys.executable, "-c", CELL, name, layers, a.ts], env=env,
                             capture_output=True, text=True)
        if out.returncode:
          sys.exit(f"{name} {layers}: {out.stderr.strip().splitlines()[-1]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        ms = " | ".join(f"{v:.1f}" for v in r["ms"].values())
        print(f"| {name} | {'on' if r['flags'] else 'off'} | {layers} | {ms} |", flush=True)


if __name__ == "__main__":
  main()

"""Simulates the speculation switch (jaxspec.engine) to choose its running-tau weight.

Each round the switch speculates iff the running tau beats ratio * (1 + margin) or a probe is
due (jaxspec.policy documents the rule). Here rounds are drawn from a model of a drafter instead
of run: a chain of k drafts where each is accepted with probability alpha (i.i.d.), or a bursty
drafter that alternates between a good and a bad phase (NGram on text that copies, then does not).
Speedup = tokens / cost, with a plain round costing 1 and a speculative round `ratio`.

  python scripts/switch_sim.py            # the table in docs/performance.md
  python scripts/switch_sim.py --tokens 64
  python scripts/switch_sim.py --decays 0.2 --probe-rules ema,max   # a candidate probe rule

Probe rules: "ema" (the engine's) folds a probe round into the running tau like any other
round; "max" (a candidate, not adopted) lets a probe round that beats the running tau replace
it, so one good probe is enough to resume speculating.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from jaxspec import engine, policy


def gaps(ratio: float) -> tuple[int, int]:
  """engine.probe_gaps in plain Python."""
  lo = int(min(max(math.ceil((ratio - 1.0) / engine.PROBE_BUDGET), engine.PROBE_GAP),
               engine.MAX_PROBE_GAP))
  return lo, max(engine.MAX_PROBE_GAP, 4 * lo)


def speedup(rng, *, ratio: float, decay: float | None, tokens: int, k: int = 4,
            alpha: float = 0.8, burst: float | None = None, trials: int = 300,
            rule: str = "ema") -> float:
  """Mean speedup over plain decoding; decay None = always speculate. burst: the chance per
  round of switching between a good (alpha 0.95) and a bad (alpha 0.05) phase."""
  bar, (lo, hi) = ratio * (1 + policy.MARGIN), gaps(ratio)
  out = []
  for _ in range(trials):
    tau, streak, gap, made, cost = min(k + 1.0, 2 * bar), 0, lo, 0, 0.0
    good = rng.random() < 0.5
    while made < tokens:
      if burst is not None:
        good = good ^ (rng.random() < burst)
      a_p = alpha if burst is None else (0.95 if good else 0.05)
      if decay is None or tau > bar or streak >= gap:
        accepted = 0
        while accepted < k and rng.random() < a_p:
          accepted += 1
        made, cost = made + accepted + 1, cost + ratio
        if decay is not None:
          probe = streak >= gap
          tau = (1 - decay) * tau + decay * (accepted + 1)
          if probe and rule == "max":
            tau = max(tau, accepted + 1.0)
          gap = lo if tau > bar else (min(2 * gap, hi) if probe else gap)
        streak = 0
      else:
        made, cost, streak = made + 1, cost + 1.0, streak + 1
    out.append(tokens / cost)
  return float(np.mean(out))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tokens", type=int, default=256)
  ap.add_argument("--decays", default="0.5,0.2,0.1")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--probe-rules", default="ema", help="comma-separated: ema (the engine's), max")
  a = ap.parse_args()
  decays = [float(x) for x in a.decays.split(",")]
  rules = a.probe_rules.split(",")
  cols = [(d, r) for r in rules for d in decays]
  cases = [("alpha 0.8", 2.6, {"alpha": 0.8}), ("alpha 0.6", 2.6, {"alpha": 0.6}),
           ("alpha 0.5", 1.4, {"alpha": 0.5}), ("alpha 0.1", 1.4, {"alpha": 0.1}),
           ("alpha 0.2", 4.0, {"alpha": 0.2}), ("bursty 3%", 1.4, {"burst": 0.03}),
           ("bursty 3%", 2.6, {"burst": 0.03}), ("bursty 10%", 2.6, {"burst": 0.1})]
  print(f"{a.tokens} tokens, k=4; cells: speedup over plain")
  name = lambda d, r: f"decay {d}" + ("" if rules == ["ema"] else f" {r}")
  print("| drafter | ratio | always | " + " | ".join(name(d, r) for d, r in cols) + " |")
  print("|---|---|---|" + "---|" * len(cols))
  for label, ratio, kw in cases:
    rng = np.random.default_rng(a.seed)
    row = [speedup(rng, ratio=ratio, decay=None, tokens=a.tokens, **kw)]
    row += [speedup(rng, ratio=ratio, decay=d, tokens=a.tokens, rule=r, **kw) for d, r in cols]
    print(f"| {label} | {ratio} | " + " | ".join(f"{x:.2f}x" for x in row) + " |")


if __name__ == "__main__":
  main()

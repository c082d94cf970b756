"""Drafter training (optax) by self-distillation from the target's own generations.

    head = jaxspec.train.train_drafter(model, kind="eagle", out_dir="runs/eagle", steps=500)
    out = jaxspec.generate(model, prompts, drafter=jaxspec.drafters.Eagle(head, k=4))

Kinds: "eagle" (an EAGLE-style feature drafter), "medusa" (Medusa heads), "distill" (a small
draft model distilled from the target, for `drafters.DraftModel`). See `trainer.train_drafter`.
"""

from __future__ import annotations


def train_drafter(model, *, kind: str = "eagle", out_dir, steps: int, data=None, **kw):
  """Trains a drafter for `model`; see `jaxspec.train.trainer.train_drafter` for every option.

  Returns the trained head (`drafters.EagleHead`, `drafters.MedusaHeads`) or, for
  kind="distill", a `jaxspec.Model`; it is also saved to `out_dir/drafter`.
  """
  from .trainer import train_drafter as _train
  return _train(model, kind=kind, out_dir=out_dir, steps=steps, data=data, **kw)


__all__ = ["train_drafter"]

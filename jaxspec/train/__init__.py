"""Drafter training (optax) by self-distillation from the target's own generations.

    head = jaxspec.train.train_drafter(model, kind="eagle", out_dir="runs/eagle", steps=500)
    out = jaxspec.generate(model, prompts, drafter=jaxspec.drafters.Eagle(head, k=4))

Kinds: "eagle" (an EAGLE-style feature drafter, returns `drafters.EagleHead`), "medusa"
(Medusa heads, returns `drafters.MedusaHeads`), "hydra" (Medusa heads that also read the token
drafted before their own, returns `drafters.HydraHeads`), "adapter" (a Kangaroo adapter after
the target's first layers, returns `drafters.AdapterHead` for `drafters.Kangaroo`), "distill" (a small draft model distilled from
the target, returns a `jaxspec.Model` for `drafters.DraftModel`). Everything a run needs and
makes lives in `out_dir`: the generated data (data/), Orbax training checkpoints (state/), the
settings and the loss/tau history, and the trained drafter (drafter/).
"""

from .trainer import train_drafter

__all__ = ["train_drafter"]

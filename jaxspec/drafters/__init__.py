"""Drafters: every one proposes a chain of k tokens or a token tree per round, inside the
compiled loop, behind one protocol (`base.Drafter` / `base.DrafterSpec`). Each family lives in
its own module and registers its command-line name in `registry`."""

from . import registry
from .base import Accepted, Drafter, DrafterSpec, NoDraft, Prefill, Proposal, Round
from .head import Head

# Import order is registration order (the default `jaxspec bench` rows follow it).
from .ngram import NGram  # noqa: E402  (isort: keep)
from .recycling import Recycling  # noqa: E402
from .early_exit import EarlyExit  # noqa: E402
from .draft_model import DraftModel  # noqa: E402
from .oracle import Oracle  # noqa: E402
from .eagle import Eagle, EagleConfig, EagleHead  # noqa: E402
from .medusa import Medusa, MedusaConfig, MedusaHeads  # noqa: E402
from .layer_skip import LayerSkip  # noqa: E402
from .hydra import Hydra, HydraConfig, HydraHeads  # noqa: E402
from .lookahead import Lookahead  # noqa: E402
from .kangaroo import AdapterConfig, AdapterHead, Kangaroo  # noqa: E402

__all__ = ["Accepted", "AdapterConfig", "AdapterHead", "DraftModel", "Drafter", "DrafterSpec", "Eagle", "EagleConfig",
           "EagleHead", "EarlyExit", "Head", "Hydra", "HydraConfig", "HydraHeads", "Kangaroo", "LayerSkip",
           "Lookahead", "Medusa", "MedusaConfig", "MedusaHeads", "NGram", "NoDraft", "Oracle",
           "Prefill", "Proposal", "Recycling", "Round", "registry"]

"""Drafters: every one proposes k tokens per round inside the compiled loop."""

from .base import DrafterSpec, NoDraft, Round
from .draft_model import DraftModel
from .early_exit import EarlyExit
from .ngram import NGram
from .oracle import Oracle
from .recycling import Recycling

__all__ = ["DraftModel", "DrafterSpec", "EarlyExit", "NGram", "NoDraft", "Oracle", "Recycling",
           "Round"]

from .eagle import Eagle, EagleConfig, EagleHead  # noqa: E402
from .medusa import Medusa, MedusaConfig, MedusaHeads  # noqa: E402

__all__ += ["Eagle", "EagleConfig", "EagleHead", "Medusa", "MedusaConfig", "MedusaHeads"]

"""Episodes: descriptions from pure functions with an explicit RNG, materialised from the packed cache."""

from fewshot.episodes.types import Episode

__all__ = ["Episode"]

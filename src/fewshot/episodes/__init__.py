"""Episodes: descriptions from pure functions with an explicit RNG, materialised from the packed cache."""

from fewshot.episodes.loader import EpisodeDataset, episode_loader
from fewshot.episodes.materialise import Augment, materialise, pool_from_split
from fewshot.episodes.sampling import (
    EpisodeSpec,
    VariableSpec,
    describe_episode,
    describe_variable_episode,
    episode_rng,
)
from fewshot.episodes.types import Episode

# What callers import from the package; the rest (ClassPool, EpisodeDescription, RangeSampler) is
# imported from its module (fewshot.episodes.sampling, fewshot.episodes.loader).
__all__ = [
    "Augment",
    "Episode",
    "EpisodeDataset",
    "EpisodeSpec",
    "VariableSpec",
    "describe_episode",
    "describe_variable_episode",
    "episode_loader",
    "episode_rng",
    "materialise",
    "pool_from_split",
]

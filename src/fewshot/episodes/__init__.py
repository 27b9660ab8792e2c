"""Episodes: descriptions from pure functions with an explicit RNG, materialised from the packed cache."""

from fewshot.episodes.loader import EpisodeDataset, RangeSampler, episode_loader
from fewshot.episodes.materialise import Augment, materialise, pool_from_split
from fewshot.episodes.sampling import (
    ClassPool,
    EpisodeDescription,
    EpisodeSpec,
    VariableSpec,
    describe_episode,
    describe_variable_episode,
    episode_rng,
)
from fewshot.episodes.types import Episode

__all__ = [
    "Augment",
    "ClassPool",
    "Episode",
    "EpisodeDataset",
    "EpisodeDescription",
    "EpisodeSpec",
    "RangeSampler",
    "VariableSpec",
    "describe_episode",
    "describe_variable_episode",
    "episode_loader",
    "episode_rng",
    "materialise",
    "pool_from_split",
]

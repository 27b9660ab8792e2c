"""Errors that name the bad value and say how to fix it."""

from __future__ import annotations


class FewshotError(Exception):
    """Base class for every error this package raises on purpose."""


class DataError(FewshotError):
    """A dataset is missing, partial, in the wrong layout or corrupt."""


class CacheError(FewshotError):
    """A packed cache is missing, stale, partial or from another version."""


class EpisodeError(FewshotError):
    """An episode cannot be served from a split (too few classes or images)."""


class ConfigError(FewshotError):
    """A configuration value is invalid."""


class CheckpointError(FewshotError):
    """A checkpoint or artifact is incompatible with the requested model."""


class ImageError(FewshotError):
    """An image is unreadable, not an image, too large or of a refused format."""

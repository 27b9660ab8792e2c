"""Episode descriptions: pure functions of (class pool, spec, rng). No images are touched here.

As in Meta-Dataset's `sampling.py`, an episode is first a *description* (which classes, which rows
of the cache as support and query); `materialise.py` turns it into tensors. Every random choice
takes an explicit `numpy.random.Generator`, and `episode_rng(seed, index)` derives one per episode,
so episode `i` of seed `s` is the same on any machine, in any worker, after any resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from fewshot.errors import EpisodeError

DomainMode = Literal["any", "within", "across"]


@dataclass(frozen=True)
class EpisodeSpec:
    """Fixed N-way K-shot Q-query episodes."""

    n_way: int = 5
    n_shot: int = 1
    n_query: int = 15

    def __post_init__(self) -> None:
        for name in ("n_way", "n_shot", "n_query"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise EpisodeError(f"{name} must be a positive integer, got {value!r}")
        if self.n_way < 2:
            raise EpisodeError(f"n_way must be at least 2, got {self.n_way}")


@dataclass(frozen=True)
class VariableSpec:
    """Variable way and shot episodes in the style of Meta-Dataset (Triantafillou et al. 2020):
    way uniform in [min_way, max_way], shots per class uniform in [1, max_shot] (capped by what
    the class has after reserving its queries), `n_query` queries per class."""

    min_way: int = 5
    max_way: int = 20
    max_shot: int = 10
    n_query: int = 5

    def __post_init__(self) -> None:
        if not 2 <= self.min_way <= self.max_way:
            raise EpisodeError(f"need 2 <= min_way <= max_way, got {self.min_way}, {self.max_way}")
        if self.max_shot < 1 or self.n_query < 1:
            raise EpisodeError(f"max_shot and n_query must be >= 1, got {self.max_shot}, {self.n_query}")


@dataclass(frozen=True)
class ClassPool:
    """The few-shot classes an episode may draw from: (cache class, rotation) pairs.

    class_ids: (M,) int64 cache class ids; rotations: (M,) quarter turns; counts: (M,) images per
    class; starts: (M,) first cache row; domains: (M,) int64 domain ids.
    """

    class_ids: np.ndarray
    rotations: np.ndarray
    counts: np.ndarray
    starts: np.ndarray
    domains: np.ndarray
    domain_names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.class_ids.shape[0])

    def domains_too_small(self, n_way: int, need: int) -> dict[str, int]:
        """Domains a within-domain `n_way`-way episode can never draw from (fewer than `n_way`
        classes with `need` images): name -> how many such classes it has."""
        ok = self.counts >= need
        out: dict[str, int] = {}
        for d in np.unique(self.domains):
            n = int(np.count_nonzero(ok & (self.domains == d)))
            if n < n_way:
                out[self.domain_names[int(d)]] = n
        return out

    def with_rotations(self) -> ClassPool:
        """Each class under 0/90/180/270 degrees as four separate classes (Vinyals et al. 2016)."""
        rep = lambda a: np.repeat(a, 4)  # noqa: E731
        rots = (np.repeat(self.rotations, 4) + np.tile(np.arange(4), len(self))) % 4
        return ClassPool(
            rep(self.class_ids), rots, rep(self.counts), rep(self.starts), rep(self.domains), self.domain_names
        )


@dataclass(frozen=True)
class EpisodeDescription:
    """Which classes and which cache rows make one episode.

    pool_idx: (n_way,) indices into the ClassPool; support_rows/query_rows: absolute cache rows;
    support_labels/query_labels: episode labels 0..n_way-1 aligned with the rows.
    """

    pool_idx: np.ndarray
    class_ids: np.ndarray
    rotations: np.ndarray
    support_rows: np.ndarray
    support_labels: np.ndarray
    query_rows: np.ndarray
    query_labels: np.ndarray


def episode_rng(seed: int, index: int) -> np.random.Generator:
    """The RNG of episode `index` under `seed`: independent streams, stable across machines."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def _eligible(pool: ClassPool, need: int) -> np.ndarray:
    return np.flatnonzero(pool.counts >= need)


def _choose_classes(
    pool: ClassPool, n_way: int, need: int, mode: DomainMode, rng: np.random.Generator
) -> np.ndarray:
    eligible = _eligible(pool, need)
    if eligible.size < n_way:
        raise EpisodeError(
            f"a {n_way}-way episode needs {n_way} classes with at least {need} images each; "
            f"the split has {eligible.size} (of {len(pool)} classes). Lower n_way, n_shot or n_query"
        )
    if mode == "any":
        return rng.choice(eligible, size=n_way, replace=False)
    doms = pool.domains[eligible]
    if mode == "within":
        uniq, per_domain = np.unique(doms, return_counts=True)
        ok = uniq[per_domain >= n_way]
        if ok.size == 0:
            raise EpisodeError(
                f"within-domain {n_way}-way episodes need a domain with {n_way} classes of at least "
                f"{need} images; the largest domain here has {int(per_domain.max())}. Lower n_way or "
                "use domain mode 'any'"
            )
        domain = rng.choice(ok)
        return rng.choice(eligible[doms == domain], size=n_way, replace=False)
    # across: every class from a different domain
    uniq = np.unique(doms)
    if uniq.size < n_way:
        raise EpisodeError(
            f"across-domain {n_way}-way episodes need {n_way} domains; the split has {uniq.size}. "
            "Lower n_way or use domain mode 'any'"
        )
    chosen_domains = rng.choice(uniq, size=n_way, replace=False)
    return np.array([rng.choice(eligible[doms == d]) for d in chosen_domains], dtype=np.int64)


def _sample_rows(pool: ClassPool, picked: np.ndarray, take: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """For each picked class draw `take[j]` distinct rows, vectorised with random sort keys."""
    counts = pool.counts[picked]
    keys = rng.random((picked.size, int(counts.max())))
    keys[np.arange(int(counts.max()))[None, :] >= counts[:, None]] = np.inf
    order = np.argsort(keys, axis=1, kind="stable")
    return [pool.starts[c] + order[j, : take[j]] for j, c in enumerate(picked)]


def _describe(
    pool: ClassPool, picked: np.ndarray, shots: np.ndarray, n_query: int, rng: np.random.Generator
) -> EpisodeDescription:
    rows = _sample_rows(pool, picked, shots + n_query, rng)
    support = np.concatenate([r[:s] for r, s in zip(rows, shots)])
    query = np.concatenate([r[s:] for r, s in zip(rows, shots)])
    labels = np.arange(picked.size)
    return EpisodeDescription(
        pool_idx=picked.astype(np.int64),
        class_ids=pool.class_ids[picked],
        rotations=pool.rotations[picked],
        support_rows=support.astype(np.int64),
        support_labels=np.repeat(labels, shots),
        query_rows=query.astype(np.int64),
        query_labels=np.repeat(labels, n_query),
    )


def describe_episode(
    pool: ClassPool, spec: EpisodeSpec, rng: np.random.Generator, mode: DomainMode = "any"
) -> EpisodeDescription:
    """An N-way K-shot Q-query episode; `mode` keeps it within one domain or spreads it across domains."""
    need = spec.n_shot + spec.n_query
    picked = _choose_classes(pool, spec.n_way, need, mode, rng)
    shots = np.full(spec.n_way, spec.n_shot, dtype=np.int64)
    return _describe(pool, picked, shots, spec.n_query, rng)


def describe_variable_episode(
    pool: ClassPool, spec: VariableSpec, rng: np.random.Generator, mode: DomainMode = "any"
) -> EpisodeDescription:
    """A variable-way, variable-shot episode (Meta-Dataset style, simplified)."""
    n_way = int(rng.integers(spec.min_way, spec.max_way + 1))
    picked = _choose_classes(pool, n_way, 1 + spec.n_query, mode, rng)
    available = pool.counts[picked] - spec.n_query
    shots = np.minimum(rng.integers(1, spec.max_shot + 1, size=n_way), available).astype(np.int64)
    return _describe(pool, picked, shots, spec.n_query, rng)

"""The leakage check over class splits: refuses splits that share a cache class or an identical
image, and reports perceptual near-duplicates (dHash within `max_distance` bits) across splits as
warnings, and the identical images across split files that `prepare` already resolved (the later
split's copy dropped)."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np

from fewshot.data.cache import PackedCache
from fewshot.data.cleaning import SplitDuplicate
from fewshot.data.splits import Split
from fewshot.errors import DataError


@dataclass(frozen=True)
class NearDuplicate:
    file_a: str
    split_a: str
    file_b: str
    split_b: str
    distance: int  # differing dHash bits


@dataclass(frozen=True)
class LeakageReport:
    """Passed checks (no shared class, no identical image) and the near-duplicate warnings."""

    classes_per_split: dict[str, int]
    images_per_split: dict[str, int]
    max_distance: int
    n_near_duplicates: int
    near_duplicates: tuple[NearDuplicate, ...]  # the first `max_listed`, closest first
    # identical images across the source's split files, resolved by prepare (later split's copy dropped)
    resolved_duplicates: tuple[SplitDuplicate, ...] = ()

    def __str__(self) -> str:
        sizes = ", ".join(f"{k} {self.classes_per_split[k]} classes / {self.images_per_split[k]} images" for k in self.classes_per_split)
        return (
            f"no shared class or identical image across splits ({sizes}); "
            f"{len(self.resolved_duplicates)} identical image(s) across the split files removed by prepare "
            f"(the copy in the later split dropped); "
            f"{self.n_near_duplicates} near-duplicate pair(s) across splits within {self.max_distance} dHash bits"
        )

    @property
    def warnings(self) -> list[str]:
        resolved = [
            f"identical image across splits, resolved by prepare: {d.dropped} [{d.dropped_split}] dropped, "
            f"{d.kept} [{d.kept_split}] kept"
            for d in self.resolved_duplicates
        ]
        return resolved + [
            f"near-duplicate across splits ({d.distance} of 64 dHash bits differ): "
            f"{d.file_a} [{d.split_a}] ~ {d.file_b} [{d.split_b}]"
            for d in self.near_duplicates
        ]


def check_leakage(
    cache: PackedCache, splits: dict[str, Split], *, max_distance: int = 2, max_listed: int = 50
) -> LeakageReport:
    """Raise DataError if a cache class or an identical image is in two splits; report near-duplicates."""
    rows = _split_rows(cache, splits)
    _check_shared_classes(cache, splits)
    _check_identical_images(cache, rows)
    n_near, near = _near_duplicates(cache, rows, max_distance, max_listed)
    return LeakageReport(
        classes_per_split={k: len(s) for k, s in splits.items()},
        images_per_split={k: int(r.size) for k, r in rows.items()},
        max_distance=max_distance,
        n_near_duplicates=n_near,
        near_duplicates=near,
        resolved_duplicates=tuple(SplitDuplicate(**d) for d in cache.index.get("split_duplicates", [])),
    )


def _split_rows(cache: PackedCache, splits: dict[str, Split]) -> dict[str, np.ndarray]:
    """Cache image rows of each split's underlying classes (rotations do not add images)."""
    out = {}
    for name, s in splits.items():
        bad = s.class_ids[(s.class_ids < 0) | (s.class_ids >= len(cache.classes))]
        if bad.size:
            raise DataError(f"split {name!r} names class id {int(bad[0])}; cache {cache.path} has {len(cache.classes)} classes")
        ranges = [np.arange(cache.classes[i].start, cache.classes[i].start + cache.classes[i].count) for i in np.unique(s.class_ids)]
        out[name] = np.concatenate(ranges) if ranges else np.zeros(0, dtype=np.int64)
    return out


def _check_shared_classes(cache: PackedCache, splits: dict[str, Split]) -> None:
    for (a, sa), (b, sb) in combinations(splits.items(), 2):
        shared = np.intersect1d(sa.class_ids, sb.class_ids)
        if shared.size:
            names = [cache.classes[int(i)].name for i in shared[:5]]
            raise DataError(
                f"leak: {shared.size} class(es) are in both {a!r} and {b!r}, e.g. {names}; "
                "a class (under any rotation) must belong to one split"
            )


def _check_identical_images(cache: PackedCache, rows: dict[str, np.ndarray]) -> None:
    hashes = cache.content_hashes()
    if len(hashes) != len(cache):
        raise DataError(f"cache {cache.path} has no per-image content hashes; rebuild it with `fewshot prepare --force`")
    seen: dict[str, tuple[str, int]] = {}
    for name, r in rows.items():
        for row in r.tolist():
            first = seen.setdefault(hashes[row], (name, row))
            if first[0] != name:
                raise DataError(
                    f"leak: identical image in {first[0]!r} ({cache.files[first[1]]}) and {name!r} "
                    f"({cache.files[row]}); remove one of them from the source and re-run `fewshot prepare` (a source with "
                    "split files, data.splits_dir, has the copy in the later split dropped by prepare)"
                )


def _near_duplicates(
    cache: PackedCache, rows: dict[str, np.ndarray], max_distance: int, max_listed: int, block: int = 1024
) -> tuple[int, tuple[NearDuplicate, ...]]:
    """Pairs across splits whose dHashes differ in <= max_distance bits (blockwise brute force)."""
    phashes = cache.index.get("phashes")
    if phashes is None or len(phashes) != len(cache):
        return 0, ()
    ph = np.array([int(h, 16) for h in phashes], dtype=np.uint64)
    found: list[NearDuplicate] = []
    total = 0
    for a, b in combinations(rows, 2):
        ra, rb = rows[a], rows[b]
        hb = ph[rb]
        for s in range(0, ra.size, block):
            ia = ra[s : s + block]
            dist = _popcount64(ph[ia][:, None] ^ hb[None, :])  # (block, |b|) differing bits
            i, j = np.nonzero(dist <= max_distance)
            total += i.size
            for k in np.argsort(dist[i, j], kind="stable")[:max_listed].tolist():
                found.append(NearDuplicate(cache.files[ia[i[k]]], a, cache.files[rb[j[k]]], b, int(dist[i[k], j[k]])))
    found.sort(key=lambda d: d.distance)
    return total, tuple(found[:max_listed])


_BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount64(x: np.ndarray) -> np.ndarray:
    """Set bits per uint64 element (numpy >= 2 has it built in; a byte table otherwise)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    return _BYTE_POPCOUNT[x[..., None].view(np.uint8)].sum(axis=-1, dtype=np.uint8)

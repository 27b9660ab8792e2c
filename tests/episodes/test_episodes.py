from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from fewshot.data.cache import ClassInfo, PackedCache, write_cache
from fewshot.data.imageio import Preprocessing
from fewshot.episodes import (
    Augment,
    EpisodeDataset,
    EpisodeSpec,
    VariableSpec,
    describe_episode,
    describe_variable_episode,
    episode_loader,
    episode_rng,
    materialise,
    pool_from_split,
)
from fewshot.episodes.materialise import rotate
from fewshot.errors import EpisodeError


@dataclass(frozen=True)
class _Split:
    name: str
    class_ids: np.ndarray
    rotations: np.ndarray


def make_cache(tmp_path: Path, per_domain: dict[str, list[int]], size: int = 8) -> PackedCache:
    """Classes whose every pixel encodes (class id, image index): rows are traceable."""
    classes, arrays, files, start = [], [], [], 0
    cid = 0
    for domain, counts in per_domain.items():
        for j, count in enumerate(counts):
            imgs = np.zeros((count, 1, size, size), dtype=np.uint8)
            imgs[:, 0, 0, 0] = cid
            imgs[:, 0, 0, 1] = np.arange(count)
            imgs[:, 0, 1, 0] = 200  # a marker that moves under rotation
            arrays.append(imgs)
            classes.append(ClassInfo(f"{domain}/c{j}", domain, "", start, count))
            files += [f"{domain}/c{j}/{i}.png" for i in range(count)]
            start += count
            cid += 1
    write_cache(tmp_path / "c", np.concatenate(arrays), classes, files, Preprocessing(size=size), "fp")
    return PackedCache.open(tmp_path / "c")


def all_split(cache: PackedCache) -> _Split:
    n = len(cache.classes)
    return _Split("train", np.arange(n), np.zeros(n, dtype=np.int64))


@pytest.fixture
def cache(tmp_path: Path) -> PackedCache:
    return make_cache(tmp_path, {"A": [6] * 6, "B": [6] * 4, "C": [3, 6]})


def test_episode_shapes_labels_and_disjoint_support_query(cache: PackedCache) -> None:
    pool = pool_from_split(cache, all_split(cache))
    spec = EpisodeSpec(n_way=4, n_shot=2, n_query=3)
    desc = describe_episode(pool, spec, episode_rng(0, 0))
    ep = materialise(cache, desc)
    assert ep.support_x.shape == (8, 1, 8, 8) and ep.query_x.shape == (12, 1, 8, 8)
    assert ep.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert ep.query_y.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert ep.support_x.dtype == torch.float32 and float(ep.support_x.max()) <= 1.0
    assert not set(desc.support_rows) & set(desc.query_rows)
    # every image belongs to the class its label says
    px = (ep.support_x[:, 0, 0, 0] * 255).round().long()
    assert torch.equal(px, ep.class_ids[ep.support_y])
    # the class with 3 images can never serve 2+3
    assert 10 not in set(desc.class_ids.tolist())


def test_same_seed_same_episodes_different_seed_differs(cache: PackedCache) -> None:
    pool = pool_from_split(cache, all_split(cache))
    spec = EpisodeSpec(3, 1, 2)
    a = [describe_episode(pool, spec, episode_rng(7, i)) for i in range(5)]
    b = [describe_episode(pool, spec, episode_rng(7, i)) for i in range(5)]
    c = [describe_episode(pool, spec, episode_rng(8, i)) for i in range(5)]
    assert all(np.array_equal(x.support_rows, y.support_rows) for x, y in zip(a, b))
    assert any(not np.array_equal(x.query_rows, y.query_rows) for x, y in zip(a, c))


def test_known_stream_is_stable_across_machines(cache: PackedCache) -> None:
    """PCG64 streams are platform independent; pin the first episode so a change is noticed."""
    pool = pool_from_split(cache, all_split(cache))
    # the values below were recorded once (2026-12-06, numpy PCG64); a change to the sampler, the
    # seeding or numpy's stream shows up here as a different episode
    d = describe_episode(pool, EpisodeSpec(3, 1, 1), episode_rng(0, 0))
    assert (d.class_ids.tolist(), d.support_rows.tolist(), d.query_rows.tolist()) == ([7, 6, 8], [42, 38, 53], [47, 40, 48])
    d = describe_episode(pool, EpisodeSpec(3, 1, 1), episode_rng(0, 1))
    assert (d.class_ids.tolist(), d.support_rows.tolist(), d.query_rows.tolist()) == ([11, 5, 9], [67, 31, 57], [64, 32, 54])


def test_within_domain_and_across_domain(cache: PackedCache) -> None:
    pool = pool_from_split(cache, all_split(cache))
    names = [c.domain for c in cache.classes]
    for i in range(20):
        d = describe_episode(pool, EpisodeSpec(4, 1, 1), episode_rng(1, i), mode="within")
        assert len({names[c] for c in d.class_ids}) == 1
        d = describe_episode(pool, EpisodeSpec(3, 1, 1), episode_rng(1, i), mode="across")
        assert len({names[c] for c in d.class_ids}) == 3
    with pytest.raises(EpisodeError, match="largest domain here has 6"):
        describe_episode(pool, EpisodeSpec(7, 1, 1), episode_rng(0, 0), mode="within")
    with pytest.raises(EpisodeError, match="need 4 domains"):
        describe_episode(pool, EpisodeSpec(4, 1, 1), episode_rng(0, 0), mode="across")


def test_domains_too_small_for_within_episodes_are_named(cache: PackedCache) -> None:
    pool = pool_from_split(cache, all_split(cache))  # A: 6 classes of 6, B: 4 of 6, C: one of 3, one of 6
    assert pool.domains_too_small(4, 2) == {"C": 2}
    assert pool.domains_too_small(5, 6) == {"B": 4, "C": 1}  # C's 3-image class cannot serve 6
    assert pool.domains_too_small(2, 2) == {}
    drawn = {cache.classes[c].domain for i in range(50)
             for c in describe_episode(pool, EpisodeSpec(5, 1, 5), episode_rng(2, i), mode="within").class_ids}
    assert set(pool.domain_names) - drawn == set(pool.domains_too_small(5, 6))  # named = what the sampler skips


def test_impossible_way_or_shot_names_the_numbers(cache: PackedCache) -> None:
    pool = pool_from_split(cache, all_split(cache))
    with pytest.raises(EpisodeError, match=r"20-way episode needs 20 classes with at least 6 images"):
        describe_episode(pool, EpisodeSpec(20, 1, 5), episode_rng(0, 0))
    with pytest.raises(EpisodeError, match="the split has 0"):
        describe_episode(pool, EpisodeSpec(2, 5, 5), episode_rng(0, 0))
    with pytest.raises(EpisodeError, match="n_shot must be a positive integer"):
        EpisodeSpec(5, 0, 1)


def test_rotation_classes(cache: PackedCache) -> None:
    pool = pool_from_split(cache, all_split(cache), add_rotations=True)
    assert len(pool) == 4 * len(cache.classes)
    img = np.zeros((1, 1, 4, 4), dtype=np.uint8)
    img[0, 0, 0, 3] = 9
    assert rotate(img, np.array([1]))[0, 0, 0, 0] == 9  # counter-clockwise quarter turn
    for i in range(10):
        d = describe_episode(pool, EpisodeSpec(5, 1, 1), episode_rng(2, i))
        ep = materialise(cache, d)
        for x, y in zip(ep.support_x, ep.support_y):
            k = int(d.rotations[int(y)])
            assert float(np.rot90(x.numpy(), k=-k, axes=(1, 2))[0, 1, 0]) == pytest.approx(200 / 255)


def test_variable_way_and_shot(cache: PackedCache) -> None:
    pool = pool_from_split(cache, all_split(cache))
    spec = VariableSpec(min_way=2, max_way=5, max_shot=4, n_query=2)
    ways = set()
    for i in range(30):
        ep = materialise(cache, describe_variable_episode(pool, spec, episode_rng(3, i)))
        ways.add(ep.n_way)
        assert ep.query_x.shape[0] == 2 * ep.n_way
        counts = torch.bincount(ep.support_y, minlength=ep.n_way)
        assert int(counts.min()) >= 1 and int(counts.max()) <= 4
    assert len(ways) > 1


def test_augment_is_seeded(cache: PackedCache) -> None:
    pool = pool_from_split(cache, all_split(cache))
    ds = EpisodeDataset(cache, pool, EpisodeSpec(3, 2, 2), seed=5, aug=Augment(crop_pad=2, hflip=True))
    a, b = ds[3], ds[3]
    assert torch.equal(a.support_x, b.support_x)
    plain = EpisodeDataset(cache, pool, EpisodeSpec(3, 2, 2), seed=5)[3]
    assert not torch.equal(a.support_x, plain.support_x)


def test_dataloader_with_spawn_workers_matches_in_process(cache: PackedCache) -> None:
    pool = pool_from_split(cache, all_split(cache))
    ds = EpisodeDataset(cache, pool, EpisodeSpec(3, 1, 2), seed=11)
    direct = [ds[i] for i in range(4, 8)]
    loaded = list(episode_loader(ds, start=4, count=4, num_workers=2))
    assert len(loaded) == 4
    for x, y in zip(direct, loaded):
        assert torch.equal(x.support_x, y.support_x) and torch.equal(x.query_y, y.query_y)


def test_rotations_on_a_split_that_already_has_them_are_not_duplicated(cache: PackedCache) -> None:
    n = len(cache.classes)
    rotated = _Split("train", np.repeat(np.arange(n), 4), np.tile(np.arange(4), n))
    pool = pool_from_split(cache, rotated, add_rotations=True)
    pairs = set(zip(pool.class_ids.tolist(), pool.rotations.tolist()))
    assert len(pool) == len(pairs) == 4 * n

"""Class splits (train / val / test) over a packed cache (the leakage check is `fewshot.data.leakage`).

A split is a list of few-shot classes: (cache class id, quarter-turn rotation) pairs. Schemes:

- "lake": Omniglot's 30 background alphabets -> train, evaluation alphabets -> test (Lake et al.,
  Science 2015). By default validation removes no alphabet from training: `fractions[1]` of the
  characters of *each* background alphabet (seeded, at least one where the fraction is > 0) are
  held out as val; with `fractions[1] == 0` there is no val split. `val_alphabets` > 0 also holds
  out that many *whole* background alphabets (seeded, among those with at least 20 characters) as
  val, so validation can run Lake's 20-way within-alphabet episodes on unseen alphabets (for
  choosing a recipe; a final run trains on all 30). Rotations optional.
- "vinyals": the class lists of Vinyals et al. 2016 (`splits/vinyals/{train,val,test}.txt`, lines
  `Alphabet/characterNN/rotDDD`), each rotation its own class: 1028 / 172 / 423 characters x 4.
- "csv": the class split of split files `{train,val,test}.csv` (`filename,label`; e.g. Ravi &
  Larochelle's miniImageNet 64 / 16 / 20 classes), read from `splits_dir` (default: the folder the
  cache's source was prepared with). Each label is a cache class; val.csv may be absent.
- "domains": whole domains held out, seeded, in proportions `fractions`.
- "classes": the classes of every domain split in proportions `fractions`, seeded.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fewshot.data.cache import PackedCache
from fewshot.data.splitfiles import read_split_files
from fewshot.errors import CacheError, ConfigError, DataError

SPLIT_NAMES: tuple[str, str, str] = ("train", "val", "test")
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.6, 0.2, 0.2)
N_ROTATIONS = 4


@dataclass(frozen=True, eq=False)
class Split:
    """One split. Row i is the few-shot class "cache class `class_ids[i]` turned `rotations[i]` x 90 deg"."""

    name: str  # "train" / "val" / "test"
    class_ids: np.ndarray  # (M,) int64 cache class ids
    rotations: np.ndarray  # (M,) int64 quarter turns (0..3) applied when materialised

    def __post_init__(self) -> None:
        if self.class_ids.shape != self.rotations.shape or self.class_ids.ndim != 1:
            raise DataError(
                f"split {self.name!r}: class_ids {self.class_ids.shape} and rotations "
                f"{self.rotations.shape} must be equal-length 1-D arrays"
            )

    def __len__(self) -> int:
        return int(self.class_ids.size)


@dataclass(frozen=True)
class _Request:
    """What a scheme is asked: the cache, the seeded draw, the proportions and the options of `make_splits`."""

    cache: PackedCache
    rng: np.random.Generator
    fractions: tuple[float, float, float]
    rotations: bool | None
    splits_dir: Path | None
    val_alphabets: int = 0

    @property
    def rotated(self) -> bool:
        return bool(self.rotations)


def list_split_schemes() -> list[str]:
    return sorted(_SCHEMES)


def make_splits(
    cache: PackedCache,
    scheme: str,
    *,
    seed: int = 0,
    splits_dir: Path | None = None,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    rotations: bool | None = None,
    val_alphabets: int = 0,
) -> dict[str, Split]:
    """{"train", "val", "test"} -> Split under `scheme`; deterministic given `seed`.

    `rotations`: None = the scheme's default (vinyals: on, as listed in its files; others: off);
    True = every class under 4 quarter turns, all in the class's split.
    `splits_dir`: folder of the vinyals files (default: `<omniglot>/splits/vinyals` of the source) or
    of the csv files (default: the split folder the cache's source was prepared with).
    `val_alphabets`: scheme "lake" only, whole background alphabets held out as val (see the module doc).
    """
    if scheme not in _SCHEMES:
        raise ConfigError(f"unknown split scheme {scheme!r}; valid schemes: {list_split_schemes()}")
    fr = _check_fractions(fractions)
    rng = np.random.default_rng(seed)
    if val_alphabets and scheme != "lake":
        raise ConfigError(f"val_alphabets={val_alphabets} holds out whole Omniglot background alphabets and needs "
                          f"scheme 'lake', not {scheme!r}; set it to 0")
    return _SCHEMES[scheme](_Request(cache, rng, fr, rotations, splits_dir, val_alphabets))


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ConfigError(
            f"fractions={tuple(fractions)} must be three non-negative numbers (train, val, test) summing to 1"
        )
    return (float(fractions[0]), float(fractions[1]), float(fractions[2]))


def _split(name: str, class_ids: Sequence[int], rotations: bool) -> Split:
    ids = np.asarray(sorted(class_ids), dtype=np.int64)
    if not rotations:
        return Split(name, ids, np.zeros_like(ids))
    return Split(name, np.repeat(ids, N_ROTATIONS), np.tile(np.arange(N_ROTATIONS, dtype=np.int64), ids.size))


# --------------------------------------------------------------------------- schemes


def _lake(req: _Request) -> dict[str, Split]:
    cache, rng, fractions = req.cache, req.rng, req.fractions
    subsets = {c.subset for c in cache.classes}
    if not {"background", "evaluation"} <= subsets:
        raise DataError(
            f"scheme 'lake' needs Omniglot's background and evaluation subsets; cache {cache.path} "
            f"has subsets {sorted(subsets)}. Use scheme 'domains' or 'classes'"
        )
    ids: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
    by_alphabet: dict[str, list[int]] = {}
    for i, c in enumerate(cache.classes):
        if c.subset == "evaluation":
            ids["test"].append(i)
        elif c.subset == "background":
            by_alphabet.setdefault(c.domain, []).append(i)
    held_out = _held_out_alphabets(by_alphabet, req.val_alphabets, rng)
    for alphabet in sorted(by_alphabet):  # sorted: the same draw on every machine
        chars = by_alphabet[alphabet]
        if alphabet in held_out:
            ids["val"].extend(chars)
            continue
        n_val = min(len(chars) - 1, max(1, round(fractions[1] * len(chars)))) if fractions[1] > 0 else 0
        val = set(rng.choice(chars, size=n_val, replace=False).tolist()) if n_val else set()
        for i in chars:
            ids["val" if i in val else "train"].append(i)
    names = SPLIT_NAMES if ids["val"] else ("train", "test")
    return {name: _split(name, ids[name], req.rotated) for name in names}


LAKE_VAL_MIN_CHARACTERS = 20  # a held-out alphabet must hold one 20-way within-alphabet episode


def _held_out_alphabets(by_alphabet: dict[str, list[int]], n: int, rng: np.random.Generator) -> set[str]:
    if n == 0:
        return set()
    eligible = sorted(a for a, chars in by_alphabet.items() if len(chars) >= LAKE_VAL_MIN_CHARACTERS)
    most = min(len(eligible), len(by_alphabet) - 1)  # at least one alphabet stays in training
    if n > most:
        raise ConfigError(f"val_alphabets={n}: only {len(eligible)} of the {len(by_alphabet)} background alphabets have "
                          f"{LAKE_VAL_MIN_CHARACTERS}+ characters and one must stay in training; use at most {most}")
    return set(rng.choice(eligible, size=n, replace=False).tolist())


_VINYALS_LINE = re.compile(r"^(?P<cls>[^/]+/[^/]+)/rot(?P<deg>\d{3})$")


def _vinyals(req: _Request) -> dict[str, Split]:
    cache, rotations = req.cache, req.rotations
    folder = _vinyals_dir(cache, req.splits_dir)
    out = {}
    for name in SPLIT_NAMES:
        path = folder / f"{name}.txt"
        if not path.is_file():
            raise DataError(f"vinyals split file {path} is missing; it ships in splits/vinyals/ beside the Omniglot zips")
        ids: list[int] = []
        rots: list[int] = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            m = _VINYALS_LINE.match(line.strip())
            deg = int(m["deg"]) if m else -1
            if m is None or deg % 90 or not 0 <= deg < 360:
                raise DataError(f"{path}:{lineno}: {line!r} is not 'Alphabet/characterNN/rotDDD' with DDD in 000/090/180/270")
            if rotations is False and deg:
                continue
            try:
                ids.append(cache.class_id(m["cls"]))
            except CacheError:
                raise DataError(f"{path}:{lineno}: class {m['cls']!r} is not in cache {cache.path}; prepare full Omniglot") from None
            rots.append(deg // 90)
        out[name] = Split(name, np.asarray(ids, dtype=np.int64), np.asarray(rots, dtype=np.int64))
    return out


def _vinyals_dir(cache: PackedCache, splits_dir: Path | None) -> Path:
    if splits_dir is None:
        root = cache.index.get("source", {}).get("root")
        if root is None:
            raise DataError("scheme 'vinyals' needs splits_dir=<data_root>/omniglot/splits/vinyals")
        splits_dir = Path(root) / "splits"
    splits_dir = Path(splits_dir)
    for candidate in (splits_dir, splits_dir / "vinyals"):
        if (candidate / "train.txt").is_file():
            return candidate
    raise DataError(
        f"no vinyals split files (train.txt, val.txt, test.txt) in {splits_dir} or {splits_dir / 'vinyals'}; "
        "pass splits_dir=<data_root>/omniglot/splits/vinyals"
    )


def _csv(req: _Request) -> dict[str, Split]:
    cache, splits_dir = req.cache, req.splits_dir
    folder = splits_dir or cache.index.get("source", {}).get("splits_dir")
    if folder is None:
        raise DataError(f"scheme 'csv' needs the folder of its split files (train.csv, val.csv, test.csv); cache "
                        f"{cache.path} was not prepared with one: pass splits_dir= (config: data.splits_dir)")
    files = read_split_files(Path(folder))
    lookup = _class_lookup(cache)
    ids: dict[str, list[int]] = {name: [] for name in files.splits}
    for label, listing in files.class_splits().items():
        if label not in lookup:
            raise DataError(
                f"{files.folder / listing.where}: class {label!r} is not in cache {cache.path} "
                f"({len(cache.classes)} classes, e.g. {[c.name for c in cache.classes[:3]]}): prepare the "
                "collection these split files describe (or all its images were dropped: see the cleaning report)"
            )
        ids[listing.split].append(lookup[label])
    return {name: _split(name, ids[name], req.rotated) for name in files.splits}


def _class_lookup(cache: PackedCache) -> dict[str, int]:
    """Class name -> id; the last path part also names a class when it is unique ("dom/cls" -> "cls")."""
    short: dict[str, list[int]] = {}
    for i, c in enumerate(cache.classes):
        short.setdefault(c.name.rsplit("/", 1)[-1], []).append(i)
    return {**{k: v[0] for k, v in short.items() if len(v) == 1}, **{c.name: i for i, c in enumerate(cache.classes)}}


def _domains(req: _Request) -> dict[str, Split]:
    cache, rng, fractions = req.cache, req.rng, req.fractions
    domains = sorted({c.domain for c in cache.classes})
    counts = _fraction_counts(len(domains), fractions, at_least_one=True)
    if any(n == 0 and f > 0 for n, f in zip(counts, fractions)):
        raise DataError(
            f"cache {cache.path} has {len(domains)} domain(s), too few to hold out domains in "
            f"proportions {fractions}; use scheme 'classes' or set a fraction to 0"
        )
    order = [domains[i] for i in rng.permutation(len(domains))]
    bounds = np.cumsum((0, *counts))
    split_of = {d: SPLIT_NAMES[k] for k in range(3) for d in order[bounds[k] : bounds[k + 1]]}
    ids: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
    for i, c in enumerate(cache.classes):
        ids[split_of[c.domain]].append(i)
    return {name: _split(name, ids[name], req.rotated) for name in SPLIT_NAMES}


def _classes(req: _Request) -> dict[str, Split]:
    cache, rng, fractions = req.cache, req.rng, req.fractions
    ids: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
    for domain in sorted({c.domain for c in cache.classes}):
        members = [i for i, c in enumerate(cache.classes) if c.domain == domain]
        order = [members[i] for i in rng.permutation(len(members))]
        bounds = np.cumsum((0, *_fraction_counts(len(members), fractions, at_least_one=False)))
        for k, name in enumerate(SPLIT_NAMES):
            ids[name].extend(order[bounds[k] : bounds[k + 1]])
    for name, f in zip(SPLIT_NAMES, fractions):
        if f > 0 and not ids[name]:
            raise DataError(f"scheme 'classes' left split {name!r} empty: cache {cache.path} has too few classes per domain")
    return {name: _split(name, ids[name], req.rotated) for name in SPLIT_NAMES}


def _fraction_counts(n: int, fractions: tuple[float, float, float], *, at_least_one: bool) -> tuple[int, int, int]:
    """Split n items by cumulative rounding; with `at_least_one`, every positive fraction gets one if it can."""
    cuts = [0, int(round(n * fractions[0])), int(round(n * (fractions[0] + fractions[1]))), n]
    counts = [cuts[k + 1] - cuts[k] for k in range(3)]
    if at_least_one:
        for k in range(3):
            if fractions[k] > 0 and counts[k] == 0:
                donor = int(np.argmax(counts))
                if counts[donor] > 1:
                    counts[donor] -= 1
                    counts[k] += 1
    return (counts[0], counts[1], counts[2])


_SCHEMES: dict[str, Callable[[_Request], dict[str, Split]]] = {
    "lake": _lake,
    "vinyals": _vinyals,
    "csv": _csv,
    "domains": _domains,
    "classes": _classes,
}

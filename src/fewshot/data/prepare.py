"""prepare: source -> cleaned, decoded, resized images in a packed cache, plus a cleaning report.

The cache lives in `cache_root/<name>-<key[:12]>-<size>-<mode>/` where `key` hashes the source
fingerprint, the preprocessing, the cleaning settings and the cache format. An unchanged source is
served from that folder (no decoding); any change gives a new key and a rebuild. Writes are atomic
(`write_cache`, then `report.json` by rename); a folder without a readable report is rebuilt.

A source with split files (`source.split_order`, e.g. miniImageNet) also has its files in no split
and its cross-split copies dropped and reported (`cleaning.apply_split_rules`); the dropped copies
are listed in the cache index so the leakage check can report them.

Decoding runs in a "spawn" process pool when the source is large enough for it to pay; the
workers write the images straight into one preallocated uint8 rows file (n_files, C, H, W; in
/dev/shm where there is room), which is compacted in place to the kept files (class-contiguous
because sources list them that way) and written once into the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import tempfile
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fewshot import CACHE_FORMAT_VERSION
from fewshot.data.cache import ClassInfo, PackedCache, write_cache
from fewshot.data.cleaning import (
    KEPT,
    CleaningConfig,
    CleaningReport,
    FileRecord,
    InspectedBatch,
    SplitDuplicate,
    apply_class_rules,
    apply_split_rules,
    cross_class_duplicates,
    inspect_batch,
)
from fewshot.data.imageio import Preprocessing
from fewshot.data.sources import Entry, ImageFolderSource, OmniglotSource, Source
from fewshot.errors import CacheError, DataError

REPORT_NAME = "report.json"
PIPELINE_VERSION = 1  # bump when decoding or cleaning changes what lands in a cache
MIN_FILES_FOR_POOL = 4096  # below this, starting worker processes costs more than it saves
MAX_WORKERS = 8


@dataclass(frozen=True)
class PreparedData:
    cache: PackedCache
    report: CleaningReport
    reused: bool = False  # True when served from an existing cache folder


def prepare(
    source: Source | str | os.PathLike[str],
    cache_root: str | os.PathLike[str],
    pre: Preprocessing = Preprocessing(),
    *,
    min_images_per_class: int = 2,
    min_side: int = 8,
    progress: bool = True,
    force: bool = False,
    workers: int | None = None,
) -> PreparedData:
    """Clean, decode and pack `source` (a Source, or a path to an image folder / zip).

    `workers`: processes for decoding; None = automatic (one per CPU, at most 8, only for
    sources of 4,096+ files), 0 or 1 = in this process.
    """
    if isinstance(source, (str, os.PathLike)):
        source = ImageFolderSource(source)
    cfg = CleaningConfig(min_images_per_class=min_images_per_class, min_side=min_side)
    source_fp = source.fingerprint()
    key = build_key(source_fp, pre, cfg)
    path = cache_dir(cache_root, source.name, key, pre)
    if not force:
        reused = _try_reuse(path, key)
        if reused is not None:
            return reused
    return _build(_Build(source, path, key, source_fp, pre, cfg, progress, workers))


def prepare_omniglot(
    data_root: str | os.PathLike[str],
    cache_root: str | os.PathLike[str],
    pre: Preprocessing = Preprocessing(),
    *,
    progress: bool = True,
    force: bool = False,
    workers: int | None = None,
) -> PreparedData:
    """Omniglot from `<data_root>/omniglot/images_{background,evaluation}.zip` (structure-checked)."""
    return prepare(
        OmniglotSource(data_root), cache_root, pre, progress=progress, force=force, workers=workers
    )


def build_key(source_fp: str, pre: Preprocessing, cfg: CleaningConfig) -> str:
    """sha256 hex of everything that determines a cache's contents."""
    blob = json.dumps(
        {
            "source": source_fp,
            "preprocessing": pre.to_dict(),
            "cleaning": cfg.to_dict(),
            "cache_format": CACHE_FORMAT_VERSION,
            "pipeline": PIPELINE_VERSION,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_dir(cache_root: str | os.PathLike[str], name: str, key: str, pre: Preprocessing) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "data"
    return Path(cache_root) / f"{safe}-{key[:12]}-{pre.size}-{pre.mode}"


def _try_reuse(path: Path, key: str) -> PreparedData | None:
    """The cache at `path` with its report, or None when absent, stale, partial or foreign."""
    if not path.is_dir():
        return None
    try:
        cache = PackedCache.open(path)
        if cache.fingerprint != key:
            return None
        report = CleaningReport.load(path / REPORT_NAME)
    except (CacheError, DataError):
        return None  # rebuilt below; write_cache replaces the folder atomically
    return PreparedData(cache, report, reused=True)


# --------------------------------------------------------------------------- the build


@dataclass(frozen=True)
class _Build:
    """One cache to build: its source, where it goes under which key, and how it is cleaned and decoded."""

    source: Source
    path: Path
    key: str
    source_fp: str
    pre: Preprocessing
    cfg: CleaningConfig
    progress: bool
    workers: int | None


def _build(job: _Build) -> PreparedData:
    entries = job.source.entries()
    if not entries:
        raise DataError(f"{job.source.describe()['root']} holds no files; nothing to prepare")
    with _scratch_rows(job.path.parent, (len(entries), job.pre.channels, job.pre.size, job.pre.size)) as rows:
        return _build_from(job, entries, rows)


def _build_from(job: _Build, entries: list[Entry], rows: _Rows) -> PreparedData:
    source, path, pre, cfg = job.source, job.path, job.pre, job.cfg
    status, detail, hashes, phash = _inspect_all(source, entries, pre, cfg, rows, job.progress, job.workers)
    images = rows.open()  # (N, C, H, W), filled by the decoding processes
    class_names = [e.class_name for e in entries]
    source_ids = [e.source_id for e in entries]
    split_dups: list[SplitDuplicate] = []
    if source.split_order:  # before the class rules: a class left too small by them is then dropped
        split_dups = apply_split_rules([e.subset for e in entries], source_ids, status, detail, hashes,
                                       source.split_order)
    apply_class_rules(class_names, source_ids, status, detail, hashes, cfg.min_images_per_class)
    report = CleaningReport(
        records=tuple(
            FileRecord(e.source_id, e.subset, e.class_name, s, d)
            for e, s, d in zip(entries, status, detail)
        ),
        warnings=tuple(cross_class_duplicates(class_names, source_ids, status, hashes)),
        settings={"cleaning": cfg.to_dict(), "preprocessing": pre.to_dict(), "source": source.describe()},
    )
    kept = np.flatnonzero(np.array([s == KEPT for s in status], dtype=bool))
    if kept.size == 0:
        raise DataError(f"{source.describe()['root']}: no usable images among {len(entries)} files\n{report.table()}")
    _compact_rows(images, kept)
    extra = {
        "content_hashes": [hashes[i] for i in kept],
        "phashes": [f"{int(p):016x}" for p in phash[kept]],
        "report_summary": report.summary(),
        "source": source.describe(),
        "source_fingerprint": job.source_fp,
        "cleaning": cfg.to_dict(),
        "split_duplicates": [asdict(d) for d in split_dups],  # reported by leakage.check_leakage
    }
    write_cache(
        path,
        images[: kept.size],
        _class_infos(entries, kept),
        [source_ids[i] for i in kept],
        pre,
        job.key,
        extra=extra,
    )
    report.save(path / REPORT_NAME)
    return PreparedData(PackedCache.open(path), report, reused=False)


@dataclass(frozen=True)
class _Rows:
    """A uint8 file of shape (N, C, H, W) that decoding processes write image rows into (so no
    image bytes travel back through pipes); `open()` maps it."""

    path: str
    shape: tuple[int, int, int, int]

    def open(self) -> np.ndarray:
        return np.memmap(self.path, dtype=np.uint8, mode="r+", shape=self.shape)


SCRATCH_PREFIX = ".fewshot-rows-"


@contextlib.contextmanager
def _scratch_rows(fallback_dir: Path, shape: tuple[int, int, int, int]) -> Iterator[_Rows]:
    """A scratch rows file, in RAM (/dev/shm) where there is room for it, else in `fallback_dir`;
    removed afterwards, or by a later prepare when this process was killed (the name holds its pid)."""
    nbytes = int(np.prod(shape))
    shm = Path("/dev/shm")
    in_ram = shm.is_dir() and os.access(shm, os.W_OK)
    fallback_dir.mkdir(parents=True, exist_ok=True)
    for place in (shm, fallback_dir) if in_ram else (fallback_dir,):
        _remove_stale_scratch(place)
    folder = shm if in_ram and shutil.disk_usage(shm).free > 2 * nbytes else fallback_dir
    fd, name = tempfile.mkstemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", suffix=".u8", dir=folder)
    try:
        os.ftruncate(fd, nbytes)
        os.close(fd)
        yield _Rows(name, shape)
    finally:
        Path(name).unlink(missing_ok=True)


def _remove_stale_scratch(folder: Path) -> None:
    """Delete scratch rows files left in `folder` by prepare processes that no longer run."""
    for p in folder.glob(f"{SCRATCH_PREFIX}*-*.u8"):
        pid = p.name[len(SCRATCH_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there: assume alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or cannot tell: keep its file
    return True


def inspect_into(datas: Sequence[bytes], names: Sequence[str], pre: Preprocessing, min_side: int,
                 rows: _Rows, start: int) -> InspectedBatch:
    """`inspect_batch`, with the images written to rows `start ..` of `rows` and left out of the
    result. Top-level so spawn-started workers can run it."""
    batch = inspect_batch(datas, names, pre, min_side)
    out = rows.open()
    out[start : start + len(names)] = batch.images
    del out  # unmapped; the pages stay in the shared file
    return replace(batch, images=batch.images[:0])


def _inspect_all(
    source: Source,
    entries: Sequence[Entry],
    pre: Preprocessing,
    cfg: CleaningConfig,
    rows: _Rows,
    progress: bool,
    workers: int | None,
) -> tuple[list[str], list[str], list[str], np.ndarray]:
    """Inspect every entry, writing resized images into `rows`; returns per-file results."""
    n = len(entries)
    n_workers = _n_workers(workers, n)
    chunk = max(256, min(2048, -(-n // max(1, n_workers * 8))))
    status, detail, hashes = [""] * n, [""] * n, [""] * n
    phash = np.zeros(n, dtype=np.uint64)
    try:
        _fill(source, entries, pre, cfg, rows, progress, chunk, n_workers, (status, detail, hashes, phash))
    except BrokenProcessPool:
        # spawn workers re-import __main__; code run from stdin or some embedders cannot be
        # re-imported. Decoding in this process gives the same cache, only slower.
        warnings.warn("worker processes could not start (run from a file with an `if __name__ == "
                      "'__main__':` guard to use them); decoding in this process", stacklevel=2)
        _fill(source, entries, pre, cfg, rows, progress, chunk, 1, (status, detail, hashes, phash))
    return status, detail, hashes, phash


def _fill(
    source: Source, entries: Sequence[Entry], pre: Preprocessing, cfg: CleaningConfig, rows: _Rows,
    progress: bool, chunk: int, n_workers: int, out: tuple[list[str], list[str], list[str], np.ndarray],
) -> None:
    status, detail, hashes, phash = out
    with tqdm(total=len(entries), unit="img", desc=f"prepare {source.name}", disable=not progress) as bar:
        for start, batch in _run_batches(source, entries, pre, cfg.min_side, rows, chunk, n_workers):
            stop = start + len(batch.status)
            status[start:stop], detail[start:stop] = batch.status, batch.detail
            hashes[start:stop], phash[start:stop] = batch.content_hash, batch.phash
            bar.update(stop - start)


def _n_workers(workers: int | None, n_files: int) -> int:
    if workers is not None:
        return max(1, int(workers))
    if n_files < MIN_FILES_FOR_POOL:
        return 1
    return max(1, min(MAX_WORKERS, _usable_cpus()))


def _usable_cpus() -> int:
    """CPUs this process may run on (affinity-aware on Linux; os.cpu_count elsewhere)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _run_batches(
    source: Source, entries: Sequence[Entry], pre: Preprocessing, min_side: int, rows: _Rows, chunk: int,
    n_workers: int,
) -> Iterator[tuple[int, InspectedBatch]]:
    """(start, batch) in input order. Reading stays in this process; decoding goes to workers,
    which write the images into `rows`."""
    starts = range(0, len(entries), chunk)

    def read(start: int) -> tuple[list[bytes], list[str]]:
        part = entries[start : start + chunk]
        return [source.read(e) for e in part], [e.source_id for e in part]

    if n_workers <= 1:
        for start in starts:
            yield start, inspect_into(*read(start), pre, min_side, rows, start)
        return
    ctx = multiprocessing.get_context("spawn")  # the same on Linux, macOS and Windows
    with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx) as pool:
        pending: deque[tuple[int, Future[InspectedBatch]]] = deque()
        for start in starts:
            pending.append((start, pool.submit(inspect_into, *read(start), pre, min_side, rows, start)))
            if len(pending) >= 2 * n_workers:  # bound the bytes held in flight
                s, fut = pending.popleft()
                yield s, fut.result()
        while pending:
            s, fut = pending.popleft()
            yield s, fut.result()


def _compact_rows(images: np.ndarray, kept: np.ndarray, block: int = 4096) -> None:
    """Move rows `kept` (increasing) to the front of `images`, in place, block by block.

    Safe because kept[j] >= j: a block only reads rows at or after the rows it writes.
    """
    for a in range(0, kept.size, block):
        rows = kept[a : a + block]
        images[a : a + rows.size] = images[rows]


def _class_infos(entries: Sequence[Entry], kept: np.ndarray) -> list[ClassInfo]:
    """Contiguous ClassInfo rows for the kept files; a class spanning subsets lists them all."""
    infos: list[ClassInfo] = []
    groups: dict[str, list[int]] = {}
    for row, i in enumerate(kept.tolist()):
        groups.setdefault(entries[i].class_name, []).append(row)
    for name, rows in groups.items():
        first = entries[int(kept[rows[0]])]
        subsets = sorted({entries[int(kept[r])].subset for r in rows})
        infos.append(ClassInfo(name, first.domain, "+".join(subsets), rows[0], len(rows)))
    return infos

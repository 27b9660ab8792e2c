"""Raw-data sources: where image bytes come from, before any decoding.

A source lists its files once (`entries()`, cheap: names only), reads them on demand
(`read(entry)`) and fingerprints its inputs (`fingerprint()`) so `prepare` can tell whether a
packed cache is still current. Iterating a source yields `RawItem`s in class-contiguous order.

Two kinds:

- `OmniglotSource`: the official zips `images_background.zip` / `images_evaluation.zip`
  (Lake et al., Science 2015), read with `zipfile` directly; validated by structure
  (30 alphabets / 964 characters / 19,280 images and 20 / 659 / 13,180). Extracted folders
  `images_background/` and `images_evaluation/` are accepted when the zips are absent.
- `ImageFolderSource`: `root/<domain>/<class>/<image>` or `root/<class>/<image>` (one domain named
  after the root), as a folder or a zip; or, with `first_level="subset"`,
  `root/<subset>/<class>/<image>` (e.g. CIFAR-10's train/test) where one class spans subsets.
- `splitfiles.SplitFileSource`: class folders plus split files `{train,val,test}.csv` (miniImageNet);
  its `split_order` is non-empty, and its items' subsets are their splits.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal, Protocol

from fewshot.errors import DataError

FirstLevel = Literal["domain", "subset"]

OMNIGLOT_SUBSETS: tuple[str, ...] = ("background", "evaluation")
# (alphabets, characters, images) of the official release
OMNIGLOT_COUNTS: dict[str, tuple[int, int, int]] = {
    "background": (30, 964, 19_280),
    "evaluation": (20, 659, 13_180),
}
_FETCH_HINT = "`fewshot prepare --download` fetches them when there is a network"


@dataclass(frozen=True)
class RawItem:
    """One input file, undecoded."""

    domain: str  # knowledge domain, e.g. "Latin"
    class_name: str  # unique class key, e.g. "Latin/character01"
    subset: str  # "background" / "evaluation" / "train" / "" ...
    source_id: str  # stable relative path, e.g. "images_background/Latin/character01/0001_01.png"
    data: bytes


@dataclass(frozen=True)
class Entry:
    """A file a source will yield, without its bytes. `location` is how the source reads it."""

    domain: str
    class_name: str
    subset: str
    source_id: str
    location: str  # zip member name, or path relative to the folder root


class Source(Protocol):
    name: str
    # non-empty when the subsets are few-shot splits, earliest first: prepare then drops files in
    # no split and the copy of an image in a later split (cleaning.apply_split_rules)
    split_order: tuple[str, ...]

    def entries(self) -> list[Entry]: ...

    def read(self, entry: Entry) -> bytes: ...

    def fingerprint(self) -> str: ...

    def describe(self) -> dict[str, str]: ...

    def __iter__(self) -> Iterator[RawItem]: ...


def source_fingerprint(source: Source) -> str:
    """Stable sha256 hex of a source's inputs: sizes + sha256 of zips; (path, size, mtime_ns) of folders."""
    return source.fingerprint()


# --------------------------------------------------------------------------- file containers


class _Container:
    """Uniform read access to a zip or a folder; `names` are posix paths relative to the root."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.is_zip = path.is_file()
        self._zip: zipfile.ZipFile | None = None
        if self.is_zip:
            try:
                with zipfile.ZipFile(path) as zf:
                    self.names = sorted(n for n in zf.namelist() if not n.endswith("/"))
            except (zipfile.BadZipFile, OSError) as exc:
                raise DataError(f"{path} is not a readable zip file ({exc}); replace it") from exc
        else:
            self.names = sorted(
                p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()
            )

    def read(self, name: str) -> bytes:
        if not self.is_zip:
            return (self.path / name).read_bytes()
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.path)
        info, fp = self._zip.getinfo(name), self._zip.fp  # fp: None only once the zip is closed
        if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1 and hasattr(os, "pread") and fp:
            return _read_stored(fp.fileno(), info, self.path)
        return self._zip.read(name)

    def fingerprint_into(self, h: hashlib._Hash) -> None:
        if self.is_zip:
            h.update(f"zip {self.path.name} {self.path.stat().st_size}\n".encode())
            h.update(_file_sha256(self.path).encode())
        else:
            h.update(f"dir {self.path.name}\n".encode())
            for name in self.names:
                st = (self.path / name).stat()
                h.update(f"{name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())

    def __getstate__(self) -> dict[str, object]:  # open zip handles do not pickle
        return {**self.__dict__, "_zip": None}


_LOCAL_HEADER = struct.Struct("<4s22xHH")  # zip local file header: signature .. name length, extra length


def _read_stored(fd: int, info: zipfile.ZipInfo, path: Path) -> bytes:
    """A stored (uncompressed) member read in place: two preads and a CRC check instead of
    zipfile's reader object per member (several times faster for 60,000 small JPEGs)."""
    sig, n_name, n_extra = _LOCAL_HEADER.unpack(os.pread(fd, _LOCAL_HEADER.size, info.header_offset))
    start = info.header_offset + _LOCAL_HEADER.size + n_name + n_extra
    data = os.pread(fd, info.compress_size, start) if sig == b"PK\x03\x04" else b""
    if len(data) != info.compress_size or zlib.crc32(data) != info.CRC:
        raise DataError(f"{path}: member {info.filename!r} is damaged (bad local header or CRC); replace the zip")
    return data


def _file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


class _BaseSource:
    name: str
    split_order: tuple[str, ...] = ()

    def entries(self) -> list[Entry]:
        raise NotImplementedError

    def read(self, entry: Entry) -> bytes:
        raise NotImplementedError

    def __iter__(self) -> Iterator[RawItem]:
        for e in self.entries():
            yield RawItem(e.domain, e.class_name, e.subset, e.source_id, self.read(e))


class _ContainerSource(_BaseSource):
    """A source whose files all live in one `_Container` (a folder or a zip), listed in `_entries`."""

    _entries: list[Entry]
    _container: _Container

    def entries(self) -> list[Entry]:
        return list(self._entries)

    def read(self, entry: Entry) -> bytes:
        return self._container.read(entry.location)


# --------------------------------------------------------------------------- Omniglot


class OmniglotSource(_BaseSource):
    """Omniglot from `<data_root>/omniglot/images_{background,evaluation}.zip` (or extracted folders).

    `data_root` may also be the `omniglot` folder itself. `check_counts=False` skips the
    30/964/19,280 and 20/659/13,180 structure check (for tiny test fixtures only).
    """

    name = "omniglot"

    def __init__(self, data_root: str | os.PathLike[str], *, check_counts: bool = True) -> None:
        self.root = omniglot_dir(data_root)
        self.check_counts = check_counts
        self._containers = {s: self._open(s) for s in OMNIGLOT_SUBSETS}
        self._entries = [e for s in OMNIGLOT_SUBSETS for e in self._subset_entries(s)]

    def _open(self, subset: str) -> _Container:
        zip_path = self.root / f"images_{subset}.zip"
        folder = self.root / f"images_{subset}"
        if zip_path.is_file():
            return _Container(zip_path)
        if folder.is_dir():
            return _Container(folder)
        raise DataError(
            f"Omniglot file {zip_path} is missing. Put the official images_background.zip and "
            f"images_evaluation.zip (github.com/brendenlake/omniglot, python/) in {self.root}/ "
            f"(or their extracted folders images_background/ and images_evaluation/); {_FETCH_HINT}"
        )

    def _subset_entries(self, subset: str) -> list[Entry]:
        container = self._containers[subset]
        top = f"images_{subset}"
        entries = []
        for name in container.names:
            parts = PurePosixPath(name).parts
            if container.is_zip:
                if len(parts) != 4 or parts[0] != top:
                    raise DataError(
                        f"{container.path}: entry {name!r} is not in the official layout "
                        f"{top}/<Alphabet>/characterNN/<file>.png; replace the file with the official "
                        f"{top}.zip ({_FETCH_HINT})"
                    )
                parts = parts[1:]
            elif len(parts) != 3:
                raise DataError(
                    f"{container.path}: file {name!r} is not in the layout <Alphabet>/characterNN/<file>.png; "
                    f"extract the official {top}.zip there or remove the folder and use the zip"
                )
            alphabet, character, _ = parts
            source_id = f"{top}/{'/'.join(parts)}"
            entries.append(Entry(alphabet, f"{alphabet}/{character}", subset, source_id, name))
        if self.check_counts:
            _check_omniglot_counts(container.path, subset, entries)
        return entries

    def entries(self) -> list[Entry]:
        return list(self._entries)

    def read(self, entry: Entry) -> bytes:
        return self._containers[entry.subset].read(entry.location)

    def fingerprint(self) -> str:
        h = hashlib.sha256(b"omniglot-v1\n")
        for s in OMNIGLOT_SUBSETS:
            self._containers[s].fingerprint_into(h)
        return h.hexdigest()

    def describe(self) -> dict[str, str]:
        return {"kind": "omniglot", "root": str(self.root)}


def omniglot_dir(data_root: str | os.PathLike[str]) -> Path:
    """`<data_root>/omniglot`, or `data_root` itself when it already holds the Omniglot files."""
    root = Path(data_root)
    if (root / "omniglot").is_dir():
        return root / "omniglot"
    if any((root / f"images_{s}{ext}").exists() for s in OMNIGLOT_SUBSETS for ext in (".zip", "")):
        return root
    raise DataError(
        f"no Omniglot under {root}: expected {root / 'omniglot'}/images_background.zip and "
        f"images_evaluation.zip (the official files from github.com/brendenlake/omniglot, python/); "
        f"{_FETCH_HINT}"
    )


def _check_omniglot_counts(path: Path, subset: str, entries: list[Entry]) -> None:
    alphabets = len({e.domain for e in entries})
    characters = len({e.class_name for e in entries})
    got = (alphabets, characters, len(entries))
    want = OMNIGLOT_COUNTS[subset]
    if got != want:
        raise DataError(
            f"{path} holds {got[0]} alphabets / {got[1]} characters / {got[2]:,} images, but the "
            f"official images_{subset} holds {want[0]} / {want[1]} / {want[2]:,}: the file is partial "
            f"or not Omniglot. Replace it with the official images_{subset}.zip in {path.parent}/ "
            f"({_FETCH_HINT})"
        )


# --------------------------------------------------------------------------- image folders


class ImageFolderSource(_ContainerSource):
    """A folder or zip of images: `<domain>/<class>/<file>` or `<class>/<file>`.

    With `first_level="subset"` the layout must be `<subset>/<class>/<file>`: the first level
    becomes the item's subset (e.g. "train"/"test"), the class spans subsets, and the whole
    collection is one domain named after the root. A zip whose members all sit under one
    top-level folder is read as that folder. Every file is yielded; cleaning decides which are images.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, first_level: FirstLevel = "domain", name: str | None = None
    ) -> None:
        path = Path(path)
        if not path.exists():
            raise DataError(f"image collection {path} does not exist; pass a folder or a .zip")
        if first_level not in ("domain", "subset"):
            raise DataError(f"first_level={first_level!r} is not valid; use 'domain' or 'subset'")
        self.path = path
        self.first_level = first_level
        self._container = _Container(path)
        self._prefix = _common_top(self._container.names) if self._container.is_zip else ""
        root_name = self._prefix.rstrip("/") or (path.stem if self._container.is_zip else path.name)
        self.name = name or root_name
        self._entries = self._layout_entries(root_name)

    def _layout_entries(self, root_name: str) -> list[Entry]:
        rel = [n[len(self._prefix) :] for n in self._container.names]
        if not rel:
            raise DataError(f"{self.path} holds no files; expected <domain>/<class>/<image> or <class>/<image>")
        depths = Counter(len(PurePosixPath(r).parts) for r in rel)
        allowed = {3} if self.first_level == "subset" else {2, 3}
        depth = depths.most_common(1)[0][0]
        for r in rel:
            d = len(PurePosixPath(r).parts)
            if d not in allowed or d != depth:
                raise DataError(_layout_message(self.path, self._prefix + r, depths, self.first_level))
        entries = []
        for r, location in zip(rel, self._container.names):
            parts = PurePosixPath(r).parts
            if depth == 2:
                entries.append(Entry(root_name, parts[0], "", r, location))
            elif self.first_level == "subset":
                entries.append(Entry(root_name, parts[1], parts[0], r, location))
            else:
                entries.append(Entry(parts[0], f"{parts[0]}/{parts[1]}", "", r, location))
        # classes contiguous: a class spanning subsets must not be interleaved with others
        entries.sort(key=lambda e: (e.domain, e.class_name, e.subset, e.source_id))
        return entries

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"image-folder-v1 {self.first_level}\n".encode())
        self._container.fingerprint_into(h)
        return h.hexdigest()

    def describe(self) -> dict[str, str]:
        return {"kind": "image_folder", "root": str(self.path), "first_level": self.first_level}


def _common_top(names: list[str]) -> str:
    """'top/' when every zip member lives under one folder `top` (with class folders below), else ''."""
    tops = {PurePosixPath(n).parts[0] for n in names}
    if len(tops) == 1 and all(len(PurePosixPath(n).parts) > 2 for n in names):
        return f"{tops.pop()}/"
    return ""


def _layout_message(path: Path, offending: str, depths: Counter[int], first_level: str) -> str:
    want = (
        "<subset>/<class>/<image>"
        if first_level == "subset"
        else "either <domain>/<class>/<image> or <class>/<image> (not a mix)"
    )
    seen = ", ".join(f"{n} file(s) at depth {d}" for d, n in sorted(depths.items()))
    return (
        f"{path}: {offending!r} does not fit the layout; every file must be at {want}. "
        f"Found {seen}. Move or delete that file"
    )

"""Collections that come with split files: class folders (a zip or a folder) plus `{train,val,test}.csv`.

The split files list every image as `filename,label` (header included), label = the class folder;
they assign each class to one split, as the Ravi & Larochelle (ICLR 2017) miniImageNet CSVs do.
`read_split_files` parses and checks them; `SplitFileSource` yields the collection's files with
`subset` = their split ("" for a file in no split), so `prepare` can drop (and report) files in no
split and copies of an image already kept in an earlier split (see `cleaning.apply_split_rules`);
the "csv" split scheme (`splits.make_splits`) reads the same files to assign classes to splits.

Checks, each a DataError naming the value and the fix: a split file is missing or not
`filename,label`; a file is listed twice; a class is in two splits; a listed file is not in the
collection; a listed label is not the folder the file is in; two files share a name.

`miniimagenet_source(data_root)`: `<data_root>/miniimagenet/miniimagenet84.zip` with the split
files in `<data_root>/miniimagenet/splits/ravi/`. There is no download: the images come under
ImageNet's terms of access, so the error for an absent zip says where to put it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from fewshot.data.sources import Entry, _Container, _ContainerSource
from fewshot.errors import DataError

SPLIT_ORDER: tuple[str, ...] = ("train", "val", "test")  # an image in two splits is kept in the first
REQUIRED_SPLITS: tuple[str, ...] = ("train", "test")  # val.csv is optional (no validation split)
HEADER = ["filename", "label"]
MINIIMAGENET_ZIP = "miniimagenet84.zip"
MINIIMAGENET_SPLITS = Path("splits") / "ravi"
_MAX_NAMED = 5  # values quoted in an error before "..."


@dataclass(frozen=True)
class Listing:
    """Where one file is listed: its split, its label (class) and `file:line` for messages."""

    split: str
    label: str
    where: str


@dataclass(frozen=True)
class SplitFiles:
    """The parsed split files of one folder. `files`: file name -> its listing."""

    folder: Path
    files: dict[str, Listing]
    splits: tuple[str, ...]  # the split files present, in SPLIT_ORDER

    def class_splits(self) -> dict[str, Listing]:
        """label -> the first listing of that class (all of a class's listings share one split)."""
        out: dict[str, Listing] = {}
        for listing in self.files.values():
            out.setdefault(listing.label, listing)
        return out

    def fingerprint(self) -> str:
        h = hashlib.sha256(b"split-files-v1\n")
        for name in self.splits:
            h.update(name.encode() + b"\n" + (self.folder / f"{name}.csv").read_bytes())
        return h.hexdigest()


def read_split_files(folder: str | os.PathLike[str]) -> SplitFiles:
    """Parse `folder/{train,val,test}.csv`; every file once, every class in one split."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"split folder {folder} does not exist; point data.splits_dir / --splits-dir at the "
                        "folder holding train.csv, val.csv and test.csv (filename,label)")
    present = [s for s in SPLIT_ORDER if (folder / f"{s}.csv").is_file()]
    missing = [s for s in REQUIRED_SPLITS if s not in present]
    if missing:
        raise DataError(
            f"split file(s) {', '.join(f'{s}.csv' for s in missing)} missing in {folder}; a folder of "
            f"split files holds train.csv, test.csv and optionally val.csv, each `filename,label` "
            f"(set data.splits_dir / --splits-dir to that folder)"
        )
    files: dict[str, Listing] = {}
    split_of_class: dict[str, Listing] = {}
    for split in present:
        for listing, filename in _rows(folder / f"{split}.csv", split):
            if filename in files:
                raise DataError(f"{listing.where}: {filename!r} is already listed at {files[filename].where}; "
                                "list every file once (delete one of the lines)")
            first = split_of_class.setdefault(listing.label, listing)
            if first.split != split:
                raise DataError(
                    f"{listing.where}: class {listing.label!r} is also in split {first.split!r} "
                    f"({first.where}); few-shot splits are by class: move all of its files to one split file"
                )
            files[filename] = listing
    return SplitFiles(folder, files, tuple(present))


def _rows(path: Path, split: str) -> list[tuple[Listing, str]]:
    text = path.read_text(encoding="utf-8-sig")
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or [h.strip() for h in header] != HEADER:
        raise DataError(f"{path}:1: header {header!r} is not 'filename,label'; split files are CSV with that header")
    out = []
    for lineno, row in enumerate(reader, 2):
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        if len(cells) != 2 or not all(cells) or "/" in cells[0]:
            raise DataError(f"{path}:{lineno}: {','.join(row)!r} is not 'filename,label' "
                            "(a file name without folders, then its class); fix the line")
        out.append((Listing(split, cells[1], f"{path.name}:{lineno}"), cells[0]))
    return out


class SplitFileSource(_ContainerSource):
    """Class folders (`[<folders>/]<class>/<image>`, a zip or a folder) with split files.

    Every file is yielded (so the cleaning report accounts for all of them) with `subset` = its
    split, or "" when no split file lists it; `split_order` tells `prepare` which copy of an image
    found in two splits to keep (the one in the earlier split).
    """

    split_order = SPLIT_ORDER

    def __init__(self, path: str | os.PathLike[str], splits_dir: str | os.PathLike[str], *,
                 name: str | None = None) -> None:
        path = Path(path)
        if not path.exists():
            raise DataError(f"image collection {path} does not exist; pass a folder or a .zip of class folders")
        self.path = path
        self.splits = read_split_files(splits_dir)
        self._container = _Container(path)
        self.name = name or (path.stem if self._container.is_zip else path.name)
        self._entries = self._match(self._class_files())

    def _class_files(self) -> dict[str, tuple[str, str]]:
        """file name -> (class folder, location); all files share the folders above their class."""
        names = self._container.names
        if not names:
            raise DataError(f"{self.path} holds no files; expected [<folders>/]<class>/<image>")
        top = PurePosixPath(names[0]).parts[:-2]
        out: dict[str, tuple[str, str]] = {}
        for location in names:
            parts = PurePosixPath(location).parts
            if len(parts) < 2 or parts[:-2] != top:
                raise DataError(
                    f"{self.path}: {location!r} does not fit the layout {'/'.join((*top, '<class>', '<image>'))} "
                    f"of {names[0]!r}; every image must sit in a class folder at the same depth. Move or delete it"
                )
            if parts[-1] in out:
                raise DataError(f"{self.path}: two files are named {parts[-1]!r} ({out[parts[-1]][1]} and {location}); "
                                "split files list images by file name: rename one")
            out[parts[-1]] = (parts[-2], location)
        return out

    def _match(self, found: dict[str, tuple[str, str]]) -> list[Entry]:
        absent = [(lst.where, f) for f, lst in self.splits.files.items() if f not in found]
        if absent:
            named = ", ".join(f"{where} {f!r}" for where, f in absent[:_MAX_NAMED])
            raise DataError(
                f"{len(absent):,} file(s) named in the split files in {self.splits.folder} are not in "
                f"{self.path}: {named}{' ...' if len(absent) > _MAX_NAMED else ''}. The collection is partial "
                "or not the one the split files describe: replace it with the complete one, or delete those lines"
            )
        entries = []
        for filename, (cls, location) in found.items():
            listing = self.splits.files.get(filename)
            if listing is not None and listing.label != cls:
                raise DataError(f"{listing.where}: {filename!r} is labelled {listing.label!r} but sits in class "
                                f"folder {cls!r} of {self.path}; fix the label or move the file")
            split = listing.split if listing is not None else ""
            entries.append(Entry(self.name, cls, split, f"{cls}/{filename}", location))
        entries.sort(key=lambda e: (e.class_name, e.source_id))  # classes contiguous
        return entries

    def fingerprint(self) -> str:
        h = hashlib.sha256(b"split-file-source-v1\n")
        self._container.fingerprint_into(h)
        h.update(self.splits.fingerprint().encode())
        return h.hexdigest()

    def describe(self) -> dict[str, str]:
        return {"kind": "split_files", "root": str(self.path), "splits_dir": str(self.splits.folder)}


def miniimagenet_dir(data_root: str | os.PathLike[str]) -> Path:
    """`<data_root>/miniimagenet`, or `data_root` itself when it holds miniimagenet84.zip."""
    root = Path(data_root)
    return root if (root / MINIIMAGENET_ZIP).is_file() else root / "miniimagenet"


def miniimagenet_source(data_root: str | os.PathLike[str], splits_dir: str | os.PathLike[str] | None = None
                        ) -> SplitFileSource:
    """miniImageNet (Vinyals et al. 2016) at 84x84 with the Ravi & Larochelle class split (64/16/20)."""
    folder = miniimagenet_dir(data_root)
    zip_path, extracted = folder / MINIIMAGENET_ZIP, folder / Path(MINIIMAGENET_ZIP).stem
    path = zip_path if zip_path.is_file() else extracted
    if not path.exists():
        raise DataError(
            f"miniImageNet file {zip_path} is missing. Put miniimagenet84.zip (100 ImageNet classes x 600 "
            f"RGB JPEGs at 84x84, laid out miniimagenet84/images/<wnid>/<wnid><8 digits>.jpg; or that folder "
            f"extracted as {extracted}/) in {folder}/, and the Ravi & Larochelle split files train.csv, "
            f"val.csv, test.csv in {folder / MINIIMAGENET_SPLITS}/. There is no download: the images are "
            "ImageNet's (ILSVRC-2012 terms of access), so fetch them where you have access"
        )
    splits = Path(splits_dir) if splits_dir is not None else folder / MINIIMAGENET_SPLITS
    if not splits.is_dir():
        raise DataError(f"miniImageNet split folder {splits} is missing; put the Ravi & Larochelle train.csv, "
                        f"val.csv and test.csv (filename,label) there, or set data.splits_dir")
    return SplitFileSource(path, splits, name="miniimagenet")

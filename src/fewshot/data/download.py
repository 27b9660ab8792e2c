"""Download the official Omniglot zips, verified by checksum, written atomically.

The files come from github.com/brendenlake/omniglot (python/); the md5 values are the ones
torchvision checks. A download streams into a temporary sibling file which is renamed into place
only after its checksum matches, so an interrupted or corrupted download never leaves a file that
looks complete. Local files are validated by structure (see `sources.OmniglotSource`), not by
checksum: re-packed copies with identical images are accepted.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from fewshot.errors import DataError

OMNIGLOT_URL = "https://github.com/brendenlake/omniglot/raw/master/python/"


@dataclass(frozen=True)
class RemoteFile:
    name: str
    url: str
    md5: str


OMNIGLOT_FILES: tuple[RemoteFile, ...] = (
    RemoteFile(
        "images_background.zip",
        OMNIGLOT_URL + "images_background.zip",
        "68d2efa1b9178cc56df9314c21c6e718",
    ),
    RemoteFile(
        "images_evaluation.zip",
        OMNIGLOT_URL + "images_evaluation.zip",
        "6b91aef0f799c5bb55b94e3f2daec811",
    ),
)

Opener = Callable[..., IO[bytes]]


def download_file(
    url: str,
    dest: str | os.PathLike[str],
    *,
    md5: str,
    opener: Opener | None = None,
    timeout_s: float = 60.0,
    chunk_bytes: int = 1 << 20,
    progress: bool = True,
) -> Path:
    """Stream `url` to `dest`, verifying `md5`; `dest` appears only when complete and correct."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.part-{uuid.uuid4().hex[:8]}"
    open_url = opener or urllib.request.urlopen
    try:
        with open_url(url, timeout=timeout_s) as response, open(tmp, "wb") as fh:
            digest = _stream(response, fh, chunk_bytes, _total(response), progress, dest.name)
            fh.flush()
            os.fsync(fh.fileno())
        if digest != md5:
            raise DataError(
                f"{url} downloaded with md5 {digest}, expected {md5}: the download is corrupt or the "
                f"file changed upstream. Retry, or put the official {dest.name} in {dest.parent}/ by hand"
            )
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise DataError(
            f"could not download {url} ({exc}). Without a network, put the official {dest.name} "
            f"(github.com/brendenlake/omniglot, python/) in {dest.parent}/"
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def download_omniglot(
    data_root: str | os.PathLike[str],
    *,
    force: bool = False,
    opener: Opener | None = None,
    progress: bool = True,
    files: tuple[RemoteFile, ...] = OMNIGLOT_FILES,
) -> list[Path]:
    """Fetch the official Omniglot zips into `<data_root>/omniglot/`; existing files are kept
    unless `force` (they are validated by structure when prepared)."""
    folder = Path(data_root) / "omniglot"
    out = []
    for f in files:
        dest = folder / f.name
        if force or not dest.is_file():
            download_file(f.url, dest, md5=f.md5, opener=opener, progress=progress)
        out.append(dest)
    return out


def _total(response: Any) -> int | None:
    length = getattr(response, "headers", {}).get("Content-Length")
    return int(length) if length else None


def _stream(
    src: IO[bytes], dst: IO[bytes], chunk_bytes: int, total: int | None, progress: bool, label: str
) -> str:
    """Copy `src` to `dst` in chunks; returns the md5 hex of what was copied."""
    h = hashlib.md5(usedforsecurity=False)
    with tqdm(total=total, unit="B", unit_scale=True, desc=label, disable=not progress) as bar:
        while block := src.read(chunk_bytes):
            h.update(block)
            dst.write(block)
            bar.update(len(block))
    return h.hexdigest()

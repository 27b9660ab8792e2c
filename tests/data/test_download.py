from __future__ import annotations

import hashlib
import io
import urllib.error
from pathlib import Path

import pytest

from fewshot.data.download import OMNIGLOT_FILES, RemoteFile, download_file, download_omniglot
from fewshot.errors import DataError


def _md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def test_official_checksums() -> None:
    got = {f.name: f.md5 for f in OMNIGLOT_FILES}
    assert got == {
        "images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
        "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811",
    }


def test_download_file_url_verifies_and_renames(tmp_path: Path) -> None:
    payload = b"zipbytes" * 1000
    src = tmp_path / "remote.zip"
    src.write_bytes(payload)
    dest = download_file(src.as_uri(), tmp_path / "out" / "a.zip", md5=_md5(payload), chunk_bytes=100, progress=False)
    assert dest.read_bytes() == payload
    assert [p.name for p in dest.parent.iterdir()] == ["a.zip"]  # no temp file left


def test_checksum_mismatch_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "remote.zip"
    src.write_bytes(b"corrupt")
    with pytest.raises(DataError, match=r"md5 .* expected 0+"):
        download_file(src.as_uri(), tmp_path / "out" / "a.zip", md5="0" * 32, progress=False)
    assert list((tmp_path / "out").iterdir()) == []


def test_interrupted_stream_leaves_nothing(tmp_path: Path) -> None:
    class Broken(io.BytesIO):
        def read(self, n: int = -1) -> bytes:
            if self.tell() > 10:
                raise ConnectionResetError("peer reset")
            return super().read(5)

    def opener(url: str, timeout: float) -> Broken:
        return Broken(b"x" * 100)

    with pytest.raises(DataError, match="peer reset"):
        download_file("https://example.invalid/a.zip", tmp_path / "a.zip", md5="0" * 32, opener=opener, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_no_network_says_where_to_put_files(tmp_path: Path) -> None:
    def offline(url: str, timeout: float) -> io.BytesIO:
        raise urllib.error.URLError("Name or service not known")

    with pytest.raises(DataError) as err:
        download_omniglot(tmp_path, opener=offline, progress=False)
    msg = str(err.value)
    assert "images_background.zip" in msg and str(tmp_path / "omniglot") in msg


def test_download_omniglot_skips_existing_and_fetches_missing(tmp_path: Path) -> None:
    payload = b"evaluation"
    remote = tmp_path / "remote.zip"
    remote.write_bytes(payload)
    files = (
        RemoteFile("images_background.zip", "https://example.invalid/never", "0" * 32),
        RemoteFile("images_evaluation.zip", remote.as_uri(), _md5(payload)),
    )
    (tmp_path / "omniglot").mkdir()
    (tmp_path / "omniglot" / "images_background.zip").write_bytes(b"local copy")
    out = download_omniglot(tmp_path, files=files, progress=False)
    assert [p.read_bytes() for p in out] == [b"local copy", payload]

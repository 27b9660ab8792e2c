from __future__ import annotations

import os
from pathlib import Path

import pytest
from datamaker import fake_omniglot, image_bytes, write_folder, write_zip

from fewshot.data.sources import ImageFolderSource, OmniglotSource, source_fingerprint
from fewshot.errors import DataError


def test_omniglot_missing_dataset_names_files_and_download(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        OmniglotSource(tmp_path)
    msg = str(err.value)
    assert "images_background.zip" in msg and "images_evaluation.zip" in msg
    assert "--download" in msg


def test_omniglot_missing_one_zip(tmp_path: Path) -> None:
    fake_omniglot(tmp_path)
    (tmp_path / "omniglot" / "images_evaluation.zip").unlink()
    with pytest.raises(DataError, match=r"images_evaluation\.zip is missing"):
        OmniglotSource(tmp_path, check_counts=False)


def test_omniglot_wrong_counts_is_partial(tmp_path: Path) -> None:
    fake_omniglot(tmp_path)
    with pytest.raises(DataError, match=r"3 alphabets / 6 characters / 24 images.*30 / 964 / 19,280"):
        OmniglotSource(tmp_path)


def test_omniglot_wrong_layout_names_entry(tmp_path: Path) -> None:
    write_zip(tmp_path / "omniglot" / "images_background.zip", {"images_background/A/x.png": b"1"})
    write_zip(tmp_path / "omniglot" / "images_evaluation.zip", {"images_evaluation/B/character01/x.png": b"1"})
    with pytest.raises(DataError, match=r"'images_background/A/x.png' is not in the official layout"):
        OmniglotSource(tmp_path, check_counts=False)


def test_omniglot_items(tmp_path: Path) -> None:
    fake_omniglot(tmp_path, alphabets=2, chars=2, drawers=3)
    items = list(OmniglotSource(tmp_path, check_counts=False))
    assert len(items) == 2 * 2 * 2 * 3
    first = items[0]
    assert (first.domain, first.class_name, first.subset) == ("Alpha0", "Alpha0/character01", "background")
    assert first.source_id.startswith("images_background/Alpha0/character01/")
    assert first.data.startswith(b"\x89PNG")
    assert {i.subset for i in items[12:]} == {"evaluation"}


def test_omniglot_extracted_folders_match_zips(tmp_path: Path) -> None:
    import zipfile

    fake_omniglot(tmp_path / "z")
    for s in ("background", "evaluation"):
        with zipfile.ZipFile(tmp_path / "z" / "omniglot" / f"images_{s}.zip") as zf:
            zf.extractall(tmp_path / "f" / "omniglot")
    from_zip = [(i.class_name, i.source_id, i.data) for i in OmniglotSource(tmp_path / "z", check_counts=False)]
    from_dir = [(i.class_name, i.source_id, i.data) for i in OmniglotSource(tmp_path / "f", check_counts=False)]
    assert from_zip == from_dir


def test_folder_two_level_is_one_domain(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "pets", {"cat/a.png": image_bytes(1), "dog/b.png": image_bytes(2)})
    items = list(ImageFolderSource(root))
    assert [(i.domain, i.class_name, i.subset) for i in items] == [("pets", "cat", ""), ("pets", "dog", "")]


def test_folder_three_level_domains(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "c", {"birds/owl/a.png": b"x", "cars/vw/b.jpg": b"y", "cars/vw/notes.txt": b"z"})
    items = list(ImageFolderSource(root))
    assert [(i.domain, i.class_name) for i in items] == [("birds", "birds/owl"), ("cars", "cars/vw"), ("cars", "cars/vw")]
    assert items[2].source_id == "cars/vw/notes.txt"  # every file is yielded; cleaning decides


def test_folder_mixed_layout_names_offending_path(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "c", {"a/b/1.png": b"x", "a/b/2.png": b"x", "a/3.png": b"x"})
    with pytest.raises(DataError, match=r"'a/3.png' does not fit the layout"):
        ImageFolderSource(root)


def test_folder_file_at_root_is_wrong_layout(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "c", {"cls/1.png": b"x", "README": b"x"})
    with pytest.raises(DataError, match="'README'"):
        ImageFolderSource(root)


def test_zip_with_subset_first_level(tmp_path: Path) -> None:
    layout = {
        "cifar/train/cat/0.jpg": image_bytes(1, "JPEG", mode="RGB"),
        "cifar/train/dog/0.jpg": image_bytes(2, "JPEG", mode="RGB"),
        "cifar/test/cat/0.jpg": image_bytes(3, "JPEG", mode="RGB"),
    }
    z = write_zip(tmp_path / "cifar.zip", layout)
    items = list(ImageFolderSource(z, first_level="subset"))
    assert [(i.domain, i.class_name, i.subset) for i in items] == [
        ("cifar", "cat", "test"), ("cifar", "cat", "train"), ("cifar", "dog", "train"),
    ]
    as_domains = list(ImageFolderSource(z))
    assert {i.domain for i in as_domains} == {"train", "test"}


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderSource(tmp_path / "nope")


def test_fingerprint_changes_with_content_and_is_stable(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "c", {"cls/1.png": image_bytes(1), "cls/2.png": image_bytes(2)})
    fp = source_fingerprint(ImageFolderSource(root))
    assert fp == source_fingerprint(ImageFolderSource(root))
    (root / "cls" / "2.png").write_bytes(image_bytes(3))
    os.utime(root / "cls" / "2.png", ns=(1, 1))
    assert source_fingerprint(ImageFolderSource(root)) != fp

    fake_omniglot(tmp_path / "o")
    ofp = source_fingerprint(OmniglotSource(tmp_path / "o", check_counts=False))
    z = tmp_path / "o" / "omniglot" / "images_evaluation.zip"
    write_zip(z, {"images_evaluation/A/character01/x.png": image_bytes(9)})
    assert source_fingerprint(OmniglotSource(tmp_path / "o", check_counts=False)) != ofp

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from datamaker import image_bytes, write_folder
from PIL import Image

from fewshot.data.cleaning import (
    KEPT,
    REASONS,
    CleaningConfig,
    CleaningReport,
    apply_class_rules,
    dhash64,
    inspect_batch,
)
from fewshot.data.imageio import Preprocessing
from fewshot.data.prepare import prepare
from fewshot.errors import ConfigError


def _png_header_only(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    head = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return head + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


def _alpha_png() -> bytes:
    arr = np.zeros((24, 24, 4), dtype=np.uint8)
    arr[..., 3] = 0  # fully transparent: lands on white
    arr[4:8, 4:8] = (255, 0, 0, 255)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGBA").save(buf, "PNG")
    return buf.getvalue()


def _same_pixels_as_bmp(png: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).save(buf, "BMP")
    return buf.getvalue()


@pytest.fixture()
def messy_folder(tmp_path: Path) -> Path:
    good = image_bytes(1)
    truncated = image_bytes(2)
    layout = {
        "formats/png.png": good,
        "formats/jpeg.jpg": image_bytes(3, "JPEG", mode="RGB"),
        "formats/webp.webp": image_bytes(4, "WEBP", mode="RGB"),
        "formats/bmp.bmp": image_bytes(5, "BMP"),
        "formats/gif.gif": image_bytes(6, "GIF", mode="P"),
        "formats/png16.png": image_bytes(7, mode="I;16"),
        "formats/palette.png": image_bytes(8, mode="P"),
        "formats/alpha.png": _alpha_png(),
        "formats/z_dup_bytes.png": good,
        "formats/z_dup_pixels.bmp": _same_pixels_as_bmp(good),
        "formats/truncated.png": truncated[: len(truncated) // 2],
        "formats/empty.png": b"",
        "formats/notes.txt": b"not an image at all",
        "formats/tiff.tif": image_bytes(9, "TIFF"),
        "formats/tiny.png": image_bytes(10, size=4),
        "formats/bomb.png": _png_header_only(10_000, 10_000),  # 100 MP, over the 40 MP limit
        "lonely/one.png": image_bytes(11),
        "lonely/broken.png": b"garbage",
    }
    return write_folder(tmp_path / "messy", layout)


def test_every_file_accounted_for_with_its_reason(messy_folder: Path, tmp_path: Path) -> None:
    prepared = prepare(messy_folder, tmp_path / "cache", Preprocessing("RGB", 16), progress=False, workers=0)
    status = {Path(r.source_id).name: r.status for r in prepared.report.records}
    assert status == {
        "png.png": KEPT, "jpeg.jpg": KEPT, "webp.webp": KEPT, "bmp.bmp": KEPT, "gif.gif": KEPT,
        "png16.png": KEPT, "palette.png": KEPT, "alpha.png": KEPT,
        "z_dup_bytes.png": "duplicate", "z_dup_pixels.bmp": "duplicate",
        "truncated.png": "truncated", "empty.png": "zero_size", "notes.txt": "not_an_image",
        "tiff.tif": "not_an_image", "tiny.png": "too_small", "bomb.png": "unreadable",
        "one.png": "class_too_small", "broken.png": "not_an_image",
    }
    report = prepared.report
    assert report.n_files == 18 and report.n_kept == 8 == len(prepared.cache)
    summary = report.summary()
    assert sum(summary["by_status"].values()) == report.n_files
    dup = {Path(r.source_id).name: r.detail for r in report.dropped("duplicate")}
    assert "formats/png.png" in dup["z_dup_bytes.png"] and "formats/png.png" in dup["z_dup_pixels.bmp"]
    assert "min_images_per_class=2" in report.dropped("class_too_small")[0].detail
    assert [c.name for c in prepared.cache.classes] == ["formats"]
    # the alpha image went onto white: transparent corner is white in the cache
    row = prepared.cache.files.index("formats/alpha.png")
    assert prepared.cache.images[row, :, 0, 0].tolist() == [255, 255, 255]


def test_report_json_roundtrip_and_table(messy_folder: Path, tmp_path: Path) -> None:
    report = prepare(messy_folder, tmp_path / "cache", progress=False, workers=0).report
    path = report.save(tmp_path / "r.json")
    again = CleaningReport.load(path)
    assert again.records == report.records and again.summary() == report.summary()
    table = report.table()
    assert "| **files** | 18 | 18 |" in table
    for reason in REASONS:
        assert f"| {reason} |" in table


def test_class_rules_keep_first_duplicate_and_drop_small_classes() -> None:
    classes = ["a", "a", "a", "b", "b"]
    ids = ["a/1", "a/2", "a/3", "b/1", "b/2"]
    status = [KEPT, KEPT, KEPT, KEPT, "truncated"]
    detail = [""] * 5
    apply_class_rules(classes, ids, status, detail, ["h1", "h2", "h1", "h3", ""], min_images_per_class=2)
    assert status == [KEPT, KEPT, "duplicate", "class_too_small", "truncated"]
    assert "a/1" in detail[2]


def test_min_side_config(tmp_path: Path) -> None:
    batch = inspect_batch([image_bytes(1, size=12)], ["x"], Preprocessing(), min_side=16)
    assert batch.status == ["too_small"] and "12x12" in batch.detail[0]
    with pytest.raises(ConfigError, match="min_images_per_class=0"):
        CleaningConfig(min_images_per_class=0)


def test_dhash_separates_similar_from_different() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    noisy = np.clip(a.astype(int) + rng.integers(-3, 4, a.shape), 0, 255).astype(np.uint8)
    b = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    assert bin(dhash64(a) ^ dhash64(noisy)).count("1") <= 4
    assert bin(dhash64(a) ^ dhash64(b)).count("1") > 16
    assert 0 <= dhash64(np.zeros((3, 5), dtype=np.uint8)) < 2**64  # tiny images work
    assert dhash64(np.stack([a] * 3, axis=-1)) == dhash64(a)  # gray RGB == gray


def test_exif_orientation_is_applied_like_decode_image() -> None:
    from fewshot.data.imageio import decode_image

    arr = np.zeros((16, 32, 3), dtype=np.uint8)
    arr[:, :8] = 255  # a white band on the left of a wide image
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise when displayed
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    data = buf.getvalue()
    pre = Preprocessing("L", 16)
    batch = inspect_batch([data], ["rot.jpg"], pre, min_side=8)
    np.testing.assert_array_equal(batch.images[0], decode_image(data, pre))
    assert batch.images[0, 0, :4].mean() > 200 > batch.images[0, 0, -4:].mean()  # band now on top

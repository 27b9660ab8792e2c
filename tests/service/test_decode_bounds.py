"""Decoding is bounded whatever the bytes say: forged headers, extreme shapes, deep bit depths,
huge alpha or palette images, phone-camera MPO files."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
from hostile_images import (
    decode_cost,
    forged_png,
    large_jpeg,
    mpo_bytes,
    palette_png,
    rgba_png,
    sixteen_bit_png,
    tiny_wide_png,
)
from PIL import Image

from fewshot.data.imageio import MAX_ASPECT_RATIO, Preprocessing, shrink
from fewshot.service.images import UploadError, decode_upload

PRE = Preprocessing(mode="L", size=28)


def decode(data: bytes, pre: Preprocessing = PRE, max_pixels: int = 25_000_000):  # type: ignore[no-untyped-def]
    return decode_upload(data, pre, max_pixels=max_pixels, thumbnail_size=64, name="up.png")


def test_a_69_byte_png_declaring_20_million_pixels_in_a_row_is_refused_before_decoding() -> None:
    data = tiny_wide_png()
    assert len(data) < 100
    with pytest.raises(UploadError) as e:
        decode(data)
    assert e.value.status == 413 and e.value.code == "image_too_large" and f"{MAX_ASPECT_RATIO}:1" in str(e.value)


@pytest.mark.parametrize("w, h", [(2000, 99), (99, 2000)])
def test_extreme_aspect_ratios_are_refused(w: int, h: int) -> None:
    with pytest.raises(UploadError) as e:
        decode(forged_png(w, h))
    assert e.value.status == 413


def test_pixel_limit_applies_before_decoding_and_truncated_data_is_a_400() -> None:
    with pytest.raises(UploadError) as e:
        decode(forged_png(3000, 3000), max_pixels=1_000_000)
    assert e.value.status == 413 and "exceeds the limit" in str(e.value)
    with pytest.raises(UploadError) as e:
        decode(forged_png(900, 900, bit_depth=16, colour_type=6))  # plausible header, truncated data
    assert e.value.status == 400 and e.value.code == "corrupt_image"


def test_sixteen_bit_images_scale_like_before_without_float_copies() -> None:
    deep = np.array([[0, 257, 40_000, 65_535]], np.uint16).repeat(4, 0)
    buf = io.BytesIO()
    Image.fromarray(deep).save(buf, format="PNG")
    got = decode(buf.getvalue(), Preprocessing(mode="L", size=4, resample="nearest")).array[0]
    np.testing.assert_array_equal(got[0], [0, 1, 155, 255])  # v * 255 // 65535
    shallow = np.array([[0, 7, 200, 255]], np.uint16).repeat(4, 0)  # fits in 8 bits: kept as is
    buf = io.BytesIO()
    Image.fromarray(shallow).save(buf, format="PNG")
    got = decode(buf.getvalue(), Preprocessing(mode="L", size=4, resample="nearest")).array[0]
    np.testing.assert_array_equal(got[0], [0, 7, 200, 255])


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_shrink_by_strips_equals_one_whole_image_reduce(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import fewshot.data.imageio as imageio

    monkeypatch.setattr(imageio, "_STRIP_BYTES", 50_000)  # many strips
    rng = np.random.default_rng(0)
    bands = {"L": (), "RGB": (3,), "RGBA": (4,)}[mode]
    img = Image.fromarray(rng.integers(0, 256, (1237, 913, *bands), dtype=np.uint8), mode)
    fx, fy = 913 // 56, 1237 // 56
    np.testing.assert_array_equal(np.asarray(shrink(img, 28)), np.asarray(img.reduce((fx, fy))))


def test_phone_camera_mpo_and_huge_jpegs_are_accepted() -> None:
    d = decode(mpo_bytes())
    assert d.array.shape == (1, 28, 28) and d.preview.shape[2] == 3
    big = decode(large_jpeg(8000, 6000))  # 48 MP, decoded at 1/8 scale: under the pixel limit
    assert big.array.shape == (1, 28, 28)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the peak RSS")
@pytest.mark.parametrize("case", ["tiny wide png", "16-bit 5000x5000 png", "rgba 5000x5000 png",
                                  "palette+alpha 5000x5000 png", "48 MP jpeg"])
def test_no_upload_raises_peak_memory_by_200_mb(case: str, tmp_path: object) -> None:
    data = {"tiny wide png": tiny_wide_png, "16-bit 5000x5000 png": lambda: sixteen_bit_png(5000),
            "rgba 5000x5000 png": lambda: rgba_png(5000), "palette+alpha 5000x5000 png": lambda: palette_png(5000),
            "48 MP jpeg": lambda: large_jpeg(8000, 6000)}[case]()
    for mode, size in (("L", 28), ("RGB", 84)):
        peak_mb, _, outcome = decode_cost(data, str(tmp_path), mode, size)
        assert peak_mb < 200, f"{case} ({mode} {size}): peak +{peak_mb:.0f} MB ({outcome})"

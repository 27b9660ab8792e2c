"""Decoding is bounded whatever the bytes say: forged headers, extreme shapes, deep bit depths,
huge alpha or palette images, phone-camera MPO files."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
from hostile_images import (
    decode_cost,
    decode_costs,
    forged_png,
    jpeg_segments,
    large_jpeg,
    lossless_webp,
    mpo_bytes,
    noninterleaved_baseline_jpeg,
    palette_png,
    progressive_scan_bomb,
    rgba_png,
    rle8_bmp,
    sixteen_bit_png,
    tiny_wide_png,
)
from PIL import Image

from fewshot.data.imageio import (
    MAX_ASPECT_RATIO,
    MAX_JPEG_SCANS,
    Preprocessing,
    jpeg_layout,
    shrink,
)
from fewshot.service.http.errors import status_of
from fewshot.service.images import UploadError, decode_upload

PRE = Preprocessing(mode="L", size=28)


def decode(data: bytes, pre: Preprocessing = PRE, max_pixels: int = 25_000_000):  # type: ignore[no-untyped-def]
    return decode_upload(data, pre, max_pixels=max_pixels, thumbnail_size=64, name="up.png")


def test_a_69_byte_png_declaring_20_million_pixels_in_a_row_is_refused_before_decoding() -> None:
    data = tiny_wide_png()
    assert len(data) < 100
    with pytest.raises(UploadError) as e:
        decode(data)
    assert status_of(e.value)[0] == 413 and status_of(e.value)[1] == "image_too_large" and f"{MAX_ASPECT_RATIO}:1" in str(e.value)


@pytest.mark.parametrize("w, h", [(2000, 99), (99, 2000)])
def test_extreme_aspect_ratios_are_refused(w: int, h: int) -> None:
    with pytest.raises(UploadError) as e:
        decode(forged_png(w, h))
    assert status_of(e.value)[0] == 413


def test_pixel_limit_applies_before_decoding_and_truncated_data_is_a_400() -> None:
    with pytest.raises(UploadError) as e:
        decode(forged_png(3000, 3000), max_pixels=1_000_000)
    assert status_of(e.value)[0] == 413 and "exceeds the limit" in str(e.value)
    with pytest.raises(UploadError) as e:
        decode(forged_png(900, 900, bit_depth=16, colour_type=6))  # plausible header, truncated data
    assert status_of(e.value)[0] == 400 and status_of(e.value)[1] == "corrupt_image"


def test_sixteen_bit_images_scale_by_their_bit_depth_without_float_copies() -> None:
    deep = np.array([[0, 257, 40_000, 65_535]], np.uint16).repeat(4, 0)
    buf = io.BytesIO()
    Image.fromarray(deep).save(buf, format="PNG")
    got = decode(buf.getvalue(), Preprocessing(mode="L", size=4, resample="nearest")).array[0]
    np.testing.assert_array_equal(got[0], [0, 1, 155, 255])  # v * 255 // 65535
    dark = np.array([[0, 255, 256, 514]], np.uint16).repeat(4, 0)  # a dark 16-bit image stays dark:
    buf = io.BytesIO()  # the scale is 16 bits whatever the content (no cliff between 255 and 256)
    Image.fromarray(dark).save(buf, format="PNG")
    got = decode(buf.getvalue(), Preprocessing(mode="L", size=4, resample="nearest")).array[0]
    np.testing.assert_array_equal(got[0], [0, 0, 0, 2])


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


def _jpeg(w: int, h: int, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (90, 120, 30)).save(buf, format="JPEG", **kw)
    return buf.getvalue()


def test_progressive_jpegs_get_no_reduced_scale_allowance() -> None:
    """libjpeg keeps a progressive file's full-size coefficients: its declared size must fit the limit."""
    assert decode(_jpeg(2000, 1000), max_pixels=1_000_000).array.shape == (1, 28, 28)  # baseline: drafted
    with pytest.raises(UploadError) as e:
        decode(_jpeg(2000, 1000, progressive=True), max_pixels=1_000_000)
    assert status_of(e.value)[0] == 413


@pytest.mark.parametrize("w, h", [(40, 30), (400, 300), (4000, 3000)])
def test_exif_orientation_is_applied_at_every_size(w: int, h: int) -> None:
    """Left half black, right half white, stored with orientation 6 (rotate 90 clockwise to display):
    the model input has black on top whatever the resolution (the reduced copy has no EXIF)."""
    img = Image.new("L", (w, h), 255)
    img.paste(0, (0, 0, w // 2, h))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    d = decode_upload(buf.getvalue(), Preprocessing(mode="L", size=28), max_pixels=25_000_000,
                      thumbnail_size=64, name="rotated.jpg")
    a = d.array[0].astype(int)
    assert a[:10].mean() < 60 and a[-10:].mean() > 200, (a[:10].mean(), a[-10:].mean())
    thumb = Image.open(io.BytesIO(d.thumbnail_png))
    assert thumb.size[1] > thumb.size[0]  # displayed upright: taller than wide


@pytest.mark.parametrize("w, h, want", [(640, 480, (64, 48)), (1000, 300, (64, 19)), (4000, 3000, (64, 48))])
def test_thumbnails_keep_the_aspect_ratio(w: int, h: int, want: tuple[int, int]) -> None:
    d = decode(_jpeg(w, h))
    assert Image.open(io.BytesIO(d.thumbnail_png)).size == want


# -- decoding cost, not only pixels (issue 16: #2 progressive scans, #3 buffered JPEG, WebP, RLE BMP) --
def test_a_progressive_jpeg_with_a_scan_repeated_hundreds_of_times_is_refused_before_decoding() -> None:
    data = progressive_scan_bomb(600, 300)  # a valid file: each repeat is a pass over every block
    with pytest.raises(UploadError) as e:
        decode(data)
    assert status_of(e.value)[0] == 413 and f"more than {MAX_JPEG_SCANS} scans" in str(e.value)
    ordinary = progressive_scan_bomb(600, 0)  # the 10 scans libjpeg writes
    assert jpeg_layout(ordinary).process == "progressive" and jpeg_layout(ordinary).scans == 10 and decode(ordinary).array.shape == (1, 28, 28)


def test_a_multi_scan_baseline_jpeg_gets_no_reduced_scale_allowance() -> None:
    """Each component in its own scan: libjpeg buffers full-size coefficients, as for progressive."""
    layout = jpeg_layout(noninterleaved_baseline_jpeg(64, 64))
    assert (layout.process, layout.scans, layout.buffered) == ("baseline", 3, True)
    with pytest.raises(UploadError) as e:
        decode(noninterleaved_baseline_jpeg(2000, 1000), max_pixels=1_000_000)  # 2 MP: would draft to 1/8
    assert status_of(e.value)[0] == 413 and "3 scans" in str(e.value)
    assert decode(noninterleaved_baseline_jpeg(1000, 1000), max_pixels=1_000_000).array.shape == (1, 28, 28)
    assert decode(_jpeg(2000, 1000), max_pixels=1_000_000).array.shape == (1, 28, 28)  # one scan: drafted


def test_buffered_jpeg_coefficients_are_bounded_by_component_count() -> None:
    with pytest.raises(UploadError) as e:  # 4 full-resolution components of 810,000 pixels: 3.24 M coefficients
        decode(noninterleaved_baseline_jpeg(900, 900, components=4), max_pixels=1_000_000)
    assert status_of(e.value)[0] == 413 and "coefficients" in str(e.value)


def test_lossless_and_hierarchical_jpegs_are_refused() -> None:
    lossless = noninterleaved_baseline_jpeg(64, 64).replace(b"\xff\xc0", b"\xff\xc3", 1)
    with pytest.raises(UploadError) as e:
        decode(lossless)
    assert status_of(e.value)[0] == 415 and "lossless JPEG" in str(e.value)


def test_mpo_scans_of_the_first_frame_only_are_counted() -> None:
    data = mpo_bytes()
    assert jpeg_layout(data).scans == 1
    assert [m for m, _, _ in jpeg_segments(data)].count(0xDA) == 1


def test_webp_gets_a_quarter_of_the_pixel_limit() -> None:
    """WebP cannot decode at a reduced scale (a 1 KB lossless 5000x5000 file cost +318 MB)."""
    with pytest.raises(UploadError) as e:
        decode(lossless_webp(1100), max_pixels=4_000_000)
    assert status_of(e.value)[0] == 413 and "WebP" in str(e.value) and "1,000,000" in str(e.value)
    assert decode(lossless_webp(1000), max_pixels=4_000_000).array.shape == (1, 28, 28)


def test_rle_bmp_is_bounded_to_a_megapixel() -> None:
    """Pillow decodes RLE BMP in pure Python: a 5.5 KB file cost 2.9 s."""
    with pytest.raises(UploadError) as e:
        decode(rle8_bmp(1100, 1000))
    assert status_of(e.value)[0] == 413 and "run-length" in str(e.value)
    assert decode(rle8_bmp(300, 200)).array.shape == (1, 28, 28)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the peak RSS")
@pytest.mark.parametrize("case", ["progressive 5000x5000, 20 scans", "3-scan baseline 5000x5000",
                                  "4-component 3-scan baseline 4330x4330", "lossless WebP 2500x2500",
                                  "RLE8 BMP 1000x1000", "scan bomb 5000x5000 x3000"])
def test_accepted_formats_cost_at_most_200_mb_and_2_s_of_cpu(case: str, tmp_path: object) -> None:
    data = {"progressive 5000x5000, 20 scans": lambda: progressive_scan_bomb(5000, 10),
            "3-scan baseline 5000x5000": lambda: noninterleaved_baseline_jpeg(5000, 5000),
            "4-component 3-scan baseline 4330x4330": lambda: noninterleaved_baseline_jpeg(4330, 4330, 4),
            "lossless WebP 2500x2500": lambda: lossless_webp(2500),
            "RLE8 BMP 1000x1000": lambda: rle8_bmp(1000, 1000),
            "scan bomb 5000x5000 x3000": lambda: progressive_scan_bomb(5000, 3000)}[case]()
    peak_mb, _, cpu_s, outcome = decode_costs(data, str(tmp_path), "RGB", 84)
    assert peak_mb < 200 and cpu_s < 2.0, f"{case}: peak +{peak_mb:.0f} MB, {cpu_s:.2f} s CPU ({outcome})"

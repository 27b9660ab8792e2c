"""Bounded decoding: an image file's bytes -> an opened Pillow image, refused before any pixel is
decoded when it would cost too much.

Decoding is bounded before any pixel is decoded: at most `max_pixels` pixels, an aspect ratio of at
most 20:1, the first frame only; a JPEG's markers are read first (at most 20 scans; a progressive or
multi-scan file keeps full-size coefficients, so it gets no reduced-scale allowance and at most
3 x max_pixels coefficients), WebP (decoded at full size) gets max_pixels / 4, RLE BMP (a pure-Python
decoder) 1 MP. Single-scan JPEGs decode at a reduced scale (`draft_to`). Formats are checked by
content, never by file name.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from fewshot.errors import ImageError

ACCEPTED_FORMATS: frozenset[str] = frozenset({"PNG", "JPEG", "MPO", "WEBP", "BMP", "GIF"})  # MPO: phone-camera JPEG
DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: far above any photo a user teaches with
MAX_ASPECT_RATIO = 20  # longest / shortest side; a 1 x 20,000,000 "image" is not a picture
JPEG_DRAFT_PIXELS = 4  # a single-scan baseline JPEG may declare 4x max_pixels: it decodes at a reduced scale
MAX_JPEG_SCANS = 20  # each scan is a pass over every block: libjpeg writes 10 (colour) or 6 (grey) progressive
MAX_JPEG_SEGMENTS = 1000  # markers before the first image's end; real files have a few dozen
JPEG_COEFFICIENT_SAMPLES = 3  # a multi-scan JPEG buffers every coefficient (2 bytes each): at most 3 x max_pixels
WEBP_PIXEL_DIVISOR = 4  # WebP decodes at full size (~15 bytes a pixel in libwebp): at most max_pixels / 4
RLE_BMP_MAX_PIXELS = 1_000_000  # Pillow decodes RLE BMP in pure Python (~0.5 s a megapixel)
_ACCEPTED_SOF = {0xC0: "baseline", 0xC1: "extended sequential", 0xC2: "progressive",
                 0xC9: "arithmetic sequential", 0xCA: "arithmetic progressive"}
_OTHER_SOF = {0xC3: "lossless", 0xC5: "hierarchical", 0xC6: "hierarchical", 0xC7: "hierarchical",
              0xCB: "lossless", 0xCD: "hierarchical", 0xCE: "hierarchical", 0xCF: "hierarchical"}
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # in entropy-coded data: not stuffing, restart or fill


class ImageTooLarge(ImageError):
    """More pixels (or a more extreme shape) than decoding is allowed to cost."""


class UnsupportedImage(ImageError):
    """Not an image, or a format that is not accepted."""


@dataclass(frozen=True)
class JpegLayout:
    """What decoding a JPEG's first image will cost, read from its markers before any decoding."""

    process: str  # "baseline", "progressive", ...
    scans: int  # SOS markers of the first image
    sample_fraction: float  # coefficients per image pixel, all components: sum of H_i V_i / (Hmax Vmax)

    @property
    def buffered(self) -> bool:
        """libjpeg keeps every full-resolution coefficient (progressive, or several scans) whatever
        the reduced scale asked for."""
        return self.process.endswith("progressive") or self.scans > 1


def jpeg_layout(data: bytes, name: str = "image") -> JpegLayout:
    """Scan a JPEG's markers (up to the first image's end, so an MPO's first frame): its coding
    process, its number of scans and its sampling. Refuses lossless and hierarchical JPEGs (415),
    more than MAX_JPEG_SCANS scans and more than MAX_JPEG_SEGMENTS markers (413) before decoding.
    Malformed structure is left to the decoder to report."""
    process, scans, fraction, segments, i, n = None, 0, 1.0, 0, 2, len(data)
    while i + 4 <= n and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xD9:  # EOI
            break
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise ImageTooLarge(f"{name}: JPEG with more than {MAX_JPEG_SEGMENTS:,} markers; re-save the image")
        end = i + 2 + int.from_bytes(data[i + 2:i + 4], "big")
        if marker in _OTHER_SOF:
            raise UnsupportedImage(f"{name}: {_OTHER_SOF[marker]} JPEG is not accepted; re-save it as an ordinary "
                                   "(baseline or progressive) JPEG, or as PNG")
        if marker in _ACCEPTED_SOF and process is None:
            process = _ACCEPTED_SOF[marker]
            ncomp = data[i + 9] if i + 9 < n else 0
            factors = [(data[i + 11 + 3 * c] >> 4, data[i + 11 + 3 * c] & 15) for c in range(ncomp)
                       if i + 11 + 3 * c < n]
            hmax, vmax = max((h for h, _ in factors), default=1) or 1, max((v for _, v in factors), default=1) or 1
            fraction = sum(h * v for h, v in factors) / (hmax * vmax) if factors else 1.0
        if marker == 0xDA:  # a scan: its entropy-coded data runs to the next marker
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise ImageTooLarge(f"{name}: JPEG with more than {MAX_JPEG_SCANS} scans (the limit); each scan is a "
                                    "pass over the whole image. Re-save it as a baseline or standard progressive JPEG")
            m = _NEXT_MARKER.search(data, end)
            end = m.start() if m else n
        i = end
    return JpegLayout(process or "unknown", scans, fraction)


def _check_shape(name: str, w: int, h: int, max_pixels: int, why: str = "",
                 fix: str = "downscale the image before uploading") -> None:
    if w < 1 or h < 1:
        raise ImageTooLarge(f"{name}: {w}x{h} has no pixels; upload a real image")
    if w * h > max_pixels:
        raise ImageTooLarge(f"{name}: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,}"
                            f"{' ' + why if why else ''}; {fix}")
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise ImageTooLarge(f"{name}: {w}x{h} is more than {MAX_ASPECT_RATIO}:1; crop it to the object "
                            "before uploading")


def _check_jpeg_cost(data: bytes, img: Image.Image, name: str, max_pixels: int, draft_to: int | None) -> None:
    """Bound a JPEG's decoding before it starts: its scans (each a pass over every block), and for a
    buffered file (progressive, or several scans) its coefficient memory and no reduced-scale
    allowance; a single-scan baseline file may declare JPEG_DRAFT_PIXELS x max_pixels, since it
    decodes at 1/2^k scale. Then asks Pillow for the reduced scale (`draft_to`)."""
    layout = jpeg_layout(data, name)
    w, h = img.size
    if layout.buffered:
        samples = int(w * h * layout.sample_fraction)
        limit = JPEG_COEFFICIENT_SAMPLES * max_pixels
        if samples > limit:
            raise ImageTooLarge(f"{name}: this {layout.process} JPEG ({layout.scans} scans, {w}x{h}) keeps "
                                f"{samples:,} coefficients in memory while decoding, over the limit of {limit:,}; "
                                "downscale it or save it as a single-scan baseline JPEG")
        _check_shape(name, w, h, max_pixels, why=f"for a {layout.process} JPEG with {layout.scans} scans",
                     fix="downscale it, or save it as a single-scan baseline JPEG")
    elif draft_to:
        _check_shape(name, w, h, max_pixels * JPEG_DRAFT_PIXELS)
    if draft_to:
        img.draft(img.mode, (draft_to, draft_to))


def open_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image",
               draft_to: int | None = None) -> Image.Image:
    """Open and decode the first frame of `data`, refusing non-images, unknown formats, decompression
    bombs, more than `max_pixels` pixels and extreme aspect ratios *before* decoding any pixel data.
    draft_to: JPEGs are decoded at the smallest 1/2^k scale whose sides stay >= draft_to, and the
    pixel limit applies to that reduced size (a 48 MP phone photo decodes at 1/8 scale)."""
    if len(data) == 0:
        raise ImageError(f"{name}: file is empty (zero bytes); upload a PNG, JPEG, WebP, BMP or GIF")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
            fmt = img.format or "unknown"
            if fmt not in ACCEPTED_FORMATS:
                raise UnsupportedImage(f"{name}: format {fmt} is not accepted; use one of {sorted(ACCEPTED_FORMATS)}")
            if fmt in ("JPEG", "MPO"):
                _check_jpeg_cost(data, img, name, max_pixels, draft_to)
            elif fmt == "WEBP":  # no reduced-scale decoding: full-size RGBA plus libwebp's own buffers
                _check_shape(name, *img.size, max_pixels // WEBP_PIXEL_DIVISOR, why="for WebP (decoded at full size)",
                             fix="downscale it, or send it as JPEG or PNG")
            elif fmt == "BMP" and img.tile and img.tile[0][0] == "bmp_rle":
                _check_shape(name, *img.size, min(max_pixels, RLE_BMP_MAX_PIXELS),
                             why="for run-length-encoded BMP (a slow decoder)", fix="send it as PNG")
            _check_shape(name, *img.size, max_pixels)
            img.load()  # the first frame only (GIF, WebP, MPO): later frames are never decoded
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"{name}: refused as a decompression bomb ({exc}); images may have at most "
                            f"{max_pixels:,} pixels") from exc
    except UnidentifiedImageError as exc:
        raise UnsupportedImage(f"{name}: not an image in an accepted format; use one of "
                               f"{sorted(ACCEPTED_FORMATS)}") from exc
    except Exception as exc:  # PIL raises many types for corrupt data
        raise ImageError(f"{name}: not a readable image ({type(exc).__name__}: {exc})") from exc
    return img

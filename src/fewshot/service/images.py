"""Upload decoding for the service: classify *why* an upload is refused (HTTP status + code), then
decode it with the shared preprocessing path (`fewshot.data.imageio`) and make a PNG thumbnail."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from fewshot.data.imageio import ACCEPTED_FORMATS, Preprocessing, open_image, to_array
from fewshot.errors import ImageError


class UploadError(ImageError):
    """An upload is refused; carries the HTTP status and a stable error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


@dataclass(frozen=True)
class DecodedImage:
    array: np.ndarray  # uint8 (C, H, W) under the bundle's preprocessing
    thumbnail_png: bytes  # empty when not asked for (classification needs none)


def _probe(data: bytes, max_pixels: int, name: str) -> None:
    """Header-only checks: not an image / refused format -> 415; too many pixels -> 413."""
    if not data:
        raise UploadError(400, "empty_image", f"{name}: file is empty (zero bytes); upload a PNG, JPEG, WebP, BMP or GIF")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt, (w, h) = img.format or "unknown", img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UploadError(413, "image_too_large", f"{name}: refused as a decompression bomb ({exc}); "
                          f"images may have at most {max_pixels:,} pixels") from exc
    except Exception as exc:
        raise UploadError(415, "unsupported_media_type", f"{name}: not an image in an accepted format "
                          f"({type(exc).__name__}); upload one of {sorted(ACCEPTED_FORMATS)}") from exc
    if fmt not in ACCEPTED_FORMATS:
        raise UploadError(415, "unsupported_media_type", f"{name}: format {fmt} is not accepted; "
                          f"upload one of {sorted(ACCEPTED_FORMATS)}")
    if w * h > max_pixels:
        raise UploadError(413, "image_too_large", f"{name}: {w}x{h} = {w * h:,} pixels exceeds the limit "
                          f"of {max_pixels:,}; downscale the image before uploading")


def thumbnail_png(img: Image.Image, size: int) -> bytes:
    """A PNG at most `size` pixels on its longest side (RGB or L)."""
    t = img.convert("RGB" if img.mode not in ("L", "1") else "L")
    t.thumbnail((size, size))
    buf = io.BytesIO()
    t.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def array_thumbnail(arr: np.ndarray, size: int) -> bytes:
    """uint8 (C, H, W) -> PNG thumbnail; used when no original image is at hand."""
    img = Image.fromarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0))
    return thumbnail_png(img, size)


def decode_upload(
    data: bytes, pre: Preprocessing, *, max_pixels: int, thumbnail_size: int, name: str,
    thumbnail: bool = True,
) -> DecodedImage:
    """Bytes -> model input + thumbnail; raises UploadError (400/413/415) naming the file and fix."""
    _probe(data, max_pixels, name)
    try:
        img = open_image(data, max_pixels=max_pixels, name=name)
        return DecodedImage(to_array(img, pre), thumbnail_png(img, thumbnail_size) if thumbnail else b"")
    except UploadError:
        raise
    except Exception as exc:  # truncated or corrupt pixel data
        raise UploadError(400, "corrupt_image", f"{exc}" if isinstance(exc, ImageError) else
                          f"{name}: image data is corrupt ({type(exc).__name__}: {exc})") from exc

"""Upload decoding for the service: decode with the shared preprocessing path (`fewshot.data.imageio`),
say *why* an upload is refused (its kind and a stable code; the HTTP layer picks the status), make a
PNG thumbnail and a small RGB preview."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from fewshot.artifacts.domain import STATS_SIDE, small_rgb
from fewshot.data.imageio import (
    ImageTooLarge,
    Preprocessing,
    UnsupportedImage,
    draft_size,
    normalise_mode,
    open_image,
    shrink_oriented,
    to_array,
)
from fewshot.errors import ImageError
from fewshot.service.errors import RequestError, TooLarge, UnsupportedMedia


class UploadError(RequestError, ImageError):
    """An upload is refused (empty or corrupt); a stable error `code`, no HTTP status."""

    default_code = "corrupt_image"


class UploadTooLarge(UploadError, TooLarge):
    """Too many pixels, too extreme a shape, or too much decoding work."""

    default_code = "image_too_large"


class UploadUnsupported(UploadError, UnsupportedMedia):
    """Not an image format the service accepts."""

    default_code = "unsupported_media_type"


@dataclass(frozen=True)
class DecodedImage:
    array: np.ndarray  # uint8 (C, H, W) under the bundle's preprocessing
    thumbnail_png: bytes  # empty when not asked for (classification needs none)
    pixels: int  # decoded width x height (after JPEG's reduced-scale decoding): the request's budget
    preview: np.ndarray  # uint8 (h, w, 3), longest side <= preview_side: the upload as sent, for
    # the out-of-domain check (a colour photo stays colour; see fewshot.artifacts.domain); (0, 0, 3)
    # when preview_side is 0 (a model without a domain summary needs none)


def thumbnail_png(img: Image.Image, size: int) -> bytes:
    """A PNG at most `size` pixels on its longest side (RGB or L), made from a reduced copy."""
    t = shrink_oriented(img, size, keep_aspect=True)
    t = normalise_mode(t, "L" if t.mode in ("L", "1", "I;16", "I;16B", "I;16L", "I", "F") else "RGB")
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
    thumbnail: bool = True, preview_side: int = STATS_SIDE,
) -> DecodedImage:
    """Bytes -> model input + thumbnail + small RGB preview; raises UploadError naming the file and
    the fix: empty or corrupt, `UploadTooLarge` (too many pixels or too extreme a shape),
    `UploadUnsupported` (not an accepted image). Decoding cost is bounded before decoding (see `fewshot.data.imageio.open_image`).
    `preview_side` 0: no preview (it costs a reduce and a conversion per upload)."""
    if not data:
        raise UploadError(f"{name}: file is empty (zero bytes); upload a PNG, JPEG, WebP, BMP or GIF",
                          "empty_image")
    try:
        img = open_image(data, max_pixels=max_pixels, name=name, draft_to=draft_size(pre))
        array = to_array(img, pre)
        preview = small_rgb(img, preview_side) if preview_side else np.zeros((0, 0, 3), np.uint8)
        thumb = thumbnail_png(img, thumbnail_size) if thumbnail else b""
    except ImageTooLarge as exc:
        raise UploadTooLarge(str(exc)) from exc
    except UnsupportedImage as exc:
        raise UploadUnsupported(str(exc)) from exc
    except ImageError as exc:
        raise UploadError(str(exc)) from exc
    except Exception as exc:  # truncated or corrupt pixel data found while converting
        raise UploadError(f"{name}: image data is corrupt ({type(exc).__name__})") from exc
    return DecodedImage(array, thumb, img.size[0] * img.size[1], preview)

"""Decoding and normalising images: the one preprocessing path shared by `prepare` and the service.

Every input (PNG, JPEG, WebP, BMP, GIF first frame; grayscale, RGB, palette, alpha, 16-bit) is
decoded with Pillow, flattened onto white where it has alpha, converted to the configured mode
("L" = 1 channel, "RGB" = 3 channels) and resized to `size x size`. The result is a uint8 array of
shape (C, H, W). Formats are checked by content, never by file name.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from fewshot.errors import ImageError

Mode = Literal["L", "RGB"]

ACCEPTED_FORMATS: frozenset[str] = frozenset({"PNG", "JPEG", "WEBP", "BMP", "GIF"})
DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: far above any photo a user teaches with


@dataclass(frozen=True)
class Preprocessing:
    """How raw images become model input; stored in caches and artifact manifests."""

    mode: Mode = "L"
    size: int = 28
    resample: str = "lanczos"

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    def to_dict(self) -> dict[str, object]:
        return {"mode": self.mode, "size": self.size, "resample": self.resample}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> Preprocessing:
        mode = str(d.get("mode", "L"))
        if mode not in ("L", "RGB"):
            raise ImageError(f"preprocessing mode {mode!r} is not supported; use 'L' or 'RGB'")
        size = int(d.get("size", 28))  # type: ignore[call-overload]
        return cls(mode=mode, size=size, resample=str(d.get("resample", "lanczos")))  # type: ignore[arg-type]


_RESAMPLE = {
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
}


def open_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image") -> Image.Image:
    """Open and fully decode `data`, refusing non-images, unknown formats and decompression bombs."""
    if len(data) == 0:
        raise ImageError(f"{name}: file is empty (zero bytes); upload a PNG, JPEG, WebP, BMP or GIF")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format or "unknown"
            if fmt not in ACCEPTED_FORMATS:
                raise ImageError(
                    f"{name}: format {fmt} is not accepted; use one of {sorted(ACCEPTED_FORMATS)}"
                )
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(
                    f"{name}: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,}; "
                    "downscale the image before uploading"
                )
            img.seek(0)  # GIF: first frame
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{name}: refused as a decompression bomb ({exc})") from exc
    except Exception as exc:  # PIL raises many types for corrupt data
        raise ImageError(f"{name}: not a readable image ({type(exc).__name__}: {exc})") from exc
    return img


def normalise_mode(img: Image.Image, mode: Mode) -> Image.Image:
    """Convert any Pillow mode (1, L, P, RGBA, LA, I;16, I, F, CMYK...) to `mode`; alpha goes onto white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = float(arr.max()) if arr.size else 0.0
        scale = 255.0 / (65535.0 if hi > 255 else max(hi, 255.0))
        img = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert(mode)


def to_array(img: Image.Image, pre: Preprocessing) -> np.ndarray:
    """Resize an opened image and return uint8 (C, H, W)."""
    img = ImageOps.exif_transpose(img) or img
    img = normalise_mode(img, pre.mode)
    if img.size != (pre.size, pre.size):
        img = img.resize((pre.size, pre.size), _RESAMPLE[pre.resample])
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[None, :, :]
    else:
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)


def decode_image(
    data: bytes, pre: Preprocessing, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image"
) -> np.ndarray:
    """Bytes -> uint8 (C, H, W) under `pre`. Raises ImageError with the reason and the fix."""
    return to_array(open_image(data, max_pixels=max_pixels, name=name), pre)


def to_float(batch_u8: np.ndarray) -> np.ndarray:
    """uint8 (..., C, H, W) -> float32 in [0, 1]; the model input scale used everywhere."""
    return batch_u8.astype(np.float32) * np.float32(1.0 / 255.0)

"""Decoding and normalising images: the one preprocessing path shared by `prepare` and the service.

Every input (PNG, JPEG, WebP, BMP, GIF first frame; grayscale, RGB, palette, alpha, 16-bit) is
decoded with Pillow, flattened onto white where it has alpha, converted to the configured mode
("L" = 1 channel, "RGB" = 3 channels) and resized to `size x size` (squashed to a square; with
`crop < 1` to a square of side round(size / crop), then centre-cropped to `size x size`). The result
is a uint8 array of shape (C, H, W). Formats are checked by content, never by file name.
`model_input` turns such uint8 batches into the model's float input ([0, 1], then (x - mean) / std
per channel when the preprocessing has a mean and std); training, evaluation, the bundle's embedders
and the service all call it.

Decoding is bounded before any pixel is decoded (`fewshot.data.decoding`, whose names are importable
from here too). Single-scan JPEGs decode at a reduced scale (>= 4x the input side); large images
are box-reduced before orientation, mode and alpha handling, and 16-bit images are converted with
integer arithmetic. Pillow holds at most 4 bytes a decoded pixel, so one image costs at most about
4 x max_pixels bytes plus small copies (see benchmarks/bench_decode_memory.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, SupportsFloat, SupportsInt, cast

import numpy as np
from PIL import Image, ImageOps

from fewshot.data.decoding import (
    ACCEPTED_FORMATS,
    DEFAULT_MAX_PIXELS,
    MAX_ASPECT_RATIO,
    MAX_JPEG_SCANS,
    ImageTooLarge,
    JpegLayout,
    UnsupportedImage,
    jpeg_layout,
    open_image,
)
from fewshot.errors import ImageError

__all__ = [
    "ACCEPTED_FORMATS", "DEFAULT_MAX_PIXELS", "DRAFT_FACTOR", "MAX_ASPECT_RATIO", "MAX_JPEG_SCANS", "REDUCE_GAP",
    "ImageTooLarge", "JpegLayout", "Mode", "Preprocessing", "UnsupportedImage", "decode_image", "draft_size",
    "from_model_input", "jpeg_layout", "model_input", "normalise_mode", "open_image", "shrink", "shrink_oriented",
    "to_array", "to_float",
]

Mode = Literal["L", "RGB"]

_RESAMPLE = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
}


@dataclass(frozen=True)
class Preprocessing:
    """How raw images become model input; stored in caches and artifact manifests.

    mode, size, resample: decoded to `mode`, resized with `resample` to size x size.
    crop: the fraction of the resized image kept: resized to round(size / crop) square, then the
      centre size x size (ImageNet evaluation's 0.875 = 224 of 256); 1.0 keeps the whole image.
    mean, std: per-channel statistics on the [0, 1] scale; the model input is (x / 255 - mean) / std.
      None (the default) for both: the model input is x / 255.
    """

    mode: Mode = "L"
    size: int = 28
    resample: str = "lanczos"
    crop: float = 1.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("L", "RGB"):
            raise ImageError(f"preprocessing mode {self.mode!r} is not supported; use 'L' or 'RGB'")
        if self.size < 1:
            raise ImageError(f"preprocessing size {self.size} must be >= 1 pixel; use e.g. 28 or 224")
        if self.resample not in _RESAMPLE:
            raise ImageError(f"preprocessing resample {self.resample!r} is not supported; use one of {sorted(_RESAMPLE)}")
        if not 0.0 < self.crop <= 1.0:
            raise ImageError(f"preprocessing crop {self.crop} must be in (0, 1]; use 1.0 for no crop or e.g. 0.875")
        if (self.mean is None) != (self.std is None):
            raise ImageError(f"preprocessing mean {self.mean} and std {self.std}: give both or neither")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if values is not None:
                object.__setattr__(self, name, _channel_tuple(name, values, self.channels, self.mode))
        if self.std is not None and min(self.std) <= 0:
            raise ImageError(f"preprocessing std {self.std} must be > 0 in every channel; "
                             "give the standard deviations of the [0, 1] pixel values")

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    @property
    def resize_side(self) -> int:
        """The side images are resized to before the centre crop (== size when crop is 1)."""
        return self.size if self.crop == 1.0 else max(self.size, round(self.size / self.crop))

    def to_dict(self) -> dict[str, object]:
        """JSON form; crop, mean and std only when set, so older caches and manifests read the same."""
        d: dict[str, object] = {"mode": self.mode, "size": self.size, "resample": self.resample}
        if self.crop != 1.0:
            d["crop"] = self.crop
        if self.mean is not None and self.std is not None:
            d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> Preprocessing:
        # JSON values, taken as they come: int() / float() raise on a wrong type, __post_init__
        # checks the mode and turns any sequence of numbers into the mean and std tuples
        mode = cast(Mode, str(d.get("mode", "L")))
        size = int(cast("SupportsInt | str", d.get("size", 28)))
        return cls(mode=mode, size=size, resample=str(d.get("resample", "lanczos")),
                   crop=float(cast("SupportsFloat | str", d.get("crop", 1.0))),
                   mean=cast("tuple[float, ...] | None", d.get("mean")),
                   std=cast("tuple[float, ...] | None", d.get("std")))


def _channel_tuple(name: str, values: object, channels: int, mode: str) -> tuple[float, ...]:
    """`values` as a tuple of `channels` finite floats, or an ImageError naming the value and the fix."""
    try:
        if not isinstance(values, Iterable):
            raise TypeError(f"{type(values).__name__} is not iterable")
        out = tuple(float(cast("SupportsFloat | str", v)) for v in values)  # float() raises on a wrong type
    except (TypeError, ValueError) as exc:
        raise ImageError(f"preprocessing {name} {values!r} is not a list of numbers; give {channels} "
                         f"value(s), one per channel") from exc
    if len(out) != channels or not all(np.isfinite(out)):
        raise ImageError(f"preprocessing {name} {list(out)} has {len(out)} value(s) but mode {mode!r} has "
                         f"{channels} channel(s); give {channels} finite value(s), one per channel")
    return out




DRAFT_FACTOR = 4  # JPEG decodes at 1/2, 1/4 or 1/8 scale while staying >= 4x the model's input side
REDUCE_GAP = 2  # larger images are box-reduced to >= 2x the input side before any other copy
def draft_size(pre: Preprocessing) -> int:
    """The smallest side a JPEG is decoded at for `pre` (the same in `prepare` and the service)."""
    return DRAFT_FACTOR * pre.resize_side


def _to_8bit(img: Image.Image, hi: float | None = None) -> Image.Image:
    """Deep grayscale -> "L" with integer arithmetic, never a float64 copy: 16-bit images always
    v * 255 // 65535 (their scale is 16 bits whatever the content); 32-bit integer and float
    images the same when their maximum `hi` exceeds 255, else unchanged."""
    arr = np.array(img)  # uint16 / int32 / float32 copy: at most 4 bytes a pixel
    if img.mode in ("I;16", "I;16B", "I;16L"):
        hi = 65535.0
    if hi is None:
        hi = float(arr.max()) if arr.size else 0.0
    if arr.dtype.kind == "f":
        arr = np.clip(np.nan_to_num(arr, nan=0.0), 0, 65535).astype(np.uint16 if hi > 255 else np.uint8)
    if hi > 255:
        np.floor_divide(arr, 257, out=arr)  # 255 / 65535 == 1 / 257
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")


_STRIP_BYTES = 4 << 20  # shrink works on horizontal strips of about this many decoded bytes


def _reducible(strip: Image.Image, hi: float | None) -> Image.Image:
    """A strip in a mode `Image.reduce` takes (it refuses 1, P and 16-bit)."""
    if strip.mode in ("I;16", "I;16B", "I;16L"):
        return _to_8bit(strip, hi)
    if strip.mode == "1":
        return strip.convert("L")
    if strip.mode == "P":
        return strip.convert("RGBA")
    return strip


def shrink(img: Image.Image, size: int, *, keep_aspect: bool = False) -> Image.Image:
    """Box-reduce by whole factors so no side is more than 2x `size` larger than needed, strip by
    strip: no full-size copy is ever made (Pillow's own reduce of RGBA copies the whole image), every
    later step (orientation, mode, alpha) works on a small image, and resampling kernels stay short.
    Blocks never straddle strips, so the result equals one `Image.reduce` of the whole image."""
    w, h = img.size
    fx, fy = max(1, w // (REDUCE_GAP * size)), max(1, h // (REDUCE_GAP * size))
    if keep_aspect:  # thumbnails and previews: one factor (model inputs are squashed to a square anyway)
        fx = fy = min(fx, fy)
    if fx == 1 and fy == 1:
        return img
    hi = None
    if img.mode in ("I", "F"):
        # the whole image decides the 8-bit scale; I and F have one band: (min, max)
        hi = float(cast("tuple[float, float]", img.getextrema())[1])
    rows = max(fy, (_STRIP_BYTES // (4 * w)) // fy * fy)
    out: Image.Image | None = None
    for y0 in range(0, h, rows):
        part = _reducible(img.crop((0, y0, w, min(h, y0 + rows))), hi).reduce((fx, fy))
        if out is None:
            out = Image.new(part.mode, (-(-w // fx), -(-h // fy)))
        out.paste(part, (0, y0 // fy))
    assert out is not None
    return out


_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def shrink_oriented(img: Image.Image, size: int, *, keep_aspect: bool = False) -> Image.Image:
    """`shrink`, then the EXIF orientation of the original applied to the small result (the
    reduced copy carries no EXIF, so orientation is read first)."""
    orientation = img.getexif().get(0x0112, 1)
    small = shrink(img, size, keep_aspect=keep_aspect)
    if small is img:
        return ImageOps.exif_transpose(img) or img
    method = _TRANSPOSE.get(orientation)
    return small.transpose(method) if method is not None else small


def normalise_mode(img: Image.Image, mode: Mode) -> Image.Image:
    """Convert any Pillow mode (1, L, P, RGBA, LA, I;16, I, F, CMYK...) to `mode`; alpha goes onto white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = _to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert(mode)


def to_array(img: Image.Image, pre: Preprocessing) -> np.ndarray:
    """Resize (and centre-crop) an opened image under `pre`; return uint8 (C, size, size)."""
    side = pre.resize_side
    img = shrink_oriented(img, side)
    img = normalise_mode(img, pre.mode)
    if img.size != (side, side):
        img = img.resize((side, side), _RESAMPLE[pre.resample])
    if side != pre.size:
        lo = (side - pre.size) // 2
        img = img.crop((lo, lo, lo + pre.size, lo + pre.size))
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
    return to_array(open_image(data, max_pixels=max_pixels, name=name, draft_to=draft_size(pre)), pre)


def to_float(batch_u8: np.ndarray) -> np.ndarray:
    """uint8 (..., C, H, W) -> float32 in [0, 1] (no mean / std)."""
    return batch_u8.astype(np.float32) * np.float32(1.0 / 255.0)


def model_input(batch_u8: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """uint8 (N, C, H, W) -> the model's float32 input under `pre`: x / 255, then (x - mean) / std
    per channel when `pre` has a mean and std. The one conversion used in training, evaluation,
    the bundle's embedders and the service."""
    if batch_u8.dtype != np.uint8 or batch_u8.ndim != 4 or batch_u8.shape[1] != pre.channels:
        raise ImageError(f"expected uint8 images (N, {pre.channels}, H, W) for mode {pre.mode!r}; got "
                         f"{batch_u8.dtype} {tuple(batch_u8.shape)}; decode with fewshot.data.imageio.decode_image")
    x = to_float(batch_u8)
    if pre.mean is None or pre.std is None:
        return x
    mean = np.asarray(pre.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(pre.std, dtype=np.float32).reshape(1, -1, 1, 1)
    x -= mean
    x /= std
    return x


def from_model_input(x: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """The inverse of `model_input`: float (N, C, H, W) model input -> the uint8 pixels it came from."""
    x = np.asarray(x, dtype=np.float32)
    if pre.mean is not None and pre.std is not None:
        x = x * np.asarray(pre.std, dtype=np.float32).reshape(1, -1, 1, 1) \
            + np.asarray(pre.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)

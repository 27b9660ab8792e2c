"""Uploads of a request: the image files, decoded one at a time under the request's limits (count,
pixels in all) and the model's preprocessing; any bad image refuses the request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import numpy as np
from fastapi import File, UploadFile

from fewshot.service.http.errors import ApiError, short
from fewshot.service.images import decode_upload
from fewshot.service.models import ServedModel
from fewshot.service.settings import ServiceSettings

Images = Annotated[list[UploadFile], File(description="one or more image files (PNG, JPEG, WebP, BMP, GIF)")]


@dataclass(frozen=True)
class Uploads:
    arrays: np.ndarray  # uint8 (N, C, H, W) under the bundle's preprocessing
    thumbnails: list[bytes]
    names: list[str]
    previews: list[np.ndarray]  # each upload as a small RGB array, for the out-of-domain check


def decode_all(files: list[UploadFile], model: ServedModel, settings: ServiceSettings, *,
                thumbnails: bool = True) -> Uploads:
    """Uploads, decoded one at a time; refuses the request on any bad image."""
    if not files:
        raise ApiError(400, "no_images", "no images in the request; send one or more 'images' file fields")
    if len(files) > settings.max_images_per_request:
        raise ApiError(413, "too_many_images", f"{len(files)} images exceed the limit of "
                       f"{settings.max_images_per_request} per request; split the upload")
    pre = model.bundle.preprocessing
    domain = model.recogniser.domain
    side = domain.stats_side if domain is not None else 0  # no domain summary: no check, no preview
    arrays, thumbs, names, previews = [], [], [], []
    budget = settings.max_request_pixels
    for i, f in enumerate(files):
        if budget <= 0:
            raise ApiError(413, "request_too_large", f"the images of this request decode to more than "
                           f"{settings.max_request_pixels:,} pixels in all; send fewer large images per request")
        name = short(f.filename or f"image {i}")
        d = decode_upload(f.file.read(), pre, max_pixels=min(settings.max_image_pixels, budget),
                          thumbnail_size=settings.thumbnail_size, name=name, thumbnail=thumbnails, preview_side=side)
        budget -= d.pixels
        arrays.append(d.array)
        thumbs.append(d.thumbnail_png)
        names.append(name)
        previews.append(d.preview)
    return Uploads(np.stack(arrays), thumbs, names, previews)

"""A PNG picture of an episode: one row per class, support images then query images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fewshot.episodes.types import Episode


def episode_grid(ep: Episode, out: Path, *, scale: int = 2, max_query: int = 5, pad: int = 4) -> Path:
    """Write `out` (PNG): row j shows class j's support images, a gap, then up to `max_query` queries."""
    sx = (ep.support_x.numpy() * 255).round().astype(np.uint8)
    qx = (ep.query_x.numpy() * 255).round().astype(np.uint8)
    c, h, w = sx.shape[1:]
    shots = int((ep.support_y == 0).sum())
    queries = min(max_query, int((ep.query_y == 0).sum()))
    cell_h, cell_w = h * scale + pad, w * scale + pad
    width = (shots + queries) * cell_w + 3 * pad + 60
    canvas = Image.new("RGB", (width, ep.n_way * cell_h + pad), (235, 235, 235))
    draw = ImageDraw.Draw(canvas)

    def paste(arr: np.ndarray, col: int, row: int, gap: int) -> None:
        img = Image.fromarray(arr[0] if c == 1 else arr.transpose(1, 2, 0)).convert("RGB")
        img = img.resize((w * scale, h * scale), Image.Resampling.NEAREST)
        canvas.paste(img, (60 + col * cell_w + gap, pad + row * cell_h))

    for j in range(ep.n_way):
        draw.text((4, pad + j * cell_h + cell_h // 3), f"{j} r{int(ep.rotations[j]) * 90}", fill=(0, 0, 0))
        for i, idx in enumerate(np.flatnonzero(ep.support_y.numpy() == j)[:shots]):
            paste(sx[idx], i, j, 0)
        for i, idx in enumerate(np.flatnonzero(ep.query_y.numpy() == j)[:queries]):
            paste(qx[idx], shots + i, j, 3 * pad)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out

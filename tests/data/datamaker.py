"""Tiny image files and fake datasets built inside the tests (no real data)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(seed: int, fmt: str = "PNG", size: int = 24, mode: str = "L") -> bytes:
    """A distinct random image per seed, encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (size, size), dtype=np.uint16))
    else:
        arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        img = Image.fromarray(arr, "RGB").convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def write_folder(root: Path, layout: dict[str, bytes]) -> Path:
    for rel, data in layout.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def write_zip(path: Path, layout: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for rel, data in layout.items():
            zf.writestr(rel, data)
    return path


def fake_omniglot(data_root: Path, *, alphabets: int = 3, chars: int = 2, drawers: int = 4) -> Path:
    """`<data_root>/omniglot/images_{background,evaluation}.zip` in the official layout, tiny."""
    seed = 0
    for subset, offset in (("background", 0), ("evaluation", 100)):
        layout = {}
        for a in range(alphabets):
            for c in range(chars):
                for d in range(drawers):
                    seed += 1
                    name = f"images_{subset}/Alpha{a + offset}/character{c + 1:02d}/{seed:04d}_{d + 1:02d}.png"
                    layout[name] = image_bytes(seed, size=20, mode="1")
        write_zip(data_root / "omniglot" / f"images_{subset}.zip", layout)
    return data_root

"""Hostile image bytes for the decode-bound tests and benchmarks: forged headers, deep bit depths,
huge alpha images. Built in memory; nothing here is a real photo."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def forged_png(width: int, height: int, bit_depth: int = 8, colour_type: int = 0, idat: bytes | None = None) -> bytes:
    """A PNG whose IHDR declares `width` x `height` (valid CRC) followed by a little (truncated) data."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    body = idat if idat is not None else zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", body)


def tiny_wide_png() -> bytes:
    """The attack from the issue: a ~69-byte PNG declaring 1 x 20,000,000 pixels."""
    return forged_png(20_000_000, 1)


def sixteen_bit_png(side: int) -> bytes:
    """A real 16-bit grayscale PNG of side x side (compresses to a few KB: constant rows)."""
    img = Image.fromarray(np.full((side, side), 40_000, np.uint16))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def rgba_png(side: int) -> bytes:
    img = Image.new("RGBA", (side, side), (10, 200, 30, 128))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def palette_png(side: int) -> bytes:
    img = Image.new("P", (side, side), 3)
    img.info["transparency"] = 3
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=3)
    return buf.getvalue()


def large_jpeg(width: int, height: int) -> bytes:
    img = Image.new("RGB", (width, height), (120, 80, 200))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=70)
    return buf.getvalue()


def mpo_bytes(side: int = 40) -> bytes:
    """A phone-camera style MPO (two JPEG pictures in one file)."""
    a = Image.new("RGB", (side, side), (200, 10, 10))
    b = Image.new("RGB", (side, side), (10, 10, 200))
    buf = io.BytesIO()
    a.save(buf, format="MPO", save_all=True, append_images=[b])
    return buf.getvalue()


CHILD = r"""
import sys, time
from fewshot.data.imageio import Preprocessing
from fewshot.service.images import UploadError, decode_upload
data = open(sys.argv[1], "rb").read()
pre = Preprocessing(mode=sys.argv[2], size=int(sys.argv[3]))
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])  # kB
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmRSS:")
t0 = time.perf_counter()
try:
    d = decode_upload(data, pre, max_pixels=25_000_000, thumbnail_size=64, name="x")
    outcome = "decoded " + "x".join(map(str, d.array.shape))
except UploadError as exc:
    outcome = f"refused {exc.status}"
seconds = time.perf_counter() - t0
after = status("VmHWM:")
print(f"{(after - before) / 1024:.1f}\t{seconds:.3f}\t{outcome}")
"""


def decode_cost(data: bytes, tmp_dir: str, mode: str = "L", size: int = 28) -> tuple[float, float, str]:
    """Decode `data` in a fresh Python process: (peak RSS growth over the RSS before decoding, in MB;
    seconds; outcome). Linux only (/proc/self/clear_refs resets the peak)."""
    import os
    import subprocess
    import sys
    import tempfile

    fd, path = tempfile.mkstemp(dir=tmp_dir, suffix=".img")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    out = subprocess.run([sys.executable, "-c", CHILD, path, mode, str(size)], capture_output=True, text=True,
                         timeout=300, check=True).stdout.strip().split("\t")
    os.unlink(path)
    return float(out[0]), float(out[1]), out[2]

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
from fewshot.service.http.errors import status_of
from fewshot.service.images import UploadError, decode_upload
data = open(sys.argv[1], "rb").read()
pre = Preprocessing(mode=sys.argv[2], size=int(sys.argv[3]))
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])  # kB
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
import PIL.Image
PIL.Image.init()  # every format plugin loaded before the clock starts (a one-off per process)
before = status("VmRSS:")
t0, c0 = time.perf_counter(), time.process_time()
try:
    d = decode_upload(data, pre, max_pixels=25_000_000, thumbnail_size=64, name="x")
    outcome = "decoded " + "x".join(map(str, d.array.shape))
except UploadError as exc:
    outcome = f"refused {status_of(exc)[0]}"
seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
after = status("VmHWM:")
print(f"{(after - before) / 1024:.1f}\t{seconds:.3f}\t{cpu:.3f}\t{outcome}")
"""


def decode_cost(data: bytes, tmp_dir: str, mode: str = "L", size: int = 28) -> tuple[float, float, str]:
    """Decode `data` in a fresh Python process: (peak RSS growth over the RSS before decoding, in MB;
    seconds; outcome). Linux only (/proc/self/clear_refs resets the peak)."""
    peak_mb, seconds, _, outcome = decode_costs(data, tmp_dir, mode, size)
    return peak_mb, seconds, outcome


def decode_costs(data: bytes, tmp_dir: str, mode: str = "L", size: int = 28) -> tuple[float, float, float, str]:
    """`decode_cost` with the CPU seconds too: (peak +MB, wall seconds, CPU seconds, outcome)."""
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
    return float(out[0]), float(out[1]), float(out[2]), out[3]


# -- decoding-cost bombs (issue 16): valid files whose decoding costs far more than their size -------
def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment of the first JPEG image in `data`; a scan (SOS)
    includes its entropy-coded data."""
    import re

    next_marker = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
    out, i = [], 2
    while i + 4 <= len(data):
        marker = data[i + 1]
        if marker == 0xD9:
            out.append((marker, i, i + 2))
            break
        end = i + 2 + int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xDA:
            m = next_marker.search(data, end)
            end = m.start() if m else len(data)
        out.append((marker, i, end))
        i = end
    return out


def progressive_scan_bomb(side: int = 5000, repeats: int = 3000) -> bytes:
    """A valid side x side progressive JPEG whose last (AC) scan is repeated `repeats` times: each
    repeat is a few dozen bytes but a pass of libjpeg over every block of the image."""
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (120, 80, 200)).save(buf, format="JPEG", progressive=True, quality=70)
    data = buf.getvalue()
    segments = jpeg_segments(data)
    _, s0, s1 = [s for s in segments if s[0] == 0xDA][-1]
    eoi = segments[-1][1]
    return data[:eoi] + data[s0:s1] * repeats + data[eoi:]


def _bits(codes: list[tuple[int, int]]) -> bytes:
    """(value, n_bits) Huffman codes -> entropy-coded bytes, 1-padded, 0xFF byte-stuffed."""
    acc, n, out = 0, 0, bytearray()
    for value, width in codes:
        acc, n = (acc << width) | value, n + width
        while n >= 8:
            n -= 8
            byte = (acc >> n) & 0xFF
            out.append(byte)
            if byte == 0xFF:
                out.append(0)
        acc &= (1 << n) - 1
    if n:
        byte = ((acc << (8 - n)) | ((1 << (8 - n)) - 1)) & 0xFF
        out.append(byte)
        if byte == 0xFF:
            out.append(0)
    return bytes(out)


def noninterleaved_baseline_jpeg(width: int, height: int, components: int = 3) -> bytes:
    """A valid baseline (SOF0) JPEG of a flat mid-grey image with each colour component in its own
    scan, as some encoders write it: libjpeg then buffers every component's full-resolution
    coefficients, whatever the reduced scale asked for."""
    seg = lambda marker, body: bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body  # noqa: E731
    dqt = seg(0xDB, b"\x00" + bytes([1] * 64))
    # one DC table (category 0 only: code '0') and one AC table (EOB only: code '0')
    dht = seg(0xC4, b"\x00" + bytes([1] + [0] * 15) + b"\x00") + seg(0xC4, b"\x10" + bytes([1] + [0] * 15) + b"\x00")
    comps = b"".join(bytes([i + 1, 0x11, 0]) for i in range(components))
    sof = seg(0xC0, b"\x08" + height.to_bytes(2, "big") + width.to_bytes(2, "big") + bytes([components]) + comps)
    blocks = -(-width // 8) * -(-height // 8)
    scan_data = _bits([(0, 2)] * blocks)  # per block: DC diff category 0 ('0'), then EOB ('0')
    scans = b"".join(seg(0xDA, bytes([1, i + 1, 0x00, 0, 63, 0])) + scan_data for i in range(components))
    return b"\xff\xd8" + dqt + dht + sof + scans + b"\xff\xd9"


def lossless_webp(side: int) -> bytes:
    """A flat lossless WebP: about a kilobyte for any size, decoded at full resolution."""
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (120, 80, 200)).save(buf, format="WEBP", lossless=True, quality=0, method=0)
    return buf.getvalue()


def rle8_bmp(width: int, height: int) -> bytes:
    """An RLE8 BMP where every row is one pixel and an end-of-line: Pillow's pure-Python decoder
    pads each row a byte at a time (4 bytes of file per row, a Python loop per pixel)."""
    rows = (b"\x01\x05" + b"\x00\x00") * height + b"\x00\x01"
    palette = b"".join(bytes([i, i, i, 0]) for i in range(256))
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(rows), 2835, 2835, 256, 0)
    offset = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(rows), 0, 0, offset) + info + palette + rows

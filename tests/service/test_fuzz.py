"""Fuzzing the service's inputs.

(a) Upload decoding: valid PNG/JPEG/GIF/WebP/BMP made here with Pillow, then bytes flipped,
    inserted, deleted, truncated, and header fields forged (PNG IHDR with a correct CRC, GIF
    screen/frame sizes and frame counts, BMP DIB fields, JPEG SOF, WebP RIFF/VP8X). Contract:
    `decode_upload` raises only `UploadError` (status 400/413/415); what it returns is uint8
    (C, size, size) plus a small PNG thumbnail. Known attack images stay cheap in memory.
(b) The HTTP API against its own OpenAPI schema (schemathesis), with the admin key, a workspace's
    key, another workspace's key or none, and real ids and images swapped in: no 5xx.
(c) Inputs that once gave 500s or were wrongly accepted: NUL bytes in text and paths, non-finite
    thresholds.

Budgets are fixed and runs reproducible (derandomize=True); FEWSHOT_FUZZ_EXAMPLES=N scales the
image fuzzing up for a longer local run.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import event as hypothesis_event
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from PIL import Image

from fewshot.data.imageio import Preprocessing
from fewshot.service.app import create_app
from fewshot.service.http.errors import status_of
from fewshot.service.images import UploadError, decode_upload
from fewshot.service.settings import ServiceSettings

settings.register_profile(
    "fewshot-fuzz", max_examples=int(os.environ.get("FEWSHOT_FUZZ_EXAMPLES", "200")), deadline=None,
    derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
FUZZ = settings.get_profile("fewshot-fuzz")
MAX_PIXELS = 1_000_000  # forged sizes straddle this; the service default is far larger (see the memory test)
THUMB = 64
PREPROCESSINGS = [Preprocessing("L", 28), Preprocessing("RGB", 20)]
ADMIN = "fuzz-admin"


# -- valid images to start from ------------------------------------------------------------------
def _save(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noise(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, size[::-1], dtype=np.uint16))
    bands = len(Image.new(mode, (1, 1)).getbands())
    arr = rng.integers(0, 256, (*size[::-1], bands), dtype=np.uint8)
    img = Image.fromarray(arr[..., 0] if bands == 1 else arr, mode="L" if bands == 1 else None)
    return img.convert(mode) if img.mode != mode else img


def _gif(n_frames: int, size: tuple[int, int], seed: int) -> bytes:
    frames = [_noise("RGB", size, seed + i).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
              for i in range(n_frames)]
    return _save(frames[0], "GIF", save_all=n_frames > 1, append_images=frames[1:], duration=40, loop=0)


@cache
def base_images() -> dict[str, bytes]:
    """Small valid images of every accepted format and several modes (and one refused format)."""
    out = {
        "png_L": _save(_noise("L", (8, 8), 0), "PNG"),
        "png_RGB": _save(_noise("RGB", (7, 5), 1), "PNG"),
        "png_RGBA": _save(_noise("RGBA", (4, 4), 2), "PNG"),
        "png_LA": _save(_noise("LA", (3, 3), 3), "PNG"),
        "png_P": _save(_noise("RGB", (6, 6), 4).convert("P", palette=Image.Palette.ADAPTIVE, colors=8), "PNG"),
        "png_1": _save(_noise("L", (9, 9), 5).convert("1"), "PNG"),
        "png_I16": _save(_noise("I;16", (4, 4), 6), "PNG"),
        "jpeg_L": _save(_noise("L", (8, 8), 7), "JPEG", quality=80),
        "jpeg_RGB": _save(_noise("RGB", (16, 16), 8), "JPEG", quality=80),
        "jpeg_progressive": _save(_noise("RGB", (16, 16), 9), "JPEG", progressive=True),
        "jpeg_CMYK": _save(_noise("CMYK", (8, 8), 10), "JPEG"),
        "gif_1": _gif(1, (5, 5), 11),
        "gif_3": _gif(3, (6, 4), 12),
        "webp_lossy": _save(_noise("RGB", (8, 8), 13), "WEBP", quality=70),
        "webp_lossless_rgba": _save(_noise("RGBA", (5, 5), 14), "WEBP", lossless=True),
        "webp_animated": _save(_noise("RGB", (6, 6), 15), "WEBP", save_all=True,
                               append_images=[_noise("RGB", (6, 6), 16)], duration=50),
        "bmp_RGB": _save(_noise("RGB", (5, 3), 17), "BMP"),
        "bmp_P": _save(_noise("RGB", (4, 4), 18).convert("P", palette=Image.Palette.ADAPTIVE, colors=4), "BMP"),
        "bmp_1": _save(_noise("L", (9, 2), 19).convert("1"), "BMP"),
        "tiff_refused": _save(_noise("L", (4, 4), 20), "TIFF"),
    }
    return out


def _event(name: str) -> None:
    """Count outcomes for --hypothesis-show-statistics (how often each was reached)."""
    if currently_in_test_context():
        hypothesis_event(name)


def check_decode(data: bytes, pre: Preprocessing, thumbnail: bool = True) -> int | None:
    """Decode under the contract; return the refusal status, or None when decoded."""
    try:
        d = decode_upload(data, pre, max_pixels=MAX_PIXELS, thumbnail_size=THUMB, name="fuzz.bin",
                          thumbnail=thumbnail)
    except UploadError as exc:
        status, code = status_of(exc)
        _event(f"refused {status}")
        assert status in (400, 413, 415), f"UploadError with status {status}: {exc}"
        assert code and str(exc), "an UploadError needs a code and a message"
        return status
    _event("decoded")
    assert d.array.dtype == np.uint8, d.array.dtype
    assert d.array.shape == (pre.channels, pre.size, pre.size), d.array.shape
    assert d.array.flags.c_contiguous
    if thumbnail:
        with Image.open(io.BytesIO(d.thumbnail_png)) as t:
            assert t.format == "PNG" and max(t.size) <= THUMB and t.mode in ("L", "RGB"), (t.format, t.size, t.mode)
    else:
        assert d.thumbnail_png == b""
    return None


@pytest.mark.parametrize("name", sorted(base_images()))
@pytest.mark.parametrize("pre", PREPROCESSINGS, ids=["L28", "RGB20"])
def test_the_starting_images_decode(name: str, pre: Preprocessing) -> None:
    """The fuzzers start from valid images: each decodes (TIFF is refused with 415)."""
    status = check_decode(base_images()[name], pre)
    assert status == (415 if name == "tiff_refused" else None), name


# -- mutations and forgeries ----------------------------------------------------------------------
@st.composite
def mutated_bytes(draw: st.DrawFn) -> bytes:
    """A valid image with up to 6 byte-level edits: bit flips, overwrites, inserts, deletes, a
    duplicated slice, or truncation."""
    data = bytearray(base_images()[draw(st.sampled_from(sorted(base_images())))])
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "dup", "truncate"]))
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[i] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, draw(st.integers(0, 255))]))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 16))]
        elif op == "dup":
            data[i:i] = data[i:i + draw(st.integers(1, 64))] * draw(st.integers(1, 8))
        else:
            del data[i:]
    return bytes(data)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    out, i = [], 8
    while i + 8 <= len(data):
        (n,), kind = struct.unpack(">I", data[i:i + 4]), data[i + 4:i + 8]
        out.append((kind, data[i + 8:i + 8 + n]))
        i += 12 + n
    return out


def forged_png_bytes(width: int, height: int, bit_depth: int, colour: int, idat: bytes, *,
                     interlace: int = 0, extra: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    """A PNG with the given IHDR fields (correct CRCs), extra chunks before IDAT, and IDAT payload."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, interlace)
    return (PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + b"".join(png_chunk(k, p) for k, p in extra)
            + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""))


DIMENSIONS = st.one_of(st.integers(0, 64), st.integers(990, 1010),
                       st.sampled_from([1, 999_999, 1_000_000, 1_000_001, 20_000_000, 2**31 - 1, 2**32 - 1]))


@st.composite
def forged_png(draw: st.DrawFn) -> bytes:
    """IHDR forged (sizes around and far beyond the pixel limit, bit depths and colour types valid
    and not), an IDAT that inflates to up to 256 KB or is garbage, an optional palette; or a
    chunk of a real PNG mutated and its CRC recomputed."""
    if draw(st.booleans()):
        base = base_images()[draw(st.sampled_from([k for k in base_images() if k.startswith("png")]))]
        chunks = png_chunks(base)
        j = draw(st.integers(0, len(chunks) - 1))
        kind, payload = chunks[j]
        payload = bytearray(payload)
        for _ in range(draw(st.integers(1, 4))):
            if payload:
                payload[draw(st.integers(0, len(payload) - 1))] = draw(st.integers(0, 255))
        if draw(st.booleans()):
            payload += draw(st.binary(max_size=32))
        chunks[j] = (kind, bytes(payload))
        return PNG_SIGNATURE + b"".join(png_chunk(k, p) for k, p in chunks)
    raw_len = draw(st.integers(0, 1 << 18))
    pattern = draw(st.sampled_from([b"\0", b"\x01\xff", b"\x04\x80\x00", b"\x02"]))
    idat = draw(st.one_of(st.just(zlib.compress((pattern * (raw_len // len(pattern) + 1))[:raw_len], 9)),
                          st.binary(max_size=64)))
    extra: tuple[tuple[bytes, bytes], ...] = ()
    if draw(st.booleans()):
        extra = ((b"PLTE", bytes(range(3 * draw(st.integers(0, 300)) % 256)) * 3),)
    return forged_png_bytes(draw(DIMENSIONS), draw(DIMENSIONS), draw(st.sampled_from([1, 2, 4, 8, 16, 0, 3, 32, 255])),
                            draw(st.sampled_from([0, 2, 3, 4, 6, 1, 5, 7, 255])), idat,
                            interlace=draw(st.sampled_from([0, 1, 2])), extra=extra)


U16 = st.one_of(st.integers(0, 32), st.sampled_from([999, 1000, 1001, 65535]), st.integers(0, 65535))


@st.composite
def forged_gif(draw: st.DrawFn) -> bytes:
    """1-40 frames; logical screen and first frame sizes forged; the last frame repeated up to
    2,000 times (frame count)."""
    data = bytearray(_gif(draw(st.integers(1, 40)), (draw(st.integers(1, 8)), draw(st.integers(1, 8))), 0))
    if draw(st.booleans()):
        data[6:10] = struct.pack("<HH", draw(U16), draw(U16))
    if draw(st.booleans()):
        i = data.find(b"\x2c", 13)
        if i > 0 and i + 9 <= len(data):
            data[i + 5:i + 9] = struct.pack("<HH", draw(U16), draw(U16))
    if draw(st.booleans()):
        last = data.rfind(b"\x21\xf9")
        if last > 0:
            data[last:-1] = data[last:-1] * draw(st.integers(2, 2000))
    return bytes(data)


@st.composite
def forged_bmp(draw: st.DrawFn) -> bytes:
    """DIB header fields forged: pixel offset, header size, width, (negative) height, planes, bit
    count, compression, palette size."""
    data = bytearray(base_images()[draw(st.sampled_from(["bmp_RGB", "bmp_P", "bmp_1"]))])
    fields = {10: ("<I", st.integers(0, 2**32 - 1)), 14: ("<I", st.sampled_from([12, 40, 52, 56, 64, 108, 124, 0, 2**31])),
              18: ("<i", st.integers(-(2**31), 2**31 - 1) | st.integers(-2000, 2000)),
              22: ("<i", st.integers(-(2**31), 2**31 - 1) | st.integers(-2000, 2000)),
              26: ("<H", st.integers(0, 3)), 28: ("<H", st.sampled_from([0, 1, 2, 4, 8, 16, 24, 32, 64, 3])),
              30: ("<I", st.integers(0, 7)), 46: ("<I", st.integers(0, 2**32 - 1) | st.integers(0, 300))}
    for off in draw(st.sets(st.sampled_from(sorted(fields)), min_size=1)):
        fmt, strategy = fields[off]
        data[off:off + struct.calcsize(fmt)] = struct.pack(fmt, draw(strategy))
    return bytes(data)


@st.composite
def forged_jpeg(draw: st.DrawFn) -> bytes:
    """SOF height/width/component count forged; or a segment length forged."""
    data = bytearray(base_images()[draw(st.sampled_from(["jpeg_L", "jpeg_RGB", "jpeg_progressive", "jpeg_CMYK"]))])
    sof = max(data.find(b"\xff\xc0"), data.find(b"\xff\xc2"))
    if draw(st.booleans()) and sof > 0:
        data[sof + 5:sof + 9] = struct.pack(">HH", draw(U16), draw(U16))
        if draw(st.booleans()):
            data[sof + 9] = draw(st.integers(0, 255))
    else:
        segments = [i for i in range(2, len(data) - 4) if data[i] == 0xFF and 0xC0 <= data[i + 1] <= 0xFE]
        if segments:
            i = draw(st.sampled_from(segments))
            data[i + 2:i + 4] = struct.pack(">H", draw(U16))
    return bytes(data)


@st.composite
def forged_webp(draw: st.DrawFn) -> bytes:
    """RIFF size, VP8X canvas size (24-bit), or a 16-bit field in the first frame header forged."""
    data = bytearray(base_images()[draw(st.sampled_from(["webp_lossy", "webp_lossless_rgba", "webp_animated"]))])
    what = draw(st.sampled_from(["riff", "canvas", "frame"]))
    if what == "riff":
        data[4:8] = struct.pack("<I", draw(st.integers(0, 2**32 - 1) | st.integers(0, len(data) + 16)))
    elif what == "canvas" and data[12:16] == b"VP8X":
        data[24:30] = draw(st.integers(0, 2**24 - 1)).to_bytes(3, "little") + draw(st.integers(0, 2**24 - 1)).to_bytes(3, "little")
    else:
        i = draw(st.integers(20, min(len(data), 48) - 2))
        data[i:i + 2] = struct.pack("<H", draw(U16))
    return bytes(data)


@FUZZ
@given(data=mutated_bytes(), pre=st.sampled_from(PREPROCESSINGS), thumbnail=st.booleans())
def test_mutated_images_raise_only_upload_error(data: bytes, pre: Preprocessing, thumbnail: bool) -> None:
    check_decode(data, pre, thumbnail)


@FUZZ
@given(data=forged_png(), pre=st.sampled_from(PREPROCESSINGS))
def test_forged_png_headers_raise_only_upload_error(data: bytes, pre: Preprocessing) -> None:
    check_decode(data, pre)


@FUZZ
@given(data=st.one_of(forged_gif(), forged_bmp(), forged_jpeg(), forged_webp()), pre=st.sampled_from(PREPROCESSINGS))
def test_forged_gif_bmp_jpeg_webp_headers_raise_only_upload_error(data: bytes, pre: Preprocessing) -> None:
    check_decode(data, pre)


@FUZZ
@given(data=st.binary(max_size=512), pre=st.sampled_from(PREPROCESSINGS))
def test_arbitrary_bytes_raise_only_upload_error(data: bytes, pre: Preprocessing) -> None:
    check_decode(data, pre)


# -- known attack images: bounded memory ----------------------------------------------------------
MAX_DECODE_GROWTH_MB = 256  # peak RSS growth for one upload, under the service's default pixel limit

_MEASURE = """
import json, re, sys
from fewshot.data.imageio import Preprocessing
from fewshot.service.http.errors import status_of
from fewshot.service.images import UploadError, decode_upload
from fewshot.service.settings import ServiceSettings

def kb(field):  # this process's own memory (ru_maxrss would carry the forking parent's peak over exec)
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))

s = ServiceSettings(bundle_path="unused")
pre = Preprocessing("L", 28)
decode_upload(open(sys.argv[2], "rb").read(), pre, max_pixels=s.max_image_pixels, thumbnail_size=s.thumbnail_size,
              name="warm-up")
try:
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current size
except OSError:
    pass
before = kb("VmHWM")
try:
    decode_upload(open(sys.argv[1], "rb").read(), pre, max_pixels=s.max_image_pixels,
                  thumbnail_size=s.thumbnail_size, name="attack")
    outcome = "decoded"
except UploadError as exc:
    outcome = f"UploadError {status_of(exc)[0]}"
print(json.dumps({"growth_mb": (kb("VmHWM") - before) / 1024, "outcome": outcome, "max_pixels": s.max_image_pixels}))
"""


def _attack_1x20m() -> bytes:
    """Under 100 bytes declaring 1 x 20,000,000 8-bit grey pixels."""
    return forged_png_bytes(1, 20_000_000, 8, 0, zlib.compress(b"\0\0\0\0", 9))


def _attack_16bit_5000() -> bytes:
    """A 16-bit grey 5000 x 5000 PNG of zeros (~50 KB)."""
    row = b"\0" * (1 + 2 * 5000)
    return forged_png_bytes(5000, 5000, 16, 0, zlib.compress(row * 5000, 9))


@pytest.mark.parametrize("make", [_attack_1x20m, _attack_16bit_5000], ids=["png_1x20M", "png16_5000x5000"])
def test_known_attack_images_stay_cheap(make: Callable[[], bytes], tmp_path: Path) -> None:
    """Peak memory of one decode, measured in a fresh process: either refused or decoded within budget."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("peak memory is read from /proc/self/status (Linux)")
    attack, warm = tmp_path / "attack.png", tmp_path / "warm.png"
    attack.write_bytes(make())
    warm.write_bytes(base_images()["png_L"])
    r = subprocess.run([sys.executable, "-c", _MEASURE, str(attack), str(warm)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["outcome"] in ("decoded", "UploadError 400", "UploadError 413", "UploadError 415"), m
    assert m["growth_mb"] <= MAX_DECODE_GROWTH_MB, (
        f"{len(attack.read_bytes())}-byte upload ({m['outcome']}) grew the process by {m['growth_mb']:.0f} MB "
        f"(limit {MAX_DECODE_GROWTH_MB} MB, max_pixels {m['max_pixels']:,})")


# -- the HTTP API against its own schema (schemathesis) ---------------------------------------------
def _png_upload(seed: int) -> bytes:
    return _save(_noise("L", (28, 28), seed), "PNG")


class _Live:
    """Real ids to swap into generated requests; re-created when a request deletes them."""

    def __init__(self, http: Any) -> None:
        self.http = http
        self.other_key = self._workspace("other")[1]
        self.ws, self.key = self._workspace("main")
        self.cid = self.eid = ""
        self.ensure()

    def _workspace(self, name: str) -> tuple[str, str]:
        r = self.http.post("/workspaces", json={"name": name}, headers={"Authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 201, r.text
        return r.json()["id"], r.json()["api_key"]

    def ensure(self) -> None:
        h = {"Authorization": f"Bearer {ADMIN}"}
        if self.http.get(f"/workspaces/{self.ws}", headers=h).status_code == 404:
            self.ws, self.key = self._workspace("main")
        r = self.http.get(f"/workspaces/{self.ws}/classes/{self.cid}", headers=h) if self.cid else None
        if r is None or r.status_code == 404:
            files = [("images", (f"{i}.png", _png_upload(i), "image/png")) for i in range(2)]
            r = self.http.post(f"/workspaces/{self.ws}/classes", data={"label": f"live-{os.urandom(4).hex()}"},
                               files=files, headers=h)
            assert r.status_code == 201, r.text
            self.cid = r.json()["id"]
            r = self.http.get(f"/workspaces/{self.ws}/classes/{self.cid}", headers=h)
        self.eid = r.json()["example_ids"][0]

    def keys(self) -> dict[str, str]:
        return {"admin": ADMIN, "workspace": self.key, "other": self.other_key, "wrong": "fsk_not-a-key", "none": ""}


def _no_admin_throttle() -> dict[str, int]:
    """The fuzzer sends wrong keys on purpose; the admin throttle (429 after a few) would lock
    the test's own admin calls out."""
    names = {f.name for f in dataclasses.fields(ServiceSettings)}
    return {k: 10**9 for k in ("admin_failures_per_minute", "admin_failures_per_minute_total") if k in names}


@pytest.fixture
def fuzz_app(tiny_bundle: Path, store_url: str) -> Iterator[Any]:
    from schemathesis.python import asgi

    app = create_app(ServiceSettings(bundle_path=str(tiny_bundle), db_url=store_url, admin_key=ADMIN,
                                     max_body_bytes=512 * 1024, max_images_per_request=4, max_image_pixels=MAX_PIXELS,
                                     **_no_admin_throttle()))
    yield app
    asgi.shutdown_lifespans()  # schemathesis keeps an app's lifespan (and its store) open until then


def test_openapi_schema_fuzz_finds_no_server_error(fuzz_app: Any) -> None:
    """Positive and negative cases for every operation in /openapi.json; path ids are generated or
    real, uploads generated or real PNGs, and requests carry the admin key, the workspace's key,
    another workspace's key, a wrong key or none. Check: `not_a_server_error`."""
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error as no_5xx
    from schemathesis.python import asgi

    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    cases = st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))
    seen: Counter[str] = Counter()
    with asgi.get_client(fuzz_app) as http:
        live = _Live(http)

        @settings(max_examples=int(os.environ.get("FEWSHOT_SCHEMA_EXAMPLES", "250")), deadline=None,
                  derandomize=True, database=None, print_blob=True, suppress_health_check=list(HealthCheck))
        @given(case=cases, data=st.data())
        def run(case: Any, data: st.DataObject) -> None:
            # 60%: authorised on real ids (the paths that reach the store); else anything goes.
            # 10% of bodies get a NUL appended to their text fields (PostgreSQL refuses NUL in text)
            authorised = data.draw(st.integers(0, 4), label="scenario") < 3
            real_ids = authorised or data.draw(st.booleans(), label="real ids")
            who = data.draw(st.sampled_from(["workspace", "workspace", "admin"] if authorised else
                                            ["admin", "workspace", "other", "wrong", "none"]), label="key")
            real_images = data.draw(st.integers(0, 3), label="real images") < (3 if authorised else 1)
            if real_ids:
                for name, value in (("ws", live.ws), ("cid", live.cid), ("eid", live.eid)):
                    if isinstance(case.path_parameters, dict) and name in case.path_parameters:
                        case.path_parameters[name] = value
            if real_images and isinstance(case.body, dict):
                if "images" in case.body:
                    case.body["images"] = [_png_upload(1), _png_upload(2)]
                if "image" in case.body:
                    case.body["image"] = _png_upload(3)
            if isinstance(case.body, dict) and data.draw(st.integers(0, 9), label="NUL") == 0:
                case.body = {k: v + "\x00" if isinstance(v, str) else v for k, v in case.body.items()}
            key = live.keys()[who]
            response = case.call(headers={"Authorization": f"Bearer {key}"} if key else {})
            seen[f"{case.operation.label} {'authorised' if authorised else 'free'} -> {response.status_code}"] += 1
            case.validate_response(response, checks=[no_5xx])
            if case.method.upper() == "DELETE" and response.status_code < 300:
                live.ensure()

        run()
        print("\n".join(f"{n:4d} {k}" for k, n in sorted(seen.items())))


# -- inputs that once broke the service -----------------------------------------------------------------
@pytest.fixture
def client(tiny_bundle: Path, store_url: str) -> Iterator[TestClient]:
    app = create_app(ServiceSettings(bundle_path=str(tiny_bundle), db_url=store_url, admin_key=ADMIN))
    with TestClient(app) as c:
        yield c


def _teach(client: TestClient) -> tuple[str, dict[str, str], str]:
    r = client.post("/workspaces", json={"name": "nul"}, headers={"Authorization": f"Bearer {ADMIN}"})
    ws, h = r.json()["id"], {"Authorization": f"Bearer {r.json()['api_key']}"}
    r = client.post(f"/workspaces/{ws}/classes", data={"label": "a"},
                    files=[("images", ("a.png", _png_upload(0), "image/png"))], headers=h)
    assert r.status_code == 201, r.text
    return ws, h, r.json()["id"]


def _assert_4xx(r: Any) -> None:
    assert 400 <= r.status_code < 500, f"{r.request.method} {r.request.url} -> {r.status_code} {r.text[:300]}"
    assert set(r.json()["error"]) == {"code", "message"}


def test_nul_bytes_in_text_and_paths_are_refused_not_500(client: TestClient) -> None:
    ws, h, cid = _teach(client)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    png = [("images", ("x.png", _png_upload(1), "image/png"))]
    _assert_4xx(client.post("/workspaces", json={"name": "a\x00b"}, headers=admin))
    _assert_4xx(client.post(f"/workspaces/{ws}/classes", data={"label": "b\x00"}, files=png, headers=h))
    _assert_4xx(client.patch(f"/workspaces/{ws}/classes/{cid}", json={"label": "\x00"}, headers=h))
    for path in (f"/workspaces/{ws}%00", f"/workspaces/{ws}/classes/{cid}%00", f"/workspaces/{ws}/examples/ex%00/thumbnail.png"):
        _assert_4xx(client.get(path, headers=h))
        _assert_4xx(client.get(path, headers=admin))
    r = client.post(f"/workspaces/{ws}/classify", files=[("images", ("a\x00.png", _png_upload(2), "image/png"))], headers=h)
    assert r.status_code < 500, r.text


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "Infinity", "1e999"])
def test_non_finite_thresholds_are_refused(client: TestClient, value: str) -> None:
    ws, h, _ = _teach(client)
    img = [("images", ("q.png", _png_upload(5), "image/png"))]
    _assert_4xx(client.post(f"/workspaces/{ws}/classify", data={"threshold": value}, files=img, headers=h))
    _assert_4xx(client.post(f"/workspaces/{ws}/explain", data={"threshold": value},
                            files=[("image", ("q.png", _png_upload(5), "image/png"))], headers=h))
    literal = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}.get(value, value)
    body = f'{{"threshold": {literal}}}'
    _assert_4xx(client.patch(f"/workspaces/{ws}", content=body, headers={**h, "Content-Type": "application/json"}))

"""HTTP service through FastAPI's TestClient: auth isolation, CRUD, classify/explain, every bad
input we know of, limits, metrics; after each bad request the service must still answer."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from service_helpers import class_images, png_bytes

from fewshot.service.app import create_app, get_settings
from fewshot.service.settings import ServiceSettings
from fewshot.service.store import ModelMismatchError

ADMIN = "admin-secret"


def settings_for(bundle: Path, tmp_path: Path, **kw: object) -> ServiceSettings:
    base: dict = dict(bundle_path=str(bundle), db_url=str(tmp_path / "svc.db"), admin_key=ADMIN,
                      max_body_bytes=2 * 1024 * 1024, max_images_per_request=8, max_image_pixels=4_000_000)
    base.update(kw)
    return ServiceSettings(**base)


@pytest.fixture
def client(tiny_bundle: Path, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(tiny_bundle, tmp_path))) as c:
        yield c


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def new_workspace(client: TestClient, name: str = "ws") -> tuple[str, str]:
    r = client.post("/workspaces", json={"name": name}, headers=auth(ADMIN))
    assert r.status_code == 201, r.text
    return r.json()["id"], r.json()["api_key"]


def files(arrs: np.ndarray, field: str = "images") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field, (f"img{i}.png", png_bytes(a), "image/png")) for i, a in enumerate(arrs)]


def teach(client: TestClient, ws: str, key: str, label: str, seed: int, n: int = 5) -> dict:
    r = client.post(f"/workspaces/{ws}/classes", data={"label": label}, files=files(class_images(seed, n)), headers=auth(key))
    assert r.status_code == 201, r.text
    return r.json()


def assert_error(r: object, status: int, code: str | None = None) -> dict:
    resp = r  # httpx.Response
    assert resp.status_code == status, resp.text  # type: ignore[attr-defined]
    err = resp.json()["error"]  # type: ignore[attr-defined]
    assert set(err) == {"code", "message"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


def assert_still_healthy(client: TestClient, ws: str, key: str) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.post(f"/workspaces/{ws}/classify", files=files(class_images(0, 6)[5:]), headers=auth(key))
    assert r.status_code == 200, r.text


def test_health_ready_docs_ui_model(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and len(ready["bundle_id"]) == 16
    assert client.get("/docs").status_code == 404  # off by default: Swagger UI loads scripts from a CDN
    paths = client.get("/openapi.json").json()["paths"]
    assert "/workspaces/{ws}/classify" in paths and "/workspaces/{ws}/classes/{cid}/images" in paths
    assert client.get("/ui/").status_code == 200 and "text/html" in client.get("/ui/").headers["content-type"]
    assert client.get("/model").json()["embedding_dim"] == 64


def test_teach_classify_explain_roundtrip(client: TestClient) -> None:
    ws, key = new_workspace(client)
    ids = [teach(client, ws, key, f"c{s}", s)["id"] for s in range(3)]
    r = client.post(f"/workspaces/{ws}/classify", files=files(np.concatenate([class_images(s, 7)[5:] for s in range(3)])),
                    data={"top_k": "2"}, headers=auth(key))
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["class_id"] for p in preds] == [i for i in ids for _ in range(2)]
    assert all(len(p["top_k"]) == 2 and p["known"] for p in preds)
    assert "app;dur=" in r.headers["server-timing"]
    r = client.post(f"/workspaces/{ws}/explain", files=[("image", ("q.png", png_bytes(class_images(1, 6)[5]), "image/png"))],
                    data={"k": "3"}, headers=auth(key))
    body = r.json()
    assert body["prediction"]["class_id"] == ids[1] and len(body["neighbours"]) == 3
    thumb = base64.b64decode(body["neighbours"][0]["thumbnail_png_base64"])
    assert Image.open(io.BytesIO(thumb)).format == "PNG"
    eid = body["neighbours"][0]["example_id"]
    t = client.get(f"/workspaces/{ws}/examples/{eid}/thumbnail.png", headers=auth(key))
    assert t.status_code == 200 and t.content == thumb and t.headers["content-type"] == "image/png"


def test_class_crud_and_incremental_images(client: TestClient) -> None:
    ws, key = new_workspace(client)
    c = teach(client, ws, key, "cat", 0, n=2)
    r = client.post(f"/workspaces/{ws}/classes/{c['id']}/images", files=files(class_images(0, 5)[2:]), headers=auth(key))
    assert r.json()["n_examples"] == 5
    got = client.get(f"/workspaces/{ws}/classes/{c['id']}", headers=auth(key)).json()
    assert got["label"] == "cat" and len(got["example_ids"]) == 5
    r = client.patch(f"/workspaces/{ws}/classes/{c['id']}", json={"label": "kitten"}, headers=auth(key))
    assert r.json()["label"] == "kitten"
    teach(client, ws, key, "dog", 1)
    assert_error(client.patch(f"/workspaces/{ws}/classes/{c['id']}", json={"label": "dog"}, headers=auth(key)), 409, "conflict")
    assert_error(client.post(f"/workspaces/{ws}/classes", data={"label": "dog"}, files=files(class_images(2, 1)),
                             headers=auth(key)), 409, "conflict")
    assert [x["label"] for x in client.get(f"/workspaces/{ws}/classes", headers=auth(key)).json()] == ["kitten", "dog"]
    assert client.delete(f"/workspaces/{ws}/classes/{c['id']}", headers=auth(key)).status_code == 204
    assert_error(client.get(f"/workspaces/{ws}/classes/{c['id']}", headers=auth(key)), 404, "not_found")
    assert_error(client.delete(f"/workspaces/{ws}/classes/{c['id']}", headers=auth(key)), 404)
    assert_error(client.post(f"/workspaces/{ws}/classes/cls_nope/images", files=files(class_images(0, 1)),
                             headers=auth(key)), 404)


def test_threshold_settings_and_override(client: TestClient) -> None:
    ws, key = new_workspace(client)
    teach(client, ws, key, "a", 0)
    q = files(class_images(0, 6)[5:])
    r = client.post(f"/workspaces/{ws}/classify", files=q, data={"threshold": "0"}, headers=auth(key))
    p = r.json()["predictions"][0]
    assert p["label"] == "unknown" and not p["known"] and p["threshold"] == 0
    assert p["novelty"] > 0  # thresholds are on the open-set rule's novelty scale
    r = client.patch(f"/workspaces/{ws}", json={"threshold": 1e6, "metric": "cosine"}, headers=auth(key))
    assert r.json()["settings"] == {"metric": "cosine", "head": "prototype", "threshold": 1e6}
    assert client.post(f"/workspaces/{ws}/classify", files=q, headers=auth(key)).json()["predictions"][0]["known"]
    assert_error(client.patch(f"/workspaces/{ws}", json={"metric": "manhattan"}, headers=auth(key)), 400, "invalid_argument")
    r = client.patch(f"/workspaces/{ws}", json={"clear_threshold": True, "head": "logistic"}, headers=auth(key))
    assert r.json()["settings"]["threshold"] is None


def test_auth_and_isolation(client: TestClient) -> None:
    a, key_a = new_workspace(client, "a")
    b, key_b = new_workspace(client, "b")
    ca = teach(client, a, key_a, "secret-class", 0)
    teach(client, b, key_b, "b-class", 1)
    assert_error(client.post("/workspaces", json={"name": "x"}), 401)
    assert_error(client.post("/workspaces", json={"name": "x"}, headers=auth("nope")), 401)
    assert_error(client.post("/workspaces", json={"name": "x"}, headers=auth(key_a)), 401)
    assert_error(client.get(f"/workspaces/{a}/classes"), 401, "unauthorized")
    assert_error(client.get(f"/workspaces/{a}/classes", headers=auth("fsk_wrong")), 401, "unauthorized")
    # B's key on A's workspace: forbidden for every route
    for method, url in [("get", f"/workspaces/{a}"), ("get", f"/workspaces/{a}/classes"),
                        ("get", f"/workspaces/{a}/classes/{ca['id']}"), ("delete", f"/workspaces/{a}/classes/{ca['id']}"),
                        ("delete", f"/workspaces/{a}")]:
        assert_error(getattr(client, method)(url, headers=auth(key_b)), 403, "forbidden")
    assert_error(client.patch(f"/workspaces/{a}/classes/{ca['id']}", json={"label": "x"}, headers=auth(key_b)), 403)
    assert_error(client.post(f"/workspaces/{a}/classify", files=files(class_images(0, 1)), headers=auth(key_b)), 403)
    # A's class id through B's own workspace: not found there
    assert_error(client.get(f"/workspaces/{b}/classes/{ca['id']}", headers=auth(key_b)), 404)
    assert_error(client.delete(f"/workspaces/{b}/classes/{ca['id']}", headers=auth(key_b)), 404)
    assert_error(client.patch(f"/workspaces/{b}/classes/{ca['id']}", json={"label": "x"}, headers=auth(key_b)), 404)
    r = client.post(f"/workspaces/{b}/classify", files=files(class_images(0, 6)[5:]), data={"top_k": "10"}, headers=auth(key_b))
    assert {c["label"] for c in r.json()["predictions"][0]["top_k"]} == {"b-class"}
    # unknown workspace: a valid key or the admin key learns it does not exist; no key learns nothing
    assert_error(client.get("/workspaces/ws_nope/classes", headers=auth(key_a)), 404, "not_found")
    assert_error(client.get("/workspaces/ws_0123456789abcdef/classes", headers=auth(key_a)), 404, "not_found")
    assert_error(client.get("/workspaces/ws_nope/classes", headers=auth(ADMIN)), 404, "not_found")
    assert_error(client.get("/workspaces/ws_nope/classes", headers=auth("fsk_wrong")), 401, "unauthorized")
    assert client.get(f"/workspaces/{a}/classes", headers=auth(ADMIN)).status_code == 200
    # keys only in the Authorization header
    assert_error(client.get(f"/workspaces/{a}/classes", headers={"X-API-Key": key_a}), 401, "unauthorized")
    # keys are stored hashed
    store = client.app.state.service.store  # type: ignore[attr-defined]
    assert key_a not in str(store.get_workspace(a)) and len(store.get_workspace(a).key_hash) == 64
    assert client.get(f"/workspaces/{a}/classes/{ca['id']}", headers=auth(key_a)).status_code == 200


def test_admin_disabled_without_key(tiny_bundle: Path, tmp_path: Path) -> None:
    with TestClient(create_app(settings_for(tiny_bundle, tmp_path, admin_key=""))) as c:
        assert_error(c.post("/workspaces", json={"name": "x"}, headers=auth("")), 403, "forbidden")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(w: int = 40_000, h: int = 40_000) -> bytes:
    """A ~100-byte PNG whose header claims w x h pixels (1.6 billion): must be refused unread."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b"")


def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def corrupt_png() -> bytes:
    """Valid header, garbage in the compressed pixel data."""
    data = bytearray(png_bytes(class_images(0, 1)[0]))
    at = data.index(b"IDAT") + 8
    data[at : at + 40] = b"\xde\xad\xbe\xef" * 10
    return bytes(data)


def tiff_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(class_images(0, 1)[0, 0]).save(buf, format="TIFF")
    return buf.getvalue()


BAD_IMAGES = {
    "empty": (b"", 400, "empty_image"),
    "text": (b"hello, I am not an image at all" * 10, 415, "unsupported_media_type"),
    "html-named-png": (b"<html><script>alert(1)</script></html>", 415, "unsupported_media_type"),
    "tiff": (tiff_bytes(), 415, "unsupported_media_type"),
    "truncated-png": (png_bytes(class_images(0, 1)[0])[:60], 400, "corrupt_image"),
    "truncated-jpeg": (jpeg_bytes()[: len(jpeg_bytes()) // 2], 400, "corrupt_image"),
    "corrupt-png": (corrupt_png(), 400, "corrupt_image"),
    "bomb-png-40000x40000": (bomb_png(), 413, "image_too_large"),
    "over-limit-3000x2000": (bomb_png(3000, 2000), 413, "image_too_large"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
@pytest.mark.parametrize("route", ["classify", "add_class"])
def test_bad_images_refused_and_service_survives(client: TestClient, case: str, route: str) -> None:
    ws, key = new_workspace(client)
    teach(client, ws, key, "good", 0)
    data, status, code = BAD_IMAGES[case]
    upload = [("images", ("x.png", data, "image/png"))]
    if route == "classify":
        r = client.post(f"/workspaces/{ws}/classify", files=upload, headers=auth(key))
    else:  # one bad image among good ones: nothing is stored
        upload = files(class_images(1, 2)) + upload
        r = client.post(f"/workspaces/{ws}/classes", data={"label": "bad"}, files=upload, headers=auth(key))
    err = assert_error(r, status, code)
    assert "x.png" in err["message"] or case == "empty"
    assert [c["label"] for c in client.get(f"/workspaces/{ws}/classes", headers=auth(key)).json()] == ["good"]
    assert_still_healthy(client, ws, key)


def test_body_limits(client: TestClient) -> None:
    ws, key = new_workspace(client)
    teach(client, ws, key, "good", 0)
    consumed = 0

    def body(total: int, chunk: int = 1 << 20) -> Iterator[bytes]:
        nonlocal consumed
        for _ in range(total // chunk):
            consumed += chunk
            yield b"\x00" * chunk

    # 100 MB announced by Content-Length: refused before reading the body
    r = client.post(f"/workspaces/{ws}/classify", content=body(100 << 20),
                    headers={**auth(key), "content-type": "multipart/form-data; boundary=x", "content-length": str(100 << 20)})
    assert_error(r, 413, "body_too_large")
    assert consumed == 0
    # too many images in one request
    assert_error(client.post(f"/workspaces/{ws}/classify", files=files(class_images(0, 9)), headers=auth(key)),
                 413, "too_many_images")
    assert_still_healthy(client, ws, key)


def test_streamed_body_over_limit_is_cut_off(client: TestClient) -> None:
    """A chunked body without Content-Length is counted as it arrives (the ASGI app is driven
    directly: TestClient reads a request body whole before the app sees it)."""
    ws, key = new_workspace(client)
    app = client.app
    consumed, sent = 0, []

    head = b'--x\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'

    async def receive() -> dict:  # a valid multipart stream with one 100 MB file
        nonlocal consumed
        chunk = (head if consumed == 0 else b"") + b"\x00" * (1 << 20)
        consumed += 1 << 20
        return {"type": "http.request", "body": chunk, "more_body": consumed < (100 << 20)}

    async def send(message: dict) -> None:
        sent.append(message)

    headers = [(b"authorization", f"Bearer {key}".encode()), (b"content-type", b"multipart/form-data; boundary=x"),
               (b"transfer-encoding", b"chunked")]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": f"/workspaces/{ws}/classify", "raw_path": f"/workspaces/{ws}/classify".encode(),
             "query_string": b"", "root_path": "", "headers": headers, "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80), "app": app, "state": {}}
    asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["error"]["code"] == "body_too_large"
    assert consumed <= (2 << 20) + (1 << 20), f"read {consumed:,} bytes of a 100 MB body"
    assert client.get("/healthz").status_code == 200


def test_malformed_requests(client: TestClient) -> None:
    ws, key = new_workspace(client)
    teach(client, ws, key, "good", 0)
    h = auth(key)
    assert_error(client.post(f"/workspaces/{ws}/classify", headers=h), 422, "invalid_request")
    assert_error(client.post(f"/workspaces/{ws}/classify", files=files(class_images(0, 1)), data={"top_k": "0"}, headers=h), 422)
    assert_error(client.post(f"/workspaces/{ws}/classify", files=files(class_images(0, 1)), data={"top_k": "1000"}, headers=h), 400)
    assert_error(client.post(f"/workspaces/{ws}/classify", files=files(class_images(0, 1)), data={"threshold": "abc"}, headers=h), 422)
    err = assert_error(client.post(f"/workspaces/{ws}/classes", files=files(class_images(0, 1)), headers=h), 400)
    assert "label is empty" in err["message"]
    assert_error(client.post(f"/workspaces/{ws}/classes", data={"label": "unknown"}, files=files(class_images(0, 1)), headers=h), 400)
    assert_error(client.post("/workspaces", content=b"{not json", headers={**auth(ADMIN), "content-type": "application/json"}), 422)
    r = client.post(f"/workspaces/{ws}/classify", content=b"--x\r\ngarbage", headers={**h, "content-type": "multipart/form-data; boundary=x"})
    assert r.status_code in (400, 422) and r.json()["error"]["code"] in ("bad_request", "invalid_request")
    assert_error(client.get("/no/such/route"), 404, "not_found")
    assert_error(client.put("/healthz"), 405)
    empty, ekey = new_workspace(client, "empty")
    assert_error(client.post(f"/workspaces/{empty}/classify", files=files(class_images(0, 1)), headers=auth(ekey)), 409)
    assert_still_healthy(client, ws, key)


def test_metrics(client: TestClient) -> None:
    ws, key = new_workspace(client)
    teach(client, ws, key, "a", 0)
    teach(client, ws, key, "b", 1)
    client.post(f"/workspaces/{ws}/classify", files=files(class_images(0, 1)), headers=auth(key))
    assert_error(client.get("/metrics"), 401)
    assert_error(client.get("/metrics", headers=auth(key)), 401)  # a workspace key is not enough
    text = client.get("/metrics", headers=auth(ADMIN)).text
    assert 'fewshot_http_requests_total{method="POST",route="/workspaces/{ws}/classify",status="200"} 1.0' in text
    assert "fewshot_http_request_duration_seconds_bucket" in text
    assert ws not in text  # no per-tenant labels


def test_store_from_a_different_model_is_refused(tiny_bundle: Path, other_bundle: Path, tmp_path: Path) -> None:
    with TestClient(create_app(settings_for(tiny_bundle, tmp_path))) as c:
        new_workspace(c)
    with pytest.raises(ModelMismatchError, match=r"of bundle \w+ \(64-d embeddings\), but this service serves only "
                       r"\w+ \(32-d\)"), \
            TestClient(create_app(settings_for(other_bundle, tmp_path))):
        pass


def test_settings_dependency_can_be_overridden(client: TestClient, tiny_bundle: Path, tmp_path: Path) -> None:
    ws, key = new_workspace(client)
    teach(client, ws, key, "a", 0)
    client.app.dependency_overrides[get_settings] = lambda: settings_for(  # type: ignore[attr-defined]
        tiny_bundle, tmp_path, max_images_per_request=1)
    assert_error(client.post(f"/workspaces/{ws}/classify", files=files(class_images(0, 2)), headers=auth(key)), 413)
    client.app.dependency_overrides.clear()  # type: ignore[attr-defined]


def test_restart_reloads_classes_from_the_store(tiny_bundle: Path, tmp_path: Path) -> None:
    s = settings_for(tiny_bundle, tmp_path)
    with TestClient(create_app(s)) as c:
        ws, key = new_workspace(c)
        cid = teach(c, ws, key, "persisted", 3)["id"]
    with TestClient(create_app(s)) as c:
        r = c.post(f"/workspaces/{ws}/classify", files=files(class_images(3, 6)[5:]), headers=auth(key))
        assert r.json()["predictions"][0]["class_id"] == cid

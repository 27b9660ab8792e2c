"""Regression tests for the HTTP service under attack: labels, unknown workspaces, keys in URLs,
admin-key guessing, metrics and docs defaults, MPO and forged uploads, store failures, out-of-domain
flags. (NUL bytes and non-finite thresholds: test_fuzz.py, "inputs that once broke the service".)"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hostile_images import mpo_bytes, tiny_wide_png
from service_helpers import class_images, colour_photo_jpeg, png_bytes
from test_app import ADMIN, assert_error, auth, files, new_workspace, settings_for, teach

from fewshot.service.app import create_app
from fewshot.service.middleware import RedactQueryFilter
from fewshot.service.store import SQLiteStore


@pytest.fixture
def any_client(tiny_bundle: Path, tmp_path: Path, store_url: str) -> Iterator[TestClient]:
    """The app over each store backend (PostgreSQL rejects NUL where SQLite stores it)."""
    with TestClient(create_app(settings_for(tiny_bundle, tmp_path, db_url=store_url)),
                    raise_server_exceptions=False) as c:
        yield c


def test_labels_empty_reserved_and_unicode_forms(any_client: TestClient) -> None:
    c = any_client
    ws, key = new_workspace(c)
    one = files(class_images(0, 2))
    for label in ("", "   "):
        err = assert_error(c.post(f"/workspaces/{ws}/classes", data={"label": label}, files=one, headers=auth(key)), 400)
        assert "empty" in err["message"]
    for label in ("unknown", "Unknown", "UNKNOWN"):
        assert "reserved" in assert_error(c.post(f"/workspaces/{ws}/classes", data={"label": label}, files=one,
                                                 headers=auth(key)), 400)["message"]
    assert teach(c, ws, key, "caf\u00e9", 0)["label"] == "caf\u00e9"
    r = c.post(f"/workspaces/{ws}/classes", data={"label": "cafe\u0301"}, files=one, headers=auth(key))
    assert_error(r, 409, "conflict")  # NFD is the same label


def test_keys_only_in_the_authorization_header(any_client: TestClient) -> None:
    ws, key = new_workspace(any_client)
    for q in ("api_key", "key", "token"):
        err = assert_error(any_client.get(f"/workspaces/{ws}/classes?{q}={key}"), 400, "key_in_url")
        assert key not in err["message"]


def test_access_log_never_holds_query_values(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("uvicorn.access.test")
    log.addFilter(RedactQueryFilter())
    with caplog.at_level(logging.INFO, logger="uvicorn.access.test"):
        log.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1", "GET", "/workspaces/ws_1/classes?api_key=fsk_SECRET&x=1",
                 "1.1", 400)
    assert "fsk_SECRET" not in caplog.text and "?api_key=...&x=..." in caplog.text


def test_failed_admin_attempts_are_throttled(tiny_bundle: Path, tmp_path: Path) -> None:
    with TestClient(create_app(settings_for(tiny_bundle, tmp_path, admin_failures_per_minute=3))) as c:
        for _ in range(3):
            assert_error(c.post("/workspaces", json={"name": "x"}, headers=auth("guess")), 401)
        r = c.post("/workspaces", json={"name": "x"}, headers=auth(ADMIN))  # even the right key, for a while
        assert_error(r, 429, "too_many_attempts")
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert_error(c.get("/metrics", headers=auth("guess")), 429)


def test_metrics_and_docs_defaults_and_switches(tiny_bundle: Path, tmp_path: Path) -> None:
    with TestClient(create_app(settings_for(tiny_bundle, tmp_path))) as c:
        assert_error(c.get("/metrics"), 401)
        assert c.get("/docs").status_code == 404 and c.get("/redoc").status_code == 404
        assert c.get("/openapi.json").status_code == 200
    with TestClient(create_app(settings_for(tiny_bundle, tmp_path, metrics_public=True, docs=True))) as c:
        assert c.get("/metrics").status_code == 200 and c.get("/docs").status_code == 200


def test_mpo_uploads_are_taught_and_forged_pngs_refused(any_client: TestClient) -> None:
    ws, key = new_workspace(any_client)
    r = any_client.post(f"/workspaces/{ws}/classes", data={"label": "photo"},
                        files=[("images", ("phone.jpg", mpo_bytes(), "image/jpeg"))], headers=auth(key))
    assert r.status_code == 201, r.text
    r = any_client.post(f"/workspaces/{ws}/classify", files=[("images", ("wide.png", tiny_wide_png(), "image/png"))],
                        headers=auth(key))
    assert_error(r, 413, "image_too_large")


class BrokenDisk(SQLiteStore):
    """An SQLite store whose every statement fails as a full disk would (after it opened)."""

    broken = False

    def _exec(self, conn, sql, params=()):  # type: ignore[no-untyped-def]
        if self.broken:
            raise sqlite3.OperationalError("database or disk is full")
        return super()._exec(conn, sql, params)


def test_a_failing_store_is_a_503_with_retry_after_and_no_path(tiny_bundle: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import fewshot.service.http.app as app_module

    db = tmp_path / "secret-location" / "svc.db"
    monkeypatch.setattr(app_module, "open_store", lambda url, **_: BrokenDisk(db))
    with TestClient(create_app(settings_for(tiny_bundle, tmp_path)), raise_server_exceptions=False) as c:
        ws, key = new_workspace(c)
        c.app.state.service.store.broken = True  # type: ignore[attr-defined]
        for r in (c.get("/readyz"), c.get(f"/workspaces/{ws}/classes", headers=auth("made-up")),
                  c.post(f"/workspaces/{ws}/classes", data={"label": "a"}, files=files(class_images(0, 1)),
                         headers=auth(key))):
            err = assert_error(r, 503, "store_unavailable")
            assert r.headers["retry-after"] == "2" and "secret-location" not in err["message"]
        c.app.state.service.store.broken = False  # type: ignore[attr-defined]
        assert c.get("/readyz").status_code == 200  # recovers without a restart
        assert c.get(f"/workspaces/{ws}/classes", headers=auth(key)).json() == []


def test_colour_photos_are_flagged_out_of_domain_but_still_answered(domain_bundle: Path, tmp_path: Path) -> None:
    with TestClient(create_app(settings_for(domain_bundle, tmp_path))) as c:
        assert c.get("/model").json()["domain"] == {"mode": "L", "size": 28, "trained_on": "noise patterns"}
        ws, key = new_workspace(c)
        teach(c, ws, key, "a", 100)
        teach(c, ws, key, "b", 101)
        photos = [("images", (f"p{i}.jpg", colour_photo_jpeg(seed=i), "image/jpeg")) for i in range(3)]
        inside = [("images", (f"q{i}.png", png_bytes(a), "image/png")) for i, a in enumerate(class_images(100, 8)[5:])]
        preds = c.post(f"/workspaces/{ws}/classify", files=photos + inside, headers=auth(key)).json()["predictions"]
        assert [p["out_of_domain"] for p in preds] == [True] * 3 + [False] * 3
        assert all(any("colour" in r for r in p["domain_reasons"]) for p in preds[:3])
        assert all(p["top_k"] and p["domain_score"] is not None for p in preds)  # flagged, not hidden
        one = c.post(f"/workspaces/{ws}/explain", files=[("image", ("p.jpg", colour_photo_jpeg(), "image/jpeg"))],
                     headers=auth(key)).json()
        assert one["prediction"]["out_of_domain"]


def test_bundles_without_a_domain_summary_flag_nothing(client_factory_bundle: Path, tmp_path: Path) -> None:
    with TestClient(create_app(settings_for(client_factory_bundle, tmp_path))) as c:
        ws, key = new_workspace(c)
        teach(c, ws, key, "a", 0)
        p = c.post(f"/workspaces/{ws}/classify", files=[("images", ("p.jpg", colour_photo_jpeg(), "image/jpeg"))],
                   headers=auth(key)).json()["predictions"][0]
        assert not p["out_of_domain"] and p["domain_score"] is None and p["domain_reasons"] == []


@pytest.fixture
def client_factory_bundle(tiny_bundle: Path) -> Path:
    return tiny_bundle


def test_admin_key_guesses_on_workspace_routes_are_throttled_too(tiny_bundle: Path, tmp_path: Path) -> None:
    with TestClient(create_app(settings_for(tiny_bundle, tmp_path, admin_failures_per_minute=3))) as c:
        for _ in range(3):
            assert_error(c.get("/workspaces/ws_0000000000000000", headers=auth("guess")), 401)
        r = c.get("/workspaces/ws_0000000000000000", headers=auth(ADMIN))
        assert_error(r, 429, "too_many_attempts")


def test_metrics_labels_stay_bounded_whatever_the_method(tiny_bundle: Path, tmp_path: Path) -> None:
    with TestClient(create_app(settings_for(tiny_bundle, tmp_path))) as c:
        for i in range(5):
            c.request(f"X{i}FOO", "/healthz")
        text = c.get("/metrics", headers=auth(ADMIN)).text
        assert "X0FOO" not in text and 'method="other"' in text
        assert c.head("/healthz").status_code == 200


def test_a_request_has_a_total_pixel_budget(tiny_bundle: Path, tmp_path: Path) -> None:
    with TestClient(create_app(settings_for(tiny_bundle, tmp_path, max_request_pixels=2000))) as c:
        ws, key = new_workspace(c)
        r = c.post(f"/workspaces/{ws}/classes", data={"label": "a"}, files=files(class_images(0, 4)),
                   headers=auth(key))  # 4 x 784 px > 2000
        assert_error(r, 413)


def test_access_log_hides_a_key_pasted_into_the_path(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("uvicorn.access.test2")
    log.addFilter(RedactQueryFilter())
    with caplog.at_level(logging.INFO, logger="uvicorn.access.test2"):
        log.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1", "GET", "/workspaces/fsk_SECRETKEY-abc/classes", "1.1", 401)
    assert "SECRETKEY" not in caplog.text


def test_unknown_patch_fields_are_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    with TestClient(create_app(settings_for(tiny_bundle, tmp_path))) as c:
        ws, key = new_workspace(c)
        assert_error(c.patch(f"/workspaces/{ws}", json={"bogus": 1}, headers=auth(key)), 422)
        assert_error(c.patch(f"/workspaces/{ws}", json={"threshold": True}, headers=auth(key)), 422)

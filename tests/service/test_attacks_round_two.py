"""The second attack run (issue 16), replayed: each test failed on 1afef48. Crafted inputs are made
here; no binary is committed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from service_helpers import class_images
from test_app import ADMIN, assert_error, auth, files, new_workspace, settings_for, teach

from fewshot.errors import ConfigError
from fewshot.service.app import create_app, proxy_trust
from fewshot.service.auth import KeyGuard, new_api_key

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.fixture
def client(tiny_bundle: Path, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(tiny_bundle, tmp_path))) as c:
        yield c


# -- 4: proxy trust ---------------------------------------------------------------------------------
def test_deploy_trusts_forwarded_for_from_nginx_only() -> None:
    compose: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    nginx_ip = compose["services"]["nginx"]["networks"]["backend"]["ipv4_address"]
    for name in ("replica1", "replica2"):
        allow = compose["services"][name]["environment"]["FORWARDED_ALLOW_IPS"]
        assert allow == nginx_ip != "*", name
        assert proxy_trust({"FORWARDED_ALLOW_IPS": allow}) == (True, nginx_ip)
    conf = (DEPLOY / "nginx.conf").read_text()
    assert "proxy_set_header X-Forwarded-For $remote_addr;" in conf  # a client-sent list never passes
    assert "$proxy_add_x_forwarded_for" not in conf


def test_serve_refuses_to_trust_every_proxy() -> None:
    assert proxy_trust({}) == (False, None)
    for value in ("*", "10.0.0.1, *"):
        with pytest.raises(ConfigError, match="any client"):
            proxy_trust({"FORWARDED_ALLOW_IPS": value})


# -- 5: the throttle and the admin ---------------------------------------------------------------------
def test_mistyped_workspace_keys_do_not_lock_out_the_admin(tiny_bundle: Path, tmp_path: Path) -> None:
    with TestClient(create_app(settings_for(tiny_bundle, tmp_path, admin_failures_per_minute=3))) as c:
        ws, key = new_workspace(c)
        for _ in range(3):  # a user on the admin's address mistypes their workspace key
            assert_error(c.get(f"/workspaces/{ws}/classes", headers=auth(key[:-1] + "x")), 401)
        assert_error(c.get(f"/workspaces/{ws}/classes", headers=auth(key[:-2] + "yy")), 429)  # their key kind
        assert c.get(f"/workspaces/{ws}/classes", headers=auth(key)).status_code == 200  # the right one always works
        assert c.post("/workspaces", json={"name": "y"}, headers=auth(ADMIN)).status_code == 201
        assert c.get(f"/workspaces/{ws}/classes", headers=auth(ADMIN)).status_code == 200
        for _ in range(3):  # admin-key guesses are still throttled per address
            assert_error(c.get(f"/workspaces/{ws}/classes", headers=auth("change-me")), 401)
        assert_error(c.post("/workspaces", json={"name": "z"}, headers=auth(ADMIN)), 429, "too_many_attempts")


def test_admin_guesses_are_bounded_over_all_addresses() -> None:
    now = [0.0]
    guard = KeyGuard("long-admin-secret", limit=5, total_limit=10, window_s=60.0, clock=lambda: now[0])
    guard.admin_succeeded("10.0.0.1")  # the admin used the key before
    tried = 0
    for i in range(50):  # one guess from each of 50 addresses
        client = f"203.0.113.{i}"
        if guard.retry_after(client, "guess")[0]:
            continue
        tried += 1
        guard.failed(client, "guess")
    assert tried == 10
    wait, scope = guard.retry_after("198.51.100.7", "guess")
    assert scope == "service-wide" and 1 <= wait <= 60
    assert guard.retry_after("10.0.0.1", "long-admin-secret") == (0, "")  # the known admin is not locked out
    assert guard.retry_after("198.51.100.7", new_api_key()) == (0, "")  # workspace keys are not admin guesses
    now[0] = 61.0
    assert guard.retry_after("198.51.100.7", "guess") == (0, "")


def test_workspace_shaped_admin_key_counts_every_guess() -> None:
    guard = KeyGuard(new_api_key(), limit=2, total_limit=100)
    for _ in range(2):
        guard.failed("a", new_api_key())
    assert guard.retry_after("a", "anything")[0] > 0


# -- 6, 12: the page ----------------------------------------------------------------------------------
STATIC = Path(__file__).resolve().parents[2] / "src" / "fewshot" / "service" / "static"


def test_page_has_csp_framing_and_nosniff_headers(client: TestClient) -> None:
    page = client.get("/ui/")
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "'unsafe-inline'" not in csp
    assert page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"
    for path in ("/ui/app.js", "/healthz", "/workspaces/ws_x/classes"):
        assert client.get(path).headers["x-content-type-options"] == "nosniff", path
    # the policy lets the page work: its scripts and styles are same-origin files, nothing inline
    import re

    html = page.text
    assert re.findall(r"<script([^>]*)>", html) == [' src="app.js" defer', ' src="panel.js" defer',
                                                     ' src="threshold.js" defer']
    assert "<style" not in html and " style=" not in html and " on" + "click=" not in html
    assert not re.search(r"""(src|href)=["'](https?:)?//""", html)


def test_page_footer_does_not_link_to_docs_that_are_off(client: TestClient) -> None:
    html = client.get("/ui/").text
    assert 'href="/docs"' not in html
    assert client.get("/openapi.json").status_code == 200 and 'href="/openapi.json"' in html


def test_panel_draws_a_workspace_opened_before_it_loaded() -> None:
    """app.js opens a stored workspace (a reload) and announces it before panel.js has registered
    its listener (scripts run in order): panel.js must draw the state as it is when it loads.
    (The browser test test_insight_page.py::test_panel_is_drawn_after_a_reload runs it for real.)"""
    panel = (STATIC / "panel.js").read_text()
    listener = panel.index('addEventListener("fewshot:classes-changed"')
    replay = panel.index("if (workspace) refreshInsight()")
    assert replay > listener


# -- 8: passwords in database URLs ----------------------------------------------------------------------
@pytest.mark.parametrize(("url", "secret"), [
    ("postgresql://fewshot@db:5432/fewshot?password=hunter2", "hunter2"),
    ("postgresql://fewshot@db/fewshot?sslmode=require&PASSWORD=hunter2&application_name=x", "hunter2"),
    ("postgresql://fewshot:hun/ter@2@db/fewshot", "hun/ter@2"),
    ("postgresql://fewshot:hunter2@db/fewshot?password=hunter2", "hunter2"),
    ("postgresql://fewshot@db/fewshot?password=p%40ss", "p@ss"),
])
def test_database_password_is_redacted_by_structure(url: str, secret: str) -> None:
    from fewshot.service.store import redact_url, scrub_secrets

    safe = redact_url(url)
    assert secret not in safe and "***" in safe and safe.startswith("postgresql://fewshot")
    said = scrub_secrets(f"could not connect with {url}: password '{secret}' rejected", url)
    assert secret not in said and "p%40ss" not in said


def test_startup_error_and_log_lines_hold_no_query_password(caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("psycopg_pool")
    from fewshot.service.store import PostgresStore, StoreError

    url = "postgresql://fewshot@127.0.0.1:1/fewshot?password=hunter2&connect_timeout=1"
    with caplog.at_level("DEBUG"), pytest.raises(StoreError) as info:
        PostgresStore(url, timeout_s=0.3, reconnect_s=0.3)
    assert "hunter2" not in str(info.value) and "password=***" in str(info.value)
    assert info.value.__cause__ is None and "hunter2" not in caplog.text


# -- 10, 12: labels and form fields ------------------------------------------------------------------
def _teach_raw(c: TestClient, ws: str, key: str, label_part: bytes, n_labels: int = 1) -> Any:
    """A multipart body written by hand, so the label's bytes are exactly `label_part`."""
    from service_helpers import png_bytes

    boundary = "----fewshot-test"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="label"\r\n\r\n'.encode() + label_part + b"\r\n"
             ] * n_labels
    for i, arr in enumerate(class_images(0, 2)):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{i}.png"\r\n'
                     f"Content-Type: image/png\r\n\r\n".encode() + png_bytes(arr) + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return c.post(f"/workspaces/{ws}/classes", content=body, headers={
        **auth(key), "Content-Type": f"multipart/form-data; boundary={boundary}"})


@pytest.mark.parametrize(("label", "says"), [
    ("\u3164", "look blank"), ("\u2800", "look blank"), ("a\u3164b", "look blank"), ("\u115f\u1160", "look blank"),
    ("\u0301", "combining mark"), ("x \u0301", "combining mark"), ("\u200b", "invisible"),
    ("cat\u2028dog", "line or paragraph"), ("cat\u2029dog", "line or paragraph"), ("cat\ufe0f", "look blank"),
    ("unkn\u043ewn", "looks like"), ("unkn\u03bfwn", "looks like"), ("UNKN\u039fWN", "looks like"),
    ("\u0443nknown", None), ("unkn0wn", "looks like"), ("unkn\u00f6wn", "looks like"), ("\uff55nknown", "reserved"),
])
def test_labels_that_look_blank_or_like_unknown_are_refused(client: TestClient, label: str, says: str | None) -> None:
    ws, key = new_workspace(client)
    r = client.post(f"/workspaces/{ws}/classes", data={"label": label}, files=files(class_images(0, 2)),
                    headers=auth(key))
    if says is None:  # Cyrillic u (U+0443) looks like y: a different word
        assert r.status_code == 201, r.text
        return
    err = assert_error(r, 400)
    assert says in err["message"], err


def test_label_that_is_not_utf8_is_refused(client: TestClient) -> None:
    ws, key = new_workspace(client)
    for raw in (b"\xff\xfe", b"caf\xe9", b"ok\xc3\x28"):
        err = assert_error(_teach_raw(client, ws, key, raw), 400, "invalid_utf8")
        assert "'label'" in err["message"] and "UTF-8" in err["message"] and "byte 0x" in err["message"]
    assert _teach_raw(client, ws, key, "caf\u00e9".encode()).json()["label"] == "caf\u00e9"


def test_two_label_fields_are_refused(client: TestClient) -> None:
    ws, key = new_workspace(client)
    err = assert_error(_teach_raw(client, ws, key, b"first", n_labels=2), 400, "duplicate_field")
    assert "'label'" in err["message"] and "2 times" in err["message"]
    assert client.get(f"/workspaces/{ws}/classes", headers=auth(key)).json() == []


def test_long_label_error_states_the_real_limit(client: TestClient) -> None:
    ws, key = new_workspace(client)
    for n in (201, 10_000):
        err = assert_error(client.post(f"/workspaces/{ws}/classes", data={"label": "x" * n},
                                       files=files(class_images(0, 1)), headers=auth(key)), 400)
        assert "at most 200" in err["message"] and "1000" not in err["message"]


def test_too_many_files_is_413_whatever_the_count(tiny_bundle: Path, tmp_path: Path) -> None:
    with TestClient(create_app(settings_for(tiny_bundle, tmp_path, max_images_per_request=4,
                                            max_body_bytes=8 * 1024 * 1024))) as c:
        ws, key = new_workspace(c)
        teach(c, ws, key, "a", 0, n=2)
        one = files(class_images(1, 1))[0][1]
        for n in (5, 40, 1001):
            err = assert_error(c.post(f"/workspaces/{ws}/classify", files=[("images", one)] * n, headers=auth(key)),
                               413, "too_many_images")
            assert "4 images per request" in err["message"], err


def test_malformed_multipart_prints_nothing_to_stderr(client: TestClient, capfd: pytest.CaptureFixture[str]) -> None:
    import logging

    ws, key = new_workspace(client)
    root = logging.getLogger()
    handlers, root.handlers = root.handlers, []  # as under uvicorn: no handler for the library's logger
    try:
        r = client.post(f"/workspaces/{ws}/classify", content=b"--xx\r\nbroken-boundary",
                        headers={**auth(key), "Content-Type": "multipart/form-data; boundary=xy"})
    finally:
        root.handlers = handlers
    assert r.status_code in (400, 422), r.text
    assert "boundary" not in capfd.readouterr().err.lower()


# -- 11: thresholds -------------------------------------------------------------------------------------
def test_negative_threshold_is_refused_everywhere(client: TestClient) -> None:
    ws, key = new_workspace(client)
    teach(client, ws, key, "a", 0, n=2)
    r = client.patch(f"/workspaces/{ws}", json={"threshold": -1.0}, headers=auth(key))
    assert r.status_code in (400, 422) and ">= 0" in r.text.replace("greater than or equal to 0", ">= 0")
    err = assert_error(client.post(f"/workspaces/{ws}/classify", data={"threshold": "-0.5"},
                                   files=files(class_images(0, 1)), headers=auth(key)), 400)
    assert "below 0" in err["message"]
    r = client.post("/workspaces", json={"name": "n", "settings": {"threshold": -3}}, headers=auth(ADMIN))
    assert "below 0" in assert_error(r, 400)["message"]
    assert client.patch(f"/workspaces/{ws}", json={"threshold": 0.0}, headers=auth(key)).status_code == 200


def test_threshold_null_clears_and_with_clear_threshold_is_refused(client: TestClient) -> None:
    ws, key = new_workspace(client)
    r = client.patch(f"/workspaces/{ws}", json={"threshold": 2.5}, headers=auth(key))
    assert r.json()["settings"]["threshold"] == 2.5
    r = client.patch(f"/workspaces/{ws}", json={"threshold": None}, headers=auth(key))
    assert r.status_code == 200 and r.json()["settings"]["threshold"] is None  # explicit null clears
    client.patch(f"/workspaces/{ws}", json={"threshold": 2.5}, headers=auth(key))
    err = assert_error(client.patch(f"/workspaces/{ws}", json={"threshold": 1.0, "clear_threshold": True},
                                    headers=auth(key)), 400)
    assert "contradict" in err["message"]
    assert client.get(f"/workspaces/{ws}", headers=auth(key)).json()["settings"]["threshold"] == 2.5
    r = client.patch(f"/workspaces/{ws}", json={"metric": "cosine"}, headers=auth(key))  # absent: unchanged rules
    assert r.json()["settings"]["threshold"] is None  # a metric change clears it (another scale), as before


# -- 12: files, keys -------------------------------------------------------------------------------------
def test_sqlite_store_is_created_owner_only(tmp_path: Path) -> None:
    import os

    from fewshot.service.store import SQLiteStore

    old = os.umask(0o022)
    try:
        store = SQLiteStore(tmp_path / "new" / "fewshot.db")
        store.create_workspace("w", "0" * 64, {}, "b")
        for name in ("fewshot.db", "fewshot.db-wal", "fewshot.db-shm"):
            path = tmp_path / "new" / name
            if path.exists():
                assert path.stat().st_mode & 0o777 == 0o600, name
        store.close()
    finally:
        os.umask(old)


@pytest.mark.parametrize("key", ["change-me", "admin", "short-key"])
def test_weak_admin_key_is_warned_about_at_startup(tiny_bundle: Path, tmp_path: Path, key: str,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="fewshot.service"), \
            TestClient(create_app(settings_for(tiny_bundle, tmp_path, admin_key=key))):
        pass
    said = [r.getMessage() for r in caplog.records if r.name == "fewshot.service"]
    assert any("SECURITY" in m and "admin key" in m for m in said), said
    caplog.clear()
    with caplog.at_level("WARNING", logger="fewshot.service"), \
            TestClient(create_app(settings_for(tiny_bundle, tmp_path, admin_key="x" * 40))):
        pass
    assert not [r for r in caplog.records if r.name == "fewshot.service"]


def test_admin_key_on_the_command_line_is_warned_about(tiny_bundle: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    import uvicorn

    from fewshot.service.app import serve

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    with caplog.at_level("WARNING", logger="fewshot.service"):
        serve(str(tiny_bundle), str(tmp_path / "s.db"), admin_key="y" * 40)
    assert any("command-line" in r.getMessage() and "ps" in r.getMessage() for r in caplog.records)


# -- 9: slow clients ----------------------------------------------------------------------------------------
async def _echo_app(scope: dict, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    size, more = 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": str(size).encode()})


def _deadline_protocols() -> list[Any]:
    from fewshot.service.protocol import DeadlineH11Protocol, DeadlineHttpToolsProtocol

    return [pytest.param(DeadlineH11Protocol, id="h11"), pytest.param(DeadlineHttpToolsProtocol, id="httptools")]


@pytest.fixture(params=_deadline_protocols())
def slow_server(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, int]]:
    import socket
    import threading
    import time

    import uvicorn

    from fewshot.service.protocol import ReadDeadline

    protocol = request.param
    monkeypatch.setattr(ReadDeadline, "read_timeout_s", 1.0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(_echo_app, host="127.0.0.1", port=port, http=protocol,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield "127.0.0.1", port
    server.should_exit = True
    thread.join(5)


def _trickle(addr: tuple[str, int], data: bytes, gap_s: float, budget_s: float) -> tuple[bytes, float]:
    """Send `data` a byte every `gap_s`; what the server answered and when the connection ended."""
    import socket
    import time

    start = time.monotonic()
    got = b""
    with socket.create_connection(addr) as s:
        s.settimeout(gap_s)
        for b in data:
            try:
                s.sendall(bytes([b]))
            except OSError:
                break
            try:
                chunk = s.recv(4096)
                got += chunk
                if not chunk:
                    break
            except TimeoutError:
                pass
            except ConnectionResetError:  # the server closed on unread bytes: the connection ended
                break
            if time.monotonic() - start > budget_s:
                break
        s.settimeout(budget_s)
        try:
            while chunk := s.recv(4096):
                got += chunk
        except (TimeoutError, OSError):
            pass
    return got, time.monotonic() - start


def test_slow_headers_and_slow_bodies_are_cut_off(slow_server: tuple[str, int]) -> None:
    import httpx

    base = f"http://{slow_server[0]}:{slow_server[1]}"
    assert httpx.post(base + "/", content=b"x" * 100_000).text == "100000"  # a normal request is untouched
    headers = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\nX-Padding: " + b"a" * 200 + b"\r\n\r\n"
    got, took = _trickle(slow_server, headers, 0.05, 8.0)  # headers a byte at a time: 12 s at this pace
    assert got.startswith(b"HTTP/1.1 408") and b"request_timeout" in got and took < 4.0, (got, took)
    got, took = _trickle(slow_server, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n" + b"y" * 500,
                         0.01, 12.0)  # the body a byte at a time
    assert got.startswith(b"HTTP/1.1 408") and took < 4.0, (got, took)


def test_serve_runs_uvicorn_with_the_read_deadline(tiny_bundle: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from fewshot.service.app import serve
    from fewshot.service.protocol import DeadlineHttpToolsProtocol, ReadDeadline

    seen: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: seen.update(k))
    monkeypatch.setattr(ReadDeadline, "read_timeout_s", ReadDeadline.read_timeout_s)
    monkeypatch.setenv("FEWSHOT_REQUEST_READ_TIMEOUT_S", "7")
    monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    serve(str(tiny_bundle), str(tmp_path / "s.db"))
    assert seen["http"] is DeadlineHttpToolsProtocol and seen["http"].read_timeout_s == 7.0


# -- 1: embedding in chunks, a bounded number at once, memory given back ---------------------------------
def test_embedding_goes_through_the_model_in_small_chunks(tiny_bundle: Path) -> None:
    import numpy as np

    from fewshot.artifacts.bundle import load_bundle
    from fewshot.service.embedding import EmbedGate, GatedEmbedder

    inner = load_bundle(tiny_bundle, verify_parity=False).onnx_embedder
    sizes: list[int] = []
    run = inner.session.run

    def spy(outputs: Any, feeds: dict[str, Any], *rest: Any) -> Any:
        sizes.append(len(next(iter(feeds.values()))))
        return run(outputs, feeds, *rest)

    inner.session = type("Spy", (), {"run": staticmethod(spy)})()
    gated = GatedEmbedder(inner, EmbedGate(slots=1), chunk=8)
    assert gated._run_options.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"
    images = class_images(0, 21)
    got = gated.embed(images)
    assert sizes == [8, 8, 5]
    inner.session = type("Plain", (), {"run": staticmethod(run)})()
    assert np.allclose(got, inner.embed(images), atol=1e-5)


# the queue's order, bounds and batching: test_embed_batching.py


def test_full_embedding_queue_is_a_503_with_retry_after(tiny_bundle: Path, tmp_path: Path) -> None:
    with TestClient(create_app(settings_for(tiny_bundle, tmp_path, embed_slots=1, embed_queue=0))) as c:
        ws, key = new_workspace(c)
        teach(c, ws, key, "a", 0, n=2)
        gate = c.app.state.service.recogniser.embedder.gate  # type: ignore[attr-defined]
        with gate.slot():  # someone else's images are being embedded
            r = c.post(f"/workspaces/{ws}/classify", files=files(class_images(0, 1)), headers=auth(key))
        err = assert_error(r, 503, "busy")
        assert r.headers["retry-after"] == "1" and "busy" in err["message"]
        assert c.post(f"/workspaces/{ws}/classify", files=files(class_images(0, 1)), headers=auth(key)).status_code == 200

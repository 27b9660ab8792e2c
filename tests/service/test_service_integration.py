"""End to end on real data over a real uvicorn server on loopback: teach 3 Omniglot evaluation
characters (5 drawings each) over HTTP, classify held-out drawings of them."""

from __future__ import annotations

import socket
import threading
import time
import zipfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from fewshot.service.app import create_app
from fewshot.service.settings import ServiceSettings

ADMIN = "integration-admin"
pytestmark = pytest.mark.integration


def omniglot_characters(data_root: Path, n_chars: int = 3) -> dict[str, list[bytes]]:
    """The raw PNG bytes of the first `n_chars` characters of the evaluation alphabets (20 each)."""
    by_char: dict[str, list[bytes]] = defaultdict(list)
    with zipfile.ZipFile(data_root / "omniglot" / "images_evaluation.zip") as z:
        for name in sorted(z.namelist()):
            if name.endswith(".png"):
                char = "/".join(name.split("/")[1:3])
                if char in by_char or len(by_char) < n_chars:
                    by_char[char].append(z.read(name))
    return dict(by_char)


@pytest.fixture
def server(tiny_bundle: Path, tmp_path: Path) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = ServiceSettings(bundle_path=str(tiny_bundle), db_url=str(tmp_path / "svc.db"), admin_key=ADMIN,
                               max_body_bytes=4 * 1024 * 1024)
    srv = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=30)


def test_teach_and_classify_omniglot_over_http(data_root: Path, server: str) -> None:
    chars = omniglot_characters(data_root)
    assert len(chars) == 3 and all(len(v) == 20 for v in chars.values())
    with httpx.Client(base_url=server, timeout=60) as http:
        r = http.post("/workspaces", json={"name": "omniglot"}, headers={"Authorization": f"Bearer {ADMIN}"})
        ws, key = r.json()["id"], r.json()["api_key"]
        h = {"Authorization": f"Bearer {key}"}
        ids = {}
        for char, pngs in chars.items():
            files = [("images", (f"{i}.png", b, "image/png")) for i, b in enumerate(pngs[:5])]
            r = http.post(f"/workspaces/{ws}/classes", data={"label": char}, files=files, headers=h)
            assert r.status_code == 201, r.text
            ids[char] = r.json()["id"]
        correct = total = 0
        for char, pngs in chars.items():
            files = [("images", (f"{i}.png", b, "image/png")) for i, b in enumerate(pngs[5:])]
            r = http.post(f"/workspaces/{ws}/classify", files=files, data={"top_k": "3"}, headers=h)
            assert r.status_code == 200, r.text
            for p in r.json()["predictions"]:
                assert {c["class_id"] for c in p["top_k"]} == set(ids.values())
                assert abs(sum(c["probability"] for c in p["top_k"]) - 1) < 1e-4
                correct += p["class_id"] == ids[char]
                total += 1
        assert total == 45
        # an untrained Conv-4 is not a trained recogniser; random conv features still beat chance (1/3)
        # on 3-way 5-shot Omniglot by a wide margin, so this only catches a broken pipeline
        assert correct / total > 0.45, f"accuracy {correct}/{total}"
        assert http.get("/healthz").status_code == 200


def test_real_server_refuses_a_100mb_body_without_reading_it(server: str) -> None:
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        head = (f"POST /workspaces/ws_x/classify HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer x\r\n"
                "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 104857600\r\n\r\n")
        s.sendall(head.encode() + b"\x00" * 65536)  # 64 KB of a promised 100 MB
        t0 = time.monotonic()
        data = b""
        while b"}}" not in data and time.monotonic() - t0 < 5:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        reply = data.decode(errors="replace")
    assert reply.startswith("HTTP/1.1 413"), reply[:200]
    assert '"code": "body_too_large"' in reply or '"code":"body_too_large"' in reply
    assert time.monotonic() - t0 < 5
    assert httpx.get(server + "/healthz").status_code == 200

"""The insight routes over HTTP: GET /workspaces/{ws}/insight and POST /workspaces/{ws}/occlusion,
behind the workspace key, with classify's handling of bad input and store outages."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from service_helpers import class_images, png_bytes
from test_app import ADMIN, assert_error, auth, files, new_workspace, settings_for, teach
from test_app_hardening import BrokenDisk

from fewshot.service.app import create_app


@pytest.fixture
def client(tiny_bundle: Path, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(tiny_bundle, tmp_path)), raise_server_exceptions=False) as c:
        yield c


def image(seed: int) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("image", ("q.png", png_bytes(class_images(seed, 7)[6]), "image/png"))]


def test_insight_counts_the_taught_examples_and_follows_changes(client: TestClient) -> None:
    ws, key = new_workspace(client)
    empty = client.get(f"/workspaces/{ws}/insight", headers=auth(key)).json()
    assert empty["classes"] == [] and empty["confusion"] == [] and "no classes yet" in empty["notes"][0]
    ids = [teach(client, ws, key, f"class {c}", seed=c, n=4)["id"] for c in range(3)]
    r = client.get(f"/workspaces/{ws}/insight", headers=auth(key))
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["class_id"] for c in body["classes"]] == ids and body["method"] == "leave-one-out"
    assert [c["evaluated"] for c in body["classes"]] == [4, 4, 4] and body["evaluated"] == 12
    assert [sum(row) for row in body["confusion"]] == [4, 4, 4]
    assert body["accuracy"] == sum(c["correct"] for c in body["classes"]) / 12
    assert body["version"] == client.get(f"/workspaces/{ws}", headers=auth(key)).json()["version"]

    r = client.post(f"/workspaces/{ws}/classes/{ids[0]}/images", files=files(class_images(0, 6)[4:]), headers=auth(key))
    assert r.status_code == 200, r.text
    after = client.get(f"/workspaces/{ws}/insight", headers=auth(key)).json()
    assert after["version"] > body["version"] and after["classes"][0]["n_examples"] == 6
    assert sum(after["confusion"][0]) == 6


def test_insight_needs_the_workspace_key(client: TestClient) -> None:
    ws, key = new_workspace(client, "a")
    other, other_key = new_workspace(client, "b")
    assert_error(client.get(f"/workspaces/{ws}/insight"), 401, "unauthorized")
    assert_error(client.get(f"/workspaces/{ws}/insight", headers=auth(other_key)), 403, "forbidden")
    assert client.get(f"/workspaces/{ws}/insight", headers=auth(ADMIN)).status_code == 200
    assert_error(client.get(f"/workspaces/{ws}/insight?key={key}", headers=auth(key)), 400, "key_in_url")


def test_occlusion_map_and_answer(client: TestClient) -> None:
    ws, key = new_workspace(client)
    assert_error(client.post(f"/workspaces/{ws}/occlusion", files=image(0), headers=auth(key)), 409, "conflict")
    ids = [teach(client, ws, key, f"class {c}", seed=c, n=5)["id"] for c in range(2)]
    r = client.post(f"/workspaces/{ws}/occlusion", files=image(1), headers=auth(key))
    assert r.status_code == 200, r.text
    body = r.json()
    classify = client.post(f"/workspaces/{ws}/classify", files=files(class_images(1, 7)[6:]), headers=auth(key)).json()
    assert body["prediction"]["label"] == classify["predictions"][0]["label"] == "class 1"
    assert body["class_id"] == ids[1] and body["cells"] == 7 and body["input_size"] == 28 and body["patch"] == 8
    assert len(body["drop"]) == 7 and all(len(row) == 7 for row in body["drop"])
    assert any(v != 0 for row in body["drop"] for v in row) and body["base_margin"] > 0
    shown = Image.open(io.BytesIO(base64.b64decode(body["input_png_base64"])))
    assert shown.size == (28, 28) and shown.mode == "L"
    small = client.post(f"/workspaces/{ws}/occlusion", files=image(1), data={"cells": "3"}, headers=auth(key)).json()
    assert len(small["drop"]) == 3


def test_occlusion_bad_input_is_refused_like_classify(client: TestClient) -> None:
    ws, key = new_workspace(client)
    teach(client, ws, key, "a", seed=0)
    url = f"/workspaces/{ws}/occlusion"
    assert_error(client.post(url, files=image(0), data={"cells": "15"}, headers=auth(key)), 422)
    assert_error(client.post(url, files=image(0), data={"cells": "1"}, headers=auth(key)), 422)
    assert_error(client.post(url, files=[("image", ("x.png", b"not an image", "image/png"))], headers=auth(key)), 415)
    assert_error(client.post(url, headers=auth(key)), 422)
    assert_error(client.post(url, files=image(0), data={"threshold": "nan"}, headers=auth(key)), 422)
    assert_error(client.post(url, files=image(0)), 401)
    assert client.post(url, files=image(0), headers=auth(key)).status_code == 200  # still serving


def test_insight_during_a_store_outage_is_a_503(tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fewshot.service.http.app as app_module

    monkeypatch.setattr(app_module, "open_store", lambda url, **_: BrokenDisk(tmp_path / "svc.db"))
    with TestClient(create_app(settings_for(tiny_bundle, tmp_path)), raise_server_exceptions=False) as c:
        ws, key = new_workspace(c)
        teach(c, ws, key, "a", seed=0)
        c.app.state.service.store.broken = True  # type: ignore[attr-defined]
        assert_error(c.get(f"/workspaces/{ws}/insight", headers=auth(key)), 503, "store_unavailable")
        assert_error(c.post(f"/workspaces/{ws}/occlusion", files=image(0), headers=auth(key)), 503, "store_unavailable")
        c.app.state.service.store.broken = False  # type: ignore[attr-defined]
        assert c.get(f"/workspaces/{ws}/insight", headers=auth(key)).status_code == 200

"""Several models in one service: each workspace runs on the model it was created with, the choice
survives a restart, and a store holding workspaces of a model that is not served is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from model_helpers import rgb_class_images, rgb_png
from service_helpers import ToyEmbedder, class_images, colour_photo_jpeg, png_bytes

from fewshot.errors import ConfigError
from fewshot.service.app import create_app
from fewshot.service.models import ModelSpec
from fewshot.service.recogniser import Recogniser
from fewshot.service.settings import ServiceSettings
from fewshot.service.store import ConflictError, ModelMismatchError, SQLiteStore

ADMIN = "admin-secret"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def two_models(tiny: Path, rgb: Path, tmp_path: Path, *extra: str) -> ServiceSettings:
    return ServiceSettings(bundle_path=f"characters={tiny}", extra_bundles=(str(rgb), *extra),
                           db_url=str(tmp_path / "svc.db"), admin_key=ADMIN)


def create(c: TestClient, name: str, model: str | None = None) -> tuple[str, str, dict]:
    body = {"name": name} if model is None else {"name": name, "model": model}
    r = c.post("/workspaces", json=body, headers=auth(ADMIN))
    assert r.status_code == 201, r.text
    return r.json()["id"], r.json()["api_key"], r.json()


def teach(c: TestClient, ws: str, key: str, label: str, pngs: list[bytes]) -> str:
    files = [("images", (f"{label}{i}.png", b, "image/png")) for i, b in enumerate(pngs)]
    r = c.post(f"/workspaces/{ws}/classes", data={"label": label}, files=files, headers=auth(key))
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def classify(c: TestClient, ws: str, key: str, png: bytes) -> dict:
    r = c.post(f"/workspaces/{ws}/classify", files=[("images", ("q.png", png, "image/png"))], headers=auth(key))
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def gray(seed: int, i: int) -> bytes:
    return png_bytes(class_images(seed, 6)[i])


def colour(seed: int, i: int) -> bytes:
    return rgb_png(rgb_class_images(seed, 6)[i])


def test_two_models_in_one_service(tiny_bundle: Path, rgb_bundle: Path, tmp_path: Path) -> None:
    settings = two_models(tiny_bundle, rgb_bundle, tmp_path)
    with TestClient(create_app(settings)) as c:
        models = c.get("/models").json()
        assert [(m["name"], m["mode"], m["size"], m["embedding_dim"], m["default"]) for m in models] == [
            ("characters", "L", 28, 64, True), ("photos", "RGB", 32, 32, False)]
        assert str(tmp_path.parent) not in c.get("/models").text  # no file paths
        assert c.get("/model").json()["embedding_dim"] == 64  # the default model
        chars, chars_key, body = create(c, "letters")
        assert body["model"] == "characters"
        photos, photos_key, body = create(c, "pets", "photos")
        assert body["model"] == "photos"
        c_ids = [teach(c, chars, chars_key, f"char{s}", [gray(s, i) for i in range(5)]) for s in (0, 1)]
        p_ids = [teach(c, photos, photos_key, f"pet{s}", [colour(10 + s, i) for i in range(5)]) for s in (0, 1)]
        for s, cid in zip((0, 1), c_ids):
            out = classify(c, chars, chars_key, gray(s, 5))
            assert out["model"] == "characters" and out["predictions"][0]["class_id"] == cid
        for s, cid in zip((0, 1), p_ids):
            out = classify(c, photos, photos_key, colour(10 + s, 5))
            assert out["model"] == "photos" and out["predictions"][0]["class_id"] == cid
        assert out["bundle_id"] == models[1]["bundle_id"]
    with TestClient(create_app(settings)) as c:  # a restart: each workspace keeps its model
        assert c.get(f"/workspaces/{photos}", headers=auth(photos_key)).json()["model"] == "photos"
        assert c.get(f"/workspaces/{chars}", headers=auth(chars_key)).json()["model"] == "characters"
        assert classify(c, photos, photos_key, colour(11, 5))["predictions"][0]["class_id"] == p_ids[1]
    # served without the photos bundle, the store's photos workspace has no model: refused at startup
    only_chars = ServiceSettings(bundle_path=f"characters={tiny_bundle}", db_url=settings.db_url, admin_key=ADMIN)
    with pytest.raises(ModelMismatchError, match=f"1 workspace\\(s\\) of bundle {models[1]['bundle_id']} "
                       r"\(32-d embeddings\).*serve that bundle too"), TestClient(create_app(only_chars)):
        pass


def test_unknown_model_is_refused_naming_the_served_ones(tiny_bundle: Path, rgb_bundle: Path, tmp_path: Path) -> None:
    with TestClient(create_app(two_models(tiny_bundle, rgb_bundle, tmp_path))) as c:
        r = c.post("/workspaces", json={"name": "x", "model": "faces"}, headers=auth(ADMIN))
        assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_model"
        assert "'faces'" in r.json()["error"]["message"] and "['characters', 'photos']" in r.json()["error"]["message"]
        assert c.get("/models").json()[0]["name"] == "characters"  # still serving


def test_duplicate_model_names_and_bundles_are_refused(tiny_bundle: Path, rgb_bundle: Path, tmp_path: Path) -> None:
    same_name = two_models(tiny_bundle, rgb_bundle, tmp_path, f"photos={tiny_bundle}")
    with pytest.raises(ConfigError, match="two bundles are named 'photos'.*NAME=PATH"), TestClient(create_app(same_name)):
        pass
    same_bundle = two_models(tiny_bundle, rgb_bundle, tmp_path, f"again={tiny_bundle}")
    with pytest.raises(ConfigError, match="'characters' and 'again' are the same bundle"), \
            TestClient(create_app(same_bundle)):
        pass


def test_model_spec_parsing(tmp_path: Path) -> None:
    assert ModelSpec.parse("photos=bundles/p") == ModelSpec(Path("bundles/p"), "photos")
    assert ModelSpec.parse("bundles/p") == ModelSpec(Path("bundles/p"))
    odd = tmp_path / "a=b"
    odd.mkdir()
    assert ModelSpec.parse(str(odd)) == ModelSpec(odd)  # an existing path is never split
    with pytest.raises(ConfigError, match="model name 'Big Model' must be"):
        ModelSpec.parse("Big Model=bundles/p")


def test_a_recogniser_refuses_a_workspace_of_another_model(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    a = Recogniser(ToyEmbedder(), store, bundle_id="model-a")
    b = Recogniser(ToyEmbedder(), store, bundle_id="model-b")
    ws, _ = a.create_workspace("w")
    a.add_class(ws.id, "x", class_images(0, 2))
    with pytest.raises(ConflictError, match="holds embeddings of model bundle model-a, not model-b"):
        b.classify(ws.id, class_images(0, 1))
    with pytest.raises(ConflictError, match="model-a, not model-b"):
        b.add_class(ws.id, "y", class_images(1, 2))
    assert [p.label for p in a.classify(ws.id, class_images(0, 1))] == ["x"]
    assert np.isfinite(a.classify(ws.id, class_images(0, 1))[0].score)
    store.close()


def test_a_zoo_model_is_named_by_its_entry_not_by_the_run_it_came_from(domain_bundle: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A zoo bundle exported from a run named "quickstart" is served under its zoo entry's name,
    given as `zoo:NAME` or as the entry's bundle folder: the name the page's out-of-domain warning
    shows ("this image does not look like what the '<model>' model was trained on")."""
    entry = tmp_path / "zoo" / "chars-zoo"
    shutil.copytree(domain_bundle, entry / "bundle")
    manifest = json.loads((entry / "bundle" / "manifest.json").read_text())
    manifest["source"]["name"] = "quickstart"
    (entry / "bundle" / "manifest.json").write_text(json.dumps(manifest))
    (entry / "card.json").write_text(json.dumps({"name": "chars-zoo"}))
    monkeypatch.setenv("FEWSHOT_ZOO", str(tmp_path / "zoo"))
    for i, spec in enumerate(("zoo:chars-zoo", str(entry / "bundle"))):
        settings = ServiceSettings(bundle_path=spec, db_url=str(tmp_path / f"svc{i}.db"), admin_key=ADMIN)
        with TestClient(create_app(settings)) as c:
            assert [m["name"] for m in c.get("/models").json()] == ["chars-zoo"]
            ws, key, made = create(c, "w")
            assert made["model"] == "chars-zoo"
            teach(c, ws, key, "a", [gray(100, j) for j in range(3)])
            photo = [("images", ("p.jpg", colour_photo_jpeg(), "image/jpeg"))]
            out = c.post(f"/workspaces/{ws}/classify", files=photo, headers=auth(key)).json()
            assert out["predictions"][0]["out_of_domain"] and out["model"] == "chars-zoo"
            assert c.get(f"/workspaces/{ws}", headers=auth(key)).json()["model"] == "chars-zoo"  # what the page shows
    plain = tmp_path / "quickstart-copy"
    shutil.copytree(entry / "bundle", plain)  # outside a zoo entry: the run's name, as before
    with TestClient(create_app(ServiceSettings(bundle_path=str(plain), db_url=str(tmp_path / "svc2.db"),
                                               admin_key=ADMIN))) as c:
        assert [m["name"] for m in c.get("/models").json()] == ["quickstart"]

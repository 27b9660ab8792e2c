"""A workspace exported as one standalone ONNX classifier gives the service's answers, unknowns
included, when run by a script that imports only onnxruntime, numpy and PIL (fewshot imports fail)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from model_helpers import rgb_class_images, rgb_png
from service_helpers import ToyEmbedder, class_images, png_bytes

from fewshot.artifacts.bundle import load_bundle
from fewshot.cli import main
from fewshot.decision import BundleDecision, OpenSetRule
from fewshot.service.app import create_app
from fewshot.service.recogniser import Recogniser, WorkspaceSettings
from fewshot.service.settings import ServiceSettings
from fewshot.service.standalone import build_standalone
from fewshot.service.store import ConflictError, SQLiteStore

ADMIN = "admin-secret"

# The README example (plus a guard that makes any fewshot import fail): labels of image files.
STANDALONE_SCRIPT = '''
import importlib.abc, sys
class NoFewshot(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("fewshot", "torch"):
            raise ImportError(f"standalone use must not import {name}")
sys.meta_path.insert(0, NoFewshot())

import json
import numpy as np
import onnxruntime as ort
from PIL import Image

folder, images = sys.argv[1], sys.argv[2:]
meta = json.load(open(f"{folder}/labels.json"))
pre = meta["preprocessing"]
session = ort.InferenceSession(f"{folder}/model.onnx")

def pixels(path):
    img = Image.open(path).convert(pre["mode"])
    side = round(pre["size"] / pre["crop"])
    img = img.resize((side, side), getattr(Image.Resampling, pre["resample"].upper()))
    top = (side - pre["size"]) // 2
    img = img.crop((top, top, top + pre["size"], top + pre["size"]))
    a = np.asarray(img, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)  # (C, H, W)

out = session.run(None, {"pixels": np.stack([pixels(p) for p in images])})
scores, probabilities, novelty, label_index = out
answers = [meta["labels"][i] if i >= 0 else "unknown" for i in label_index]
print(json.dumps({"labels": answers, "novelty": novelty.tolist()}))
'''


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def run_standalone(folder: Path, images: list[Path], tmp_path: Path) -> dict:
    script = tmp_path / "classify.py"
    script.write_text(STANDALONE_SCRIPT)
    done = subprocess.run([sys.executable, "-I", str(script), str(folder), *map(str, images)], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def write_pngs(tmp_path: Path, pngs: list[bytes]) -> list[Path]:
    paths = []
    for i, b in enumerate(pngs):
        paths.append(tmp_path / f"q{i}.png")
        paths[-1].write_bytes(b)
    return paths


@pytest.mark.parametrize("rule", [{"metric": "euclidean"}, {"metric": "cosine"}, {"metric": "euclidean", "head": "logistic"}])
def test_exported_workspace_answers_as_the_service(rgb_bundle: Path, tmp_path: Path, rule: dict) -> None:
    settings = ServiceSettings(bundle_path=str(rgb_bundle), db_url=str(tmp_path / "svc.db"), admin_key=ADMIN)
    queries = [rgb_png(rgb_class_images(s, 7)[i]) for s in range(3) for i in (5, 6)]
    queries += [rgb_png(rgb_class_images(50 + s, 1)[0]) for s in range(4)]  # untaught: some unknown
    with TestClient(create_app(settings)) as c:
        r = c.post("/workspaces", json={"name": "export", "settings": rule}, headers=auth(ADMIN))
        ws, key = r.json()["id"], r.json()["api_key"]
        for s in range(3):
            files = [("images", (f"{i}.png", rgb_png(a), "image/png")) for i, a in enumerate(rgb_class_images(s, 5))]
            assert c.post(f"/workspaces/{ws}/classes", data={"label": f"class {s}"}, files=files,
                          headers=auth(key)).status_code == 201
        files = [("images", (f"q{i}.png", q, "image/png")) for i, q in enumerate(queries)]
        probe = c.post(f"/workspaces/{ws}/classify", files=files, data={"threshold": "1e9"}, headers=auth(key)).json()
        middle = float(np.median([p["novelty"] for p in probe["predictions"]]))  # rejects about half the queries
        assert c.patch(f"/workspaces/{ws}", json={"threshold": middle}, headers=auth(key)).status_code == 200
        served = c.post(f"/workspaces/{ws}/classify", files=files, headers=auth(key)).json()
        assert c.get(f"/workspaces/{ws}/export").status_code == 401
        r = c.get(f"/workspaces/{ws}/export", headers=auth(key))
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    folder = tmp_path / "exported"
    zipfile.ZipFile(io.BytesIO(r.content)).extractall(folder)
    labels = json.loads((folder / "labels.json").read_text())
    assert labels["labels"] == ["class 0", "class 1", "class 2"] and labels["decision"]["metric"] == rule["metric"]
    assert labels["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    alone = run_standalone(folder, write_pngs(tmp_path, queries), tmp_path)
    expected = [p["label"] for p in served["predictions"]]
    assert alone["labels"] == expected
    assert "unknown" in expected and set(expected) - {"unknown"} <= {"class 0", "class 1", "class 2"}
    assert all(expected[i] in (f"class {i // 2}", "unknown") for i in range(6))  # taught queries: own class
    np.testing.assert_allclose(alone["novelty"], [p["novelty"] for p in served["predictions"]], rtol=1e-4, atol=1e-6)


def test_spread_rule_and_no_rule_are_baked_in(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    spread = OpenSetRule("spread", "euclidean", threshold=1.0, prior_spread=2.0, prior_strength=3.0, shot_penalty=0.5)
    decision = BundleDecision(open_set={"euclidean": spread})
    store = SQLiteStore(tmp_path / "s.db")
    for cal, expect_unknown in ((decision, True), (None, False)):
        r = Recogniser(bundle.onnx_embedder, store, decision=cal, bundle_id=bundle.bundle_id)
        ws, _ = r.create_workspace("w", WorkspaceSettings("euclidean"))
        for s, n in ((0, 1), (1, 3), (2, 5)):  # different counts: the per-class factor matters
            r.add_class(ws.id, f"c{s}", class_images(s, n))
        q = np.concatenate([class_images(s, 7)[6:] for s in range(3)] + [class_images(60 + s, 1) for s in range(3)])
        if cal is not None:  # the rule's kind and priors at a threshold that rejects half of the queries
            middle = float(np.median([p.novelty for p in r.classify(ws.id, q)]))
            r.update_settings(ws.id, WorkspaceSettings("euclidean", threshold=middle))
        model = build_standalone(bundle, r.decision_state(ws.id), model_name="tiny", workspace_id=ws.id).model
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        _, _, novelty, index = session.run(None, {"pixels": q})
        preds = r.classify(ws.id, q)
        assert [p.class_id if p.known else None for p in preds] == [ws_class(r, ws.id, i) for i in index]
        assert any(not p.known for p in preds) == expect_unknown
        if cal is not None:
            np.testing.assert_allclose(novelty, [p.novelty for p in preds], rtol=1e-3)  # float32 d^2 cancellation
    store.close()


def ws_class(r: Recogniser, ws: str, index: int) -> str | None:
    return None if index < 0 else r.decision_state(ws).protos.class_ids[index]


def test_export_of_an_empty_workspace_is_refused(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    r = Recogniser(ToyEmbedder(), store)
    ws, _ = r.create_workspace("empty")
    with pytest.raises(ConflictError, match="no classes yet; teach at least one class"):
        build_standalone(None, r.decision_state(ws.id), model_name="toy", workspace_id=ws.id)  # type: ignore[arg-type]
    store.close()


def test_cli_exports_a_stored_workspace(tiny_bundle: Path, rgb_bundle: Path, tmp_path: Path) -> None:
    db = str(tmp_path / "svc.db")
    settings = ServiceSettings(bundle_path=str(tiny_bundle), extra_bundles=(str(rgb_bundle),), db_url=db, admin_key=ADMIN)
    with TestClient(create_app(settings)) as c:
        r = c.post("/workspaces", json={"name": "chars"}, headers=auth(ADMIN))
        ws, key = r.json()["id"], r.json()["api_key"]
        files = [("images", (f"{i}.png", png_bytes(a), "image/png")) for i, a in enumerate(class_images(0, 3))]
        c.post(f"/workspaces/{ws}/classes", data={"label": "zero"}, files=files, headers=auth(key))
    out = tmp_path / "cli-out"
    assert main(["export-workspace", str(rgb_bundle), f"chars={tiny_bundle}", "--db", db, "--workspace", ws,
                 "--out", str(out)]) == 0
    labels = json.loads((out / "labels.json").read_text())
    assert labels["labels"] == ["zero"] and labels["model"]["name"] == "chars" and (out / "model.onnx").is_file()
    assert main(["export-workspace", str(rgb_bundle), "--db", db, "--workspace", ws, "--out", str(out)]) == 2

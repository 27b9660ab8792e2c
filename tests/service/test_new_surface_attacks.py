"""The service's newer surface under attack: several models, insight and occlusion, the standalone
export, int8 and bring-your-own ONNX bundles. Each test once failed (or guards a refusal that must
stay clear); the bring-your-own models are built here as small ONNX graphs, so no test exports torch."""

from __future__ import annotations

import io
import json
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper
from service_helpers import ToyEmbedder, class_images
from test_app import ADMIN, assert_error, auth, files, new_workspace, settings_for, teach
from test_app_hardening import BrokenDisk

from fewshot.artifacts.bundle import Bundle, load_bundle
from fewshot.artifacts.byo import bundle_from_onnx
from fewshot.artifacts.quantise import quantise_bundle
from fewshot.data.imageio import Preprocessing
from fewshot.decision import BundleDecision, DecisionRule, OpenSetRule, ServedDecision
from fewshot.errors import ConfigError
from fewshot.service.app import create_app
from fewshot.service.insight import InsightCache, recogniser_insight, workspace_insight
from fewshot.service.recogniser import Recogniser, WorkspaceSettings
from fewshot.service.settings import ServiceSettings
from fewshot.service.standalone import build_standalone
from fewshot.service.store import ConflictError, ModelMismatchError, SQLiteStore

L28 = Preprocessing("L", 28)


def byo_onnx(path: Path, *, opset: int = 17, nan_below: float | None = None, rename: dict[str, str] | None = None) -> Path:
    """A small image -> embedding model: [mean, max(x^2)] per image (N, 2) @ W (2, 8), spatial sides
    dynamic ("H", "W"). nan_below: embeddings sqrt(. - t), NaN for dark images. rename: internal
    tensor names to replace (a user's model may use any name)."""
    w = np.random.default_rng(0).uniform(0.5, 1.5, (2, 8)).astype(np.float32)
    out = "lin" if nan_below is not None else "features"
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["mean4"]), helper.make_node("Flatten", ["mean4"], ["mean"]),
             helper.make_node("Mul", ["x", "x"], ["x2"]), helper.make_node("GlobalMaxPool", ["x2"], ["max4"]),
             helper.make_node("Flatten", ["max4"], ["max"]), helper.make_node("Concat", ["mean", "max"], ["both"], axis=1),
             helper.make_node("MatMul", ["both", "w"], [out])]
    inits = [numpy_helper.from_array(w, "w")]
    if nan_below is not None:
        inits.append(numpy_helper.from_array(np.asarray(nan_below, np.float32), "t"))
        nodes += [helper.make_node("Sub", ["lin", "t"], ["shifted"]), helper.make_node("Sqrt", ["shifted"], ["features"])]
    for node in nodes:
        node.input[:] = [(rename or {}).get(n, n) for n in node.input]
        node.output[:] = [(rename or {}).get(n, n) for n in node.output]
    graph = helper.make_graph(nodes, "byo", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, "H", "W"])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def grey(level: int, n: int, seed: int = 0) -> np.ndarray:
    """n uint8 (n, 1, 28, 28) images around grey `level`, each with one white pixel (max(x^2) = 1)."""
    noise = np.random.default_rng(seed).integers(-12, 13, (n, 1, 28, 28))
    out = np.clip(level + noise, 0, 255).astype(np.uint8)
    out[:, :, 0, 0] = 255
    return out


def byo_bundle(tmp: Path, name: str, **kw: object) -> Path:
    return bundle_from_onnx(byo_onnx(tmp / f"{name}.onnx", **kw), tmp / name,  # type: ignore[arg-type]
                            preprocessing=L28, samples=np.concatenate([grey(230, 2), grey(180, 2, seed=1)]))


def served_and_standalone(r: Recogniser, bundle: Bundle, ws: str, q: np.ndarray) -> tuple[list, list, np.ndarray]:
    """(service answers as class ids or None, standalone answers likewise, standalone scores)."""
    state = r.decision_state(ws)
    model = build_standalone(bundle, state, model_name="m", workspace_id=ws).model
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    scores, _, _, index = session.run(None, {"pixels": q})
    alone = [None if i < 0 else state.protos.class_ids[i] for i in index]
    return [p.class_id if p.known else None for p in r.classify(ws, q)], alone, scores


@pytest.fixture(scope="module")
def byo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("byo")


# -- bring-your-own models ---------------------------------------------------------------------------
def test_a_model_that_gives_nan_for_some_images_cannot_poison_a_workspace(byo_dir: Path, tmp_path: Path) -> None:
    """Once, the dark images' NaN embeddings were stored: every later answer of the workspace had
    probability null and the held-out accuracy of the good classes fell to 0."""
    bundle = byo_bundle(byo_dir, "nan", nan_below=0.6)
    settings = ServiceSettings(bundle_path=str(bundle), db_url=str(tmp_path / "s.db"), admin_key=ADMIN)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        ws, key = new_workspace(c)
        for label, level in (("light", 235), ("mid", 175)):
            r = c.post(f"/workspaces/{ws}/classes", data={"label": label}, files=files(grey(level, 3)), headers=auth(key))
            assert r.status_code == 201, r.text
        dark = np.zeros((2, 1, 28, 28), np.uint8)
        err = assert_error(c.post(f"/workspaces/{ws}/classes", data={"label": "dark"}, files=files(dark),
                                  headers=auth(key)), 422, "non_finite_embedding")
        assert "2 of 2" in err["message"]
        for route, field in (("classify", "images"), ("explain", "image"), ("occlusion", "image")):
            assert_error(c.post(f"/workspaces/{ws}/{route}", files=files(dark[:1], field), headers=auth(key)), 422,
                         "non_finite_embedding")
        preds = c.post(f"/workspaces/{ws}/classify", files=files(np.concatenate([grey(235, 1, 9), grey(175, 1, 9)])),
                       headers=auth(key)).json()["predictions"]
        assert [p["label"] for p in preds] == ["light", "mid"] and all(p["probability"] > 0.5 for p in preds)
        insight = c.get(f"/workspaces/{ws}/insight", headers=auth(key)).json()
        assert [cl["label"] for cl in insight["classes"]] == ["light", "mid"] and insight["accuracy"] == 1.0


@pytest.mark.parametrize("opset", [13, 17])
def test_cosine_workspaces_of_models_before_opset_18_export(byo_dir: Path, tmp_path: Path, opset: int) -> None:
    """Once, the export used ReduceL2 with its axes as an input (opset 18 only): a cosine workspace
    (the default of `fewshot bundle-onnx`) of an opset-13..17 model failed with a 500."""
    bundle = load_bundle(byo_bundle(byo_dir, f"opset{opset}", opset=opset))
    store = SQLiteStore(tmp_path / "s.db")
    r = Recogniser(bundle.onnx_embedder, store, bundle_id=bundle.bundle_id)
    for metric in ("cosine", "euclidean"):
        ws, _ = r.create_workspace(metric, WorkspaceSettings(metric))  # type: ignore[arg-type]
        for level in (235, 160, 90):
            r.add_class(ws.id, f"grey {level}", grey(level, 3))
        q = np.concatenate([grey(level, 2, seed=5) for level in (235, 160, 90)])
        served, alone, _ = served_and_standalone(r, bundle, ws.id, q)
        assert alone == served and len(set(served)) == 3
    store.close()


def test_models_older_than_opset_12_are_refused_with_the_fix(byo_dir: Path, tmp_path: Path) -> None:
    bundle = load_bundle(byo_bundle(byo_dir, "opset11", opset=11))
    store = SQLiteStore(tmp_path / "s.db")
    r = Recogniser(bundle.onnx_embedder, store, bundle_id=bundle.bundle_id)
    ws, _ = r.create_workspace("w", WorkspaceSettings("euclidean"))
    r.add_class(ws.id, "a", grey(200, 2))
    with pytest.raises(ConfigError, match="opset 11; the standalone export needs opset >= 12: re-export"):
        build_standalone(bundle, r.decision_state(ws.id), model_name="m", workspace_id=ws.id)
    store.close()


@pytest.mark.parametrize("name", ["pixels", "scores", "probabilities", "pre_float"])
def test_a_model_whose_tensor_names_match_the_exports_still_exports(byo_dir: Path, tmp_path: Path, name: str) -> None:
    """Once, merging failed ("overlapping names", a 500) when the user's model named a tensor like
    one of the graphs the export adds around it."""
    bundle = load_bundle(byo_bundle(byo_dir, f"named-{name}", rename={"both": name}))
    store = SQLiteStore(tmp_path / "s.db")
    r = Recogniser(bundle.onnx_embedder, store, bundle_id=bundle.bundle_id)
    ws, _ = r.create_workspace("w", WorkspaceSettings("euclidean"))
    for level in (235, 120):
        r.add_class(ws.id, f"grey {level}", grey(level, 3))
    served, alone, _ = served_and_standalone(r, bundle, ws.id, np.concatenate([grey(235, 1, 3), grey(120, 1, 3)]))
    assert alone == served and None not in served
    store.close()


# -- int8 bundles ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def int8_pair(byo_dir: Path) -> tuple[Path, Path]:
    """(fp32 bundle, its int8 bundle) of a bring-your-own model."""
    fp32 = byo_bundle(byo_dir, "fp32-for-int8")
    images = np.concatenate([grey(level, 4, seed=level) for level in range(40, 250, 25)])
    return fp32, quantise_bundle(fp32, images, lambda e: {"none": 1.0}, out_dir=byo_dir / "int8")


def test_the_export_of_an_int8_bundle_runs_the_int8_model_the_service_serves(int8_pair: tuple[Path, Path],
                                                                             tmp_path: Path) -> None:
    """Once, the export composed the fp32 model.onnx with prototypes made of int8 embeddings."""
    bundle = load_bundle(int8_pair[1])
    store = SQLiteStore(tmp_path / "s.db")
    r = Recogniser(bundle.onnx_embedder, store, bundle_id=bundle.bundle_id)
    ws, _ = r.create_workspace("w", WorkspaceSettings("euclidean"))
    for level in (235, 160, 90):
        r.add_class(ws.id, f"grey {level}", grey(level, 3))
    q = np.concatenate([grey(level, 2, seed=7) for level in (230, 150, 100)])
    served, alone, scores = served_and_standalone(r, bundle, ws.id, q)
    assert alone == served
    served_scores = np.asarray([[c.score for c in sorted(p.top_k, key=lambda c: c.class_id)] for p in r.classify(ws.id, q)])
    order = np.argsort(r.decision_state(ws.id).protos.class_ids)
    np.testing.assert_allclose(scores[:, order], served_scores, rtol=1e-4, atol=1e-5 * float(served_scores.max()))
    ops = {n.op_type for n in build_standalone(bundle, r.decision_state(ws.id), model_name="m",
                                               workspace_id=ws.id).model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    store.close()


def test_an_int8_bundle_refuses_a_store_filled_by_its_fp32_bundle(int8_pair: tuple[Path, Path], tmp_path: Path) -> None:
    fp32, int8 = int8_pair
    db = str(tmp_path / "s.db")
    with TestClient(create_app(ServiceSettings(bundle_path=str(fp32), db_url=db, admin_key=ADMIN))) as c:
        ws, key = new_workspace(c)
        assert c.post(f"/workspaces/{ws}/classes", data={"label": "a"}, files=files(grey(200, 2)),
                      headers=auth(key)).status_code == 201
    fp32_id = json.loads((fp32 / "manifest.json").read_text())["bundle_id"]
    int8_only = create_app(ServiceSettings(bundle_path=str(int8), db_url=db, admin_key=ADMIN))
    with pytest.raises(ModelMismatchError, match=f"1 workspace\\(s\\) of bundle {fp32_id}.*serve that bundle too"), \
            TestClient(int8_only):
        pass
    with TestClient(create_app(ServiceSettings(bundle_path=f"int8={int8}", extra_bundles=(str(fp32),), db_url=db,
                                               admin_key=ADMIN))) as c:  # both served: each workspace on its own
        assert c.get(f"/workspaces/{ws}", headers=auth(key)).json()["model"] == "fp32-for-int8"


# -- the standalone export equals the service, spread rule ----------------------------------------------
@pytest.mark.parametrize("metric,head", [("cosine", "prototype"), ("cosine", "logistic")])
def test_standalone_equals_the_service_under_the_spread_rule(tiny_bundle: Path, tmp_path: Path, metric: str,
                                                             head: str) -> None:
    bundle = load_bundle(tiny_bundle)
    rules = {m: OpenSetRule("spread", m, threshold=1.0, prior_spread=2.0, prior_strength=3.0,  # type: ignore[arg-type]
                            shot_penalty=0.5) for m in ("euclidean", "cosine")}
    store = SQLiteStore(tmp_path / "s.db")
    r = Recogniser(bundle.onnx_embedder, store, decision=BundleDecision(open_set=rules), bundle_id=bundle.bundle_id)
    ws, _ = r.create_workspace("w", WorkspaceSettings(metric, head))  # type: ignore[arg-type]
    for s, n in ((0, 1), (1, 3), (2, 5)):
        r.add_class(ws.id, f"c{s}", class_images(s, n))
    q = np.concatenate([class_images(s, 8)[6:] for s in range(3)] + [class_images(70 + s, 1) for s in range(5)])
    novelties = sorted(p.novelty for p in r.classify(ws.id, q))  # type: ignore[type-var]
    r.update_settings(ws.id, WorkspaceSettings(metric, head, threshold=(novelties[5] + novelties[6]) / 2))  # type: ignore[arg-type]
    served, alone, _ = served_and_standalone(r, bundle, ws.id, q)
    assert alone == served and served.count(None) == 5
    store.close()


# -- HTTP: keys, outages, odd labels, model names -------------------------------------------------------
@pytest.fixture
def client(tiny_bundle: Path, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(tiny_bundle, tmp_path)), raise_server_exceptions=False) as c:
        yield c


def test_occlusion_and_export_open_only_with_the_workspace_key(client: TestClient) -> None:
    ws, key = new_workspace(client, "a")
    other, other_key = new_workspace(client, "b")
    teach(client, ws, key, "a", 0, n=2)
    one = files(class_images(0, 1), "image")
    for method, url, kw in (("post", f"/workspaces/{ws}/occlusion", {"files": one}), ("get", f"/workspaces/{ws}/export", {})):
        assert_error(getattr(client, method)(url, **kw), 401, "unauthorized")
        assert_error(getattr(client, method)(url, headers=auth(other_key), **kw), 403, "forbidden")
        assert_error(getattr(client, method)(url, headers=auth("fsk_made_up"), **kw), 401, "unauthorized")
        assert getattr(client, method)(url, headers=auth(ADMIN), **kw).status_code == 200
    assert_error(client.get(f"/workspaces/{other}/export", headers=auth(other_key)), 409, "conflict")  # no classes


def test_export_during_a_store_outage_is_a_503_without_the_path(tiny_bundle: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import fewshot.service.http.app as app_module

    monkeypatch.setattr(app_module, "open_store", lambda url, **_: BrokenDisk(tmp_path / "hidden-dir" / "svc.db"))
    with TestClient(create_app(settings_for(tiny_bundle, tmp_path)), raise_server_exceptions=False) as c:
        ws, key = new_workspace(c)
        teach(c, ws, key, "a", 0, n=2)
        c.app.state.service.store.broken = True  # type: ignore[attr-defined]
        r = c.get(f"/workspaces/{ws}/export", headers=auth(key))
        assert "hidden-dir" not in assert_error(r, 503, "store_unavailable")["message"] and r.headers["retry-after"]
        c.app.state.service.store.broken = False  # type: ignore[attr-defined]
        assert c.get(f"/workspaces/{ws}/export", headers=auth(key)).status_code == 200


def test_exported_labels_keep_odd_unicode_and_never_name_zip_entries(client: TestClient) -> None:
    ws, key = new_workspace(client)
    labels = ["../../etc/passwd", "C:\\boot.ini", "\u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627", "\U0001f431 cat",
              "\u732b/\u30cd\u30b3"]
    for s, label in enumerate(labels):
        r = client.post(f"/workspaces/{ws}/classes", data={"label": label}, files=files(class_images(s, 2)),
                        headers=auth(key))
        assert r.status_code == 201, r.text
    r = client.get(f"/workspaces/{ws}/export", headers=auth(key))
    assert r.status_code == 200, r.text
    z = zipfile.ZipFile(io.BytesIO(r.content))
    assert z.namelist() == ["model.onnx", "labels.json"]
    assert json.loads(z.read("labels.json").decode("utf-8"))["labels"] == labels
    assert r.headers["content-disposition"] == f'attachment; filename="{ws}-classifier.zip"'


@pytest.mark.parametrize("model", [5, True, ["characters"], {"a": 1}, "x" * 201, "characters\x00", "", "CHARACTERS",
                                   "characters=/etc", "../characters"])
def test_model_names_that_are_not_served_are_refused(client: TestClient, tmp_path: Path, model: object) -> None:
    r = client.post("/workspaces", json={"name": "w", "model": model}, headers=auth(ADMIN))
    err = assert_error(r, 422 if not isinstance(model, str) or len(model) > 200 else 400)
    assert str(tmp_path) not in err["message"] and len(err["message"]) < 500


def test_a_workspace_cannot_change_its_model_and_insight_follows_its_rule(client: TestClient) -> None:
    ws, key = new_workspace(client)
    for s in range(2):
        teach(client, ws, key, f"c{s}", s, n=3)
    before = client.get(f"/workspaces/{ws}/insight", headers=auth(key)).json()
    assert_error(client.patch(f"/workspaces/{ws}", json={"model": "other"}, headers=auth(key)), 422)
    assert client.patch(f"/workspaces/{ws}", json={"metric": "cosine"}, headers=auth(key)).status_code == 200
    after = client.get(f"/workspaces/{ws}/insight", headers=auth(key))
    assert after.status_code == 200 and after.json()["evaluated"] == before["evaluated"] == 6
    r = client.post(f"/workspaces/{ws}/occlusion", files=files(class_images(1, 4)[3:], "image"), headers=auth(key))
    assert r.status_code == 200 and r.json()["prediction"]["metric"] == "cosine"


# -- insight -----------------------------------------------------------------------------------------
def test_one_class_reports_no_overall_accuracy() -> None:
    """Once, one class of 2+ examples reported 100% held-out accuracy overall while its own report
    said accuracy needs a second class."""
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    one = workspace_insight(1, ("cls_a",), ("a",), x, np.zeros(3, np.int64), ServedDecision(DecisionRule()))
    assert one.evaluated == 3 and one.accuracy is None and one.classes[0].accuracy is None


def test_insight_of_a_huge_workspace_is_refused_before_its_cost(tmp_path: Path) -> None:
    """Once unbounded: (N, K) float64 scores and a (K, K) confusion matrix in JSON; thousands of
    one-image classes took gigabytes on one GET."""
    store = SQLiteStore(tmp_path / "s.db")
    r = Recogniser(ToyEmbedder(), store)
    ws, _ = r.create_workspace("w")
    for s in range(4):
        r.add_class(ws.id, f"c{s}", class_images(s, 3))
    with pytest.raises(ConflictError, match="limited to 3 classes.*has 4 classes and 12 examples"):
        recogniser_insight(r, ws.id, InsightCache(), max_classes=3)
    with pytest.raises(ConflictError, match="40 example x class scores.*48 scores"):
        recogniser_insight(r, ws.id, InsightCache(), max_scores=40)
    assert recogniser_insight(r, ws.id, InsightCache(), max_classes=4, max_scores=48).evaluated == 12
    store.close()


def test_insight_while_classes_are_added_answers_every_time(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    r = Recogniser(ToyEmbedder(), store)
    ws, _ = r.create_workspace("w")
    r.add_class(ws.id, "c0", class_images(0, 2))
    cache, seen, errors = InsightCache(), [], []

    def read() -> None:
        try:
            for _ in range(30):
                seen.append(recogniser_insight(r, ws.id, cache))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    ids = [r.add_class(ws.id, f"c{s}", class_images(s, 2)).id for s in range(1, 6)]
    for cid in ids[:3]:
        r.add_images(ws.id, cid, class_images(40, 1))
    reader.join()
    assert not errors and seen
    for ins in seen:  # each answer is whole: a row per class, counts adding up
        assert ins.confusion.shape == (len(ins.classes),) * 2
        assert [int(row.sum()) for row in ins.confusion] == [c.evaluated for c in ins.classes]
    final = recogniser_insight(r, ws.id, cache)
    assert [c.n_examples for c in final.classes] == [c.n_examples for c in store.list_classes(ws.id)]
    store.close()

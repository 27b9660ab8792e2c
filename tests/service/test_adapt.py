"""A workspace that learns from use: `adapt_workspace` and POST /workspaces/{ws}/adapt choose the
head by held-out answers on the workspace's own examples and switch it atomically."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from service_helpers import ToyEmbedder
from test_app import ADMIN, assert_error, auth, new_workspace, settings_for, teach

import fewshot.service.adapt as adapt_module
from fewshot.artifacts.embedders import check_batch
from fewshot.service.adapt import adapt_workspace
from fewshot.service.app import create_app
from fewshot.service.recogniser import Recogniser
from fewshot.service.store import ConflictError, Store


class CodeEmbedder(ToyEmbedder):
    """Reads a 4-d embedding written into an image's first 4 pixels ((pixel - 128) / 20), so a test
    chooses the embeddings the recogniser stores."""

    def __init__(self) -> None:
        super().__init__(dim=4)

    def embed(self, images_u8: np.ndarray) -> np.ndarray:
        check_batch(images_u8, self.channels, self.size)
        return (images_u8.reshape(len(images_u8), -1)[:, :4].astype(np.float32) - 128) / 20


def images_of(x: np.ndarray) -> np.ndarray:
    img = np.full((len(x), 1, 28, 28), 128, np.uint8)
    img.reshape(len(x), -1)[:, :4] = np.clip(np.round(x * 20 + 128), 0, 255)
    return img


def tilted(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Two classes 1 apart along axis 0 under large shared noise along (1, 1): nearest prototypes
    confuse them, a linear probe separates them."""
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n)
    t = rng.standard_normal((2, n // 2))
    t = np.concatenate([t, -t], axis=1).ravel()  # symmetric: each class's mean is exactly its centre
    x = np.array([[0.5, 0, 1, 0], [-0.5, 0, 1, 0]])[y] + np.outer(t * 2.0, [1, 1, 0, 0])
    return x + 0.05 * rng.standard_normal(x.shape), y


def teach_tilted(r: Recogniser, ws: str, n: int = 20) -> list[str]:
    x, y = tilted(0, n)
    return [r.add_class(ws, f"c{c}", images_of(x[y == c])).id for c in (0, 1)]


def served_accuracy(r: Recogniser, ws: str, ids: list[str]) -> float:
    x, y = tilted(7, 30)  # fresh photos of the taught classes
    preds = r.classify(ws, images_of(x))
    return float(np.mean([p.class_id == ids[c] for p, c in zip(preds, y)]))


def test_the_logistic_head_is_switched_on_when_it_answers_more_right(sqlite_store: Store) -> None:
    r = Recogniser(CodeEmbedder(), sqlite_store)
    ws, _ = r.create_workspace("w")
    ids = teach_tilted(r, ws.id)
    before = served_accuracy(r, ws.id, ids)
    version = r.workspace(ws.id).version
    report, rec = adapt_workspace(r, ws.id)
    proto, logistic = report["scores"]
    assert (proto["head"], logistic["head"]) == ("prototype", "logistic")
    assert logistic["right"] > proto["right"] and proto["evaluated"] == logistic["evaluated"] == 40
    assert report["chosen"] == report["head"] == "logistic" and report["previous"] == "prototype" and report["changed"]
    assert report["measured_version"] == version and rec.version == version + 1
    assert (report["classes"], report["examples"]) == (2, 40)
    assert r.settings(ws.id).head == "logistic" and r.settings(ws.id).adapted == report
    after = served_accuracy(r, ws.id, ids)
    assert after >= before + 0.15, (before, after)  # what the user is told got better, not only the measurement


def test_where_prototypes_do_as_well_the_head_stays(sqlite_store: Store) -> None:
    r = Recogniser(CodeEmbedder(), sqlite_store)
    ws, _ = r.create_workspace("w")
    rng = np.random.default_rng(1)
    for c in range(3):
        r.add_class(ws.id, f"c{c}", images_of(2 * np.eye(3, 4)[c] + 0.2 * rng.standard_normal((6, 4))))
    report, _ = adapt_workspace(r, ws.id)
    assert report["chosen"] == report["head"] == "prototype" and not report["changed"]
    assert "no head beats prototype" in report["why"] and r.settings(ws.id).head == "prototype"


def test_too_few_examples_keep_the_head_and_say_why(sqlite_store: Store) -> None:
    r = Recogniser(CodeEmbedder(), sqlite_store)
    ws, _ = r.create_workspace("w")
    r.patch_settings(ws.id, {"head": "logistic"})
    teach_tilted(r, ws.id, n=4)  # 8 held out < 10
    report, _ = adapt_workspace(r, ws.id)
    assert report["chosen"] is None and report["head"] == "logistic" and not report["changed"]
    assert "teach more images" in report["why"] and r.settings(ws.id).head == "logistic"


def test_changing_the_head_or_metric_by_hand_clears_the_report(sqlite_store: Store) -> None:
    r = Recogniser(CodeEmbedder(), sqlite_store)
    ws, _ = r.create_workspace("w")
    teach_tilted(r, ws.id)
    adapt_workspace(r, ws.id)
    r.patch_settings(ws.id, {"threshold": 5.0})
    assert r.settings(ws.id).adapted is not None  # a threshold leaves the head as measured
    r.patch_settings(ws.id, {"head": "prototype"})
    assert r.settings(ws.id).adapted is None
    adapt_workspace(r, ws.id)
    r.patch_settings(ws.id, {"metric": "cosine"})
    assert r.settings(ws.id).adapted is None


def test_a_change_while_measuring_is_a_conflict_and_changes_nothing(sqlite_store: Store,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    r = Recogniser(CodeEmbedder(), sqlite_store)
    ws, _ = r.create_workspace("w")
    teach_tilted(r, ws.id)
    real = adapt_module.choose_head

    def meanwhile(*args: Any, **kw: Any) -> Any:
        r.add_class(ws.id, "taught meanwhile", images_of(np.array([[0, 3.0, 0, 0]] * 3)))
        return real(*args, **kw)

    monkeypatch.setattr(adapt_module, "choose_head", meanwhile)
    with pytest.raises(ConflictError, match="changed .* while this change was prepared; nothing was changed"):
        adapt_workspace(r, ws.id)
    s = r.settings(ws.id)
    assert s.head == "prototype" and s.adapted is None and r.class_count(ws.id) == 3


def test_the_cost_is_bounded(sqlite_store: Store) -> None:
    r = Recogniser(CodeEmbedder(), sqlite_store)
    ws, _ = r.create_workspace("w")
    teach_tilted(r, ws.id)
    with pytest.raises(ConflictError, match="training on the workspace's examples is limited to .*80 scores"):
        adapt_workspace(r, ws.id, max_scores=79)
    assert r.settings(ws.id).adapted is None


# -- over HTTP ---------------------------------------------------------------------------------------
@pytest.fixture
def client(tiny_bundle: Path, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(tiny_bundle, tmp_path)), raise_server_exceptions=False) as c:
        yield c


def test_adapt_over_http(client: TestClient) -> None:
    ws, key = new_workspace(client)
    assert_error(client.post(f"/workspaces/{ws}/adapt"), 401, "unauthorized")
    for c in range(3):
        teach(client, ws, key, f"class {c}", seed=c, n=5)
    r = client.post(f"/workspaces/{ws}/adapt", headers=auth(key))
    assert r.status_code == 200, r.text
    body = r.json()
    assert [s["head"] for s in body["scores"]] == ["prototype", "logistic"]
    assert body["scores"][0]["evaluated"] == 15 and body["folds"] == 5 and body["examples"] == 15
    assert body["head"] == body["workspace"]["settings"]["head"] and body["chosen"] in ("prototype", "logistic")
    assert body["workspace"]["settings"]["adapted"]["why"] == body["why"]
    got = client.get(f"/workspaces/{ws}", headers=auth(key)).json()
    assert got["settings"]["adapted"]["measured_version"] == body["measured_version"]
    assert got["version"] == body["measured_version"] + 1


def test_the_report_cannot_be_written_by_a_client(client: TestClient) -> None:
    ws, key = new_workspace(client)
    forged = {"chosen": "logistic", "why": "trust me"}
    assert_error(client.patch(f"/workspaces/{ws}", json={"adapted": forged}, headers=auth(key)), 422)
    r = client.post("/workspaces", json={"name": "x", "settings": {"adapted": forged}}, headers=auth(ADMIN))
    assert_error(r, 400)
    assert "adapted" in r.text

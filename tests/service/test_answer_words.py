"""Issue 18 items 2 and 4: each answer says in words why it is "unknown", shows its confidence on
the decision's own scale (known exactly when >= 50%) and what to do next; every prediction and the
workspace carry the threshold it uses and why (`fewshot.service.verdict`)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from service_helpers import class_images
from test_app import auth, files, new_workspace, settings_for, teach
from test_served_decision import PixelEmbedder, images

from fewshot.decision import BundleDecision, DecisionRule, OpenSetRule
from fewshot.service.app import create_app
from fewshot.service.recogniser import Recogniser, WorkspaceSettings
from fewshot.service.store import Store

SHAPE = OpenSetRule("shape", "cosine", 1.0, coefficients=(math.log(0.05), 0.0, 0.5, 0.0), fitted_on="test")


def t_shape(n: int, threshold: float = 1.0) -> float:
    """t(K, n) x threshold of `SHAPE` (it does not depend on K): 0.05 exp(0.5 / n)."""
    return 0.05 * math.exp(0.5 / n) * threshold


def shape_workspace(store: Store, threshold: float | None = None) -> tuple[Recogniser, str]:
    r = Recogniser(PixelEmbedder(), store, decision=BundleDecision(DecisionRule(metric="cosine"), {"cosine": SHAPE}))
    ws, _ = r.create_workspace("w", WorkspaceSettings("cosine", "prototype", threshold=threshold))
    r.add_class(ws.id, "mug", images([200, 0, 0, 0], [190, 10, 0, 0], [200, 5, 0, 0]))
    r.add_class(ws.id, "cup", images([0, 200, 0, 0]))
    return r, ws.id


def test_a_shape_rule_answer_says_why_in_words_on_the_decisions_scale(sqlite_store: Store) -> None:
    r, ws = shape_workspace(sqlite_store)
    far, near = r.classify(ws, images([200, 120, 0, 0], [200, 6, 0, 0]), top_k=2)
    assert not far.known and far.label == "unknown" and far.rule == "shape"
    assert far.effective_threshold == pytest.approx(t_shape(3))  # the answered class ('mug') has 3 examples
    assert far.novelty is not None and far.novelty > 1.0
    assert far.summary == (f"Not sure: this image is farther from 'mug' than the examples you taught (score "
                           f"{far.novelty:.2f} over the limit 1.00 for a class with 3 examples).")
    assert "Add more examples of 'mug'" in far.advice and "raise the threshold" in far.advice
    assert far.confidence < 0.5 and far.confidence == pytest.approx(max(0.0, 1 - far.novelty / 2))
    assert near.known and near.label == "mug" and 0.5 <= near.confidence <= 1.0
    assert "within the limit 1.00 for a class with 3 examples" in near.summary and "lower the threshold" in near.advice
    why = far.threshold_why
    assert why is not None and why["kind"] == "shape" and why["classes"] == 2
    assert why["by_examples"] == {"1": pytest.approx(t_shape(1)), "3": pytest.approx(t_shape(3))}
    assert "multiplies t(K, n)" in why["setting"] and "1.0 is the calibrated point" in why["setting"]
    assert r.threshold_why(ws) == why == near.threshold_why


def test_a_workspace_threshold_multiplies_the_shape_threshold(sqlite_store: Store) -> None:
    r, ws = shape_workspace(sqlite_store, threshold=2.0)
    p = r.classify(ws, images([200, 6, 0, 0]))[0]
    assert p.effective_threshold == pytest.approx(t_shape(3, 2.0)) and p.threshold == 2.0
    why = r.threshold_why(ws)
    assert why is not None and why["by_examples"]["1"] == pytest.approx(t_shape(1, 2.0))
    assert why["threshold"] == 2.0 and why["calibrated_threshold"] == 1.0 and p.threshold_why == why


@pytest.fixture
def client(tiny_bundle: Path, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(tiny_bundle, tmp_path))) as c:
        yield c


def test_the_api_returns_the_words_and_the_threshold_for_a_global_rule(client: TestClient) -> None:
    ws, key = new_workspace(client)
    teach(client, ws, key, "a", seed=0)
    teach(client, ws, key, "b", seed=1)
    query = files(class_images(1, 6)[5:])
    assert client.get(f"/workspaces/{ws}", headers=auth(key)).json()["threshold_why"] is None  # no rule yet
    p = client.post(f"/workspaces/{ws}/classify", files=query, headers=auth(key)).json()["predictions"][0]
    assert p["threshold_why"] is None and p["effective_threshold"] is None
    assert p["confidence"] == pytest.approx(p["probability"]) and "no 'unknown' rule" in p["summary"]

    patched = client.patch(f"/workspaces/{ws}", json={"threshold": 0.0}, headers=auth(key)).json()
    assert patched["threshold_why"]["kind"] == "global" and patched["threshold_why"]["threshold"] == 0.0
    assert patched["threshold_why"]["calibrated_threshold"] is None  # the tiny bundle is not calibrated
    p = client.post(f"/workspaces/{ws}/classify", files=query, headers=auth(key)).json()["predictions"][0]
    nearest = p["top_k"][0]["label"]
    assert not p["known"] and p["rule"] == "global" and p["effective_threshold"] == 0.0
    assert p["confidence"] == 0.0 and p["threshold_why"] == patched["threshold_why"]
    assert p["summary"].startswith(f"Not sure: this image is farther from '{nearest}' than the examples you taught")
    assert "for a class with" not in p["summary"] and f"Add more examples of '{nearest}'" in p["advice"]

    client.patch(f"/workspaces/{ws}", json={"threshold": 1e9}, headers=auth(key))
    for path, field in (("explain", "image"), ("occlusion", "image")):
        out = client.post(f"/workspaces/{ws}/{path}", files=files(class_images(1, 6)[5:], field), headers=auth(key))
        p = out.json()["prediction"]
        assert p["known"] and p["effective_threshold"] == 1e9 and 0.5 <= p["confidence"] <= 1.0, (path, p)
        assert p["threshold_why"]["kind"] == "global" and p["summary"].startswith(f"'{p['label']}'")
    got = client.get(f"/workspaces/{ws}", headers=auth(key)).json()["threshold_why"]
    assert got["threshold"] == 1e9 and "larger accepts more" in got["setting"]


def test_a_shape_rule_workspace_shows_its_threshold_per_example_count(client: TestClient) -> None:
    model = client.app.state.service.models.default  # type: ignore[attr-defined]
    model.recogniser.decision = BundleDecision(DecisionRule(metric="cosine"), {"cosine": SHAPE})
    ws, key = new_workspace(client)
    teach(client, ws, key, "a", seed=0, n=3)
    teach(client, ws, key, "b", seed=1, n=1)
    why = client.get(f"/workspaces/{ws}", headers=auth(key)).json()["threshold_why"]
    assert why["kind"] == "shape" and why["by_examples"] == {"1": pytest.approx(t_shape(1)), "3": pytest.approx(t_shape(3))}
    p = client.post(f"/workspaces/{ws}/classify", files=files(class_images(1, 6)[5:]), headers=auth(key)).json()
    p = p["predictions"][0]
    n = 3 if p["top_k"][0]["label"] == "a" else 1
    assert p["rule"] == "shape" and p["effective_threshold"] == pytest.approx(t_shape(n))
    assert p["threshold_why"] == why and (p["confidence"] >= 0.5) == p["known"]

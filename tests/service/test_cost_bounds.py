"""Issue 16, finding 7: the routes that multiply cost are bounded. Occlusion images per workspace per
minute (429 + Retry-After), one insight or export computation at a time (503 busy), the export
zip cached per workspace version, a logistic head refitted off the request path."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from service_helpers import class_images
from test_app import assert_error, auth, files, new_workspace, settings_for, teach

from fewshot.service import insight as insight_module
from fewshot.service.app import create_app
from fewshot.service.costs import ImageBudget, OneAtATime, OverBudget
from fewshot.service.embedding import ServiceBusy


@pytest.fixture
def client(tiny_bundle: Path, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(tiny_bundle, tmp_path))) as c:
        yield c


def test_image_budget_is_a_token_bucket_per_key() -> None:
    now = [0.0]
    budget = ImageBudget(per_minute=60, clock=lambda: now[0])
    budget.spend("a", 50)
    with pytest.raises(OverBudget, match="retry in 40 s") as err:  # 10 left; 50 more need 40 s at 1 image/s
        budget.spend("a", 50)
    assert err.value.retry_after_s == 40
    budget.spend("b", 60)  # another workspace has its own budget
    now[0] = 40.0
    budget.spend("a", 50)
    with pytest.raises(OverBudget, match="exceeds the budget of 60 images per minute"):
        budget.spend("c", 61)  # can never fit: no point retrying
    now[0] = 1000.0
    budget.spend("a", 60)  # refilled to the full minute, not beyond


def occlusion(c: TestClient, ws: str, key: str, cells: int) -> Any:
    return c.post(f"/workspaces/{ws}/occlusion", files=files(class_images(1, 1), "image"), data={"cells": str(cells)},
                  headers=auth(key))


def test_occlusion_is_refused_with_retry_after_once_a_workspace_spent_its_images(client: TestClient) -> None:
    client.app.state.occlusion_budget = ImageBudget(per_minute=60)  # type: ignore[attr-defined]
    ws, key = new_workspace(client)
    other, other_key = new_workspace(client, "other")
    for w, k in ((ws, key), (other, other_key)):
        teach(client, w, k, "a", 0, n=2)
        teach(client, w, k, "b", 1, n=2)
    assert occlusion(client, ws, key, 5).status_code == 200  # 2 + 25 images
    assert occlusion(client, ws, key, 5).status_code == 200
    r = occlusion(client, ws, key, 5)
    err = assert_error(r, 429, "over_budget")
    assert int(r.headers["retry-after"]) >= 1 and "occlusion budget" in err["message"]
    assert occlusion(client, other, other_key, 5).status_code == 200  # a bystander workspace is not affected
    assert client.post(f"/workspaces/{ws}/classify", files=files(class_images(0, 1)), headers=auth(key)).status_code == 200


def test_one_at_a_time_refuses_a_caller_that_cannot_start() -> None:
    turn = OneAtATime("insight", wait_s=0.05)
    with turn.turn(), pytest.raises(ServiceBusy, match="insight of another workspace"), turn.turn():
        pass
    with turn.turn():  # given back
        pass


def test_concurrent_insight_calls_after_a_change_compute_once(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    computed: list[int] = []
    original = insight_module.workspace_insight

    def slow(*args: Any, **kwargs: Any) -> Any:
        computed.append(1)
        time.sleep(0.3)  # long enough that the calls overlap
        return original(*args, **kwargs)

    monkeypatch.setattr(insight_module, "workspace_insight", slow)
    ws, key = new_workspace(client)
    teach(client, ws, key, "a", 0, n=3)
    teach(client, ws, key, "b", 1, n=3)
    statuses: list[int] = []

    def call() -> None:
        statuses.append(client.get(f"/workspaces/{ws}/insight", headers=auth(key)).status_code)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert statuses == [200] * 6 and len(computed) == 1


def test_insight_is_busy_while_another_is_computed(client: TestClient) -> None:
    ws, key = new_workspace(client)
    teach(client, ws, key, "a", 0, n=2)
    turn = OneAtATime("insight", wait_s=0.05)
    client.app.state.insight_turn = turn  # type: ignore[attr-defined]
    with turn.turn():
        r = client.get(f"/workspaces/{ws}/insight", headers=auth(key))
    assert_error(r, 503, "busy")
    assert r.headers["retry-after"] == "1"
    assert client.get(f"/workspaces/{ws}/insight", headers=auth(key)).status_code == 200


def test_export_is_built_once_per_version_of_the_workspace(client: TestClient) -> None:
    ws, key = new_workspace(client)
    teach(client, ws, key, "a", 0, n=2)
    teach(client, ws, key, "b", 1, n=2)
    cache = client.app.state.export_cache  # type: ignore[attr-defined]
    first = client.get(f"/workspaces/{ws}/export", headers=auth(key))
    again = client.get(f"/workspaces/{ws}/export", headers=auth(key))
    assert first.status_code == again.status_code == 200 and first.content == again.content and cache.builds == 1
    teach(client, ws, key, "c", 2, n=2)  # a new version
    after_teach = client.get(f"/workspaces/{ws}/export", headers=auth(key))
    assert after_teach.content != first.content and cache.builds == 2
    assert client.patch(f"/workspaces/{ws}", json={"threshold": 1.5}, headers=auth(key)).status_code == 200
    after_patch = client.get(f"/workspaces/{ws}/export", headers=auth(key))  # settings are in the zip too
    assert after_patch.content != after_teach.content and cache.builds == 3


def test_a_registration_brings_the_decision_up_to_date_in_the_background(client: TestClient) -> None:
    ws, key = new_workspace(client)
    state = client.app.state.service  # type: ignore[attr-defined]
    recogniser = state.recogniser
    threads: list[str] = []
    original = recogniser.decision_state

    def spy(workspace_id: str, *args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        return original(workspace_id, *args, **kwargs)

    recogniser.decision_state = spy
    teach(client, ws, key, "a", 0, n=2)
    assert client.app.state.refitter.idle()  # type: ignore[attr-defined]
    assert any(name.startswith("fewshot-refit") for name in threads), threads


def test_occlusion_starts_only_when_no_images_wait_for_the_model(client: TestClient) -> None:
    ws, key = new_workspace(client)
    teach(client, ws, key, "a", 0, n=2)
    gate = client.app.state.service.recogniser.embedder.gate  # type: ignore[attr-defined]
    gate._queues[0].append(object())  # someone's images wait for the model
    try:
        r = occlusion(client, ws, key, 3)
    finally:
        gate._queues[0].clear()
    err = assert_error(r, 503, "busy")
    assert r.headers["retry-after"] == "1" and "occlusion map" in err["message"]
    assert occlusion(client, ws, key, 3).status_code == 200

"""Per-request costs of the service that the throughput work removed (issue 16): thread hand-offs
per request, and the out-of-domain preview for a model that has no domain summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio.to_thread
import pytest
from fastapi.testclient import TestClient
from service_helpers import class_images
from test_app import auth, files, new_workspace, settings_for, teach

from fewshot.service import images
from fewshot.service.app import create_app


def test_a_classify_request_makes_two_thread_handoffs(tiny_bundle: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The workspace check (a store query) and the endpoint run in the threadpool; the dependencies
    that only read attributes run on the event loop (each `def` dependency was a hand-off)."""
    calls: list[str] = []
    run_sync = anyio.to_thread.run_sync

    async def counted(fn: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(getattr(fn, "__name__", repr(fn)))
        return await run_sync(fn, *args, **kwargs)

    with TestClient(create_app(settings_for(tiny_bundle, tmp_path))) as c:
        ws, key = new_workspace(c)
        teach(c, ws, key, "a", 0, n=2)
        monkeypatch.setattr(anyio.to_thread, "run_sync", counted)
        r = c.post(f"/workspaces/{ws}/classify", files=files(class_images(0, 1)), headers=auth(key))
        assert r.status_code == 200, r.text
    assert len(calls) <= 2, calls


@pytest.mark.parametrize(("bundle", "previews"), [("tiny_bundle", 0), ("domain_bundle", 2)])
def test_the_domain_preview_is_made_only_for_a_model_with_a_domain_summary(
        bundle: str, previews: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        request: pytest.FixtureRequest) -> None:
    made: list[int] = []
    small_rgb = images.small_rgb
    monkeypatch.setattr(images, "small_rgb", lambda img, side: made.append(side) or small_rgb(img, side))
    with TestClient(create_app(settings_for(request.getfixturevalue(bundle), tmp_path))) as c:
        ws, key = new_workspace(c)
        teach(c, ws, key, "a", 0, n=2)
        made.clear()
        r = c.post(f"/workspaces/{ws}/classify", files=files(class_images(0, 2)), headers=auth(key))
        assert r.status_code == 200, r.text
        assert (r.json()["predictions"][0]["domain_score"] is None) == (previews == 0)
    assert len(made) == previews

"""The page's "Train" step in headless Chromium against a real uvicorn server: after teaching Omniglot
characters, "Train on my examples" (POST /workspaces/{ws}/adapt) shows which head is served, both
heads' held-out scores and why; too few examples say that more are needed; the stored report
(`settings.adapted`) is shown again after a reload."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from test_page import (  # noqa: F401 (fixtures)
    N_SHOT,
    _create_workspace,
    _expect_message,
    _teach,
    browser,
    omniglot_classes,
    page,
    server,
)

pytestmark = pytest.mark.browser


def _workspace(base: str, ws: dict[str, str]) -> dict[str, Any]:
    r = httpx.get(f"{base}/workspaces/{ws['id']}", headers={"Authorization": f"Bearer {ws['key']}"})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _train(pg: Any) -> None:
    """Press the button and wait for the answer drawn from this press (the status line says "Trained")."""
    button = pg.get_by_role("button", name="Train on my examples")
    button.click()
    pg.wait_for_function("document.getElementById('train-status').textContent.startsWith('Trained on ')")
    assert button.is_enabled()


def test_train_shows_both_heads_scores_and_the_served_head_and_keeps_them_after_a_reload(
        page: Any, server: str, omniglot_classes: dict[str, list[Path]]) -> None:  # noqa: F811 (fixtures)
    ws = _create_workspace(page)
    page.get_by_role("button", name="Done").click()
    (a, a_paths), (b, b_paths), (c, c_paths) = omniglot_classes.items()
    page.wait_for_function("document.getElementById('train-status').textContent === 'Not trained yet.'")
    assert page.locator("#train-result").is_hidden()

    # 2 classes x 4 images: 8 held out, fewer than 10, so the heads are not compared and nothing changes.
    head = _workspace(server, ws)["settings"]["head"]
    _teach(page, a, a_paths[:4])
    _teach(page, b, b_paths[:4])
    _train(page)
    report = _workspace(server, ws)["settings"]["adapted"]
    assert report["chosen"] is None and report["head"] == head and report["examples"] == 8
    assert page.locator("#train-verdict").inner_text().startswith("More examples are needed to compare the two heads")
    assert f"The {head} head is still served." in page.locator("#train-verdict").inner_text()
    assert page.locator("#train-head").get_attribute("data-head") == head

    # A third class of N_SHOT: the report above is now out of date, and a second press measures both heads.
    _teach(page, c, c_paths[:N_SHOT])
    page.locator("#train-note").wait_for(state="visible")
    assert "changed since" in page.locator("#train-note").inner_text()
    _train(page)
    got = _workspace(server, ws)
    report = got["settings"]["adapted"]
    assert report["chosen"] in ("prototype", "logistic") and report["examples"] == 8 + N_SHOT
    assert report["head"] == got["settings"]["head"] == report["chosen"]
    assert got["version"] == report["measured_version"] + 1
    proto, logistic = report["scores"]
    scores = (f"prototype {proto['right']} of {proto['evaluated']} right, "
              f"logistic {logistic['right']} of {logistic['evaluated']} right")
    assert proto["evaluated"] == logistic["evaluated"] == 8 + N_SHOT

    def shown() -> dict[str, str]:
        return {k: page.locator(f"#train-{k}").inner_text() for k in ("head", "verdict", "scores", "why")}

    fresh = shown()
    assert scores in fresh["scores"] and "5-fold cross-validation" in fresh["scores"]
    assert fresh["why"] == f"Why: {report['why']}."
    served = report["head"]
    assert fresh["head"].startswith(f"Served now: the {served} head")
    assert fresh["verdict"] == (f"Now serving the {served} head (was {report['previous']})." if report["changed"]
                                else f"Still serving the {served} head.")
    assert page.locator("#train-note").is_hidden()
    assert page.locator("#train-status").inner_text() == f"Trained on {8 + N_SHOT} examples of 3 classes."
    # The panel below is redrawn for the workspace's new version (the head moves the held-out answers).
    page.wait_for_function("v => document.getElementById('insight').dataset.version === String(v)", arg=got["version"])

    # A reload shows the stored report again, with when it was measured.
    page.reload()
    page.locator("#workspace").wait_for(state="visible")
    page.wait_for_function("document.getElementById('train-status').textContent.startsWith('Last trained ')")
    assert shown() == fresh
    assert page.locator("#train-status").inner_text().endswith(f" on {8 + N_SHOT} examples of 3 classes.")
    assert page.locator("#train-note").is_hidden()


def test_a_train_refused_by_the_api_is_shown_in_words(page: Any, server: str) -> None:  # noqa: F811 (fixtures)
    """An error answer (here 401: the stored key no longer opens the workspace) goes to the message
    area, the status line says it did not train, and the button can be pressed again."""
    _create_workspace(page)
    page.get_by_role("button", name="Done").click()
    page.wait_for_function("document.getElementById('train-status').textContent === 'Not trained yet.'")
    page.evaluate("() => { const w = JSON.parse(localStorage.getItem('fewshot.workspace'));"
                  " w.key = 'not-the-key'; localStorage.setItem('fewshot.workspace', JSON.stringify(w)); }")
    page.reload()  # the page opens the workspace with the wrong key; clear what that load reported
    page.locator("#workspace").wait_for(state="visible")
    page.locator("#message-close").click()
    page.get_by_role("button", name="Train on my examples").click()
    text = _expect_message(page, "error", "open the workspace again with its API key")
    assert "wrong API key" in text
    page.wait_for_function("document.getElementById('train-status').textContent.startsWith('Not trained.')")
    assert page.get_by_role("button", name="Train on my examples").is_enabled()

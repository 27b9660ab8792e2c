"""The page's "Under the hood" panel in headless Chromium against a real uvicorn server: held-out
accuracy bars, confusion matrix and confused pairs follow the taught classes; a classified image
gets an occlusion map."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from service_helpers import class_images, png_bytes
from test_page import _create_workspace, _expect_message, _teach, browser, page, server  # noqa: F401 (fixtures)

pytestmark = pytest.mark.browser

N_SHOT = 5
SCREENSHOT = Path("/tmp/fewshot-insight-page.png")  # for a look after the run


@pytest.fixture(scope="module")
def generated_classes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Three classes of noisy variants of one random 28x28 pattern each: N_SHOT + 2 PNGs per class."""
    out = tmp_path_factory.mktemp("generated")
    classes: dict[str, list[Path]] = {}
    for seed, label in enumerate(("alpha", "beta", "gamma")):
        classes[label] = []
        for i, arr in enumerate(class_images(seed, N_SHOT + 2)):
            path = out / f"{label}-{i}.png"
            path.write_bytes(png_bytes(arr))
            classes[label].append(path)
    return classes


def _insight(base: str, ws: dict[str, str]) -> dict[str, Any]:
    r = httpx.get(f"{base}/workspaces/{ws['id']}/insight", headers={"Authorization": f"Bearer {ws['key']}"})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _panel_version(pg: Any, version: int) -> None:
    pg.wait_for_function("v => document.getElementById('insight').dataset.version === String(v)", arg=version)


def _shown_bars(pg: Any) -> list[tuple[str, str]]:
    bars = pg.locator("#insight-classes li")
    return [(bars.nth(i).locator(".bar-label").inner_text(), bars.nth(i).locator(".bar-value").inner_text())
            for i in range(bars.count())]


def test_panel_follows_teaching_and_classify_shows_an_occlusion_map(
        page: Any, server: str, generated_classes: dict[str, list[Path]]) -> None:  # noqa: F811 (fixtures)
    ws = _create_workspace(page)
    page.get_by_role("button", name="Done").click()
    labels = list(generated_classes)

    _teach(page, labels[0], generated_classes[labels[0]][:N_SHOT])
    _panel_version(page, _insight(server, ws)["version"])
    assert _shown_bars(page) == [(labels[0], "n/a")]
    assert "teach a second class" in page.locator("#insight-classes li").inner_text()

    for label in labels[1:]:
        _teach(page, label, generated_classes[label][:N_SHOT])
    api = _insight(server, ws)
    _panel_version(page, api["version"])
    assert _shown_bars(page) == [(c["label"], f"{c['correct']}/{N_SHOT}") for c in api["classes"]]
    cells = page.locator("#insight-matrix tbody td")
    assert cells.count() == 9
    assert [cells.nth(i).inner_text() for i in range(9)] == [str(v) if v else "" for row in api["confusion"] for v in row]
    assert page.locator("#insight-matrix tbody th").nth(1).inner_text() == f"2 {labels[1]}"
    expected_pairs = [p["hint"] for p in api["pairs"]] or ["No class was mistaken for another."]
    assert page.locator("#insight-pairs li").all_inner_texts() == expected_pairs

    # One more image of the first class: the panel re-reads the insight of the new version.
    card = page.locator(".class", has_text=labels[0])
    card.locator(".add-input").set_input_files(str(generated_classes[labels[0]][N_SHOT]))
    _expect_message(page, "info", f"Added 1 image to \"{labels[0]}\"")
    api = _insight(server, ws)
    _panel_version(page, api["version"])
    assert api["classes"][0]["n_examples"] == N_SHOT + 1
    assert _shown_bars(page)[0] == (labels[0], f"{api['classes'][0]['correct']}/{N_SHOT + 1}")

    # Classify a held-out image: the occlusion map is drawn over the model input, for the answer.
    page.locator("#classify-file").set_input_files(str(generated_classes[labels[1]][N_SHOT + 1]))
    page.locator("#occlusion").wait_for(state="visible")
    canvas = page.locator("#occlusion-canvas")
    assert canvas.get_attribute("data-cells") == "7"
    answer = page.locator("#result-verdict").inner_text()
    assert canvas.get_attribute("data-class-id") == next(c["class_id"] for c in api["classes"] if c["label"] == answer)
    assert page.evaluate("(() => { const c = document.getElementById('occlusion-canvas');"
                         " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
                         " return c.width === 168 && d.some((v, i) => i % 4 !== 3 && v !== d[0]); })()")
    assert answer in page.locator("#occlusion-caption").inner_text()
    page.screenshot(path=str(SCREENSHOT), full_page=True)


def test_panel_is_drawn_after_a_reload(page: Any, server: str,  # noqa: F811 (fixtures)
                                       generated_classes: dict[str, list[Path]]) -> None:
    """Issue 16 #6: app.js announced the stored workspace before panel.js listened: empty panel."""
    ws = _create_workspace(page)
    page.get_by_role("button", name="Done").click()
    labels = list(generated_classes)
    for label in labels[:2]:
        _teach(page, label, generated_classes[label][:N_SHOT])
    api = _insight(server, ws)
    page.reload()
    page.locator("#workspace").wait_for(state="visible")
    _panel_version(page, api["version"])
    assert _shown_bars(page) == [(c["label"], f"{c['correct']}/{N_SHOT}") for c in api["classes"]]

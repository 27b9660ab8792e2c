"""The page with two models served, in headless Chromium against a real uvicorn server: the create
form offers the models, a workspace runs on the one chosen and the page names it, and the
out-of-domain warning names the workspace's model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from model_helpers import rgb_class_images, rgb_png
from service_helpers import class_images, colour_photo_jpeg, png_bytes
from test_page import ADMIN_KEY, _create_workspace, _teach, browser, open_page  # noqa: F401 (fixture)

from fewshot.service.app import create_app
from fewshot.service.settings import ServiceSettings
from fewshot.service.smoke import live_server

pytestmark = pytest.mark.browser

N_SHOT = 5


@pytest.fixture
def two_models(browser: Any, domain_bundle: Path, rgb_bundle: Path, tmp_path: Path) -> Iterator[tuple[Any, str]]:  # noqa: F811
    """The page and base URL of a service serving 'characters' (grayscale, with a domain summary; the
    default) and 'photos' (RGB 32x32)."""
    settings = ServiceSettings(bundle_path=f"characters={domain_bundle}", extra_bundles=(str(rgb_bundle),),
                               db_url=f"sqlite:///{tmp_path / 'page.db'}", admin_key=ADMIN_KEY)
    with live_server(create_app(settings)) as base, open_page(browser, base) as pg:
        yield pg, base


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _shown_model(pg: Any, text: str) -> None:
    pg.wait_for_function("t => document.getElementById('ws-model').textContent === t", arg=text)


def test_a_workspace_on_the_second_model(two_models: tuple[Any, str], tmp_path: Path) -> None:
    pg, base = two_models
    pg.goto("/ui/")
    pg.wait_for_function("document.getElementById('create-model').options.length === 2")
    assert pg.locator("#create-model option").all_text_contents() == ["characters — grayscale 28x28",
                                                                     "photos — RGB 32x32"]
    assert pg.get_by_label("Model", exact=True).input_value() == "characters"  # the default model
    assert pg.locator("#create-model").is_enabled()

    ws = _create_workspace(pg, model="photos")
    _shown_model(pg, "photos — RGB 32x32")
    auth = {"Authorization": f"Bearer {ws['key']}"}
    assert httpx.get(f"{base}/workspaces/{ws['id']}", headers=auth).json()["model"] == "photos"
    pg.get_by_role("button", name="Done").click()
    for seed, label in ((10, "red pet"), (11, "blue pet")):
        images = rgb_class_images(seed, N_SHOT + 1)
        _teach(pg, label, [_write(tmp_path, f"{label}{i}.png", rgb_png(a)) for i, a in enumerate(images[:N_SHOT])])
    query = _write(tmp_path, "query.png", rgb_png(rgb_class_images(11, N_SHOT + 1)[N_SHOT]))
    pg.locator("#classify-file").set_input_files(str(query))
    pg.locator("#result").wait_for(state="visible")
    with query.open("rb") as fh:
        pred = httpx.post(f"{base}/workspaces/{ws['id']}/explain", headers=auth,
                          files={"image": (query.name, fh, "image/png")}).json()["prediction"]
    assert pg.locator("#result-verdict").inner_text() == (pred["label"] if pred["known"] else "unknown")
    assert pg.locator("#result-top .bar-label").all_inner_texts() == [c["label"] for c in pred["top_k"]]
    assert pg.locator("#result-domain").is_hidden() == (not pred["out_of_domain"])

    # A workspace kept without its model (by an earlier page) is named after asking the API.
    pg.evaluate("""() => { const w = JSON.parse(localStorage.getItem('fewshot.workspace'));
                  delete w.model; localStorage.setItem('fewshot.workspace', JSON.stringify(w)); }""")
    pg.reload()
    _shown_model(pg, "photos — RGB 32x32")


def test_the_domain_warning_names_the_model(two_models: tuple[Any, str], tmp_path: Path) -> None:
    pg, _ = two_models
    ws = _create_workspace(pg, model="photos")
    pg.get_by_role("button", name="Switch workspace").click()
    _create_workspace(pg)  # the default: characters
    _shown_model(pg, "characters — grayscale 28x28")
    _teach(pg, "pattern", [_write(tmp_path, f"t{i}.png", png_bytes(a)) for i, a in enumerate(class_images(100, N_SHOT))])
    pg.locator("#classify-file").set_input_files(str(_write(tmp_path, "photo.jpg", colour_photo_jpeg())))
    warning = pg.locator("#result-domain")
    warning.wait_for(state="visible")
    text = warning.inner_text()
    assert "does not look like what the 'characters' model was trained on" in text and "colour" in text

    # Opening the photos workspace by id and key names its model.
    pg.get_by_role("button", name="Switch workspace").click()
    pg.get_by_label("Workspace id").fill(ws["id"])
    pg.get_by_label("API key").fill(ws["key"])
    pg.get_by_role("button", name="Open workspace").click()
    _shown_model(pg, "photos — RGB 32x32")

"""End-to-end tests of the web page (/ui) in headless Chromium against a real uvicorn server:
create a workspace, teach Omniglot characters, classify a held-out drawing, explain it, manage
classes, and show the API's errors in the page."""

from __future__ import annotations

import base64
import shutil
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from browser import chromium  # noqa: E402

from fewshot.service.app import create_app  # noqa: E402
from fewshot.service.settings import ServiceSettings  # noqa: E402
from fewshot.service.smoke import live_server  # noqa: E402

sys.path.pop(0)

pytestmark = pytest.mark.browser

ADMIN_KEY = "page-test-admin-key"
N_SHOT = 5
SCREENSHOT_COPY = Path("/tmp/fewshot-page.png")


@pytest.fixture(scope="module")
def omniglot_classes(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Three evaluation characters (one per alphabet) -> N_SHOT + 1 PNG drawings each, written to disk."""
    out = tmp_path_factory.mktemp("omniglot-pngs")
    with zipfile.ZipFile(data_root / "omniglot" / "images_evaluation.zip") as z:
        drawings: dict[tuple[str, str], list[str]] = {}  # (alphabet, character) -> member names
        for name in sorted(n for n in z.namelist() if n.endswith(".png")):
            _, alphabet, character, _ = name.split("/")
            drawings.setdefault((alphabet, character), []).append(name)
        first_of_alphabet: dict[str, tuple[str, list[str]]] = {}
        for (alphabet, character), members in drawings.items():
            first_of_alphabet.setdefault(alphabet, (character, members))
        classes: dict[str, list[Path]] = {}
        for alphabet, (character, members) in list(first_of_alphabet.items())[:3]:
            label = f"{alphabet.lower()} {character.removeprefix('character')}"
            classes[label] = []
            for name in members[: N_SHOT + 1]:
                path = out / alphabet / character / Path(name).name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(z.read(name))
                classes[label].append(path)
    assert len(classes) == 3 and all(len(v) == N_SHOT + 1 for v in classes.values()), classes
    return classes


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as b:
        yield b


@pytest.fixture
def server(tiny_bundle: Path, tmp_path: Path) -> Iterator[str]:
    settings = ServiceSettings(bundle_path=str(tiny_bundle), db_url=f"sqlite:///{tmp_path / 'page.db'}",
                               admin_key=ADMIN_KEY)
    with live_server(create_app(settings)) as base:
        yield base


@contextmanager
def open_page(browser: Any, base_url: str, *, enforce_csp: bool = False) -> Iterator[Any]:
    """A page in a fresh browser context on the server; fails the test on uncaught JavaScript errors.

    Playwright's `wait_for_function` polls by evaluating its predicate inside the page, which the
    service's Content-Security-Policy (no eval) blocks, so the tests' contexts bypass the policy;
    `enforce_csp=True` keeps it and fails the test on any policy violation the page itself causes
    (test_the_page_works_under_its_content_security_policy)."""
    context = browser.new_context(viewport={"width": 1100, "height": 900}, base_url=base_url,
                                  bypass_csp=not enforce_csp)
    context.set_default_timeout(10_000)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" and "Content Security Policy" in m.text
          else None)
    pg.on("dialog", lambda d: d.accept())  # the class delete confirmation
    yield pg
    context.close()
    assert not errors, f"uncaught JavaScript errors in the page: {errors}"


@pytest.fixture
def page(browser: Any, server: str) -> Iterator[Any]:
    with open_page(browser, server) as pg:
        yield pg


def _create_workspace(page: Any, model: str | None = None) -> dict[str, str]:
    """Create a workspace through the form, on `model` (None: the one the page selects)."""
    page.goto("/")
    assert page.url.endswith("/ui/")
    page.get_by_label("Name", exact=True).fill("page test")
    page.get_by_label("Admin key").fill(ADMIN_KEY)
    if model is not None:
        page.get_by_label("Model", exact=True).select_option(model)
    page.get_by_role("button", name="Create workspace").click()
    page.locator("#workspace").wait_for(state="visible")
    stored = page.evaluate("JSON.parse(localStorage.getItem('fewshot.workspace'))")
    assert stored["id"] and stored["key"]
    assert page.locator("#new-key-value").inner_text() == stored["key"]
    return stored  # type: ignore[no-any-return]


def _teach(page: Any, label: str, files: list[Path]) -> None:
    page.get_by_label("Class name", exact=True).fill(label)
    page.locator("#teach-files").set_input_files([str(f) for f in files])
    page.get_by_role("button", name=f"Teach class ({len(files)} images)").click()
    page.locator(".class", has_text=label).wait_for()


def _expect_message(page: Any, kind: str, contains: str) -> str:
    msg = page.get_by_role("alert")
    msg.wait_for(state="visible")
    page.wait_for_function("([k, t]) => { const m = document.getElementById('message');"
                           " return m.classList.contains(k) && m.textContent.includes(t); }", arg=[kind, contains])
    return str(msg.inner_text())


def _drop_file(page: Any, selector: str, path: Path) -> None:
    """Drag-and-drop `path` onto the element, as a browser does: a drop event carrying a DataTransfer."""
    data = page.evaluate_handle(
        """([name, b64]) => { const dt = new DataTransfer();
           const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
           dt.items.add(new File([bytes], name, { type: "image/png" })); return dt; }""",
        [path.name, base64.b64encode(path.read_bytes()).decode()])
    page.dispatch_event(selector, "dragover", {"dataTransfer": data})
    page.dispatch_event(selector, "drop", {"dataTransfer": data})


def test_teach_classify_explain(page: Any, server: str, omniglot_classes: dict[str, list[Path]], tmp_path: Path) -> None:
    ws = _create_workspace(page)
    # One model served: the form shows it without offering a choice; the header names it.
    page.wait_for_function("document.getElementById('ws-model').textContent === 'tiny — grayscale 28x28'")
    assert page.locator("#create-model option").all_text_contents() == ["tiny — grayscale 28x28"]
    assert page.locator("#create-model").is_disabled()
    page.get_by_role("button", name="Done").click()
    for label, paths in omniglot_classes.items():
        _teach(page, label, paths[:N_SHOT])
        _expect_message(page, "info", f'Taught "{label}" from {N_SHOT} images')

    # The class list: three classes, counts, N_SHOT thumbnails each, fetched with the workspace key.
    cards = page.locator(".class")
    assert cards.count() == 3
    for label in omniglot_classes:
        card = page.locator(".class", has_text=label)
        assert card.locator(".class-count").inner_text() == f"{N_SHOT} images"
        assert card.locator(".class-thumbs img").count() == N_SHOT
    page.wait_for_function("[...document.querySelectorAll('.class-thumbs img')].every(i => i.complete && i.naturalWidth > 0)")
    assert page.locator("#classes-count").inner_text() == f"(3 classes, {3 * N_SHOT} images)"

    # Classify a held-out drawing: the page shows what the API answers for the same image.
    label, paths = next(iter(omniglot_classes.items()))
    held_out = paths[N_SHOT]
    page.locator("#classify-file").set_input_files(str(held_out))
    page.locator("#result").wait_for(state="visible")
    with held_out.open("rb") as fh:
        api = httpx.post(f"{server}/workspaces/{ws['id']}/explain", headers={"Authorization": f"Bearer {ws['key']}"},
                         files={"image": (held_out.name, fh, "image/png")}, data={"k": "5"}).json()
    pred = api["prediction"]
    assert page.locator("#result-verdict").inner_text() == pred["label"]
    bars = page.locator("#result-top li")
    assert bars.count() == 3  # top-5 asked, three classes exist
    shown = [(bars.nth(i).locator(".bar-label").inner_text(), bars.nth(i).locator(".bar-value").inner_text())
             for i in range(3)]
    assert shown == [(c["label"], f"{100 * c['probability']:.1f}%") for c in pred["top_k"]]
    assert {name for name, _ in shown} == set(omniglot_classes)
    neighbours = page.locator("#result-neighbours li")
    assert neighbours.count() == len(api["neighbours"]) == N_SHOT
    assert [neighbours.nth(i).inner_text() for i in range(N_SHOT)] == [n["label"] for n in api["neighbours"]]
    page.wait_for_function("[...document.querySelectorAll('#result-neighbours img, #result-query')]"
                           ".every(i => i.complete && i.naturalWidth > 0)")

    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot), full_page=True)
    shutil.copyfile(shot, SCREENSHOT_COPY)

    # A reload keeps the workspace (localStorage); a strict threshold makes the same drawing "unknown".
    page.reload()
    page.locator(".class").first.wait_for()
    assert page.locator("#ws-id").inner_text() == ws["id"]
    r = httpx.patch(f"{server}/workspaces/{ws['id']}", headers={"Authorization": f"Bearer {ws['key']}"},
                    json={"threshold": 1e-9})
    assert r.status_code == 200, r.text
    _drop_file(page, "#classify-drop", held_out)
    page.locator("#result-verdict.unknown").wait_for()
    assert page.locator("#result-verdict").inner_text() == "unknown"
    assert page.locator("#result-detail").inner_text().startswith("Not sure: this image is farther from '")


def test_an_unknown_answer_says_why_in_words_and_never_shows_full_confidence(
        page: Any, server: str, omniglot_classes: dict[str, list[Path]]) -> None:
    """Issue 18 item 4: the words, the confidence on the decision's scale and what to do next come
    from the API (`fewshot.service.verdict`); the threshold control shows which threshold and why."""
    ws = _create_workspace(page)
    page.get_by_role("button", name="Done").click()
    for label, paths in omniglot_classes.items():
        _teach(page, label, paths[:N_SHOT])
    page.wait_for_function("document.getElementById('threshold-why').textContent.startsWith('No ')")
    page.get_by_label("Threshold", exact=True).fill("0.000000001")
    page.get_by_role("button", name="Set", exact=True).click()
    page.wait_for_function("document.getElementById('threshold-why').textContent.includes('above 1e-09')")
    assert "larger accepts more" in page.locator("#threshold-note").inner_text()

    held_out = next(iter(omniglot_classes.values()))[N_SHOT]
    page.locator("#classify-file").set_input_files(str(held_out))
    page.locator("#result-verdict.unknown").wait_for()
    with held_out.open("rb") as fh:
        pred = httpx.post(f"{server}/workspaces/{ws['id']}/explain", headers={"Authorization": f"Bearer {ws['key']}"},
                          files={"image": (held_out.name, fh, "image/png")}, data={"k": "5"}).json()["prediction"]
    nearest = pred["top_k"][0]["label"]
    assert page.locator("#result-detail").inner_text() == pred["summary"]
    assert pred["summary"].startswith(f"Not sure: this image is farther from '{nearest}' than the examples you taught")
    assert f"Add more examples of '{nearest}'" in page.locator("#result-advice").inner_text()
    meter = page.locator("#result-confidence-bar")
    assert float(meter.get_attribute("aria-valuenow")) < 50
    assert page.locator("#result-confidence-value").inner_text() == f"{100 * pred['confidence']:.1f}%"
    shown = page.locator("#result .bar-value").all_inner_texts() + page.locator("#result [aria-valuenow]").evaluate_all(
        "els => els.map(e => e.getAttribute('aria-valuenow') + '%')")
    assert shown and not any(v.startswith("100.0") for v in shown), shown
    assert page.locator("#result-top li").all_inner_texts()[0] == nearest  # names only beside "unknown"


def test_errors_are_shown_and_page_recovers(page: Any, omniglot_classes: dict[str, list[Path]], tmp_path: Path) -> None:
    page.goto("/ui/")
    page.get_by_label("Admin key").fill("not-the-admin-key")
    page.get_by_role("button", name="Create workspace").click()
    assert "wrong admin key" in _expect_message(page, "error", "wrong admin key")
    assert page.locator("#workspace").is_hidden()

    _create_workspace(page)
    page.locator("#classify-file").set_input_files(str(next(iter(omniglot_classes.values()))[0]))
    _expect_message(page, "error", "no classes yet")

    # A text file among the images: the API refuses the request (415) and the page says why.
    junk = tmp_path / "notes.txt"
    junk.write_text("this is not an image\n")
    label, paths = next(iter(omniglot_classes.items()))
    page.get_by_label("Class name", exact=True).fill(label)
    page.locator("#teach-files").set_input_files([str(paths[0]), str(junk)])
    page.get_by_role("button", name="Teach class (2 images)").click()
    text = _expect_message(page, "error", "notes.txt")
    assert "not an image" in text
    assert page.locator(".class").count() == 0

    # Still works: clear the bad selection, teach, add images, rename, delete.
    page.get_by_role("button", name="Clear").click()
    _teach(page, label, paths[:2])
    page.get_by_label("Add images to " + label).set_input_files([str(p) for p in paths[2:4]])
    _expect_message(page, "info", f'Added 2 images to "{label}" (4 in all)')
    assert page.locator(".class .class-count").inner_text() == "4 images"
    page.get_by_role("button", name=f"Rename {label}").click()
    page.get_by_label(f"New name for {label}").fill("renamed")
    page.get_by_role("button", name="Save").click()
    page.locator(".class", has_text="renamed").wait_for()
    page.get_by_role("button", name="Delete renamed").click()
    page.locator("#classes-empty").wait_for(state="visible")
    assert page.locator(".class").count() == 0

    # Another workspace's id with this key: 401 from the API, shown in the page.
    page.get_by_role("button", name="Switch workspace").click()
    page.get_by_label("Workspace id").fill("no-such-workspace")
    page.get_by_label("API key").fill("wrong-key")
    page.get_by_role("button", name="Open workspace").click()
    _expect_message(page, "error", "wrong API key")


@pytest.fixture
def domain_page(browser: Any, domain_bundle: Path, tmp_path: Path) -> Iterator[Any]:
    settings = ServiceSettings(bundle_path=str(domain_bundle), db_url=f"sqlite:///{tmp_path / 'page.db'}",
                               admin_key=ADMIN_KEY)
    with live_server(create_app(settings)) as base, open_page(browser, base) as pg:
        yield pg


def test_an_out_of_domain_image_shows_a_warning(domain_page: Any, tmp_path: Path) -> None:
    from service_helpers import class_images, colour_photo_jpeg, png_bytes

    _create_workspace(domain_page)
    teach_files = []
    for i, a in enumerate(class_images(100, 5)):
        teach_files.append(tmp_path / f"t{i}.png")
        teach_files[-1].write_bytes(png_bytes(a))
    _teach(domain_page, "pattern", teach_files)
    inside = tmp_path / "inside.png"
    inside.write_bytes(png_bytes(class_images(100, 7)[6]))
    domain_page.locator("#classify-file").set_input_files(str(inside))
    domain_page.wait_for_function("document.getElementById('result-verdict').textContent.length > 0")
    assert domain_page.locator("#result-domain").is_hidden()
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(colour_photo_jpeg())
    domain_page.locator("#classify-file").set_input_files(str(photo))
    domain_page.locator("#result-domain").wait_for(state="visible")
    assert "colour" in domain_page.locator("#result-domain").inner_text()


def test_the_page_works_under_its_content_security_policy(browser: Any, server: str, tmp_path: Path) -> None:
    from service_helpers import class_images, png_bytes

    with open_page(browser, server, enforce_csp=True) as pg:
        assert "script-src 'self'" in (pg.goto("/").headers.get("content-security-policy") or "")
        _create_workspace(pg)  # the page's own scripts ran: the workspace view opened
        files = []
        for i, a in enumerate(class_images(0, 3)):
            files.append(tmp_path / f"c{i}.png")
            files[-1].write_bytes(png_bytes(a))
        _teach(pg, "alpha", files)
        pg.locator(".class-thumbs img").first.wait_for(state="visible")

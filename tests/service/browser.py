"""Helpers for browser tests: Debian's headless Chromium driven by Playwright, and the service run
by a real uvicorn server on a free 127.0.0.1 port in a background thread.

Playwright's own browser download is not used (the machines have no network): CI installs
`apt-get install -y chromium` and the tests launch /usr/bin/chromium.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = Path(os.environ.get("FEWSHOT_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def _require_or_skip(reason: str) -> None:
    """tests/conftest.py's require_or_skip (loaded by path: `import conftest` is ambiguous here)."""
    spec = importlib.util.spec_from_file_location("fewshot_tests_root_conftest", Path(__file__).parents[1] / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.require_or_skip(reason)


def chromium_or_skip() -> Path:
    """The Chromium executable; skips (locally) or fails (CI) when it or Playwright is missing."""
    if not CHROMIUM.is_file():
        _require_or_skip(f"Chromium not found at {CHROMIUM}; apt-get install -y chromium (or set FEWSHOT_CHROMIUM)")
    if importlib.util.find_spec("playwright") is None:
        _require_or_skip("the playwright package is not installed; pip install playwright")
    return CHROMIUM


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium `playwright.sync_api.Browser`, closed on exit."""
    from playwright.sync_api import sync_playwright

    executable = chromium_or_skip()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(executable), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()



"""The playground in a real browser: Debian's Chromium driven by Playwright (its own browser
download cannot work offline), against real server processes. Skipped with the reason when
Chromium or Playwright is missing (`bash scripts/system_deps.sh test` installs Chromium)."""
from __future__ import annotations

import os
import shutil

import pytest

from tests.server_process import RemoteServer

CHROMIUM = os.environ.get("CHATVLM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
API_KEY = "ui-test-key-0123456789"


# Module scope, not session: while Playwright's sync API is open, the main thread has a running
# event loop, and tests collected after these ones would fail in asyncio.run().
@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM:
        pytest.skip("Chromium is not installed (apt-get install chromium; scripts/system_deps.sh test does it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -r requirements.txt)")
    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="session")
def ui_server(tiny_models_dir):
    """Tiny checkpoints (chat) plus the CPU OCR engines, auth off."""
    with RemoteServer(models_dir=tiny_models_dir) as server:
        yield server


@pytest.fixture(scope="session")
def keyed_server(tmp_path_factory):
    with RemoteServer(models_dir=tmp_path_factory.mktemp("no_weights"),
                      env={"CHATVLM_AUTH__API_KEYS": f'["{API_KEY}"]'}) as server:
        yield server


@pytest.fixture
def page(browser, tmp_path, request):
    """A fresh tab (its own sessionStorage) with downloads on; a screenshot is left in tmp_path at the end."""
    context = browser.new_context(accept_downloads=True, viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    try:
        page.screenshot(path=str(tmp_path / f"{request.node.name}-final.png"), full_page=True)
    finally:
        context.close()

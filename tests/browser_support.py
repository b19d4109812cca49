"""Debian's Chromium driven by Playwright, for the tests that look at pages as a person would
(test_browser.py, test_oidc_sign_in.py). Chromium comes from Debian (`apt-get install chromium`), never
downloaded by Playwright; without it (or without playwright) the tests skip on a developer machine and
fail in CI (conftest.require)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from conftest import require

CHROMIUM = os.environ.get("CDS_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def launched_chromium() -> Iterator[Any]:
    """A headless Chromium for a module's tests (a fixture yields from it), closed afterwards."""
    require(Path(CHROMIUM).exists() or shutil.which(CHROMIUM), f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "Python package playwright not installed (pip install -e '.[test]')")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()

"""Open a page in a real headless browser (Debian's chromium, driven by Playwright) and report what it saw."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

# chromium without its background services: this machine has no network beyond the package registries
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass
class PageReport:
    console_errors: list[str]
    images: int
    broken_images: list[str]
    title: str
    text: str


def chromium() -> str:
    """The browser's path; skip (or fail, where CI asks for the browser tests) when it is not installed."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "Debian's chromium is not installed (apt-get install chromium)"
        if os.environ.get("TRANSFERLAB_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def open_page(page_file: Path, screenshot: Path) -> PageReport:
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on(
                "console", lambda message: errors.append(message.text) if message.type == "error" else None
            )
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(page_file.resolve().as_uri(), wait_until="load")
            images = page.eval_on_selector_all(
                "img", "imgs => imgs.map(i => [i.alt, i.complete && i.naturalWidth > 0])"
            )
            page.screenshot(path=str(screenshot), full_page=True)
            return PageReport(
                errors,
                len(images),
                [alt for alt, loaded in images if not loaded],
                page.title(),
                page.inner_text("body"),
            )
        finally:
            browser.close()

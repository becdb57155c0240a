"""The example page in a real headless Chromium (Debian's), driven by Playwright: a person's view."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask

from .conftest import serving

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# As root, in a sandbox with no network: no sandboxing, no background traffic, nothing to phone home.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def served_example(make_example: Callable[..., Flask]) -> Iterator[tuple[str, Flask]]:
    app = make_example(CLAUDE_MAX_RETRIES=0)
    with serving(app) as base:
        yield base, app


@pytest.fixture
def page() -> Iterator[Any]:
    if CHROMIUM is None:
        pytest.fail("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser.new_page()
        finally:
            browser.close()


def test_the_page_summarizes_and_shows_degradation(page: Any, served_example: tuple[str, Flask]) -> None:
    url, app = served_example
    page.goto(url + "/")
    page.fill("#text", "Our support queue halved after the release, and reviews mention the faster pages.")
    page.click("#summarize-btn")
    page.wait_for_function("document.querySelector('#result').textContent.includes('summary')", timeout=10_000)
    assert "summary" in page.text_content("#result")
    assert page.text_content("#degraded").strip() == ""

    app.extensions["claude"].simulator.fail(529)
    page.fill("#text", "A different paragraph, so the fallback cache has nothing for it.")
    page.click("#summarize-btn")
    page.wait_for_function("document.querySelector('#degraded').textContent.includes('upstream_unavailable')",
                           timeout=10_000)
    assert "paused" in page.text_content("#result").lower() or "null" in page.text_content("#result")


def test_the_chat_streams_into_the_page(page: Any, served_example: tuple[str, Flask]) -> None:
    url, _ = served_example
    page.goto(url + "/")
    page.fill("#text", "Tell me about the release in a few sentences.")
    page.click("#chat-btn")
    page.wait_for_function("document.querySelector('#chat-output').textContent.trim().length > 20",
                           timeout=10_000)
    assert len(page.text_content("#chat-output").strip()) > 20


def test_a_first_classify_click_shows_a_label(page: Any, served_example: tuple[str, Flask]) -> None:
    url, app = served_example
    page.goto(url + "/")
    page.fill("#text", "I love how fast the new release is.")
    page.click("#classify-btn")
    page.wait_for_function("document.querySelector('#result').textContent.includes('label')", timeout=10_000)
    assert json.loads(page.text_content("#result")) == {"label": "positive"}  # the page pretty-prints the JSON
    assert page.text_content("#degraded").strip() == ""

    app.extensions["claude"].simulator.truncate(times=1)  # a reply cut short still degrades, visibly
    page.click("#classify-btn")
    page.wait_for_function("document.querySelector('#degraded').textContent.includes('truncated')", timeout=10_000)
    assert json.loads(page.text_content("#result")) == {"label": "unknown"}

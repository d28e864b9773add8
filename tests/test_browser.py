"""The page in a real browser (Debian's Chromium driven by Playwright): upload, ask, stream, Stop,
Retry, Undo, Clear, and HTML shown as text."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed"),
]
ARTIFACTS = Path(os.environ.get("OWL_ARTIFACTS", Path(__file__).parent / "artifacts"))
EXAMPLES = Path(__file__).resolve().parent.parent / "static" / "examples"


@pytest.fixture(scope="module")
def page(random_server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
            ],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(random_server.url)
        page.wait_for_selector("#owl-input textarea", timeout=30_000)
        yield page
        browser.close()


def health(server) -> dict:
    import json
    import urllib.request

    return json.loads(urllib.request.urlopen(f"{server.url}/health", timeout=5).read())


def request_count(server, outcome: str) -> int:
    """Requests by outcome (submitted, completed, cancelled), from the server's /metrics."""
    import re
    import urllib.request

    metrics = urllib.request.urlopen(f"{server.url}/metrics", timeout=5).read().decode()
    return int(float(re.search(rf'owl_requests_total\{{outcome="{outcome}"\}} (\S+)', metrics).group(1)))


def answer_text(page) -> str:
    bots = page.locator("#owl-chat .message-row.bot-row, #owl-chat [data-testid='bot']")
    return bots.last.inner_text() if bots.count() else ""


def bot_count(page) -> int:
    return page.locator("#owl-chat [data-testid='bot']").count()


def user_count(page) -> int:
    return page.locator("#owl-chat [data-testid='user']").count()


def open_parameters(page, max_tokens: int) -> None:
    """Greedy decoding (the random model then talks until the budget runs out) and a token budget."""
    accordion = page.locator("#owl-params")
    if not accordion.locator("input[type='number']").first.is_visible():
        accordion.locator("button").first.click()
    page.locator("#owl-sample input[type='checkbox']").set_checked(False)
    box = page.locator("#owl-params input[type='number']").first
    box.fill(str(max_tokens))
    box.press("Enter")


def ask(page, text: str, images: list[Path] = ()) -> None:
    if images:
        page.locator("#owl-input input[type='file']").set_input_files([str(p) for p in images])
        page.wait_for_function(
            f"document.querySelectorAll('#owl-input .thumbnail-item, #owl-input img').length >= {len(images)}",
            timeout=15_000,
        )
    page.locator("#owl-input textarea").fill(text)
    page.locator("#owl-input textarea").press("Enter")


def wait_growing(page, timeout: float = 30.0) -> list[int]:
    """Lengths of the last answer, sampled while it grows: streaming shows several steps."""
    lengths = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(set(lengths)) < 3:
        lengths.append(len(answer_text(page)))
        time.sleep(0.05)
    return lengths


def wait_settled(page, quiet: float = 1.0, timeout: float = 15.0) -> str:
    """The last answer once it has not changed for ``quiet`` seconds (the page may still be drawing
    updates that left the server before Stop)."""
    text, since = answer_text(page), time.monotonic()
    deadline = since + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = answer_text(page)
        if now != text:
            text, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return text
    raise AssertionError(f"the answer was still changing after {timeout} s")


def test_upload_two_images_ask_and_watch_the_stream(page):
    open_parameters(page, 1000)
    ask(page, "Which image has a blue circle?", [EXAMPLES / "pair-left.png", EXAMPLES / "pair-right.png"])
    page.wait_for_selector("#owl-chat [data-testid='user'] img", timeout=15_000)
    lengths = wait_growing(page)
    assert len(set(lengths)) >= 3, f"the answer did not stream: {lengths}"
    assert page.locator("#owl-chat [data-testid='user'] img").count() == 2
    assert "2 / 8 images" in page.locator("#owl-image-count").inner_text()


def test_stop_ends_the_answer(page, random_server):
    cancelled = request_count(random_server, "cancelled")
    page.locator("#owl-stop").click()
    frozen = wait_settled(page)
    time.sleep(1.0)
    assert answer_text(page) == frozen, "the answer kept growing after Stop"
    assert health(random_server)["active"] == 0
    assert request_count(random_server, "cancelled") == cancelled + 1, "the answer ran to its end"


def test_retry_answers_again(page):
    users = user_count(page)
    page.locator("#owl-retry").click()
    lengths = wait_growing(page)
    assert len(set(lengths)) >= 2
    page.locator("#owl-stop").click()
    wait_settled(page)
    assert user_count(page) == users  # the question was not duplicated


def test_undo_puts_the_question_back(page):
    page.wait_for_timeout(300)
    page.locator("#owl-undo").click()
    page.wait_for_function(
        "document.querySelectorAll(\"#owl-chat [data-testid='user']\").length == 0", timeout=10_000
    )
    assert page.locator("#owl-input textarea").input_value() == "Which image has a blue circle?"


def test_html_is_shown_as_text_never_run(page):
    page.evaluate("window.__owl_xss = 0")
    open_parameters(page, 5)
    ask(page, '<img src=x onerror="window.__owl_xss=1"><script>window.__owl_xss=2</script><b>bold?</b>')
    page.wait_for_function(
        "document.querySelectorAll(\"#owl-chat [data-testid='user']\").length >= 1", timeout=15_000
    )
    page.wait_for_timeout(1500)
    user = page.locator("#owl-chat [data-testid='user']").last
    assert "<script>window.__owl_xss=2</script>" in user.inner_text()
    assert user.locator("b, script, img").count() == 0
    assert page.evaluate("window.__owl_xss") == 0


def test_clear_empties_the_chat_and_a_screenshot_is_saved(page):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.locator("#owl-clear").click()
    page.wait_for_function(
        "document.querySelectorAll(\"#owl-chat [data-testid='user']\").length == 0", timeout=10_000
    )
    open_parameters(page, 60)
    ask(page, "Describe this image in one sentence.", [EXAMPLES / "three-shapes.png"])
    page.wait_for_selector("#owl-chat [data-testid='bot']", timeout=20_000)
    page.wait_for_timeout(1500)
    page.screenshot(path=str(ARTIFACTS / "chat.png"), full_page=True)
    assert (ARTIFACTS / "chat.png").stat().st_size > 10_000
    page.locator("#owl-clear").click()
    page.wait_for_function(
        "document.querySelectorAll(\"#owl-chat [data-testid='user']\").length == 0", timeout=10_000
    )
    assert "0 / 8 images" in page.locator("#owl-image-count").inner_text()


def test_editing_a_question_runs_the_conversation_again_from_there(page, random_server):
    open_parameters(page, 20)
    for n, question in enumerate(["How many shapes are there?", "And which colours?"], start=1):
        ask(page, question)
        page.wait_for_function(
            f"document.querySelectorAll(\"#owl-chat [data-testid='bot']\").length >= {n}", timeout=20_000
        )
        page.wait_for_timeout(1500)  # 20 tokens on the tiny model: done well within this
    submitted = request_count(random_server, "submitted")
    first = page.locator("#owl-chat [data-testid='user']").first
    first.hover()
    page.locator("#owl-chat button[aria-label='Edit']").first.click()
    page.locator("#owl-chat textarea").first.fill("What shapes are there?")
    page.locator("#owl-chat button[aria-label='Submit']").first.click()
    page.wait_for_function(
        "document.querySelectorAll(\"#owl-chat [data-testid='user']\").length == 1", timeout=15_000
    )
    page.wait_for_selector("#owl-chat [data-testid='bot']", timeout=20_000)
    assert (
        page.locator("#owl-chat [data-testid='user']").first.inner_text().strip() == "What shapes are there?"
    )
    assert "And which colours?" not in page.locator("#owl-chat").inner_text()
    assert answer_text(page).strip()
    assert request_count(random_server, "submitted") == submitted + 1  # answered anew


def test_a_panorama_is_answered_with_a_hint_that_it_will_be_stretched(page, tmp_path):
    from PIL import Image

    page.locator("#owl-clear").click()
    panorama = tmp_path / "panorama.png"
    Image.new("RGB", (600, 150), (30, 90, 200)).save(panorama)
    open_parameters(page, 5)
    ask(page, "What is in this picture?", [panorama])
    toast = page.get_by_text("panorama.png is 4.0 times as wide as it is tall")
    toast.wait_for(timeout=15_000)
    assert "squashes every picture" in toast.inner_text()
    page.wait_for_selector("#owl-chat [data-testid='bot']", timeout=20_000)
    assert page.locator("#owl-chat [data-testid='user'] img").count() == 1  # sent all the same

"""The page at / in a real headless browser (Debian's chromium through selenium, at a phone's size): it loads,
shows the stream, a question typed in gets its streamed answer, the memory gauge moves and the strip of
frames in memory appears. The server runs the built-in edge-vlm, so the answer is words about the scene."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from wallclock import wall_s

from scripts.page_screenshot import ask_on_page, browser, card, free_port, start_server


@pytest.fixture(scope="module")
def page() -> Iterator[object]:
    port = free_port()
    server = start_server(["--stream", "door=synthetic:7", "--realtime", "--fps", "4", "--budget", "256",
                           "--threads", "2"], port, timeout=wall_s(120))
    driver = None
    try:  # the server stops even when the browser does not start
        driver = browser(start_timeout=wall_s(30))
        driver.get(f"http://127.0.0.1:{port}/")
        yield driver
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(wall_s(60))


def test_the_page_shows_the_stream_and_its_gauge_moves(page) -> None:
    el = card(page, "door", timeout=wall_s(60))
    assert page.title == "edge-runtime"
    first = int(el.get_attribute("data-frames"))
    WebDriverWait(page, wall_s(60)).until(lambda d: int(el.get_attribute("data-frames")) > first + 3)
    tokens = el.find_element(By.CSS_SELECTOR, ".tokens").text
    assert tokens.endswith("/ 256 tokens"), tokens
    width = el.find_element(By.CSS_SELECTOR, ".gauge div").value_of_css_property("width")
    assert float(width.removesuffix("px")) > 0
    live = el.find_element(By.CSS_SELECTOR, "img.live")
    WebDriverWait(page, wall_s(30)).until(lambda d: d.execute_script("return arguments[0].naturalWidth", live) > 0)


def test_a_question_typed_in_gets_its_streamed_answer(page) -> None:
    answer = ask_on_page(page, "door", "What is in the scene?", timeout=wall_s(120))
    assert answer.strip() and "error" not in answer, answer
    assert page.find_element(By.CSS_SELECTOR, ".chat .q").text == "Q: What is in the scene?"


def test_the_strip_shows_the_frames_in_memory_after_a_pass(page) -> None:
    el = card(page, "door", timeout=wall_s(60))
    deadline = time.monotonic() + wall_s(90)
    while time.monotonic() < deadline:
        # read in one go: the page redraws the strip every 5 s
        captions = page.execute_script(
            "return [...arguments[0].querySelectorAll('.strip figcaption')].map((f) => f.textContent)", el)
        if captions and any(not c.endswith("· 100%") for c in captions):
            break  # a pass kept part of some frame: the strip says how much
        time.sleep(1)
    else:
        raise AssertionError("no partly kept frame in the strip within 90 s")
    assert all(c.endswith("%") for c in captions), captions

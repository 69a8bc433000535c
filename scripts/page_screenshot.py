"""The page of `edge-runtime serve` in a real headless browser (Debian's chromium through selenium), at a
phone's size: the server watches synthetic streams with the built-in edge-vlm, the page asks a question and
the answer streams in; the screenshot is what the README shows.

    python -m scripts.page_screenshot --out results/serve_page.png
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PHONE = (412, 915)  # CSS px of a common Android phone (Pixel 7 class)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(argv: list[str], port: int, timeout: float = 120.0) -> subprocess.Popen:
    """`edge-runtime serve ARGV --port PORT`, returned once it answers."""
    proc = subprocess.Popen([sys.executable, "-m", "edge_runtime", "serve", *argv, "--port", str(port)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/streams", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server did not answer in {timeout:g} s")


def browser(size: tuple[int, int] = PHONE, start_timeout: float = 30.0):
    """Headless Chromium driven by selenium; Debian's chromium and chromium-driver (apt-get install).

    chromedriver is started here and waited for up to `start_timeout` seconds (selenium's own Service gives
    it a fixed ~30 s, which an emulated Arm machine needs more than); the driver's quit() stops it too.
    With EDGE_TEST_WEBDRIVER set to a running chromedriver's URL, that one drives the browser instead:
    scripts/arm64_suite.sh points it at the x86 host's, since Chromium does not run under qemu-user (the
    page is then served by the emulated aarch64 server and shown by a host browser, as a phone shows a Pi's).
    """
    from selenium import webdriver
    from selenium.webdriver.remote.client_config import ClientConfig

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={size[0]},{size[1]}", "--force-device-scale-factor=2"):
        options.add_argument(flag)
    options.add_experimental_option("mobileEmulation", {"deviceMetrics": {"width": size[0], "height": size[1],
                                                                         "pixelRatio": 2.0}})
    if remote := os.environ.get("EDGE_TEST_WEBDRIVER"):
        return webdriver.Remote(command_executor=remote, options=options,
                                client_config=ClientConfig(remote, timeout=max(120, round(start_timeout))))
    driver_path = shutil.which("chromedriver")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if not driver_path or not binary:
        raise RuntimeError("needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver")
    options.binary_location = binary
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([driver_path, f"--port={port}"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + start_timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"chromedriver exited with {proc.returncode} before it answered")
        try:
            if httpx.get(url + "/status", timeout=2).json()["value"]["ready"]:
                break
        except (httpx.TransportError, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"chromedriver did not answer within {start_timeout:g} s")
        time.sleep(0.2)
    try:
        driver = webdriver.Remote(command_executor=url, options=options,
                                  client_config=ClientConfig(url, timeout=max(120, round(start_timeout))))
    except Exception:
        proc.kill()
        raise
    quit_session = driver.quit

    def quit() -> None:  # the session, then the chromedriver this function started
        try:
            quit_session()
        finally:
            proc.terminate()
            proc.wait(10)

    driver.quit = quit
    return driver


def card(driver, stream: str, timeout: float = 60.0):
    """The stream's card on the page, once it shows a status."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    css = f'section.card[data-stream="{stream}"]'
    WebDriverWait(driver, timeout).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, css) and d.find_element(By.CSS_SELECTOR, css).get_attribute(
            "data-frames"))
    return driver.find_element(By.CSS_SELECTOR, css)


def ask_on_page(driver, stream: str, question: str, timeout: float = 120.0) -> str:
    """Type a question into the stream's chat box and wait for its streamed answer to finish."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    el = card(driver, stream)
    answers = int(el.get_attribute("data-answers") or 0)
    box = el.find_element(By.CSS_SELECTOR, "input")
    box.send_keys(question)
    el.find_element(By.CSS_SELECTOR, "button").click()
    WebDriverWait(driver, timeout).until(lambda d: int(el.get_attribute("data-answers") or 0) > answers)
    return el.find_elements(By.CSS_SELECTOR, ".chat .a")[-1].text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "results" / "serve_page.png")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    port = free_port()
    server = start_server(["--stream", "door=synthetic:7", "--stream", "yard:1024=synthetic:8", "--realtime",
                           "--fps", "2", "--budget", "512", "--threads", str(args.threads)], port)
    driver = browser()
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        card(driver, "door")
        time.sleep(30)  # a first compression pass on door (512 tokens: 14 frames of 36), a strip to show
        answer = ask_on_page(driver, "door", "What is in the scene?")
        time.sleep(6)  # the strip redraws every 5 s
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
        print(f"answer on the page: {answer!r}; screenshot {args.out}")
    finally:
        driver.quit()
        server.terminate()
        server.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())

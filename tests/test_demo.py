"""`cmath-demo EXPORT_DIR` (cmath_demo/): the real server in its own process on a free 127.0.0.1 port, driven by a
real headless browser (Debian's chromium + chromedriver through Selenium): two typed turns give the emotions the
runtime gives, a pasted transcript too, bad input is a message on the page, a feature export says it needs text."""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SCREENSHOT = ROOT / "docs" / "images" / "demo.png"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER),
        reason="no chromium + chromedriver (apt-get install chromium chromium-driver; scripts/install.sh does)",
    ),
]
selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install 'cmath[dev]')")
pytest.importorskip("starlette", reason="the demo extra is not installed (pip install 'cmath[demo]')")

from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver import Chrome, ChromeOptions  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def demo_server(export_dir: Path) -> Iterator[str]:
    """`python -m cmath_demo EXPORT_DIR --port P` until the block ends; its URL once /api/info answers."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cmath_demo", str(export_dir), "--port", str(port), "--threads", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"cmath-demo exited with {proc.returncode}: {proc.stdout.read()}")
            try:
                with urllib.request.urlopen(url + "api/info", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("cmath-demo did not answer within 120 s") from None
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


@contextmanager
def browser() -> Iterator[Chrome]:
    options = ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,900"):
        options.add_argument(arg)
    driver = Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def open_page(driver: Chrome, url: str) -> WebDriverWait:
    driver.get(url)
    # the page redraws its rows while a wait reads them: an element gone stale is read again at the next poll
    wait = WebDriverWait(driver, 60, ignored_exceptions=[StaleElementReferenceException])
    wait.until(lambda d: d.find_element(By.ID, "about").text != "loading…")
    return wait


def type_turn(driver: Chrome, wait: WebDriverWait, speaker: str, text: str) -> None:
    before = len(driver.find_elements(By.CSS_SELECTOR, "#rows tr"))
    box = driver.find_element(By.ID, "speaker")
    box.clear()
    box.send_keys(speaker)
    driver.find_element(By.ID, "text").send_keys(text)
    driver.find_element(By.ID, "add").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#rows tr")) == before + 1)


def page_rows(driver: Chrome) -> list[dict[str, str]]:
    return [
        {c: tr.find_element(By.CLASS_NAME, c).text for c in ("speaker", "text", "label", "confidence")}
        for tr in driver.find_elements(By.CSS_SELECTOR, "#rows tr")
    ]


def runtime_emotions(export_dir: Path, turns: list[tuple[int, str]], precision: str = "fp32") -> list:
    import cmath_runtime

    conv = cmath_runtime.Conversation(
        cmath_runtime.load(export_dir, backend="cpu", precision=precision, threads=1)
    )
    for speaker, text in turns:
        conv.add(speaker, text=text)
    return conv.emotions()


DIALOGUE = [("Ann", "great lovely fun"), ("Bob", "stupid awful hate")]


def test_two_typed_turns_show_the_runtimes_emotions(context_run: tuple[Path, Path]) -> None:
    _, export = context_run
    want = runtime_emotions(export, [(0, DIALOGUE[0][1]), (1, DIALOGUE[1][1])])
    with demo_server(export) as url, browser() as driver:
        wait = open_page(driver, url)
        assert "joy" in driver.find_element(By.ID, "about").text
        for speaker, text in DIALOGUE:
            type_turn(driver, wait, speaker, text)
        rows = page_rows(driver)
        assert [(r["speaker"], r["text"]) for r in rows] == DIALOGUE
        assert [r["label"] for r in rows] == [e.label for e in want]
        assert [float(r["confidence"]) for r in rows] == pytest.approx([e.confidence for e in want], abs=1e-3)
        points = driver.find_elements(By.CSS_SELECTOR, "#chart circle.point")
        assert [p.get_attribute("data-label") for p in points] == [e.label for e in want]

        driver.find_element(By.ID, "add").click()  # empty text: a message on the page, the rows unchanged
        wait.until(lambda d: d.find_element(By.ID, "error").text)
        assert (
            "utterances[2].text: expected the utterance's text (not empty)"
            in driver.find_element(By.ID, "error").text
        )
        assert len(page_rows(driver)) == 2

        transcript = driver.find_element(By.ID, "transcript")
        transcript.send_keys("Ann: great lovely fun\nno speaker here")
        driver.find_element(By.ID, "analyse").click()
        wait.until(lambda d: "transcript line 2" in d.find_element(By.ID, "error").text)
        assert "expected 'speaker: text', got 'no speaker here'" in driver.find_element(By.ID, "error").text

        transcript.clear()
        transcript.send_keys("\n".join(f"{s}: {t}" for s, t in reversed(DIALOGUE)))
        driver.find_element(By.ID, "analyse").click()
        wait.until(lambda d: [r["speaker"] for r in page_rows(d)] == ["Bob", "Ann"])
        assert driver.find_element(By.ID, "error").text == ""
        reversed_turns = [(0, DIALOGUE[1][1]), (1, DIALOGUE[0][1])]
        assert [r["label"] for r in page_rows(driver)] == [
            e.label for e in runtime_emotions(export, reversed_turns)
        ]

        driver.find_element(By.CSS_SELECTOR, "#precision option[value=int8]").click()  # replays it in int8
        wait.until(lambda d: d.find_element(By.ID, "rows").get_attribute("data-precision") == "int8")
        int8 = runtime_emotions(export, reversed_turns, "int8")
        assert [r["label"] for r in page_rows(driver)] == [e.label for e in int8]


def test_a_feature_export_says_it_needs_text(tiny_export: tuple[Path, dict]) -> None:
    with demo_server(tiny_export[0]) as url, browser() as driver:
        open_page(driver, url)
        error = driver.find_element(By.ID, "error").text
        assert "reads feature vectors (t, a, v), not text: it has no text encoder" in error
        assert not driver.find_element(By.ID, "add").is_enabled()


def take_screenshot(export_dir: Path, out: Path, dialogue: list[tuple[str, str]]) -> None:
    """The page after `dialogue` typed turn by turn, as a PNG (docs/images/demo.png:
    `python -m tests.test_demo EXPORT_DIR` with an export of a real text run)."""
    with demo_server(export_dir) as url, browser() as driver:
        wait = open_page(driver, url)
        for speaker, text in dialogue:
            type_turn(driver, wait, speaker, text)
        height = driver.execute_script("return document.documentElement.scrollHeight")
        shot = driver.execute_cdp_cmd(  # the whole page, not just the window
            "Page.captureScreenshot",
            {
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": 1000, "height": height, "scale": 1},
            },
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(shot["data"]))


if __name__ == "__main__":  # python -m tests.test_demo EXPORT_DIR: docs/images/demo.png
    take_screenshot(
        Path(sys.argv[1]),
        SCREENSHOT,
        [
            ("Ann", "This party is great, lovely people and fun music!"),
            ("Bob", "I hate it. Stupid, awful music."),
            ("Ann", "The table is here, by the window."),
            ("Bob", "Great, lovely. Let's sit."),
        ],
    )

"""`viclip serve` as a user runs it: the command `viclip demo` prints, a real server on a loopback port,
the README's curl, and the page in a real browser (headless Chromium) captioning a real photograph."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from skimage import data as photos

from pipeline.core.registry import MODELS

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")  # Debian's packages
SCREENSHOT = ROOT / "artifacts/test-serve/page.png"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(demo):
    """The serve command the demo printed, run from the folder it names, on a free loopback port."""
    line = (demo / "demo.out").read_text().strip().splitlines()[-1]
    assert line.startswith("serve every model") and " && " in line, line
    folder, command = line.split(": ", 1)[1].split(" && ")
    assert folder == f"cd {demo}"
    port = free_port()
    process = subprocess.Popen([*shlex.split(command), "--port", str(port)], cwd=demo,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"viclip serve did not come up:\n{process.communicate()[0]}")
        time.sleep(0.25)
    yield url
    process.send_signal(signal.SIGINT)  # as Ctrl-C: uvicorn shuts down cleanly
    output = process.communicate(timeout=30)[0]
    assert process.returncode == 0, output


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("photo") / "astronaut.jpg"
    Image.fromarray(photos.astronaut()).save(path)
    return path


def test_the_readme_curl(server, photo):
    """README: curl -F images=@photo.jpg http://127.0.0.1:8000/v1/captions (here on the test's port)."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    result = subprocess.run(["curl", "-sS", "-F", f"images=@{photo}", "-F", "beam_size=3", f"{server}/v1/captions"],
                            capture_output=True, text=True, cwd=photo.parent, check=True)
    body = json.loads(result.stdout)
    assert body["images"][0]["name"] == "astronaut.jpg"
    assert set(body["images"][0]["captions"]) == set(MODELS) and all(body["images"][0]["captions"].values())
    models = json.loads(subprocess.run(["curl", "-sS", f"{server}/v1/models"], capture_output=True, text=True).stdout)
    assert [m["model"] for m in models["models"]] == list(MODELS)


def chrome():
    """Headless Chromium from Debian's packages; nothing downloads a browser. Missing: a failure in CI."""
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        message = f"the browser test needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1400",
                     "--lang=vi"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


def test_the_page_in_a_real_browser(server, photo):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chrome()
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(server)
        wait.until(lambda d: d.find_element(By.ID, "models").text.startswith("Serving"))
        driver.find_element(By.ID, "files").send_keys(str(photo))
        results = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".result"))
        captions = {c.get_attribute("data-model"): c.find_element(By.CSS_SELECTOR, ".text").text
                    for c in results[0].find_elements(By.CSS_SELECTOR, ".caption")}
        assert set(captions) == set(MODELS) and all(captions.values()), captions
        # The page shows what the API says, Vietnamese diacritics and all.
        with photo.open("rb") as image:
            api = httpx.post(f"{server}/v1/captions", files={"images": image}, timeout=60).json()
        assert captions == api["images"][0]["captions"]
        assert "astronaut.jpg" in results[0].text and " ms on the model" in results[0].text

        # A sample test image, clicked, is captioned too; the run's report is on the page.
        driver.find_element(By.CSS_SELECTOR, "#samples button").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".result")) == 2)
        report = driver.find_element(By.ID, "report")
        assert report.is_displayed() and "ViCLIPCap" in report.find_element(By.TAG_NAME, "table").text
        # The report's chart is shown as an image, where the markdown puts it, never as its markdown line.
        assert "![" not in report.text and "comparison.png" not in report.text
        wait.until(lambda d: d.execute_script("return document.querySelector('#report img.chart').naturalWidth") > 0)
        assert len(report.find_elements(By.TAG_NAME, "img")) == 1
        assert "Error" not in driver.find_element(By.ID, "status").text
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(SCREENSHOT))
        print(f"screenshot: {SCREENSHOT}")
    finally:
        driver.quit()

"""The web page at `/` and GET /v1/stats, on a real server on loopback (the embedded Piper voice),
started with an API key as a careful user would.

The HTTP checks run everywhere. The browser test drives Debian's chromium headless through
selenium + chromedriver (scripts/install_browser.sh installs them): it types the key, speaks, checks
that the <audio> element gets a positive duration, uploads a WAV and finds it in the voice list,
and sees the memory chart's data points and the request counter grow. It saves two screenshots
(PNG) into a folder it prints ($EDGE_RUNTIME_SCREENSHOTS, else a temporary folder), and skips with
the reason when no chromium/chromedriver/selenium can be found.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from server_support import API_KEY, speech_prompt, start

STATIC = Path(__file__).resolve().parents[1] / "edge_runtime" / "serving" / "server" / "static"


@pytest.fixture(scope="module")
def server():
    from edge_runtime.serving.server import ServerSettings

    with start(ServerSettings(api_key=API_KEY, warm_up=False)) as running:
        yield running


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


# -- HTTP ----------------------------------------------------------------------------------------
def test_page_and_static_files_are_served_without_the_key(server):
    page = httpx.get(f"{server.url}/", timeout=30)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert '<script src="/static/app.js">' in page.text and 'id="mem-chart"' in page.text
    for name, media in (("app.js", "text/javascript"), ("style.css", "text/css")):
        answer = httpx.get(f"{server.url}/static/{name}", timeout=30)
        assert answer.status_code == 200 and answer.headers["content-type"].startswith(media)
        assert answer.content == (STATIC / name).read_bytes()
    missing = httpx.get(f"{server.url}/static/secrets.txt", timeout=30)
    assert missing.status_code == 404
    assert "secrets.txt" in missing.json()["error"]["message"] and "app.js" in missing.json()["error"]["message"]
    assert httpx.get(f"{server.url}/static/..%2Fweb.py", timeout=30).status_code == 404


def test_static_files_fetch_nothing_from_elsewhere():
    """No CDN, no fonts, no analytics: every URL the page names is on the server itself."""
    for path in STATIC.iterdir():
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), path.name
        assert "@import" not in text, path.name
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    for ref in re.findall(r'(?:src|href)="([^"]+)"', html):
        assert ref.startswith("/static/"), ref


def test_stats_needs_the_key(server):
    answer = httpx.get(f"{server.url}/v1/stats", timeout=30)
    assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"


def test_stats_figures(server):
    before = httpx.get(f"{server.url}/v1/stats", headers=auth(), timeout=30).json()
    speech = httpx.post(f"{server.url}/v1/audio/speech", headers=auth(), timeout=120,
                        json={"model": "tts-1", "input": "Stats, please.", "voice": "alloy",
                              "response_format": "wav"})
    assert speech.status_code == 200
    stats = httpx.get(f"{server.url}/v1/stats", headers=auth(), timeout=30).json()
    assert stats["object"] == "stats" and stats["model"] == "piper:en_US-joe-medium"
    assert stats["profile"] == "cpu" and stats["sample_rate"] == 22050 and stats["time"] > before["time"]
    memory = stats["memory"]
    assert memory["rss_bytes"] > 50 * 2**20 and memory["rss_peak_bytes"] >= memory["rss_bytes"]
    assert memory["cuda_allocated_bytes"] is None  # CPU profile
    assert stats["queue"]["depth"] == 0 and stats["queue"]["running"] == 0 and stats["queue"]["max_batch"] >= 1
    assert stats["requests"]["requests"] == before["requests"]["requests"] + 1
    last = stats["requests"]["recent"][-1]
    assert last["audio_seconds"] > 0.3 and last["rtf"] > 0 and last["time_to_first_audio_s"] > 0
    assert last["batch_size"] == stats["queue"]["last_batch_size"] == 1
    cache = stats["voice_cache"]
    assert cache["max_entries"] == 32 and cache["max_bytes"] == 256 * 2**20 and cache["entries"] >= 0
    # the Piper voice on the cpu profile: four components, every block computing on the CPU in fp32
    rows = stats["components"]
    assert [r["component"] for r in rows] == ["text_encoder", "duration_predictor", "flow", "decoder"]
    assert all(r["where"] == "CPU" and r["precision"] == "fp32" and not r["quantized"] for r in rows)
    assert sum(r["bytes"] for r in rows) > 40 * 2**20 and all(r["blocks"] == 1 for r in rows)
    assert stats["placement"]["backend"] == "resident" and stats["placement"]["resident_bytes"] == 0
    assert stats["placement"]["cpu_bytes"] == sum(r["bytes"] for r in rows)


def test_where_words():
    from edge_runtime.serving.server.web import where

    assert where("gpu", "") == "resident"
    assert where("gpu", "int4") == "resident, int4"
    assert where("stream:cpu", "") == "streamed from cpu"
    assert where("stream:nvme", "int8") == "streamed from nvme, int8"
    assert where("cpu", "") == "CPU"


# -- the browser ---------------------------------------------------------------------------------
def _browser_paths() -> tuple[str, str]:
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("no chromium and chromedriver on PATH: run scripts/install_browser.sh (apt-get install -y "
                    "chromium chromium-driver, as root)")
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.service import Service

    binary, driver = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--mute-audio",
                "--autoplay-policy=no-user-gesture-required", "--window-size=1280,960",
                "--disable-background-networking", "--no-first-run",
                # a fake microphone (a beep once a second) that needs no permission prompt
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"):
        options.add_argument(arg)
    chrome = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    chrome.set_script_timeout(60)
    try:
        yield chrome
    finally:
        chrome.quit()


def _wait(chrome, script: str, what: str, timeout: float = 60.0):
    """Poll a JavaScript expression until it is truthy; fail saying what was awaited and the page's status."""
    deadline = time.monotonic() + timeout
    while True:
        value = chrome.execute_script(f"return ({script});")
        if value:
            return value
        if time.monotonic() > deadline:
            status = chrome.execute_script(
                "return ['speak-status','upload-status','stats-status'].map(i => document.getElementById(i).textContent)")
            pytest.fail(f"timed out waiting for {what}; page status lines: {status}")
        time.sleep(0.1)


def _screenshot_dir() -> Path:
    folder = os.environ.get("EDGE_RUNTIME_SCREENSHOTS")
    path = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="edge_runtime_web_"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_page_in_a_real_browser(server, browser, tmp_path):
    chrome = browser
    shots = _screenshot_dir()
    print(f"\nweb page screenshots: {shots}")
    chrome.get(f"{server.url}/")
    assert chrome.title == "edge_runtime"
    # without the key the page says why nothing works
    _wait(chrome, "document.getElementById('speak-status').textContent.includes('401')", "the missing-key message")
    assert "API key" in chrome.find_element("id", "speak-status").text

    key = chrome.find_element("id", "api-key")
    key.send_keys(API_KEY)
    chrome.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
    _wait(chrome, "document.body.dataset.ready === '1'", "the voice list")
    voices = chrome.execute_script("return [...document.querySelectorAll('#voice option')].map(o => o.value)")
    assert "alloy" in voices and "shimmer" in voices
    _wait(chrome, "window.edgeRuntime.lastStats !== null", "the first /v1/stats poll")
    points_before = int(chrome.find_element("id", "mem-chart").get_attribute("data-points"))
    requests_before = chrome.execute_script("return window.edgeRuntime.lastStats.requests.requests")

    # speak (mp3, the default format: streamed into the <audio> element through MediaSource)
    text = chrome.find_element("id", "text")
    text.clear()
    text.send_keys("The quick brown fox jumps over the lazy dog, twice.")
    chrome.find_element("id", "speak").click()
    duration = _wait(chrome, "(d => isFinite(d) && d > 0 && d)(document.getElementById('player').duration) && "
                             "!document.getElementById('download').classList.contains('hidden') && "
                             "document.getElementById('player').duration", "a positive <audio> duration")
    assert 1.0 < duration < 10.0
    assert chrome.find_element("id", "download").get_attribute("download") == "speech.mp3"
    _wait(chrome, f"window.edgeRuntime.lastStats.requests.requests > {requests_before}", "the request in /v1/stats")
    _wait(chrome, f"+document.getElementById('mem-chart').dataset.points > {points_before}", "new chart points")
    rows = chrome.execute_script("return document.querySelectorAll('#requests tbody tr').length")
    assert rows >= 1
    assert chrome.execute_script("return document.querySelectorAll('#components tbody tr').length") == 4
    assert chrome.find_element("id", "ttfa").text.endswith(" ms")
    chrome.save_screenshot(str(shots / "1_spoken.png"))

    # upload a voice prompt (a WAV file): it appears in the voice list, selected
    prompt = tmp_path / "my_voice.wav"
    prompt.write_bytes(speech_prompt())
    chrome.find_element("id", "voice-file").send_keys(str(prompt))
    chrome.find_element("id", "transcript").send_keys("This is my voice, recorded for the test.")
    chrome.find_element("id", "upload").click()
    # the page selects the new voice once its upload has answered (the list may also hold voices other
    # tests saved to the voice library, so the selection, not the first uploaded option, is the one)
    uploaded = _wait(chrome, "(o => o && o.dataset.type === 'uploaded' && /ready/.test("
                             "document.getElementById('upload-status').textContent) && o.value)"
                             "(document.querySelector('#voice option:checked'))",
                     "the uploaded voice selected in the list", timeout=90)
    assert re.fullmatch(r"[0-9a-f]{16,64}", uploaded)
    assert uploaded.startswith(chrome.find_element("id", "upload-status").text.split("voice ")[1][:12])
    listed = httpx.get(f"{server.url}/v1/voices", headers=auth(), timeout=30).json()["data"]
    assert uploaded in [v["id"] for v in listed if v["type"] == "uploaded"]

    # speak with it, as a WAV this time (played once whole)
    chrome.execute_script("document.getElementById('format').value = 'wav'")
    chrome.execute_script("document.getElementById('player').removeAttribute('src'); "
                          "document.getElementById('player').load()")
    chrome.find_element("id", "speak").click()
    _wait(chrome, "document.getElementById('download').getAttribute('download') === 'speech.wav' && "
                  "(d => isFinite(d) && d > 0)(document.getElementById('player').duration)",
          "a positive duration with the uploaded voice")
    _wait(chrome, f"window.edgeRuntime.lastStats.requests.requests >= {requests_before + 2}", "two requests in stats")
    _wait(chrome, "window.edgeRuntime.lastStats.voice_cache.entries >= 1", "the voice in the cache")
    chrome.execute_script("window.scrollTo(0, 0)")
    time.sleep(1.2)  # one more poll, so the chart and tables show the second request
    chrome.save_screenshot(str(shots / "2_uploaded_voice.png"))

    # the microphone button: record ~2 s of the fake device, stop; the page sends it as a 16-bit WAV
    known = set(chrome.execute_script("return [...document.querySelectorAll('#voice option')].map(o => o.value)"))
    chrome.find_element("id", "transcript").clear()
    chrome.find_element("id", "record").click()
    _wait(chrome, "window.edgeRuntime.recorder !== null", "the recording to start")
    time.sleep(2.0)
    chrome.find_element("id", "record").click()
    status = _wait(chrome, "(t => (t.includes('ready') || t.includes(':')) && t)"
                           "(document.getElementById('upload-status').textContent)", "the recording's upload", timeout=90)
    print(f"microphone upload: {status}")
    recorded = chrome.execute_script("return document.getElementById('voice').value")
    assert "ready" in status and recorded not in known and re.fullmatch(r"[0-9a-f]{16,64}", recorded), status
    for name in ("1_spoken.png", "2_uploaded_voice.png"):
        data = (shots / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000

"""`edge-runtime serve` as a user runs it: a subprocess that prints its profile, plan and URL, takes
the API key from the environment and profile limits from --set, and on SIGTERM finishes the request
in flight before exiting 0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from server_support import decode, metric_value  # noqa: E402
from test_server_load import LONG_TEXT, _wait_for, bodies, check_answers, hammer  # noqa: E402

KEY = "cli-test-key"


@pytest.mark.slow
def test_serve_prints_startup_serves_and_drains_on_sigterm(tmp_path):
    env = {**os.environ, "EDGE_RUNTIME_API_KEY": KEY}
    cmd = [sys.executable, "-m", "edge_runtime", "serve", "--port", "0", "--profile", "cpu", "--no-warm-up",
           "--set", "runtime.threads=1", "--set", "limits.queue_size=1",
           "--set", f"voice_cache.library_dir={tmp_path / 'voices'}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    try:
        for line in proc.stdout:  # until the server says where it listens
            lines.append(line)
            if line.startswith("serving on "):
                break
        startup = "".join(lines)
        assert "profile: cpu" in startup and "plan: " in startup and "batching: max_batch auto -> 1 (not measured" in startup, startup
        assert "auth: API key required" in startup
        url = re.search(r"serving on (http://127\.0\.0\.1:\d+)", startup).group(1)
        threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()

        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        audio, _ = decode(client.audio.speech.create(model="tts-1", voice="alloy", input="From the CLI.").content)
        assert audio.size > 0
        assert httpx.get(f"{url}/v1/models").status_code == 401  # the key from the environment applies

        # --set limits.queue_size=1: simultaneous clients beyond it get 429 with Retry-After
        headers = {"Authorization": f"Bearer {KEY}"}
        ok, busy = check_answers(hammer(url, bodies(8, ("mp3",)), headers=headers), 8)
        assert ok >= 1 and busy >= 1

        outcome: dict = {}

        def in_flight() -> None:
            outcome["response"] = httpx.post(f"{url}/v1/audio/speech", headers=headers, timeout=300, json={
                "model": "tts-1", "voice": "alloy", "input": LONG_TEXT, "response_format": "flac"})

        requester = threading.Thread(target=in_flight)
        requester.start()
        _wait_for(lambda: metric_value(httpx.get(f"{url}/metrics").text, "edge_runtime_in_flight_requests") >= 1,
                  "the long request to reach the worker")
        proc.send_signal(signal.SIGTERM)
        requester.join()
        assert proc.wait(timeout=120) == 0
        response = outcome["response"]
        assert response.status_code == 200  # finished, not cut off
        audio, rate = decode(response.content)
        assert audio.size > 10 * rate  # the whole long text
        assert "stopped (SIGTERM)" in "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

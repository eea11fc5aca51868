"""Many clients at once against a real server: every request answered (200, or 429 with
Retry-After), nothing lost, batching through the real model, disconnects release their work."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("fastapi")

from server_support import decode, metric_value, shared_runtime, start  # noqa: E402

CLIENTS = 32
LONG_TEXT = " ".join(f"This is sentence number {i} of a long text that takes a while to speak." for i in range(10))


def hammer(url: str, bodies: list[dict], headers: dict | None = None) -> list[httpx.Response]:
    """Send every body at the same moment from its own thread and connection."""
    barrier = threading.Barrier(len(bodies))

    def one(body: dict) -> httpx.Response:
        with httpx.Client(timeout=300, headers=headers) as client:
            barrier.wait()
            return client.post(f"{url}/v1/audio/speech", json=body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(one, bodies))


def check_answers(responses: list[httpx.Response], expected: int) -> tuple[int, int]:
    assert len(responses) == expected  # nothing lost
    ok = busy = 0
    for response in responses:
        if response.status_code == 200:
            audio, _ = decode(response.content)
            assert audio.size > 0
            ok += 1
        else:
            assert response.status_code == 429, response.text
            assert int(response.headers["Retry-After"]) >= 1
            assert response.json()["error"]["code"] == "queue_full"
            busy += 1
    return ok, busy


def bodies(n: int, fmt_cycle=("mp3", "wav")) -> list[dict]:
    return [{"model": "tts-1", "voice": "alloy", "input": f"Hello {i}.",
             "response_format": fmt_cycle[i % len(fmt_cycle)]} for i in range(n)]


def healthy(url: str) -> None:
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    response = httpx.post(f"{url}/v1/audio/speech", timeout=120,
                          json={"model": "tts-1", "voice": "alloy", "input": "Still fine.", "response_format": "wav"})
    assert response.status_code == 200


def test_32_clients_all_answered():
    with start() as server:
        ok, busy = check_answers(hammer(server.url, bodies(CLIENTS)), CLIENTS)
        assert ok + busy == CLIENTS and ok >= 1
        healthy(server.url)


def test_small_queue_answers_429_with_retry_after():
    from edge_runtime.serving.server import ServerSettings

    with start(ServerSettings(queue_size=1, warm_up=False)) as server:
        ok, busy = check_answers(hammer(server.url, bodies(CLIENTS, ("mp3",))), CLIENTS)
        assert busy >= 1 and ok >= 1
        text = httpx.get(f"{server.url}/metrics").text
        assert metric_value(text, "edge_runtime_rejected_requests_total", reason="queue_full") == busy
        healthy(server.url)


def test_batching_through_the_real_model():
    from edge_runtime.serving.server import ServerSettings

    with start(ServerSettings(max_batch=4, max_wait_ms=50, warm_up=False)) as server:
        # flac: whole-audio formats are what the scheduler batches (mp3, wav, pcm, opus, aac stream alone)
        ok, busy = check_answers(hammer(server.url, bodies(16, ("flac",))), 16)
        assert (ok, busy) == (16, 0)
        text = httpx.get(f"{server.url}/metrics").text
        batches = metric_value(text, "edge_runtime_batch_size_count")
        assert metric_value(text, "edge_runtime_batch_size_sum") == 16
        assert batches < 16  # requests shared forwards
        assert metric_value(text, "edge_runtime_max_batch") == 4


def _wait_for(condition, what: str, limit: float = 120.0) -> None:
    """Poll (this is not a speed check: the limit only keeps a broken server from hanging the suite)."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def test_disconnects_cancel_queued_and_streaming_work():
    rt = shared_runtime()
    with start() as server:
        scheduler = server.server.config.app.state.scheduler
        before = rt.telemetry.summary()["requests"]
        streamed: list[bytes] = []

        def long_stream() -> None:
            body = {"model": "tts-1", "voice": "alloy", "input": LONG_TEXT, "response_format": "pcm"}
            with httpx.stream("POST", f"{server.url}/v1/audio/speech", json=body, timeout=300) as response:
                streamed.extend(response.iter_bytes())

        holder = threading.Thread(target=long_stream)
        holder.start()
        _wait_for(lambda: scheduler.running == 1, "the long stream to start")
        with pytest.raises(httpx.TimeoutException):  # gives up while its request is still queued
            httpx.post(f"{server.url}/v1/audio/speech", timeout=httpx.Timeout(30, read=0.2),
                       json={"model": "tts-1", "voice": "alloy", "input": "Never mind.", "response_format": "mp3"})
        metric = lambda: metric_value(httpx.get(f"{server.url}/metrics").text,  # noqa: E731
                                      "edge_runtime_rejected_requests_total", reason="disconnected")
        _wait_for(lambda: metric() >= 1, "the disconnect to be noticed")
        holder.join()
        assert len(b"".join(streamed)) > 0
        assert rt.telemetry.summary()["requests"] == before + 1  # the queued request never ran

        body = {"model": "tts-1", "voice": "alloy", "input": LONG_TEXT, "response_format": "wav"}
        with httpx.stream("POST", f"{server.url}/v1/audio/speech", json=body, timeout=300) as response:
            assert next(response.iter_bytes())  # the first audio, then hang up
        _wait_for(lambda: rt.telemetry.summary()["requests"] == before + 2, "the stream to be released")
        assert rt.last_telemetry.error is not None  # stopped before its end, not run to completion
        _wait_for(lambda: metric() >= 2, "the stream disconnect to be counted")
        healthy(server.url)

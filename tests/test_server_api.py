"""The HTTP server against the official `openai` client and raw HTTP: speech in every format,
streaming, models, health, metrics, OpenAI-shaped errors for bad input, and the API key."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from server_support import API_KEY, decode, metric_value, start  # noqa: E402

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server():
    from edge_runtime.serving.server import ServerSettings

    with start(ServerSettings(api_key=API_KEY, warm_up=False)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def post_speech(server, body, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/audio/speech", json=body, headers=AUTH, timeout=120, **kwargs)


def test_openai_client_speech_decodes(client):
    response = client.audio.speech.create(model="tts-1", voice="alloy", input="Hello from the test.")
    audio, rate = decode(response.content)  # mp3, OpenAI's default format
    assert rate == 22050 and audio.size > rate // 4 and np.abs(audio).max() > 0.01


@pytest.mark.parametrize("fmt", ["wav", "flac", "opus"])
def test_openai_client_formats_decode(client, fmt):
    response = client.audio.speech.create(model="piper:en_US-joe-medium", voice="nova", input="Formats.",
                                          response_format=fmt, speed=1.2)
    audio, rate = decode(response.content)
    assert rate == (24000 if fmt == "opus" else 22050)  # Opus has no 22.05 kHz mode
    assert audio.size > 0 and np.isfinite(audio).all()


def test_whole_audio_response_says_where_its_time_went(server):
    response = post_speech(server, {"model": "tts-1", "voice": "alloy", "input": "Timing headers.",
                                    "response_format": "flac"})
    assert response.status_code == 200
    assert response.headers["x-batch-size"] == "1"
    queued, compute = float(response.headers["x-queue-seconds"]), float(response.headers["x-compute-seconds"])
    assert 0 <= queued < compute  # one request on an idle server: no wait, some forward
    assert response.headers["x-sample-rate"] == "22050"


def test_openai_client_streaming_wav_and_pcm(client):
    text = "First sentence streams at once. The second one follows it. And a third."
    with client.audio.speech.with_streaming_response.create(model="tts-1", voice="alloy", input=text,
                                                            response_format="wav") as response:
        assert response.headers["content-type"] == "audio/wav"
        chunks = list(response.iter_bytes())
    audio, rate = decode(b"".join(chunks))
    assert rate == 22050 and audio.size > rate  # three sentences: well over a second
    with client.audio.speech.with_streaming_response.create(model="tts-1", voice="alloy", input=text,
                                                            response_format="pcm",
                                                            extra_body={"stream_format": "audio"}) as response:
        pcm = response.read()
    assert len(pcm) % 2 == 0
    samples = np.frombuffer(pcm, "<i2")
    assert abs(samples.size - audio.size) < rate  # same text, same voice: about the same length


def test_models_health_and_metrics(server, client):
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert ids == ["piper:en_US-joe-medium"]
    health = httpx.get(f"{server.url}/health").json()  # no key needed
    assert health["status"] == "ok" and health["profile"] == "cpu" and health["queue_depth"] == 0
    text = httpx.get(f"{server.url}/metrics").text  # no key needed
    for name in ("edge_runtime_request_latency_seconds_bucket", "edge_runtime_time_to_first_audio_seconds_count",
                 "edge_runtime_real_time_factor_count", "edge_runtime_queue_depth", "edge_runtime_batch_size_count",
                 "edge_runtime_voice_cache_hits_total", "edge_runtime_voice_cache_misses_total",
                 "edge_runtime_voice_cache_evictions_total", "edge_runtime_voice_cache_bytes",
                 "edge_runtime_memory_rss_bytes", "edge_runtime_max_batch", "edge_runtime_http_requests_total"):
        assert name in text, name
    assert metric_value(text, "edge_runtime_max_batch") == 1
    assert metric_value(text, "edge_runtime_http_requests_total", route="/v1/audio/speech", status="200") >= 1


BAD_REQUESTS = [
    ({"input": ""}, 400, "input"),
    ({"input": "   \n "}, 400, "input"),
    ({"input": "word " * 1000}, 400, "input"),  # 5000 characters; the cpu profile allows 4000
    ({"voice": "bob"}, 400, "voice"),
    ({"voice": "ab" * 32}, 400, "voice"),  # a well-formed id nobody uploaded
    ({"voice": {"id": "not-a-voice"}}, 400, "voice"),
    ({"voice": {"id": 5}}, 400, "voice"),
    ({"model": "whisper-1"}, 404, "model"),
    ({"response_format": "ogg"}, 400, "response_format"),  # aac is served now
    ({"response_format": "xyz"}, 400, "response_format"),
    ({"speed": 0.1}, 400, "speed"),
    ({"speed": 4.5}, 400, "speed"),
    ({"speed": "fast"}, 400, "speed"),
    ({"stream_format": "websocket"}, 400, "stream_format"),  # sse is served now
    ({"input": None}, 400, "input"),
    ({"seed": -1}, 400, "seed"),
    ({"seed": "lucky"}, 400, "seed"),
]


@pytest.mark.parametrize("change, status, param", BAD_REQUESTS, ids=[str(c)[:40] for c, _, _ in BAD_REQUESTS])
def test_bad_speech_requests_are_4xx_with_clear_messages(server, change, status, param):
    body = {"model": "tts-1", "input": "Hello.", "voice": "alloy", **change}
    response = post_speech(server, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error" and len(error["message"]) > 10


def test_missing_field_and_malformed_json(server):
    response = post_speech(server, {"model": "tts-1", "voice": "alloy"})
    assert response.status_code == 400
    assert "input" in response.json()["error"]["message"]
    for raw in (b'{"model": "tts-1", "input": "Hi', b"not json at all", b"[1, 2"):
        response = httpx.post(f"{server.url}/v1/audio/speech", content=raw, timeout=30,
                              headers={**AUTH, "Content-Type": "application/json"})
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "invalid_json" and "malformed JSON" in error["message"]
    for raw in (b"[1, 2]", b'"text"'):
        response = httpx.post(f"{server.url}/v1/audio/speech", content=raw, timeout=30,
                              headers={**AUTH, "Content-Type": "application/json"})
        assert response.status_code == 400 and "JSON object" in response.json()["error"]["message"]


def test_oversized_json_body_is_413(server):
    response = post_speech(server, {"model": "tts-1", "voice": "alloy", "input": "x" * (2 * 1024 * 1024)})
    assert response.status_code == 413
    assert "limit" in response.json()["error"]["message"]

    def chunked():  # no Content-Length: counted while it arrives
        yield b'{"model": "tts-1", "voice": "alloy", "input": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}'

    response = httpx.post(f"{server.url}/v1/audio/speech", content=chunked(), timeout=60,
                          headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"


def test_api_key_required(server):
    body = {"model": "tts-1", "input": "Hello.", "voice": "alloy"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"},
                    {"Authorization": f"Bearer {API_KEY}x"}):
        response = httpx.post(f"{server.url}/v1/audio/speech", json=body, headers=headers, timeout=30)
        assert response.status_code == 401
        error = response.json()["error"]
        assert error["code"] == "invalid_api_key" and "key" in error["message"].lower()
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    # unauthenticated garbage is refused before the body is parsed
    response = httpx.post(f"{server.url}/v1/audio/speech", content=b"{bad", timeout=30)
    assert response.status_code == 401
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.audio.speech.create(model="tts-1", voice="alloy", input="Hello.")


def test_unknown_route_and_method(server):
    response = httpx.get(f"{server.url}/v1/nothing", headers=AUTH)
    assert response.status_code == 404 and "no such endpoint" in response.json()["error"]["message"]
    response = httpx.get(f"{server.url}/v1/audio/speech", headers=AUTH)
    assert response.status_code == 405 and "error" in response.json()


def test_server_healthy_after_bad_input(server, client):
    response = client.audio.speech.create(model="tts-1", voice="alloy", input="Still here.", response_format="wav")
    audio, _ = decode(response.content)
    assert audio.size > 0
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_a_draining_server_tells_probes_when_to_retry(server):
    """While shutting down /health is 503 with Retry-After, so a balancer takes the server out."""
    state = server.server.config.app.state
    state.draining = True
    try:
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503 and health.headers["Retry-After"] == "5"
        assert health.json()["status"] == "draining"
    finally:
        state.draining = False
    assert httpx.get(f"{server.url}/health").status_code == 200

"""Word timestamps over HTTP (`word_timestamps: true`): a JSON answer with the audio and its words, the
same words as a speech.audio.timestamps event on SSE, offsets into the original input, and a clear 400
for a model without an alignment."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from openai._streaming import SSEDecoder  # noqa: E402 - the openai package's own SSE parser

import edge_runtime  # noqa: E402
from server_support import API_KEY, ServerThread, start  # noqa: E402

AUTH = {"Authorization": f"Bearer {API_KEY}"}
TEXT = "Dr. Smith paid $5 for the tea. It was 5°C outside!"


@pytest.fixture(scope="module")
def server():
    from edge_runtime.serving.server import ServerSettings

    with start(ServerSettings(api_key=API_KEY, warm_up=False)) as running:
        yield running


def post(url: str, **change) -> httpx.Response:
    body = {"model": "tts-1", "voice": "alloy", "input": TEXT, "seed": 3, "word_timestamps": True,
            "response_format": "wav", **change}
    return httpx.post(f"{url}/v1/audio/speech", json=body, headers=AUTH, timeout=120)


def test_json_answer_carries_audio_and_words_into_the_original_text(server):
    response = post(server.url)
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/json")
    answer = response.json()
    audio, rate = sf.read(io.BytesIO(base64.b64decode(answer["audio"])), dtype="float32")
    assert rate == answer["sample_rate"] == 22050 and answer["format"] == "wav"
    assert abs(len(audio) / rate - answer["duration_s"]) < 1e-3
    words = answer["words"]
    assert len(words) >= 8
    starts = [w["start"] for w in words]
    assert starts == sorted(starts) and all(0 <= w["start"] < w["end"] <= answer["duration_s"] + 1e-3 for w in words)
    spans = {TEXT[w["start_char"]:w["end_char"]] for w in words}
    assert {"Smith", "$5", "tea", "5°C", "outside"} <= spans  # "$5" spoken as "five dollars" spans "$5"
    assert any(w["word"] != TEXT[w["start_char"]:w["end_char"]] for w in words)  # normalised words
    # the same audio as the plain path with the same seed
    plain = httpx.post(f"{server.url}/v1/audio/speech", headers=AUTH, timeout=120,
                       json={"model": "tts-1", "voice": "alloy", "input": TEXT, "seed": 3, "response_format": "flac"})
    assert np.allclose(sf.read(io.BytesIO(plain.content), dtype="float32")[0], audio, atol=1 / 32768)


def test_sse_sends_a_timestamps_event_before_done(server):
    json_words = post(server.url).json()["words"]
    with httpx.stream("POST", f"{server.url}/v1/audio/speech", headers=AUTH, timeout=120,
                      json={"model": "tts-1", "voice": "alloy", "input": TEXT, "seed": 3, "word_timestamps": True,
                            "response_format": "mp3", "stream_format": "sse"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [e.json() for e in SSEDecoder().iter_bytes(response.iter_bytes())]
    kinds = [e["type"] for e in events]
    assert kinds[-2:] == ["speech.audio.timestamps", "speech.audio.done"]
    assert set(kinds[:-2]) == {"speech.audio.delta"}
    assert events[-2]["words"] == json_words
    assert len(b"".join(base64.b64decode(e["audio"]) for e in events[:-2])) > 1000


def test_a_model_without_alignment_gets_a_clear_400(tmp_path):
    from family_toy import build_toy

    from edge_runtime.serving.server import ServerSettings, create_app

    rt = edge_runtime.load(str(build_toy(tmp_path / "toy")), profile="cpu", overrides=("runtime.threads=1",))
    try:
        with ServerThread(create_app(rt, ServerSettings(warm_up=False))) as running:
            response = httpx.post(f"{running.url}/v1/audio/speech", timeout=120,
                                  json={"model": rt.model.model_id, "voice": "alloy", "input": "Hello there.",
                                        "word_timestamps": True})
    finally:
        rt.close()
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "word_timestamps" and "word timings" in error["message"]

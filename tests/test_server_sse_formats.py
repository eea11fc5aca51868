"""OpenAI SSE streaming, every response format (aac included) streamed and decodable, mp3/opus/aac
sent frame by frame while synthesis is still running, and streamed WAV headers that tell the truth."""

from __future__ import annotations

import base64
import io
import math
import struct
import threading
import wave

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
av = pytest.importorskip("av")

from openai._streaming import SSEDecoder  # noqa: E402 - the openai package's own SSE parser

from edge_runtime.runtime import audio, audio_stream  # noqa: E402
from server_support import API_KEY, shared_runtime, start  # noqa: E402

AUTH = {"Authorization": f"Bearer {API_KEY}"}
RATE = 22050
TEXT = "First sentence streams at once. The second one follows it, a little longer. And a third."
ENCODED = ("mp3", "opus", "aac")


class _NoLengthModel:
    """The served model, minus its up-front length: what every other family looks like."""

    def __init__(self, model) -> None:
        self._model = model

    def __getattr__(self, name):
        if name == "predict_samples":
            raise AttributeError(name)
        return getattr(self._model, name)


class GatedRuntime:
    """The shared runtime, counting the chunks its stream produces and (when `hold_after` is set)
    stopping after that many until the test releases it: synthesis is provably unfinished while
    the client reads the first bytes."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.model = _NoLengthModel(inner.model)
        self.reset(None)

    def reset(self, hold_after: int | None) -> None:
        self.produced = 0
        self.hold_after = hold_after
        self.release = threading.Event()
        self.released_in_time = True
        if hold_after is None:
            self.release.set()

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def stream(self, text, **settings):
        for chunk in self._inner.stream(text, **settings):
            self.produced += 1
            yield chunk
            if self.produced == self.hold_after:
                self.released_in_time = self.release.wait(60)


@pytest.fixture(scope="module")
def server():
    from edge_runtime.serving.server import ServerSettings

    with start(ServerSettings(api_key=API_KEY, warm_up=False)) as running:
        yield running


@pytest.fixture(scope="module")
def gated():
    from edge_runtime.serving.server import ServerSettings

    runtime = GatedRuntime(shared_runtime())
    with start(ServerSettings(api_key=API_KEY, warm_up=False), runtime=runtime) as running:
        running.runtime = runtime
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def body(**change):
    return {"model": "tts-1", "voice": "alloy", "input": TEXT, "seed": 7, **change}


@pytest.fixture(scope="module")
def reference_pcm(server) -> bytes:
    """The raw audio path's PCM for TEXT with seed 7: what every other path must carry."""
    response = httpx.post(f"{server.url}/v1/audio/speech", json=body(response_format="pcm"), headers=AUTH,
                          timeout=120)
    assert response.status_code == 200 and response.headers["content-type"] == "audio/pcm"
    return response.content


def sse_events(chunks) -> list[dict]:
    return [event.json() for event in SSEDecoder().iter_bytes(iter(chunks))]


def check_done(events: list[dict], audio_samples: int) -> None:
    done = events[-1]
    assert done["type"] == "speech.audio.done"
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    usage = done["usage"]
    assert usage["input_tokens"] == len(TEXT)  # characters
    assert usage["output_tokens"] == math.ceil(audio_samples * 50 / RATE)  # 20 ms audio frames
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_openai_client_sse_carries_the_same_pcm(client, reference_pcm):
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input=TEXT, response_format="pcm", stream_format="sse",
            extra_body={"seed": 7}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.iter_bytes())
    deltas = [base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta"]
    assert len(deltas) > 3  # three sentences, several chunks: streamed, not one blob
    assert b"".join(deltas) == reference_pcm  # same seed: identical samples
    check_done(events, len(reference_pcm) // 2)


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav"])
@pytest.mark.parametrize("stream_format", ["audio", "sse"])
def test_every_format_decodes_to_the_right_duration(server, reference_pcm, fmt, stream_format):
    response = httpx.post(f"{server.url}/v1/audio/speech", json=body(response_format=fmt,
                                                                     stream_format=stream_format),
                          headers=AUTH, timeout=120)
    assert response.status_code == 200, response.text
    if stream_format == "sse":
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events([response.content])
        check_done(events, len(reference_pcm) // 2)
        data = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    else:
        assert response.headers["content-type"] == audio.MEDIA_TYPES[fmt]
        data = response.content
    samples, rate = audio_stream.decode(data)  # PyAV: FFmpeg's own demuxers and decoders
    expected_s = len(reference_pcm) / 2 / RATE
    assert rate == {"opus": 48000}.get(fmt, RATE)  # Opus decodes at 48 kHz (encoded at 24)
    assert abs(samples.size / rate - expected_s) < 0.1, (samples.size / rate, expected_s)
    assert np.sqrt(np.mean(samples ** 2)) > 0.01  # speech, not silence


@pytest.mark.parametrize("fmt, stream_format", [("mp3", "audio"), ("opus", "audio"), ("aac", "audio"),
                                                ("aac", "sse")])
def test_encoded_audio_arrives_before_synthesis_ends(gated, fmt, stream_format):
    """The engine stops after its first chunk until the client has decodable audio in hand: a
    server that encodes only the finished utterance never gets there (the gate times out)."""
    runtime = gated.runtime
    runtime.reset(hold_after=1)
    received, produced_at_first_audio = b"", None
    with httpx.stream("POST", f"{gated.url}/v1/audio/speech", headers=AUTH, timeout=120,
                      json=body(response_format=fmt, stream_format=stream_format)) as response:
        assert response.status_code == 200
        pieces = response.iter_bytes() if stream_format == "audio" else (
            base64.b64decode(e.json()["audio"]) for e in SSEDecoder().iter_bytes(response.iter_bytes())
            if e.json()["type"] == "speech.audio.delta")
        for piece in pieces:
            received += piece
            if produced_at_first_audio is None:
                try:
                    decoded, _ = audio_stream.decode(received)
                except Exception:  # noqa: BLE001 - not a whole frame yet
                    continue
                if decoded.size:
                    produced_at_first_audio = runtime.produced
                    runtime.release.set()
    assert runtime.released_in_time
    assert produced_at_first_audio == 1
    assert runtime.produced >= 4  # three sentences: the rest came after the first audio left
    decoded, rate = audio_stream.decode(received)
    assert decoded.size / rate > 3.0


def test_client_leaving_mid_stream_leaves_the_server_healthy(gated):
    runtime = gated.runtime
    runtime.reset(hold_after=2)
    with httpx.stream("POST", f"{gated.url}/v1/audio/speech", headers=AUTH, timeout=120,
                      json=body(response_format="mp3")) as response:
        assert response.status_code == 200 and next(response.iter_bytes())
    runtime.release.set()  # the client is gone; the worker stops at its next chunk
    runtime.reset(None)
    response = httpx.post(f"{gated.url}/v1/audio/speech", json=body(response_format="aac", input="Still here."),
                          headers=AUTH, timeout=120)
    assert response.status_code == 200
    samples, _ = audio_stream.decode(response.content)
    assert samples.size > 0


def _wav_sizes(data: bytes) -> tuple[int, int]:
    return struct.unpack("<I", data[4:8])[0], struct.unpack("<I", data[40:44])[0]


@pytest.mark.parametrize("seed", [7, None])
def test_streamed_piper_wav_header_carries_the_true_length(server, seed):
    chunks = []
    request = body(response_format="wav", stream_format="audio", seed=seed)
    with httpx.stream("POST", f"{server.url}/v1/audio/speech", json=request, headers=AUTH, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
        chunks = list(r.iter_bytes())
    data = b"".join(chunks)
    assert len(chunks) > 2  # streamed
    riff, size = _wav_sizes(data)
    assert size == len(data) - 44 and riff == len(data) - 8
    with wave.open(io.BytesIO(data)) as strict:  # reads the header's sizes, as strict readers do
        assert strict.getframerate() == RATE
        assert strict.getnframes() == (len(data) - 44) // 2
        assert strict.getnframes() / RATE > 3.0


def test_wav_without_a_known_length_says_open_length(gated):
    gated.runtime.reset(None)
    response = httpx.post(f"{gated.url}/v1/audio/speech", json=body(response_format="wav"), headers=AUTH,
                          timeout=120)
    assert response.status_code == 200
    assert _wav_sizes(response.content) == (0xFFFFFFFF, 0xFFFFFFFF)
    samples, rate = audio_stream.decode(response.content)  # FFmpeg reads it to the end of the data
    assert rate == RATE and samples.size == (len(response.content) - 44) // 2


def test_wav_header_sizes():
    assert _wav_sizes(audio.wav_stream_header(RATE)) == (0xFFFFFFFF, 0xFFFFFFFF)
    header = audio.wav_stream_header(RATE, samples=1000)
    assert len(header) == 44 and _wav_sizes(header) == (2036, 2000)
    with wave.open(io.BytesIO(header + b"\0" * 2000)) as strict:
        assert strict.getnframes() == 1000


def test_aac_file_from_python():
    tone = (0.3 * np.sin(2 * np.pi * 200 * np.arange(RATE) / RATE)).astype(np.float32)
    data = audio.encode(tone, RATE, "aac")
    assert data[:2] in (b"\xff\xf1", b"\xff\xf9")  # an ADTS sync word: the stream starts with a frame
    samples, rate = audio_stream.decode(data)
    assert rate == RATE and abs(samples.size / rate - 1.0) < 0.1


@pytest.mark.parametrize("change, param, allowed", [
    ({"stream_format": "websocket"}, "stream_format", "audio, sse"),
    ({"response_format": "ogg"}, "response_format", "aac"),
])
def test_bad_stream_or_response_format_names_the_field(server, change, param, allowed):
    response = httpx.post(f"{server.url}/v1/audio/speech", json=body(**change), headers=AUTH, timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and allowed in error["message"] and repr(next(iter(change.values()))) in \
        error["message"]

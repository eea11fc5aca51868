"""Voice prompts over HTTP: upload -> id -> speak with it -> list -> delete -> gone; and every
kind of bad upload answered with a 4xx and a clear message, the server healthy after."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from server_support import decode, speech_prompt, start, wav_bytes  # noqa: E402

MAX_UPLOAD = 512 * 1024


@pytest.fixture(scope="module")
def server():
    from edge_runtime.serving.server import ServerSettings

    with start(ServerSettings(max_upload_bytes=MAX_UPLOAD, warm_up=False)) as running:
        yield running


def upload(server, data: bytes, content_type: str = "audio/wav", transcript: str | None = None,
           filename: str = "prompt.wav") -> httpx.Response:
    form = {"transcript": transcript} if transcript is not None else None
    return httpx.post(f"{server.url}/v1/voices", files={"file": (filename, data, content_type)}, data=form,
                      timeout=120)


def test_voice_lifecycle(server):
    prompt = speech_prompt()
    first = upload(server, prompt, transcript="This is my voice, recorded for the test.")
    assert first.status_code == 201, first.text
    card = first.json()
    voice_id = card["id"]
    assert len(voice_id) == 64 and int(voice_id, 16) >= 0  # a content hash, not a name or a path
    assert card["type"] == "uploaded" and card["transcript"].startswith("This is my voice")
    again = upload(server, prompt, transcript="This is my voice, recorded for the test.")
    assert again.status_code == 200 and again.json()["id"] == voice_id  # same content, same id

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    spoken = client.audio.speech.create(model="tts-1", voice=voice_id, input="Speaking in the uploaded voice.",
                                        response_format="flac")
    audio, rate = decode(spoken.content)
    assert rate == 22050 and audio.size > 0
    as_object = httpx.post(f"{server.url}/v1/audio/speech", timeout=120,
                           json={"model": "tts-1", "voice": {"id": voice_id}, "input": "Object form.",
                                 "response_format": "wav"})
    assert as_object.status_code == 200 and decode(as_object.content)[0].size > 0

    listed = httpx.get(f"{server.url}/v1/voices").json()["data"]
    assert voice_id in [v["id"] for v in listed if v["type"] == "uploaded"]
    assert "alloy" in [v["id"] for v in listed if v["type"] == "builtin"]

    deleted = httpx.delete(f"{server.url}/v1/voices/{voice_id}")
    assert deleted.status_code == 200 and deleted.json() == {"id": voice_id, "object": "voice", "deleted": True}
    assert httpx.delete(f"{server.url}/v1/voices/{voice_id}").status_code == 404
    assert voice_id not in [v["id"] for v in httpx.get(f"{server.url}/v1/voices").json()["data"]]
    gone = httpx.post(f"{server.url}/v1/audio/speech", timeout=60,
                      json={"model": "tts-1", "voice": voice_id, "input": "Gone?"})
    assert gone.status_code == 400 and gone.json()["error"]["param"] == "voice"


def test_delete_rejects_paths_and_unknown_ids(server):
    traversal = httpx.delete(f"{server.url}/v1/voices/..%2F..%2Fetc%2Fpasswd")
    assert traversal.status_code == 404 and "error" in traversal.json()
    for bad in ("not-hex", "ab" * 40, "AB" * 32, "x.safetensors"):
        response = httpx.delete(f"{server.url}/v1/voices/{bad}")
        assert response.status_code == 404, bad
        assert response.json()["error"]["code"] == "voice_not_found"


def _nan_wav() -> bytes:
    audio = np.full(22050, np.nan, dtype=np.float32)
    return wav_bytes(audio, 22050, subtype="FLOAT")


def _long_wav() -> bytes:  # 25 s of noise at 8 kHz: under the byte limit, over the 20 s limit
    rng = np.random.default_rng(0)
    return wav_bytes((rng.standard_normal(8000 * 25) * 0.1).astype(np.float32), 8000)


def _large_wav() -> bytes:  # over MAX_UPLOAD bytes
    return wav_bytes(np.zeros(MAX_UPLOAD, dtype=np.float32), 22050)


BAD_UPLOADS = [
    ("empty", lambda: b"", "audio/wav", 400, "empty_file"),
    ("corrupt", lambda: b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x07" * 200, "audio/wav", 400, "corrupt_audio"),
    ("truncated", lambda: speech_prompt()[:30], "audio/wav", 400, "corrupt_audio"),
    ("text as text", lambda: b"hello, I am not audio", "text/plain", 415, "unsupported_media_type"),
    ("png as octet-stream", lambda: b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "application/octet-stream", 415,
     "unsupported_media_type"),
    ("text as audio", lambda: b"definitely not a wav file at all", "audio/wav", 415, "unsupported_media_type"),
    ("nan-filled", _nan_wav, "audio/wav", 422, "unusable_audio"),
    ("silent", lambda: wav_bytes(np.zeros(22050, dtype=np.float32), 22050), "audio/wav", 422, "unusable_audio"),
    ("too long", _long_wav, "audio/wav", 422, "unusable_audio"),
    ("too large", _large_wav, "audio/wav", 413, "body_too_large"),
]


@pytest.mark.parametrize("name, make, content_type, status, code", BAD_UPLOADS, ids=[b[0] for b in BAD_UPLOADS])
def test_bad_uploads(server, name, make, content_type, status, code):
    response = upload(server, make(), content_type)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and len(error["message"]) > 10


def test_upload_without_file_and_server_healthy_after(server):
    response = httpx.post(f"{server.url}/v1/voices", data={"transcript": "no file"}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "file"
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    ok = upload(server, speech_prompt(), filename="again.wav", content_type="application/octet-stream")
    assert ok.status_code in (200, 201) and len(ok.json()["id"]) == 64

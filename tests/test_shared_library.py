"""Two plain `edge-runtime serve` processes sharing one voice library, as N servers behind a
layer-7 balancer that hashes on X-Voice-Id: a voice uploaded to one is usable on the other,
concurrent uploads of one clip leave one intact entry, a truncated entry is rebuilt."""

from __future__ import annotations

import threading

import httpx
import pytest

from edge_runtime.runtime.voices import VoiceLibrary
from family_toy import build_toy
from replica_support import ServerProcess, tone_wav

TEXT = "Hello there."


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    toy = build_toy(tmp_path_factory.mktemp("toy") / "toy")
    library = tmp_path_factory.mktemp("shared_library")
    args = ("--voice-library", str(library), "--set", "voice_cache.library_recheck_s=0")
    procs = [ServerProcess(toy, *args) for _ in range(2)]  # both start at once
    try:
        yield [p.start().url for p in procs], library
    finally:
        for p in procs:
            p.stop()


def upload(url: str, data: bytes) -> httpx.Response:
    return httpx.post(f"{url}/v1/voices", files={"file": ("me.wav", data, "audio/wav")}, timeout=60)


def speak(url: str, voice_id: str, header: bool = True) -> httpx.Response:
    body = {"model": "tts-1", "input": TEXT, "voice": "alloy" if header else voice_id, "response_format": "wav"}
    return httpx.post(f"{url}/v1/audio/speech", json=body, headers={"X-Voice-Id": voice_id} if header else {},
                      timeout=60)


def test_a_voice_uploaded_to_one_server_speaks_on_the_other(servers):
    (a, b), library = servers
    made = upload(a, tone_wav(1))
    assert made.status_code == 201, made.text
    voice_id = made.json()["id"]
    on_b = speak(b, voice_id)  # the balancer's header; the body keeps an OpenAI voice name
    on_a = speak(a, voice_id, header=False)
    assert on_b.status_code == 200 and on_a.status_code == 200, (on_b.text, on_a.text)
    assert on_b.content == on_a.content  # the same prepared voice on both
    plain = httpx.post(f"{b}/v1/audio/speech", json={"model": "tts-1", "input": TEXT, "voice": "alloy",
                                                     "response_format": "wav"}, timeout=60)
    assert plain.content != on_b.content  # the header's voice was used
    assert voice_id in [v["id"] for v in httpx.get(f"{b}/v1/voices").json()["data"]]
    clash = speak(b, voice_id[::-1])
    assert clash.status_code == 400 and "unknown voice id" in clash.json()["error"]["message"]
    both = httpx.post(f"{b}/v1/audio/speech", headers={"X-Voice-Id": voice_id},
                      json={"model": "tts-1", "input": TEXT, "voice": "f" * 64}, timeout=60)
    assert both.status_code == 400 and both.json()["error"]["code"] == "conflicting_voice"


def test_concurrent_uploads_of_one_clip_leave_one_intact_entry(servers):
    (a, b), library = servers
    data, answers = tone_wav(2), []
    start = threading.Barrier(6)

    def send(url: str) -> None:
        start.wait()
        answers.append(upload(url, data))

    threads = [threading.Thread(target=send, args=(url,)) for url in (a, b) * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(r.status_code for r in answers)[-1] <= 201 and len(answers) == 6, [r.text for r in answers]
    ids = {r.json()["id"] for r in answers}
    assert len(ids) == 1
    voice_id = ids.pop()
    assert sorted(p.name for p in library.iterdir() if voice_id in p.name or p.name.startswith(".")) == \
        [f"{voice_id}.safetensors", f"{voice_id}.source.safetensors"]  # one entry, no temporary files
    shared = VoiceLibrary(library)
    shared.load(voice_id), shared.load_source(voice_id)  # both whole: their checksums hold
    assert speak(a, voice_id).status_code == 200 and speak(b, voice_id).status_code == 200


def test_a_truncated_entry_is_rebuilt_not_served(servers):
    (a, b), library = servers
    made = upload(a, tone_wav(3))
    voice_id = made.json()["id"]
    reference = speak(a, voice_id).content
    entry = library / f"{voice_id}.safetensors"
    entry.write_bytes(entry.read_bytes()[:-100])  # a partial copy, as after a crashed rsync
    rebuilt = speak(b, voice_id)  # b never cached it: it reads the damaged entry
    assert rebuilt.status_code == 200, rebuilt.text
    assert rebuilt.content == reference  # prepared again from the source, identically
    VoiceLibrary(library).load(voice_id)  # whole again on the shared storage
    assert "edge_runtime_voice_library_rebuilds_total 1.0" in httpx.get(f"{b}/metrics").text


def test_a_voice_deleted_on_one_server_is_gone_on_the_other(servers):
    (a, b), library = servers
    voice_id = upload(a, tone_wav(4)).json()["id"]
    assert speak(b, voice_id).status_code == 200  # now cached on b
    assert httpx.delete(f"{a}/v1/voices/{voice_id}").status_code == 200
    gone = speak(b, voice_id)
    assert gone.status_code == 400 and "unknown voice id" in gone.json()["error"]["message"]
    assert not list(library.glob(f"{voice_id}*"))

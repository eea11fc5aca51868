"""`edge-runtime serve --replicas 2` on a local Ray cluster, black-box through the CLI: both replicas
serve, requests for a voice find the replica holding it, a killed replica costs at most the
requests on it, and SIGTERM lets in-flight requests finish. One Ray start for the whole module
(the tests run in file order; the last one stops the server)."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install 'edge-runtime[ray]')")
httpx = pytest.importorskip("httpx")

from family_toy import build_toy  # noqa: E402
from replica_support import ServerProcess, cache_counts, upload_voices  # noqa: E402

VOICES = 8  # twice what one replica's voice cache holds (voice_cache.max_entries=4)
SHORT = "Hi."
LONG = "Hello there. " * 60  # ~0.3 s of toy synthesis: still running when SIGTERM arrives


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    srv = ServerProcess(build_toy(root / "toy"), "--replicas", "2", "--set", "voice_cache.max_entries=4",
                        "--set", "replicas.num_cpus=0.5", "--voice-library", str(root / "library"),
                        "--shutdown-timeout", "20").start(90)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def speak(client, text: str = SHORT, voice: str = "alloy", **extra) -> httpx.Response:
    return client.post("/v1/audio/speech", json={"model": "tts-1", "input": text, "voice": voice,
                                                 "response_format": "pcm", **extra})


def replicas_seen(client, tries: int = 40) -> dict[str, int]:
    """replica id -> pid, from /health answers (Ray picks a replica at random when all are idle)."""
    seen = {}
    for _ in range(tries):
        answer = client.get("/health")
        if answer.status_code == 200:
            body = answer.json()
            assert answer.headers["x-replica"] == body["replica"]["id"]
            seen[body["replica"]["id"]] = body["replica"]["pid"]
        if len(seen) == 2:
            break
    return seen


def replica_processes() -> set[int]:
    """pids of the model replicas' processes (Ray titles them ray::ServeReplica:<app>:ModelReplica)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"ServeReplica:edge_runtime:ModelReplica" in (entry / "cmdline").read_bytes():
                pids.add(int(entry.name))
        except OSError:
            pass
    return pids


def test_both_replicas_serve(server, client):
    assert "replicas: 2 on Ray Serve" in server.text
    seen = replicas_seen(client)
    assert len(seen) == 2 and len(set(seen.values())) == 2, seen
    served = {speak(client).headers["x-replica"] for _ in range(12)}
    assert served <= set(seen) and served, served
    answer = client.post("/v1/audio/speech", content=b"{", headers={"content-type": "application/json"})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_json"  # the replica's errors


def test_voices_stay_with_their_replica(client):
    ids = upload_voices(client, VOICES)
    assert len(set(ids)) == VOICES
    for voice in ids:  # warm-up pass: each voice finds its replica, which prepares it once
        assert speak(client, voice=voice).status_code == 200
    time.sleep(1.5)  # replicas push their figures every second
    before = cache_counts(client)
    for voice in ids * 2:
        assert speak(client, voice=voice).status_code == 200
    for voice in ids:  # the header routes too (and as an object, the OpenAI custom-voice form)
        answer = client.post("/v1/audio/speech", headers={"X-Voice-Id": voice},
                             json={"model": "tts-1", "input": SHORT, "voice": {"id": voice}, "response_format": "pcm"})
        assert answer.status_code == 200
    with ThreadPoolExecutor(4) as pool:  # and under concurrency
        assert all(r.status_code == 200 for r in pool.map(lambda v: speak(client, voice=v), ids * 2))
    time.sleep(1.5)
    after = cache_counts(client)
    assert after["replicas"] == 2
    hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
    assert hits + misses >= 4 * VOICES
    assert hits / (hits + misses) >= 0.95, (hits, misses)


def test_a_killed_replica_costs_only_its_requests(client):
    victim = next(iter(replicas_seen(client).values()))
    results: list[tuple[float, int, str | None]] = []  # (start, status or 0 when the connection broke, Retry-After)
    stop = threading.Event()
    killed_at: list[float] = []

    def load() -> None:
        with httpx.Client(base_url=str(client.base_url), timeout=30) as own:
            while not stop.is_set():
                start = time.monotonic()
                try:
                    answer = speak(own, "Hello there, again.")
                    results.append((start, answer.status_code, answer.headers.get("retry-after")))
                except httpx.HTTPError:
                    results.append((start, 0, None))

    workers = [threading.Thread(target=load) for _ in range(3)]
    for w in workers:
        w.start()
    time.sleep(0.5)
    os.kill(victim, signal.SIGKILL)
    killed_at.append(time.monotonic())
    recovered = replaced = False
    pids: set[int] = set()
    deadline = killed_at[0] + 20
    while time.monotonic() < deadline and not (recovered and replaced):
        # recovered: every worker has had several answers since the kill, the last ones all 200
        after = [r for r in results if r[0] > killed_at[0] + 0.5]
        recovered = len(after) >= 30 and all(status == 200 for _, status, _ in after[-15:])
        if not replaced:  # Ray starts a replica in place of the killed one (its start-up is Ray's business)
            pids = replica_processes()
            replaced = len(pids) == 2 and victim not in pids
        time.sleep(0.2)
    stop.set()
    for w in workers:
        w.join(30)
    assert replaced, pids
    failed = [r for r in results if r[1] != 200]
    assert len(failed) <= len(workers), failed  # at most the requests in flight on the victim
    for start, status, retry_after in failed:
        assert status in (0, 503) and (status == 0 or retry_after), (status, retry_after)
        assert start - killed_at[0] <= 10
    assert [r[1] for r in results if r[0] > killed_at[0] + 0.5][-10:] == [200] * 10


def test_sigterm_lets_in_flight_requests_finish(server, client):
    expected = len(speak(client, LONG).content)
    url = f"{server.url}/v1/audio/speech"
    body = {"model": "tts-1", "input": LONG, "voice": "alloy", "response_format": "pcm"}
    started = threading.Barrier(5)
    sizes: list[tuple[int, int]] = []

    def one() -> None:
        with httpx.Client(timeout=60) as own, own.stream("POST", url, json=body) as answer:
            chunks = answer.iter_bytes()
            first = next(chunks, b"")
            started.wait(30)  # every request is being answered before SIGTERM is sent
            sizes.append((answer.status_code, len(first) + sum(len(c) for c in chunks)))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    started.wait(30)
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    assert sizes == [(200, expected)] * 4, sizes
    assert server.proc.wait(60) == 0, server.text[-3000:]
    time.sleep(0.2)
    assert "stopped (SIGTERM): in-flight requests finished" in server.text, server.text[-3000:]

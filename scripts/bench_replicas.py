#!/usr/bin/env python
"""What the Ray Serve path costs per request, and what voice affinity buys, in one run.

    python scripts/bench_replicas.py [--requests 200] [--out bench_results/replicas.json]

The model is the test tree's toy voice-cloning family (tests/family_toy.py: milliseconds per
request, so the serving path is what is measured), profile cpu, runtime.threads=1.
  overhead     p50 latency of the same tiny request (4 characters, pcm, built-in voice) and of
               GET /health through (a) `edge-runtime serve` (uvicorn, one process) and (b)
               `serve --replicas 2` (Ray Serve's proxy, our ingress, a model replica); (b) - (a).
  affinity     8 uploaded voices, a voice cache of 4 per replica, 2 replicas: the voice-cache hit
               rate over `--requests` requests cycling through the voices at concurrency 1 and 4,
               after one warm-up pass, with replicas.routing voice (Ray's model multiplexing
               keyed on the voice) and default (least loaded), from the merged /metrics.
Prints a table and writes JSON. This runs on whatever machine it is given: it measures the
serving path's overhead and the routing's effect on the cache, and supports no scaling claim.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
TINY = "Hi."
VOICES = 8
CACHE = 4
START_TIMEOUT_S = 180

sys.path.insert(0, str(TESTS))
from replica_support import ServerProcess, cache_counts, upload_voices  # noqa: E402  (the tests' server helper)


def speech(client, voice: str = "alloy") -> None:
    answer = client.post("/v1/audio/speech", json={"model": "tts-1", "input": TINY, "voice": voice,
                                                   "response_format": "pcm"})
    answer.raise_for_status()


def latencies(client, call, rounds: int) -> list[float]:
    for _ in range(10):  # first-use costs are not what is compared
        call(client)
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        call(client)
        out.append(time.perf_counter() - start)
    return out


def overhead_row(name: str, client, rounds: int) -> dict:
    row = {"path": name}
    for what, call in (("speech", speech), ("health", lambda c: c.get("/health").raise_for_status())):
        values = latencies(client, call, rounds)
        row[f"{what}_p50_ms"] = 1e3 * statistics.median(values)
        row[f"{what}_p90_ms"] = 1e3 * sorted(values)[int(0.9 * (len(values) - 1))]
    return row


def hit_rate(client, url: str, ids: list[str], concurrency: int, requests: int) -> dict:
    import httpx

    for voice in ids:  # warm-up pass: every voice prepared once somewhere
        speech(client, voice)
    time.sleep(1.5)  # replicas push their figures every second
    before = cache_counts(client)

    def worker(k: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as own:
            for i in range(k, requests, concurrency):
                speech(own, ids[i % len(ids)])

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    time.sleep(1.5)
    after = cache_counts(client)
    hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
    return {"concurrency": concurrency, "requests": requests, "hits": hits, "misses": misses,
            "hit_rate": hits / (hits + misses) if hits + misses else None}


def main(argv: list[str] | None = None) -> int:
    import httpx

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="requests per hit-rate run (default 200)")
    parser.add_argument("--rounds", type=int, default=200, help="requests per latency figure (default 200)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "replicas.json")
    args = parser.parse_args(argv)
    from family_toy import build_toy

    rows, affinity = [], []
    with tempfile.TemporaryDirectory() as tmp:
        toy, library = build_toy(Path(tmp) / "toy"), Path(tmp) / "library"
        runs = [("direct uvicorn", ()), ("Ray Serve, 2 replicas", ("--replicas", "2")),
                ("Ray Serve, 2 replicas, routing default", ("--replicas", "2", "--set", "replicas.routing=default"))]
        for name, extra in runs:
            ray = bool(extra)
            server = ServerProcess(toy, "--set", f"voice_cache.max_entries={CACHE}", "--voice-library", str(library),
                                   *extra, *(("--set", "replicas.num_cpus=0.5") if ray else ())).start(START_TIMEOUT_S)
            try:
                with httpx.Client(base_url=server.url, timeout=120) as client:
                    if "routing default" not in name:
                        rows.append(overhead_row(name, client, args.rounds))
                    if ray:
                        routing = "default" if "routing default" in name else "voice"
                        ids = upload_voices(client, VOICES)
                        for concurrency in (1, 4):
                            affinity.append({"routing": routing,
                                             **hit_rate(client, server.url, ids, concurrency, args.requests)})
            finally:
                server.stop()
    direct, ray = rows
    overhead = {f"{what}_p50_ms": ray[f"{what}_p50_ms"] - direct[f"{what}_p50_ms"] for what in ("speech", "health")}

    print(f"per-request latency, toy model, {args.rounds} sequential requests each (cpu profile, 1 thread)")
    print(f"{'path':<24} {'speech p50 ms':>14} {'p90 ms':>8} {'health p50 ms':>14} {'p90 ms':>8}")
    for row in rows:
        print(f"{row['path']:<24} {row['speech_p50_ms']:14.1f} {row['speech_p90_ms']:8.1f} "
              f"{row['health_p50_ms']:14.1f} {row['health_p90_ms']:8.1f}")
    print(f"{'overhead (b - a)':<24} {overhead['speech_p50_ms']:14.1f} {'':>8} {overhead['health_p50_ms']:14.1f}")
    print()
    print(f"voice-cache hit rate: {VOICES} voices, cache {CACHE} per replica, 2 replicas, after one warm-up pass")
    print(f"{'routing':<8} {'concurrency':>11} {'requests':>9} {'hits':>6} {'misses':>7} {'hit rate':>9}")
    for row in affinity:
        rate = "-" if row["hit_rate"] is None else f"{100 * row['hit_rate']:.0f}%"
        print(f"{row['routing']:<8} {row['concurrency']:>11} {row['requests']:>9} {row['hits']:>6.0f} "
              f"{row['misses']:>7.0f} {rate:>9}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rounds": args.rounds, "text": TINY, "voices": VOICES, "cache_per_replica": CACHE,
                                    "latency": rows, "overhead": overhead, "affinity": affinity,
                                    "cpu_count": os.cpu_count()}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Time to first audio over HTTP against the in-process stream, side by side in one run.

    python scripts/bench_http_ttfa.py [--rounds 15] [--out bench_results/http_ttfa.json]

One `edge-runtime serve` process (profile cpu, runtime.threads=1, the embedded voice) and one in-process
Runtime with the same profile. Each round measures, in a rotated order, the same text three ways:
  in-process   rt.stream(text): until the first audio chunk is in hand;
  HTTP pcm     POST /v1/audio/speech (response_format pcm): until the first body bytes arrive;
  HTTP sse     the same with stream_format sse: until the first `speech.audio.delta` event arrives.
What the server adds is the median over rounds of (HTTP - in-process) of the same round (the machine's
drift cancels within a round). Prints a table, PASS/FAIL for "the server adds <= 20 ms" (pcm and sse),
and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

TEXT = ("The quick brown fox jumps over the lazy dog near the river bank. "
        "Then it runs back home before the sun goes down.")
LIMIT_MS = 20.0


def in_process(rt) -> float:
    start = time.perf_counter()
    stream = rt.stream(TEXT)
    next(iter(stream))
    elapsed = time.perf_counter() - start
    for _ in stream:  # finish the request: the next round starts from an idle runtime
        pass
    return elapsed


def http_first_bytes(client, url: str, sse: bool) -> float:
    body = {"model": "tts-1", "input": TEXT, "voice": "alloy", "response_format": "pcm"}
    if sse:
        body["stream_format"] = "sse"
    start = time.perf_counter()
    first = None
    with client.stream("POST", f"{url}/v1/audio/speech", json=body, timeout=120) as response:
        response.raise_for_status()
        seen = b""
        for chunk in response.iter_bytes():
            if first is None:
                seen += chunk
                if not sse and chunk:
                    first = time.perf_counter() - start
                elif sse and b"speech.audio.delta" in seen:
                    first = time.perf_counter() - start
    if first is None:
        raise RuntimeError("no audio arrived")
    return first


def main(argv: list[str] | None = None) -> int:
    import httpx

    from bench_batching import Server
    from edge_runtime import load

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "http_ttfa.json")
    args = parser.parse_args(argv)

    server = Server(None, "1")
    rt = load(profile="cpu", overrides=("runtime.threads=1", "runtime.keep_alive_s=0"))
    ways = {"in-process": lambda: in_process(rt),
            "HTTP pcm": lambda: http_first_bytes(client, server.url, sse=False),
            "HTTP sse": lambda: http_first_bytes(client, server.url, sse=True)}
    times: dict[str, list[float]] = {k: [] for k in ways}
    try:
        with httpx.Client() as client:
            for name in ways:  # warm every path once (first-use costs are not what is compared)
                ways[name]()
            names = list(ways)
            for r in range(args.rounds):
                for name in names[r % 3:] + names[: r % 3]:
                    times[name].append(ways[name]())
    finally:
        server.stop()
        rt.close()
    base = times["in-process"]
    rows = []
    for name, values in times.items():
        added = [1e3 * (v - b) for v, b in zip(values, base)]
        rows.append({"path": name, "median_ms": 1e3 * statistics.median(values),
                     "p90_ms": 1e3 * sorted(values)[int(0.9 * (len(values) - 1))],
                     "added_ms": None if name == "in-process" else statistics.median(added)})
    print(f"time to first audio, embedded voice, {args.rounds} rounds, {len(TEXT)} characters")
    print(f"{'path':<12} {'median ms':>10} {'p90 ms':>8} {'server adds (median of pairs) ms':>34}")
    for row in rows:
        added = "-" if row["added_ms"] is None else f"{row['added_ms']:.1f}"
        print(f"{row['path']:<12} {row['median_ms']:10.1f} {row['p90_ms']:8.1f} {added:>34}")
    verdicts = {row["path"]: row["added_ms"] <= LIMIT_MS for row in rows if row["added_ms"] is not None}
    for path, ok in verdicts.items():
        print(f"{'PASS' if ok else 'FAIL'}: {path} adds <= {LIMIT_MS:.0f} ms to the in-process time to first audio")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rounds": args.rounds, "text_chars": len(TEXT), "rows": rows,
                                    "raw_s": times, "pass": verdicts}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(verdicts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

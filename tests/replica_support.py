"""Shared by the multi-server tests and scripts/bench_replicas.py: `edge-runtime serve` processes
(plain or --replicas) of the toy voice-cloning family on free loopback ports, distinct voice clips,
and the voice-cache counters summed over a merged /metrics."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import soundfile as sf

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


class ServerProcess:
    """`python -m edge_runtime serve --model TOY --profile cpu --port 0 --no-warm-up ...` with the toy
    family found through EDGE_RUNTIME_FAMILIES; its output is read on a thread (never a full pipe).
    `start()` waits for the "serving on" line; several may be created first and started together."""

    def __init__(self, toy: Path, *args: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "EDGE_RUNTIME_FAMILIES": "family_toy",
               "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
               "PYTHONPATH": os.pathsep.join(filter(None, (str(TESTS), os.environ.get("PYTHONPATH"))))}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge_runtime", "serve", "--model", str(toy), "--profile", "cpu", "--port", "0",
             "--no-warm-up", "--set", "runtime.threads=1", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
        self.output: list[str] = []
        self.url = ""
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    @property
    def text(self) -> str:
        return "".join(self.output)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            found = re.search(r"serving on (http://127\.0\.0\.1:\d+)", line)
            if found:
                self.url = found.group(1)
                self.ready.set()
        self.ready.set()  # exited

    def start(self, timeout: float = 120) -> ServerProcess:
        if not self.ready.wait(timeout) or not self.url:
            self.stop()
            raise RuntimeError("the server did not start:\n" + self.text[-4000:])
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def tone_wav(index: int, seconds: float = 0.5, rate: int = 16000) -> bytes:
    """A distinct tone per index: a distinct voice prompt."""
    t = np.arange(int(rate * seconds)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * (110 + 37 * index) * t)).astype(np.float32), rate, format="WAV")
    return buf.getvalue()


def upload_voices(client, count: int) -> list[str]:
    """Upload `count` distinct voices; their ids."""
    ids = []
    for i in range(count):
        answer = client.post("/v1/voices", files={"file": (f"v{i}.wav", tone_wav(i), "audio/wav")})
        assert answer.status_code in (200, 201), answer.text
        ids.append(answer.json()["id"])
    return ids


def cache_counts(client) -> dict[str, float]:
    """Voice-cache hits and misses summed over the replicas in /metrics, and how many replicas."""
    from prometheus_client.parser import text_string_to_metric_families

    totals, replicas = {"hits": 0.0, "misses": 0.0}, set()
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for what in totals:
            if family.name == f"edge_runtime_voice_cache_{what}":
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        totals[what] += sample.value
                        replicas.add(sample.labels.get("replica"))
    return {**totals, "replicas": len(replicas)}
